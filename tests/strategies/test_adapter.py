"""Bottleneck adapters in pure PyTorch: identity at init, the Houlsby formula, placements on Llama,
GPT-2 and BERT, tuple outputs, ``disable_adapters``, exactly the adapters trainable, and validation."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import mlp, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

from lightning_peft.strategies.base import (
    MergeableLayer,
    PEFTStrategy,
    adapter_parameter_names,
    disable_adapters,
    strategy_from_config,
)
from lightning_peft.strategies.bottleneck import BottleneckAdapter, BottleneckLayer
from lightning_peft.strategies.state import trainable_state_dict

MODELS: dict[str, Callable[[], nn.Module]] = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
ACTIVATIONS = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


# ---------------------------------------------------------------------------------------------- helpers


def _logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


def _adapter_layers(model: nn.Module) -> dict[str, BottleneckLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BottleneckLayer)}


def _randomise(model: nn.Module, seed: int = 0) -> None:
    """Random up-projections (zero at init) so that every adapter changes its input."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _adapter_layers(model).values():
            for tensor in (layer.adapter_up_weight, layer.adapter_up_bias, layer.adapter_down_bias):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)


def _trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _hand_adapter(
    layer: BottleneckLayer, x: torch.Tensor, act: Callable, residual: bool = True
) -> torch.Tensor:
    """Houlsby's adapter written out: x + W_up act(W_down x + b_down) + b_up."""
    hidden = act(x @ layer.adapter_down_weight.T + layer.adapter_down_bias)
    delta = hidden @ layer.adapter_up_weight.T + layer.adapter_up_bias
    return x + delta if residual else delta


