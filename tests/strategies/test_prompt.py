"""Prompt tuning and prefix tuning: outputs against peft and against the base model fed by hand,
argument rewriting (mask, labels, positions, token types), generation, the adapter protocol,
removal, trainable state and config validation."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import VOCAB, mlp, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

from lightning_peft.strategies import disable_adapters
from lightning_peft.strategies.base import adapter_parameter_names, count_parameters, strategy_from_config
from lightning_peft.strategies.prompt import PrefixEncoder, PrefixTuning, PromptEncoder, PromptTuning
from lightning_peft.strategies.state import trainable_state_dict
from lightning_peft.strategies.transformers_compat import enable_checkpointing

N = 4  # virtual tokens
MODELS = {
    "llama": (tiny_llama, "CAUSAL_LM"),
    "gpt2": (tiny_gpt2, "CAUSAL_LM"),
    "bert": (tiny_bert, "SEQ_CLS"),
}


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """Two sequences of 10 tokens, the first left-padded by 3."""
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _encoder(model: nn.Module) -> PromptEncoder | PrefixEncoder:
    (found,) = [m for m in model.modules() if isinstance(m, PromptEncoder | PrefixEncoder)]
    return found


def _with_peft(
    kind: str, build: Callable[[], nn.Module], task: str, **options: object
) -> tuple[nn.Module, nn.Module]:
    """(peft model, our model) on the same base weights, our adapter loaded with peft's random values."""
    config_cls = peft.PromptTuningConfig if kind == "prompt" else peft.PrefixTuningConfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(build(), config_cls(task_type=task, num_virtual_tokens=N, **options))
    strategy = PromptTuning if kind == "prompt" else PrefixTuning
    ours = strategy(num_virtual_tokens=N, **options).apply(build())
    theirs = reference.prompt_encoder["default"].state_dict()
    encoder = _encoder(ours)
    with torch.no_grad():
        if options.get("prefix_projection"):
            encoder.prefix_embeddings.copy_(theirs["embedding.weight"])
            encoder.transform.load_state_dict(
                {k[len("transform.") :]: v for k, v in theirs.items() if "transform" in k}
            )
        else:
            next(encoder.parameters()).copy_(theirs["embedding.weight"])
    return reference, ours


def _labels(task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["input_ids"] if task == "CAUSAL_LM" else torch.tensor([0, 1])


# ---------------------------------------------------------------------------------------------- prompt tuning


@pytest.mark.parametrize("name", MODELS)
def test_prompt_tuning_matches_peft_logits_and_loss(name, batch):
    build, task = MODELS[name]
    reference, ours = _with_peft("prompt", build, task)
    labels = _labels(task, batch)
    expected = reference(**batch, labels=labels)
    got = ours(**batch, labels=labels)
    # peft's layout: causal LMs return N + T positions, classifiers one row per sequence
    assert got.logits.shape == expected.logits.shape
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=0)


def test_prompt_tuning_equals_base_model_fed_the_prompt_by_hand(batch):
    model = PromptTuning(num_virtual_tokens=N).apply(tiny_llama())
    prompt = _encoder(model).prompt_embeddings.detach()
    base = tiny_llama()
    embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(batch["input_ids"])], dim=1)
    mask = torch.cat([torch.ones(2, N, dtype=torch.long), batch["attention_mask"]], dim=1)
    labels = torch.cat([torch.full((2, N), -100), batch["input_ids"]], dim=1)
    expected = base(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    got = model(**batch, labels=batch["input_ids"])
    assert torch.equal(got.logits, expected.logits)
    assert torch.equal(got.loss, expected.loss)


def test_prompt_tuning_keeps_per_sequence_labels_of_a_classifier(batch):
    model = PromptTuning(num_virtual_tokens=N).apply(tiny_bert())
    labels = torch.tensor([1, 0])
    out = model(**batch, labels=labels)
    assert out.logits.shape == (2, 2)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))


def test_prompt_tuning_gives_virtual_tokens_token_type_zero(batch):
    model = PromptTuning(num_virtual_tokens=N).apply(tiny_bert())
    prompt = _encoder(model).prompt_embeddings.detach()
    types = torch.ones_like(batch["input_ids"])
    base = tiny_bert()
    embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(batch["input_ids"])], dim=1)
    expected = base(
        inputs_embeds=embeds,
        attention_mask=torch.cat([torch.ones(2, N, dtype=torch.long), batch["attention_mask"]], dim=1),
        token_type_ids=torch.cat([torch.zeros(2, N, dtype=torch.long), types], dim=1),
    )
    assert torch.equal(model(**batch, token_type_ids=types).logits, expected.logits)


