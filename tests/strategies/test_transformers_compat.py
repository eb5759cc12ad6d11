"""The transformers compatibility layer: each branch against a model that uses that release's names."""

from __future__ import annotations

import inspect

import torch
from conftest import tiny_llama
from torch import nn

from lightning_peft.strategies.prompt import PrefixTuning
from lightning_peft.strategies.transformers_compat import (
    CACHE_ARGUMENTS,
    cache_argument,
    call_cache,
    disable_checkpointing,
    enable_checkpointing,
    is_checkpointing,
    new_cache,
)


class OldNames(nn.Module):
    """A causal LM whose forward names its cache ``past_key_values``, as transformers < 5.25 did."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_llama()
        self.config = self.inner.config
        self.seen: list[str] = []

    def get_input_embeddings(self) -> nn.Module:
        return self.inner.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, position_ids=None):
        self.seen.append("past_key_values" if past_key_values is not None else "none")
        name = cache_argument(self.inner)
        return self.inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{name: past_key_values},
        )


def test_cache_argument_is_the_name_in_the_installed_models_signature():
    name = cache_argument(tiny_llama())
    assert name in CACHE_ARGUMENTS
    assert name in inspect.signature(tiny_llama().forward).parameters
    assert cache_argument(OldNames()) == "past_key_values"
    assert cache_argument(nn.Linear(2, 2)) is None


def test_call_cache_finds_the_cache_under_either_name():
    cache = object()
    assert call_cache({"cache": cache}) is cache
    assert call_cache({"past_key_values": cache, "cache": None}) is cache
    assert call_cache({"input_ids": 1}) is None


def test_prefix_tuning_reaches_a_model_with_the_old_cache_name_like_the_new():
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    torch.manual_seed(0)
    new = PrefixTuning(num_virtual_tokens=3).apply(tiny_llama())
    torch.manual_seed(0)
    old = PrefixTuning(num_virtual_tokens=3).apply(OldNames())
    # the prefix went in under the old name and changed the outputs exactly as on the current model
    torch.testing.assert_close(
        old(input_ids=ids, attention_mask=mask).logits, new(input_ids=ids, attention_mask=mask).logits
    )
    assert old.seen == ["past_key_values"]
    assert not torch.allclose(
        old(input_ids=ids, attention_mask=mask).logits, tiny_llama()(input_ids=ids).logits
    )


def test_new_cache_starts_empty_and_takes_updates():
    cache = new_cache(tiny_llama().config)
    assert cache.get_seq_length() == 0
    cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 0)
    assert cache.get_seq_length() == 3


def test_checkpointing_switches_on_and_off_with_the_installed_releases_names():
    model = tiny_llama()
    assert not is_checkpointing(model)
    enable_checkpointing(model, use_reentrant=False)
    assert is_checkpointing(model)
    disable_checkpointing(model)
    assert not is_checkpointing(model)