class TupleBlock(nn.Module):
    """Self-attention that returns ``(output, attention weights)``, like Hugging Face attention modules."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attn(x, x, x)


# ------------------------------------------------------------------------------------ identity at init


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("case", list(MODELS))
def test_adapter_is_identity_at_init(case: str, placement: str, token_ids: torch.Tensor) -> None:
    base = MODELS[case]()
    adapted = BottleneckAdapter(placement=placement).apply(copy.deepcopy(base))
    assert _adapter_layers(adapted)
    assert torch.equal(_logits(adapted, token_ids), _logits(base, token_ids))


def test_adapter_up_projection_starts_at_zero() -> None:
    layers = _adapter_layers(BottleneckAdapter().apply(tiny_llama())).values()
    assert all(not layer.adapter_up_weight.any() and not layer.adapter_up_bias.any() for layer in layers)
    assert all(layer.adapter_down_weight.any() for layer in layers)  # gradients reach it once up moves


# -------------------------------------------------------------------------------------------- placement

PLACEMENTS = {
    ("llama", "houlsby"): ["model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"],
    ("llama", "pfeiffer"): ["model.layers.{i}.mlp.down_proj"],
    ("gpt2", "houlsby"): ["transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_proj"],
    ("gpt2", "pfeiffer"): ["transformer.h.{i}.mlp.c_proj"],
    # before BERT's dropout + residual + LayerNorm, as in Houlsby fig. 2
    ("bert", "houlsby"): [
        "bert.encoder.layer.{i}.attention.output.dense",
        "bert.encoder.layer.{i}.output.dense",
    ],
    ("bert", "pfeiffer"): ["bert.encoder.layer.{i}.output.dense"],
}


@pytest.mark.parametrize(("case", "placement"), list(PLACEMENTS), ids=["-".join(k) for k in PLACEMENTS])
def test_adapter_default_placement_per_architecture(case: str, placement: str) -> None:
    model = BottleneckAdapter(placement=placement).apply(MODELS[case]())
    expected = {site.format(i=i) for site in PLACEMENTS[case, placement] for i in range(2)}
    assert set(_adapter_layers(model)) == expected


def test_adapter_target_modules_override_the_placement() -> None:
    model = BottleneckAdapter(placement="houlsby", target_modules=["mlp"]).apply(tiny_llama())
    assert set(_adapter_layers(model)) == {"model.layers.0.mlp", "model.layers.1.mlp"}


def test_adapter_layers_to_transform_adapts_only_those_blocks() -> None:
    model = BottleneckAdapter(layers_to_transform=1).apply(tiny_gpt2())
    assert set(_adapter_layers(model)) == {"transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"}


# ----------------------------------------------------------------------------- forward = hand formula


@pytest.mark.parametrize("non_linearity", list(ACTIVATIONS))
def test_adapter_forward_matches_hand_formula(non_linearity: str) -> None:
    model = BottleneckAdapter(target_modules=["0"], reduction_factor=4, non_linearity=non_linearity).apply(
        mlp()
    )
    _randomise(model)
    layer = model[0]
    assert layer.adapter_down_weight.shape == (4, 16) and layer.adapter_up_weight.shape == (16, 4)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sublayer = layer.base_layer(x)
        expected = model[1:](_hand_adapter(layer, sublayer, ACTIVATIONS[non_linearity]))
    torch.testing.assert_close(_logits(model, x), expected, atol=1e-6, rtol=1e-6)


def test_adapter_without_residual_replaces_the_output() -> None:
    model = BottleneckAdapter(target_modules=["2"], reduction_factor=4, residual=False).apply(mlp())
    _randomise(model)
    layer = model[2]
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sublayer = layer.base_layer(model[:2](x))
        expected = model[3:](_hand_adapter(layer, sublayer, torch.relu, residual=False))
    torch.testing.assert_close(_logits(model, x), expected, atol=1e-6, rtol=1e-6)


def test_adapter_on_a_tuple_output_adapts_only_the_first_element() -> None:
    torch.manual_seed(0)
    base = TupleBlock().eval()
    model = BottleneckAdapter(target_modules=["attn"], reduction_factor=2).apply(copy.deepcopy(base))
    _randomise(model)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, weights = model(x)
        base_out, base_weights = base(x)
    assert torch.equal(weights, base_weights)
    torch.testing.assert_close(out, _hand_adapter(model.attn, base_out, torch.relu), atol=1e-6, rtol=1e-6)


def test_adapter_after_llama_attention_equals_adapter_after_its_output_projection(
    token_ids: torch.Tensor,
) -> None:
    # LlamaAttention returns (o_proj output, weights): the same adapter must give the same logits
    on_attention = BottleneckAdapter(target_modules=["self_attn"]).apply(tiny_llama())
    on_projection = BottleneckAdapter(target_modules=["self_attn.o_proj"]).apply(tiny_llama())
    _randomise(on_attention)
    with torch.no_grad():
        for name, layer in _adapter_layers(on_attention).items():
            target = on_projection.get_submodule(f"{name}.o_proj")
            for local in layer.adapter_params():
                getattr(target, local).copy_(getattr(layer, local))
    expected = _logits(on_projection, token_ids)
    assert not torch.allclose(expected, _logits(tiny_llama(), token_ids), atol=1e-3)
    torch.testing.assert_close(_logits(on_attention, token_ids), expected, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------ disable_adapters and merge


@pytest.mark.parametrize("case", list(MODELS))
def test_adapter_disable_adapters_gives_base_outputs_exactly(case: str, token_ids: torch.Tensor) -> None:
    base = MODELS[case]()
    model = BottleneckAdapter().apply(copy.deepcopy(base))
    _randomise(model)
    adapted = _logits(model, token_ids)
    assert not torch.equal(adapted, _logits(base, token_ids))
    with disable_adapters(model):
        assert torch.equal(_logits(model, token_ids), _logits(base, token_ids))
    assert torch.equal(_logits(model, token_ids), adapted)  # back on at exit


def test_adapter_is_not_mergeable_and_merge_leaves_it_unchanged(token_ids: torch.Tensor) -> None:
    model = BottleneckAdapter().apply(tiny_llama())
    _randomise(model)
    assert not any(isinstance(layer, MergeableLayer) for layer in _adapter_layers(model).values())
    expected = _logits(model, token_ids)
    PEFTStrategy().merge(model)
    assert torch.equal(_logits(model, token_ids), expected)


# ------------------------------------------------------------------------------ what is trainable


def test_adapter_apply_trains_exactly_the_adapters_of_tiny_llama() -> None:
    model = BottleneckAdapter().apply(tiny_llama())
    locals_ = ("adapter_down_weight", "adapter_down_bias", "adapter_up_weight", "adapter_up_bias")
    names = {
        f"model.layers.{i}.{site}.{local}"
        for i in range(2)
        for site in ("self_attn.o_proj", "mlp.down_proj")
        for local in locals_
    }
    assert _trainable(model) == names == set(adapter_parameter_names(model))
    # by hand: hidden 32 / reduction 16 = bottleneck 2; down 2x32 + 2, up 32x2 + 32; 4 adapters
    per_adapter = 2 * 32 + 2 + 32 * 2 + 32
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * per_adapter == 648


def test_adapter_trainable_state_dict_holds_only_adapter_tensors() -> None:
    model = BottleneckAdapter(placement="pfeiffer").apply(tiny_gpt2())
    state = trainable_state_dict(model)
    assert set(state) == set(adapter_parameter_names(model))
    assert {name.rsplit(".", 1)[-1] for name in state} == {
        "adapter_down_weight",
        "adapter_down_bias",
        "adapter_up_weight",
        "adapter_up_bias",
    }
    assert len(state) == 2 * 4


def test_adapter_modules_to_save_trains_the_head_too() -> None:
    model = BottleneckAdapter(modules_to_save=["classifier"]).apply(tiny_bert())
    trainable = _trainable(model)
    assert {"classifier.trained.weight", "classifier.trained.bias"} <= trainable
    assert trainable == set(adapter_parameter_names(model))  # the head and the adapters, nothing else
    assert len(_adapter_layers(model)) == 4


# ------------------------------------------------------------------------------------- configuration


def test_adapter_on_a_model_without_blocks_names_what_to_pass() -> None:
    with pytest.raises(ValueError, match="no default placement") as error:
        BottleneckAdapter().apply(mlp())
    assert "target_modules=" in str(error.value)


def test_adapter_on_a_module_without_a_linear_layer_is_an_error() -> None:
    with pytest.raises(ValueError, match="no linear layer"):
        BottleneckAdapter(target_modules=["1"]).apply(mlp())


def test_adapter_reduction_factor_larger_than_the_width_is_an_error() -> None:
    with pytest.raises(ValueError, match="leaves no bottleneck"):
        BottleneckAdapter(target_modules=["0"], reduction_factor=32).apply(mlp())


def test_adapter_on_nested_targets_is_an_error() -> None:
    with pytest.raises(ValueError, match="inside another target"):
        BottleneckAdapter(target_modules=["mlp", "mlp.down_proj"]).apply(tiny_llama())


def test_adapter_applied_twice_is_an_error() -> None:
    model = BottleneckAdapter().apply(tiny_llama())
    with pytest.raises(ValueError, match="already carries an adapter"):
        BottleneckAdapter().apply(model)


def test_adapter_invalid_config_raises_one_error_listing_every_problem() -> None:
    with pytest.raises(ValueError) as error:
        BottleneckAdapter(
            reduction_factor=0,
            non_linearity="swish",
            residual="yes",
            placement="parallel",
            target_modules="(",
        )
    message = str(error.value)
    for problem in (
        "reduction_factor",
        "non_linearity",
        "residual",
        "placement",
        "not a valid regular expression",
    ):
        assert problem in message


def test_adapter_config_round_trips_through_json() -> None:
    strategy = BottleneckAdapter(
        reduction_factor=8,
        non_linearity="gelu",
        residual=False,
        placement="pfeiffer",
        target_modules=["mlp"],
        modules_to_save=["lm_head"],
        layers_to_transform=[0, 1],
    )
    rebuilt = strategy_from_config(json.loads(json.dumps(strategy.to_config())))
    assert isinstance(rebuilt, BottleneckAdapter) and rebuilt == strategy


# -------------------------------------------------------------------------------- frozen base, training
