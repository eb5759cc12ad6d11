"""Adapter-only state: which tensors ``trainable_state_dict`` keeps, and how loading one checks it fits."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_bert
from torch import nn

from lightning_peft.strategies import LoRA, load_trainable_state_dict, trainable_state_dict
from lightning_peft.strategies.base import adapter_parameter_names

QUERY_A = "bert.encoder.layer.0.attention.self.query.lora_A"


def _strategy(init_lora_weights: bool = True) -> LoRA:
    return LoRA(
        r=4,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        init_lora_weights=init_lora_weights,
    )


@pytest.fixture
def base() -> nn.Module:
    return tiny_bert()


@pytest.fixture
def trained(base: nn.Module) -> nn.Module:
    """An adapted BERT whose adapters and head are no longer at their initial values."""
    model = _strategy(init_lora_weights=False).apply(copy.deepcopy(base))
    with torch.no_grad():
        model.classifier.trained.weight.add_(0.5)
    return model


def test_trainable_state_dict_holds_exactly_the_adapters_and_saved_modules(trained: nn.Module) -> None:
    state = trainable_state_dict(trained)
    assert set(state) == set(adapter_parameter_names(trained))
    assert {"classifier.trained.weight", "classifier.trained.bias", QUERY_A} <= set(state)
    assert not any(".base_layer." in key or ".original." in key for key in state)


def test_trainable_state_dict_keeps_a_temporarily_frozen_adapter(trained: nn.Module) -> None:
    trained.get_parameter(QUERY_A).requires_grad_(False)
    assert QUERY_A in trainable_state_dict(trained)


def test_trainable_state_dict_tensors_are_detached_copies_of_the_parameters(trained: nn.Module) -> None:
    state = trainable_state_dict(trained)
    assert not state[QUERY_A].requires_grad
    assert torch.equal(state[QUERY_A], trained.get_parameter(QUERY_A))


def test_trainable_state_dict_names_ignore_torch_compile_wrapper(trained: nn.Module) -> None:
    compiled = torch.compile(trained)  # nothing is compiled until it is called
    assert set(trainable_state_dict(compiled)) == set(trainable_state_dict(trained))


def test_state_of_a_compiled_model_loads_back_into_that_compiled_model(trained: nn.Module) -> None:
    compiled = torch.compile(trained)  # nothing is compiled until it is called
    state = {k: v.clone() for k, v in trainable_state_dict(compiled).items()}
    with torch.no_grad():
        trained.get_parameter(QUERY_A).zero_()
    load_trainable_state_dict(compiled, state)
    assert torch.equal(trained.get_parameter(QUERY_A), state[QUERY_A])
    assert not torch.equal(state[QUERY_A], torch.zeros_like(state[QUERY_A]))


def test_state_of_a_compiled_model_loads_into_a_plain_one_and_back(
    base: nn.Module, trained: nn.Module
) -> None:
    fresh = _strategy().apply(copy.deepcopy(base))
    load_trainable_state_dict(fresh, trainable_state_dict(torch.compile(trained)))
    assert torch.equal(fresh.get_parameter(QUERY_A), trained.get_parameter(QUERY_A))
    other = _strategy().apply(copy.deepcopy(base))
    load_trainable_state_dict(torch.compile(other), trainable_state_dict(trained))
    assert torch.equal(other.get_parameter(QUERY_A), trained.get_parameter(QUERY_A))


def test_round_trip_into_a_fresh_adapted_model_gives_identical_outputs(
    base: nn.Module, trained: nn.Module, token_ids: torch.Tensor
) -> None:
    fresh = _strategy().apply(copy.deepcopy(base))
    with torch.no_grad():
        assert not torch.equal(fresh(token_ids).logits, trained(token_ids).logits)
        load_trainable_state_dict(fresh, trainable_state_dict(trained))
        assert torch.equal(fresh(token_ids).logits, trained(token_ids).logits)


def _load_fails(model: nn.Module, state: dict[str, torch.Tensor], match: str) -> None:
    """Loading ``state`` raises a ValueError matching ``match`` and copies nothing."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_trainable_state_dict(model, state)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_load_with_a_missing_key_raises_naming_it(base: nn.Module, trained: nn.Module) -> None:
    state = trainable_state_dict(trained)
    del state[QUERY_A]
    _load_fails(_strategy().apply(copy.deepcopy(base)), state, rf"missing .*{QUERY_A}")


def test_load_with_a_wrong_shape_raises_naming_the_key(base: nn.Module, trained: nn.Module) -> None:
    state = trainable_state_dict(trained)
    state[QUERY_A] = torch.zeros(2, 32)
    _load_fails(
        _strategy().apply(copy.deepcopy(base)), state, rf"{QUERY_A}: checkpoint \(2, 32\) vs model \(4, 32\)"
    )


def test_load_with_an_unknown_key_raises_naming_it(base: nn.Module, trained: nn.Module) -> None:
    state = trainable_state_dict(trained)
    state["bert.encoder.layer.0.attention.self.key.lora_A"] = torch.zeros(4, 32)
    _load_fails(_strategy().apply(copy.deepcopy(base)), state, r"does not have .*self\.key\.lora_A")


def test_load_into_an_unadapted_model_raises(base: nn.Module, trained: nn.Module) -> None:
    _load_fails(copy.deepcopy(base), trainable_state_dict(trained), "does not have")
