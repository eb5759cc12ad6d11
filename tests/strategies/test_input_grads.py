"""Strategies ask for the input embeddings' gradient only while activation checkpointing needs it.

Without checkpointing nothing before the first adapter trains, so the backward may stop there and
skip the first block's gradient with respect to its input. Reentrant checkpointing, on the other
hand, backpropagates into a block only if one of its inputs requires grad, so there the embeddings'
output must require it, whenever checkpointing was switched on.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from lightning_peft.planning import saved_activation_bytes
from lightning_peft.strategies import IA3, BottleneckAdapter, Freeze, LoRA
from lightning_peft.strategies.transformers_compat import disable_checkpointing, enable_checkpointing


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(0))


def _lora() -> nn.Module:
    return LoRA(r=4, init_lora_weights=False).apply(tiny_llama()).train()


def _embedding_output_requires_grad(model: nn.Module, ids: torch.Tensor) -> bool:
    """Whether the embeddings' output requires grad in a training forward (seen after every hook)."""
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: seen.append(output.requires_grad)
    )
    try:
        model(ids)
    finally:
        handle.remove()
    return seen == [True]


def _checkpointing(model: nn.Module, on: bool) -> None:
    if on:
        enable_checkpointing(model, use_reentrant=True)
        # transformers 5 hooks the embeddings itself here (older versions do not): leave only ours
        model.disable_input_require_grads()
    else:
        disable_checkpointing(model)


def _adapter_grads(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_without_checkpointing_the_backward_stops_at_the_first_adapter(ids: torch.Tensor) -> None:
    model = _lora()
    assert not _embedding_output_requires_grad(model, ids)
    forced = copy.deepcopy(model)
    forced.enable_input_require_grads()  # what the frozen-base limit does
    assert _embedding_output_requires_grad(forced, ids)
    # the adapters' gradients do not depend on it ...
    ours, reference = _adapter_grads(model, ids), _adapter_grads(forced, ids)
    assert ours.keys() == reference.keys() and len(ours) == 2 * 2 * 7
    for name, grad in ours.items():
        torch.testing.assert_close(grad, reference[name], rtol=0, atol=1e-7, msg=name)
        assert grad.abs().sum() > 0, name
    # ... and less is kept for backward: the first block's norm no longer saves its input for it
    params = lambda m: [*m.parameters(), *m.buffers()]  # noqa: E731
    assert saved_activation_bytes(lambda: model(ids), params(model)) < saved_activation_bytes(
        lambda: forced(ids), params(forced)
    )


@pytest.mark.parametrize("order", ["checkpointing-first", "adapters-first"])
def test_checkpointing_switched_on_at_any_time_gets_every_adapter_a_gradient(
    order: str, ids: torch.Tensor
) -> None:
    if order == "checkpointing-first":
        model = tiny_llama().train()
        _checkpointing(model, True)
        model = LoRA(r=4, init_lora_weights=False).apply(model)
    else:
        model = _lora()
        _checkpointing(model, True)
    assert _embedding_output_requires_grad(model, ids)
    grads = _adapter_grads(model, ids)
    assert len(grads) == 2 * 2 * 7 and all(g.abs().sum() > 0 for g in grads.values())
    # and off again: back to stopping at the first adapter, with the same gradients
    _checkpointing(model, False)
    assert not _embedding_output_requires_grad(model, ids)
    for name, grad in _adapter_grads(model, ids).items():
        torch.testing.assert_close(grad, grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_no_grad_forwards_never_ask_for_the_gradient(ids: torch.Tensor) -> None:
    model = _lora()
    _checkpointing(model, True)
    with torch.no_grad():
        assert not _embedding_output_requires_grad(model, ids)


def test_a_deep_copy_follows_its_own_checkpointing_flags(ids: torch.Tensor) -> None:
    model = _lora()
    twin = copy.deepcopy(model)
    _checkpointing(twin, True)
    assert _embedding_output_requires_grad(twin, ids)
    assert not _embedding_output_requires_grad(model, ids)
    hooks = list(model.get_input_embeddings()._forward_hooks.values())
    assert len(hooks) == 1 and hooks[0].owner is model  # the copy's hook did not point back here


@pytest.mark.parametrize(
    "strategy",
    [lambda: IA3(), lambda: BottleneckAdapter(reduction_factor=4), lambda: Freeze(last_n_blocks=1)],
    ids=["ia3", "adapter", "freeze-last-block"],
)
def test_every_method_gets_its_gradients_under_reentrant_checkpointing(strategy, ids: torch.Tensor) -> None:
    # the first checkpointed block's input must require grad, or nothing inside it gets a gradient
    model = strategy().apply(tiny_llama()).train()
    with torch.no_grad():  # nothing at an init that zeroes some gradients (the adapter's up-projection)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    plain = _adapter_grads(model, ids)
    _checkpointing(model, True)
    assert _embedding_output_requires_grad(model, ids)
    checkpointed = _adapter_grads(model, ids)
    assert checkpointed.keys() == plain.keys() and plain
    for name, grad in checkpointed.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, plain[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("share", [False, True], ids=["per-layer-masks", "shared-masks"])
@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_dropout_masks_are_redrawn_alike_when_checkpointing_recomputes(
    use_reentrant: bool, share: bool, ids: torch.Tensor
) -> None:
    # checkpointing reruns each block's forward in backward with the RNG state restored: every
    # layer's mask (or, shared, the one of q, k, v and of gate, up) must come out as in the first
    # forward, or the gradients would differ
    strategy = LoRA(r=4, lora_dropout=0.3, init_lora_weights=False, share_dropout_mask=share)
    model = strategy.apply(tiny_llama()).train()
    torch.manual_seed(11)
    plain = _adapter_grads(model, ids)
    enable_checkpointing(model, use_reentrant=use_reentrant)
    torch.manual_seed(11)
    checkpointed = _adapter_grads(model, ids)
    for name, grad in checkpointed.items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-4, atol=1e-6, msg=name)