def test_prompt_tuning_shifts_given_positions_behind_the_prompt(batch):
    model = PromptTuning(num_virtual_tokens=N).apply(tiny_llama())
    positions = torch.arange(10).expand(2, -1)
    # the default positions are 0 .. N+T-1: the same as the given 0 .. T-1 moved behind the prompt
    assert torch.equal(model(**batch, position_ids=positions).logits, model(**batch).logits)


def test_prompt_tuning_accepts_positional_arguments(batch):
    model = PromptTuning(num_virtual_tokens=N).apply(tiny_llama())
    positional = model(batch["input_ids"], batch["attention_mask"]).logits
    assert torch.equal(positional, model(**batch).logits)


def test_prompt_tuning_text_init_repeats_the_token_embeddings():
    model = PromptTuning(num_virtual_tokens=8, prompt_tuning_init="text", init_token_ids=[5, 6, 7]).apply(
        tiny_llama()
    )
    table = tiny_llama().get_input_embeddings().weight
    assert torch.equal(_encoder(model).prompt_embeddings, table[[5, 6, 7, 5, 6, 7, 5, 6]])


def test_prompt_tuning_text_init_from_a_tokenizer_matches_peft(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "classify": 5, "the": 6, "review": 7}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(tmp_path)
    text = {"prompt_tuning_init_text": "classify the review", "tokenizer_name_or_path": str(tmp_path)}
    config = peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="TEXT", **text
    )
    expected = peft.get_peft_model(tiny_llama(), config).prompt_encoder["default"].embedding.weight
    model = PromptTuning(num_virtual_tokens=5, prompt_tuning_init="text", **text).apply(tiny_llama())
    assert torch.equal(_encoder(model).prompt_embeddings, expected)


def test_prompt_tuning_sample_vocab_init_takes_rows_of_the_embedding_table():
    model = PromptTuning(num_virtual_tokens=N, prompt_tuning_init="sample_vocab").apply(tiny_llama())
    table = tiny_llama().get_input_embeddings().weight
    for row in _encoder(model).prompt_embeddings:
        assert (table == row).all(dim=1).any()


def test_prompt_tuning_rejects_token_ids_outside_the_vocabulary():
    strategy = PromptTuning(num_virtual_tokens=N, prompt_tuning_init="text", init_token_ids=[3, VOCAB])
    with pytest.raises(ValueError, match=rf"\[{VOCAB}\] are outside the vocabulary"):
        strategy.apply(tiny_llama())


def test_prompt_tuning_trainable_parameters_are_exactly_the_prompt(batch):
    model = PromptTuning(num_virtual_tokens=8).apply(tiny_llama())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == adapter_parameter_names(model) == ["prompt_encoder.prompt_embeddings"]
    state = trainable_state_dict(model)
    assert list(state) == ["prompt_encoder.prompt_embeddings"]
    assert state["prompt_encoder.prompt_embeddings"].shape == (8, 32)
    assert count_parameters(model)[0] == 8 * 32
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert _encoder(model).prompt_embeddings.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_prompt_tuning_export_is_peft_prompt_embeddings():
    model = PromptTuning(num_virtual_tokens=N).apply(tiny_llama())
    encoder = _encoder(model)
    assert torch.equal(encoder.export_embeddings(), encoder.prompt_embeddings)
    assert not encoder.export_embeddings().requires_grad


def test_prompt_tuning_on_model_without_input_embeddings_raises():
    with pytest.raises(ValueError, match="needs a transformers model with input embeddings.*Linear"):
        PromptTuning(num_virtual_tokens=N).apply(mlp())


def test_prompt_tuning_reports_every_problem_at_once():
    with pytest.raises(ValueError) as err:
        PromptTuning(num_virtual_tokens=0, prompt_tuning_init="random", init_token_ids=[1])
    assert "num_virtual_tokens must be a positive integer" in str(err.value)
    assert "used only with prompt_tuning_init='text'" in str(err.value)
    with pytest.raises(ValueError, match="needs init_token_ids, or prompt_tuning_init_text"):
        PromptTuning(prompt_tuning_init="text", prompt_tuning_init_text="hello")
    with pytest.raises(ValueError, match="prompt_tuning_init must be"):
        PromptTuning(prompt_tuning_init="TEXT")


