"""(IA)^3 in pure PyTorch: identity at init, the paper's formulas, numerics and defaults against peft,
merge/unmerge, ``disable_adapters``, exactly the vectors trainable, and config validation."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import peft
import pytest
import torch
from conftest import mlp, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft.strategies.base import (
    PEFTStrategy,
    adapter_parameter_names,
    disable_adapters,
    strategy_from_config,
)
from lightning_peft.strategies.ia3 import IA3, IA3Linear
from lightning_peft.strategies.state import trainable_state_dict

IN, OUT = 8, 6
MODELS: dict[str, Callable[[], nn.Module]] = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


# ---------------------------------------------------------------------------------------------- helpers


def _logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


def _adapted(kind: str, feedforward: bool) -> tuple[nn.Sequential, IA3Linear]:
    """``Sequential(layer)`` with a random bias and random (IA)^3 vectors on the layer."""
    torch.manual_seed(0)
    layer = nn.Linear(IN, OUT) if kind == "linear" else Conv1D(OUT, IN)  # Conv1D weight: (in, out)
    with torch.no_grad():
        layer.bias.normal_()
    strategy = IA3(target_modules=["0"], feedforward_modules=["0"] if feedforward else None)
    model = strategy.apply(nn.Sequential(layer))
    with torch.no_grad():
        model[0].ia3_l.uniform_(0.5, 1.5)  # away from zero: unmerge divides by it
    return model, model[0]


def _weight_out_in(layer: nn.Module) -> torch.Tensor:
    return layer.weight.T if isinstance(layer, Conv1D) else layer.weight


def _x() -> torch.Tensor:
    return torch.randn(4, IN, generator=torch.Generator().manual_seed(1))


def _last_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The last block's output: BERT's classifier logits are too small to show a difference."""
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[-1]


def _ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, IA3Linear)}


def _trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _randomise(model: nn.Module) -> None:
    with torch.no_grad():
        for layer in _ia3_layers(model).values():
            layer.ia3_l.uniform_(0.5, 1.5)


LAYER_CASES = [("linear", False), ("linear", True), ("conv1d", False), ("conv1d", True)]
LAYER_IDS = ["linear-out", "linear-ff", "conv1d-out", "conv1d-ff"]


# ------------------------------------------------------------------------------------ identity at init


@pytest.mark.parametrize("case", list(MODELS))
def test_ia3_with_defaults_is_identity_at_init(case: str, token_ids: torch.Tensor) -> None:
    base = MODELS[case]()
    adapted = IA3().apply(copy.deepcopy(base))
    assert _ia3_layers(adapted)
    assert torch.equal(_logits(adapted, token_ids), _logits(base, token_ids))


