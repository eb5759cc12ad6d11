"""torch.compile: every method traces a tiny Llama's training forward without graph breaks, an adapted
layer compiles whole (``fullgraph=True``), and compiled training steps give the eager steps' losses.

``aot_eager`` runs Dynamo and AOTAutograd (where a dropout mask drawn in place crashed with
"setStorage: ... out of bounds") and then the same aten ops as eager, so it matches eager to float
rounding and takes seconds; the ``inductor`` (C++ codegen) runs are marked slow.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from lightning_peft.strategies import IA3, BottleneckAdapter, LoRA, PEFTStrategy, QLoRA

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_peft"


def _qlora() -> PEFTStrategy:
    pytest.importorskip("bitsandbytes")
    return QLoRA(r=4, init_lora_weights=False)


# init_lora_weights=False: the update is nonzero from the start, so the first loss already reads it
METHODS: dict[str, Callable[[], PEFTStrategy]] = {
    "lora": lambda: LoRA(r=4, init_lora_weights=False),
    "lora-dropout": lambda: LoRA(r=4, lora_dropout=0.1, init_lora_weights=False),
    "rslora": lambda: LoRA(r=4, use_rslora=True, init_lora_weights=False),
    "dora": lambda: LoRA(r=4, use_dora=True, init_lora_weights=False),
    "dora-dropout": lambda: LoRA(r=4, use_dora=True, lora_dropout=0.1, init_lora_weights=False),
    "ia3": lambda: IA3(),
    "adapter": lambda: BottleneckAdapter(),
    "qlora": _qlora,
}
WITHOUT_DROPOUT = ["lora", "rslora", "dora", "ia3", "adapter", "qlora"]


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def _train(model: nn.Module, ids: torch.Tensor, steps: int = 2) -> list[float]:
    """Losses of ``steps`` SGD steps: the second one reads the first one's gradients."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", sorted(METHODS))
def test_dynamo_traces_a_training_forward_without_graph_breaks(method: str, ids: torch.Tensor) -> None:
    model = METHODS[method]().apply(tiny_llama()).train()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    in_package = [
        reason.reason
        for reason in explained.break_reasons
        if any(str(PACKAGE) in frame.filename for frame in reason.user_stack)
    ]
    assert in_package == []
    assert explained.graph_break_count == 0  # the tiny Llama itself has none either


def _layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """One adapted layer of the kind named, and an input for it."""
    torch.manual_seed(0)
    lora = {"r": 4, "lora_alpha": 8.0, "target_modules": ["0"], "init_lora_weights": False}
    strategies = {
        "lora": LoRA(**lora),
        "lora-dropout": LoRA(**lora, lora_dropout=0.1),
        "dora": LoRA(**lora, use_dora=True),
        "dora-dropout": LoRA(**lora, use_dora=True, lora_dropout=0.1),
        "ia3": IA3(target_modules=["0"], feedforward_modules=[]),
        "adapter": BottleneckAdapter(target_modules=["0"], reduction_factor=4),
    }
    model = strategies[kind].apply(nn.Sequential(nn.Linear(16, 12))).train()
    with torch.no_grad():  # off the identity init, so that every adapter tensor gets a gradient
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    return model[0], torch.randn(3, 5, 16)


@pytest.mark.parametrize("kind", ["lora", "lora-dropout", "dora", "dora-dropout", "ia3", "adapter"])
def test_an_adapted_layer_compiles_as_one_graph_with_eager_outputs_and_gradients(kind: str) -> None:
    layer, x = _layer(kind)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # a graph break would raise
    results = []
    for run in (layer, compiled):
        inputs = x.clone().requires_grad_(True)
        torch.manual_seed(5)  # aot_eager draws from the default generator as eager does: same masks
        out = run(inputs)
        weights = torch.linspace(-1, 1, out.numel()).view(out.shape)
        params = [p for p in layer.parameters() if p.requires_grad]
        results.append((out, *torch.autograd.grad((out * weights).sum(), [inputs, *params])))
    for eager, compiled_result in zip(*results, strict=True):
        assert compiled_result.abs().sum() > 0
        torch.testing.assert_close(compiled_result, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "backend",
    ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)],
)
@pytest.mark.parametrize("method", WITHOUT_DROPOUT)
def test_compiled_training_steps_give_the_eager_losses(method: str, backend: str, ids: torch.Tensor) -> None:
    model = METHODS[method]().apply(tiny_llama())
    eager = _train(copy.deepcopy(model).train(), ids)
    compiled = copy.deepcopy(model).train()
    compiled.compile(backend=backend)
    torch._dynamo.reset()
    got = _train(compiled, ids)
    assert eager[1] < eager[0]  # the step trained something the second loss sees
    # aot_eager runs eager's aten ops; inductor fuses and reorders float32 sums (measured: <= 1e-6)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "backend",
    ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)],
)
@pytest.mark.parametrize("method", ["lora-dropout", "dora-dropout"])
def test_compiled_training_with_dropout_runs_and_lowers_the_loss(
    method: str, backend: str, ids: torch.Tensor
) -> None:
    # the masks are the compiled graph's own draws (inductor has its own RNG): the numbers differ
    # from eager's, the training does not
    model = METHODS[method]().apply(tiny_llama()).train()
    model.compile(backend=backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    losses = _train(model, ids, steps=4)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