# ---------------------------------------------------------------------------------------------- prefix tuning


def _call_peft(reference: nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> object:
    """peft's output; for a classifier whose backbone names its cache ``cache``, peft's own steps by hand.

    peft 0.21 looks for a ``past_key_values`` argument in the backbone's signature before it prefixes a
    sequence classifier, and transformers 5.25 renamed it to ``cache``: peft then refuses a model it
    supports. Its fallback is short, so it is run here step by step with peft's own prefix (the keys and
    values from ``get_prompt``) under the old keyword, which transformers < 5.40 still accepts.
    """
    try:
        return reference(**batch, labels=labels)
    except ValueError as err:
        if "past key values" not in str(err):
            raise
    base = reference.base_model
    mask = torch.cat(
        [torch.ones(labels.shape[0], N, dtype=batch["attention_mask"].dtype), batch["attention_mask"]], 1
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old keyword's deprecation
        out = base.bert(
            input_ids=batch["input_ids"], attention_mask=mask, past_key_values=reference.get_prompt(2)
        )
    logits = base.classifier(base.dropout(out[1]))
    return transformers.modeling_outputs.SequenceClassifierOutput(
        loss=F.cross_entropy(logits, labels), logits=logits
    )


@pytest.mark.parametrize("projection", [False, True], ids=["prefix", "projection"])
@pytest.mark.parametrize("name", MODELS)
def test_prefix_tuning_matches_peft_logits_and_loss(name, projection, batch):
    build, task = MODELS[name]
    reference, ours = _with_peft("prefix", build, task, prefix_projection=projection)
    labels = _labels(task, batch)
    expected = _call_peft(reference, batch, labels)
    got = ours(**batch, labels=labels)
    assert got.logits.shape == expected.logits.shape == tuple(build()(**batch).logits.shape)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=0)


def test_prefix_tuning_offsets_given_rotary_positions_like_peft(batch):
    reference, ours = _with_peft("prefix", tiny_llama, "CAUSAL_LM")
    positions = torch.arange(10).expand(2, -1)
    got = ours(**batch, position_ids=positions).logits
    torch.testing.assert_close(got, reference(**batch, position_ids=positions).logits, atol=1e-5, rtol=0)
    # the real tokens sit at positions N .. N+T-1 behind the prefix, given or not
    assert torch.equal(got, ours(**batch).logits)


def test_prefix_tuning_export_matches_peft_saved_prompt_embeddings():
    reference, ours = _with_peft("prefix", tiny_llama, "CAUSAL_LM", prefix_projection=True)
    saved = peft.get_peft_model_state_dict(reference)
    assert list(saved) == ["prompt_embeddings"]
    exported = _encoder(ours).export_embeddings()
    assert exported.shape == (N, 2 * 2 * 2 * 8)  # layers * (key, value) * kv_heads * head_dim
    torch.testing.assert_close(exported, saved["prompt_embeddings"], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("projection", "expected"),
    # tiny_llama: 2 layers, 2 key/value heads of 8 -> width 16; with 8 virtual tokens:
    # prefix 8 * (2 * 2 * 16); projection 8 * 16 + (16 * 16 + 16) + (16 * 64 + 64)
    [(False, {"prefix_encoder.prefix": (8, 64)}), (True, None)],
    ids=["prefix", "projection"],
)
def test_prefix_tuning_trainable_parameters_are_exactly_the_prefix(projection, expected, batch):
    model = PrefixTuning(num_virtual_tokens=8, prefix_projection=projection).apply(tiny_llama())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == adapter_parameter_names(model)
    state = trainable_state_dict(model)
    assert list(state) == trainable
    if expected is not None:
        assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert count_parameters(model)[0] == (1488 if projection else 512)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_prefix_tuning_on_model_without_a_cache_raises():
    with pytest.raises(ValueError, match="reads a key/value cache"):
        PrefixTuning(num_virtual_tokens=N).apply(mlp())


def test_prefix_tuning_on_encoder_decoder_model_raises():
    config = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="encoder-decoder"):
        PrefixTuning(num_virtual_tokens=N).apply(transformers.T5ForConditionalGeneration(config))


def test_prefix_tuning_refuses_gradient_checkpointing():
    model = tiny_llama()
    enable_checkpointing(model)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        PrefixTuning(num_virtual_tokens=N).apply(model)