# ----------------------------------------------------------------------------- forward = hand formula


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_ia3_output_scaling_matches_hand_formula(kind: str) -> None:
    model, layer = _adapted(kind, feedforward=False)
    assert layer.ia3_l.shape == (OUT, 1)
    x, W, b, vec = _x(), _weight_out_in(layer.base_layer), layer.base_layer.bias, layer.ia3_l
    expected = (x @ W.T + b) * vec[:, 0]  # the bias is scaled too, as in peft
    torch.testing.assert_close(_logits(model, x), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_ia3_feedforward_scaling_matches_hand_formula(kind: str) -> None:
    model, layer = _adapted(kind, feedforward=True)
    assert layer.ia3_l.shape == (1, IN)
    x, W, b, vec = _x(), _weight_out_in(layer.base_layer), layer.base_layer.bias, layer.ia3_l
    expected = (x * vec[0]) @ W.T + b
    torch.testing.assert_close(_logits(model, x), expected, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------ vs peft


@pytest.mark.parametrize("case", list(MODELS))
def test_ia3_default_targets_and_feedforward_flags_match_peft(case: str) -> None:
    base = MODELS[case]()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config())
    their_layers = {
        name.removeprefix("base_model.model."): m.is_feedforward
        for name, m in theirs.named_modules()
        if isinstance(m, peft.tuners.ia3.IA3Layer)
    }
    ours = {name: m.is_feedforward for name, m in _ia3_layers(IA3().apply(copy.deepcopy(base))).items()}
    assert ours == their_layers


@pytest.mark.parametrize("case", list(MODELS))
def test_ia3_outputs_match_peft_with_random_vectors(case: str, token_ids: torch.Tensor) -> None:
    base = MODELS[case]()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(init_ia3_weights=False)).eval()
    ours = IA3().apply(copy.deepcopy(base)).eval()
    state = theirs.state_dict()
    with torch.no_grad():
        for name, layer in _ia3_layers(ours).items():
            theirs_l = state[f"base_model.model.{name}.ia3_l.default"]
            assert theirs_l.shape == layer.ia3_l.shape, name  # same shapes: the export maps 1:1
            layer.ia3_l.copy_(theirs_l)
    expected = _last_hidden(theirs, token_ids)
    assert not torch.allclose(expected, _last_hidden(base, token_ids), atol=1e-2)  # the vectors do something
    torch.testing.assert_close(_last_hidden(ours, token_ids), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(ours, token_ids), _logits(theirs, token_ids), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ merge and unmerge


@pytest.mark.parametrize(("kind", "feedforward"), LAYER_CASES, ids=LAYER_IDS)
def test_ia3_merge_keeps_outputs(kind: str, feedforward: bool) -> None:
    model, layer = _adapted(kind, feedforward)
    x = _x()
    expected = _logits(model, x)
    PEFTStrategy().merge(model)
    assert layer.merged
    torch.testing.assert_close(_logits(model, x), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(_logits(layer.base_layer, x), _logits(model, x))  # the base layer alone now


@pytest.mark.parametrize(("kind", "feedforward"), LAYER_CASES, ids=LAYER_IDS)
def test_ia3_unmerge_restores_base_weights_and_outputs(kind: str, feedforward: bool) -> None:
    model, layer = _adapted(kind, feedforward)
    x = _x()
    weight, bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    expected = _logits(model, x)
    layer.merge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.base_layer.bias, bias, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_logits(model, x), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_ia3_merge_of_a_whole_model_keeps_logits(case: str, token_ids: torch.Tensor) -> None:
    model = IA3().apply(MODELS[case]())
    _randomise(model)
    expected = _logits(model, token_ids)
    IA3().merge(model)
    assert all(layer.merged for layer in _ia3_layers(model).values())
    torch.testing.assert_close(_logits(model, token_ids), expected, atol=1e-5, rtol=1e-5)


def test_ia3_merge_refuses_non_finite_weights() -> None:
    model, layer = _adapted("linear", feedforward=False)
    weight = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.ia3_l[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base_layer.weight, weight)


def test_ia3_unmerge_refuses_a_vector_with_zeros() -> None:
    model, layer = _adapted("linear", feedforward=True)
    with torch.no_grad():
        layer.ia3_l[0, 2] = 0.0
    layer.merge()
    with pytest.raises(ValueError, match="zeros"):
        layer.unmerge()
    assert layer.merged


def test_ia3_merge_twice_is_a_no_op() -> None:
    model, layer = _adapted("linear", feedforward=False)
    layer.merge()
    weight = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.base_layer.weight, weight)


# ------------------------------------------------------------------------------------ disable_adapters


def test_ia3_disable_adapters_gives_base_outputs_exactly(token_ids: torch.Tensor) -> None:
    base = tiny_llama()
    model = IA3().apply(copy.deepcopy(base))
    _randomise(model)
    adapted = _logits(model, token_ids)
    with disable_adapters(model):
        assert torch.equal(_logits(model, token_ids), _logits(base, token_ids))
    assert torch.equal(_logits(model, token_ids), adapted)  # back on at exit


def test_ia3_disable_adapters_gives_base_outputs_when_merged(token_ids: torch.Tensor) -> None:
    base = tiny_gpt2()
    model = IA3().apply(copy.deepcopy(base))
    _randomise(model)
    IA3().merge(model)
    with disable_adapters(model):
        torch.testing.assert_close(_logits(model, token_ids), _logits(base, token_ids), atol=1e-5, rtol=1e-5)
    assert all(layer.merged for layer in _ia3_layers(model).values())


# ------------------------------------------------------------------------------ what is trainable


def test_ia3_apply_trains_exactly_the_scaling_vectors_of_tiny_llama() -> None:
    model = IA3().apply(tiny_llama())
    names = {
        f"model.layers.{i}.{module}.ia3_l"
        for i in range(2)
        for module in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
    }
    assert _trainable(model) == names == set(adapter_parameter_names(model))
    # by hand, per block: k_proj and v_proj have 2 kv heads x 8 = 16 outputs, down_proj 64 inputs
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (16 + 16 + 64) == 192


def test_ia3_trainable_state_dict_holds_only_the_vectors() -> None:
    model = IA3().apply(tiny_llama())
    state = trainable_state_dict(model)
    assert set(state) == set(adapter_parameter_names(model))
    assert all(name.endswith(".ia3_l") for name in state)
    assert sorted({tuple(t.shape) for t in state.values()}) == [(1, 64), (16, 1)]


def test_ia3_modules_to_save_trains_the_head_too() -> None:
    model = IA3(modules_to_save=["classifier"]).apply(tiny_bert())
    trainable = _trainable(model)
    assert {"classifier.trained.weight", "classifier.trained.bias"} <= trainable
    assert all(n.endswith(".ia3_l") or n.startswith("classifier.trained.") for n in trainable)


def test_ia3_layers_to_transform_adapts_only_those_blocks() -> None:
    model = IA3(layers_to_transform=[1]).apply(tiny_llama())
    assert {n.split(".")[2] for n in _ia3_layers(model)} == {"1"}


def test_ia3_explicit_targets_on_a_plain_model_scale_outputs() -> None:
    model = IA3(target_modules=["0", "2"]).apply(mlp())
    assert [(n, m.is_feedforward) for n, m in _ia3_layers(model).items()] == [("0", False), ("2", False)]


# ------------------------------------------------------------------------------------- configuration


def test_ia3_without_targets_on_an_unknown_model_names_what_to_pass() -> None:
    with pytest.raises(ValueError, match="no default targets") as error:
        IA3().apply(mlp())
    assert "target_modules=" in str(error.value) and "feedforward_modules=" in str(error.value)


def test_ia3_feedforward_entry_outside_the_targets_is_an_error() -> None:
    with pytest.raises(ValueError, match="'up_proj' matches none of the targets"):
        IA3(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj", "up_proj"]).apply(
            tiny_llama()
        )


def test_ia3_target_of_an_unsupported_type_is_an_error() -> None:
    with pytest.raises(ValueError, match="ReLU"):
        IA3(target_modules=["1"]).apply(mlp())


def test_ia3_applied_twice_is_an_error() -> None:
    model = IA3().apply(tiny_llama())
    with pytest.raises(ValueError, match="already carries an adapter"):
        IA3().apply(model)


def test_ia3_invalid_config_raises_one_error_listing_every_problem() -> None:
    with pytest.raises(ValueError) as error:
        IA3(
            target_modules="(",
            feedforward_modules="all-linear",
            init_ia3_weights="yes",
            layers_to_transform="0",
        )
    message = str(error.value)
    for problem in (
        "not a valid regular expression",
        "feedforward_modules",
        "init_ia3_weights",
        "layers_to_transform",
    ):
        assert problem in message


def test_ia3_config_round_trips_through_json() -> None:
    strategy = IA3(
        target_modules=["k_proj", "v_proj", "down_proj"],
        feedforward_modules=["down_proj"],
        exclude_modules=r".*\.0\..*",
        layers_to_transform=[1],
        layers_pattern="layers",
        modules_to_save=["lm_head"],
        init_ia3_weights=False,
    )
    rebuilt = strategy_from_config(json.loads(json.dumps(strategy.to_config())))
    assert isinstance(rebuilt, IA3) and rebuilt == strategy


# -------------------------------------------------------------------------------- frozen base, training
