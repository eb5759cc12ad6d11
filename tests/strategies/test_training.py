"""A few plain SGD steps on an adapted tiny Llama, for every method, without Lightning: the optimizer
gets *every* parameter, yet only the adapters move, and the loss goes down."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_llama

from lightning_peft import IA3, BottleneckAdapter, LoRA
from lightning_peft.strategies.base import adapter_parameter_names

STRATEGIES = {
    "lora": lambda: LoRA(r=4, lora_alpha=8, target_modules="all-linear"),
    "ia3": lambda: IA3(),
    # a 2-unit ReLU bottleneck (the default on hidden size 32) can die within a step at this learning
    # rate; 8 smooth units keep every adapter weight receiving gradient
    "adapter": lambda: BottleneckAdapter(reduction_factor=4, non_linearity="silu"),
}


@pytest.fixture(scope="module", params=sorted(STRATEGIES))
def trained(request) -> dict[str, object]:
    model = STRATEGIES[request.param]().apply(tiny_llama()).train()
    ids = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # every parameter: frozen ones must not move
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {
        "before": before,
        "after": after,
        "adapters": set(adapter_parameter_names(model)),
        "losses": losses,
    }


def test_training_leaves_base_weights_bit_identical(trained) -> None:
    base_names = set(trained["before"]) - trained["adapters"]
    assert base_names
    for name in base_names:
        assert torch.equal(trained["after"][name], trained["before"][name]), name


def test_training_changes_every_adapter_weight(trained) -> None:
    for name in trained["adapters"]:
        assert not torch.equal(trained["after"][name], trained["before"][name]), name


def test_training_decreases_the_loss(trained) -> None:
    assert trained["losses"][-1] < trained["losses"][0]