def test_prefix_tuning_reports_every_problem_at_once():
    with pytest.raises(ValueError) as err:
        PrefixTuning(num_virtual_tokens=-1, encoder_hidden_size=8)
    assert "num_virtual_tokens must be a positive integer" in str(err.value)
    assert "encoder_hidden_size is used only with prefix_projection=True" in str(err.value)


# ---------------------------------------------------------------------------------------------- both


@pytest.mark.parametrize("strategy", [PromptTuning, PrefixTuning])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_greedy_generation_matches_peft(strategy, name, batch):
    kind = "prompt" if strategy is PromptTuning else "prefix"
    reference, ours = _with_peft(kind, MODELS[name][0], "CAUSAL_LM")
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    # the reference decodes greedily with peft's forward over the whole sequence at every step (no
    # cache): peft 0.21's own generate() drops a prefix on transformers >= 5.25, which passes its own
    # `cache` beside peft's `past_key_values`, and its prompt-tuned GPT-2 loses the positions there
    expected = _greedy_without_cache(reference, batch, settings["max_new_tokens"])
    assert torch.equal(ours.generate(**batch, **settings), expected)


def _greedy_without_cache(model: nn.Module, batch: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for _ in range(steps):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft: "position ids are not supported" for prompt tuning
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count from 0
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


@pytest.mark.parametrize("strategy", [PromptTuning, PrefixTuning])
def test_adapter_changes_outputs_from_the_start_and_disabling_restores_base_exactly(strategy, batch):
    model = strategy(num_virtual_tokens=N).apply(tiny_llama())
    base = tiny_llama()(**batch).logits
    assert not torch.allclose(model(**batch).logits[:, -10:], base, atol=1e-3)
    with disable_adapters(model):
        assert torch.equal(model(**batch).logits, base)
    assert not torch.allclose(model(**batch).logits[:, -10:], base, atol=1e-3)


@pytest.mark.parametrize("strategy", [PromptTuning, PrefixTuning])
def test_remove_takes_out_adapter_and_hook(strategy, batch):
    model = strategy(num_virtual_tokens=N).apply(tiny_llama())
    strategy().remove(model)
    assert not model._forward_pre_hooks
    assert adapter_parameter_names(model) == []
    assert torch.equal(model(**batch).logits, tiny_llama()(**batch).logits)


@pytest.mark.parametrize("strategy", [PromptTuning, PrefixTuning])
def test_deleting_the_adapter_module_leaves_base_outputs(strategy, batch):
    model = strategy(num_virtual_tokens=N).apply(tiny_llama())
    del model._modules["prompt_encoder" if strategy is PromptTuning else "prefix_encoder"]
    assert torch.equal(model(**batch).logits, tiny_llama()(**batch).logits)


@pytest.mark.parametrize("strategy", [PromptTuning, PrefixTuning])
def test_deep_copy_keeps_a_working_hook_of_its_own(strategy, batch):
    model = strategy(num_virtual_tokens=N).apply(tiny_llama())
    clone = copy.deepcopy(model)
    assert torch.equal(clone(**batch).logits, model(**batch).logits)
    strategy().remove(clone)
    assert len(model._forward_pre_hooks) == 1 and not clone._forward_pre_hooks


@pytest.mark.parametrize("strategy", [PromptTuning, PrefixTuning])
def test_applying_twice_raises(strategy):
    model = strategy(num_virtual_tokens=N).apply(tiny_llama())
    with pytest.raises(ValueError, match="apply a strategy once"):
        strategy(num_virtual_tokens=N).apply(model)


@pytest.mark.parametrize("strategy", [PromptTuning, PrefixTuning])
def test_adapter_inside_a_wrapper_module_hooks_the_transformers_model(strategy, batch):
    wrapper = nn.ModuleDict({"model": tiny_llama()})
    strategy(num_virtual_tokens=N).apply(wrapper)
    assert [n for n, p in wrapper.named_parameters() if p.requires_grad] == adapter_parameter_names(wrapper)
    assert adapter_parameter_names(wrapper)[0].startswith("model.")
    assert wrapper["model"]._forward_pre_hooks


@pytest.mark.parametrize(
    "strategy",
    [
        PromptTuning(num_virtual_tokens=3, prompt_tuning_init="text", init_token_ids=[4, 5]),
        PrefixTuning(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=12),
    ],
    ids=["prompt", "prefix"],
)
def test_config_round_trips(strategy):
    assert strategy_from_config(strategy.to_config()) == strategy
