"""LoRA's fast paths give the straightforward formulation's numbers: dropout that saves its mask as
bits instead of saving the dropped input, DoRA's row norm without building ``W + s B A``, and
DoRA's magnitude gradient from the saved output. Plus the activation bytes they were written for."""

from __future__ import annotations

import copy
import gc

import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from torch import nn

from lightning_peft.planning import saved_activation_bytes
from lightning_peft.strategies import LoRA, LoRALinear
from lightning_peft.strategies.lora_autograd import (
    _pack_bits,
    _unpack_bits,
    dropout_mask,
    keep_mask,
    shared_dropout_mask,
)

IN, OUT, RANK, ALPHA = 16, 12, 4, 8.0
SCALE = ALPHA / RANK


def _layer(**lora: object) -> LoRALinear:
    torch.manual_seed(0)
    settings = {"r": RANK, "lora_alpha": ALPHA, "target_modules": ["0"], "init_lora_weights": False}
    settings.update(lora)
    model = LoRA(**settings).apply(nn.Sequential(nn.Linear(IN, OUT)))
    return model[0]


def _input(requires_grad: bool = True) -> torch.Tensor:
    x = torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(1))
    return x.requires_grad_(requires_grad)


def _grads(out: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    return torch.autograd.grad((out * weights).sum(), tensors)


def _saved_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes autograd saves during one forward: each storage once, parameters excluded."""
    return saved_activation_bytes(lambda: model(ids), [*model.parameters(), *model.buffers()])


# ------------------------------------------------------------------------------------ fused, no dropout


@pytest.mark.parametrize("train_base", [False, True], ids=["frozen-base", "trainable-base-and-bias"])
def test_fused_lora_outputs_and_gradients_match_the_straightforward_formulation(train_base: bool) -> None:
    layer = _layer().train()
    W, b, A, B = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B
    W.requires_grad_(train_base)
    b.requires_grad_(train_base)
    x = _input()
    tensors = (x, A, B, W, b) if train_base else (x, A, B)
    got = layer(x)
    assert type(got.grad_fn).__name__.startswith("_FusedLoRALinear")
    expected = F.linear(x, W, b) + SCALE * F.linear(F.linear(x, A), B)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(_grads(got, *tensors), _grads(expected, *tensors), strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_a_hook_on_the_base_layer_still_runs() -> None:
    layer = _layer()
    calls = []
    layer.base_layer.register_forward_hook(lambda *args: calls.append(1))
    x = _input()
    W, b, A, B = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B
    torch.testing.assert_close(layer(x), F.linear(x, W, b) + SCALE * F.linear(F.linear(x, A), B))
    assert calls == [1]


# --------------------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("path", ["fused", "unfused"])
def test_dropout_outputs_and_gradients_match_the_straightforward_formulation(path: str) -> None:
    layer = _layer(lora_dropout=0.3).train()
    if path == "unfused":  # a hook on the base layer takes the general path (_DroppedLoRA)
        layer.base_layer.register_forward_hook(lambda *args: None)
    x = _input()
    torch.manual_seed(7)
    got = layer(x)
    name = type(got.grad_fn).__name__ if path == "fused" else type(got.grad_fn.next_functions[1][0]).__name__
    assert name.startswith("_FusedLoRALinear" if path == "fused" else "_DroppedLoRA")
    got_grads = _grads(got, x, layer.lora_A, layer.lora_B)
    W, b, A, B = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B
    torch.manual_seed(7)  # the same draw from the same state
    keep, keep_p = keep_mask(x.shape, 0.3)
    expected = F.linear(x, W, b) + SCALE * F.linear(F.linear(x * keep / keep_p, A), B)
    expected_grads = _grads(expected, x, A, B)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_keep_mask_drops_p_of_the_elements_uniformly() -> None:
    torch.manual_seed(0)
    keep, keep_p = keep_mask((4, 250_000), 0.05)
    assert keep.dtype == torch.bool and keep_p == (65536 - 3277) / 65536  # p rounded to 1/65536
    dropped = 1 - keep.float().mean(dim=1)  # each row: 250k draws, std 0.0004
    assert ((dropped - 0.05).abs() < 0.002).all()
    lanes = 1 - keep.flatten().view(-1, 4).float().mean(dim=0)  # the four 16-bit lanes of each draw
    assert ((lanes - 0.05).abs() < 0.002).all()
    torch.manual_seed(0)
    assert torch.equal(keep_mask((4, 250_000), 0.05)[0], keep)


@pytest.mark.parametrize("p", [1 - 2**-17, 1 - 2**-20], ids=["half-a-step-below-1", "closer-to-1"])
def test_dropout_just_below_one_keeps_one_in_65536_and_stays_finite(p: float) -> None:
    # p rounds to 65536/65536 there: the mask keeps the smallest step instead (keep_p = 2**-16)
    assert keep_mask((8,), p)[1] == 2**-16
    layer = _layer(lora_dropout=p).train()
    x = _input()
    out = layer(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(layer.lora_A.grad).all()


def test_shared_masks_refuse_torch_compile_with_a_clear_error() -> None:
    model = _two_readers(0.5, share=True)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="share_dropout_mask=True works in eager mode only"):
        compiled(_input())


def test_share_dropout_mask_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="share_dropout_mask must be True or False, got 'yes'"):
        LoRA(share_dropout_mask="yes")


def test_dropout_mask_drops_about_p_and_scales_the_rest() -> None:
    layer = _layer(lora_dropout=0.25).train()
    with torch.no_grad():  # A = identity-like probe: the hidden reads x through the mask
        layer.lora_A.zero_()
        layer.lora_A[0, 0] = 1.0
        layer.lora_B.zero_()
        layer.lora_B[0, 0] = 1.0 / SCALE
    x = torch.ones(20000, IN)
    update = (layer(x) - layer.base_layer(x))[:, 0].detach()  # the mask on x[:, 0], times 1 / 0.75
    dropped = (update == 0).float().mean().item()
    assert abs(dropped - 0.25) < 0.015
    torch.testing.assert_close(update[update != 0], torch.full_like(update[update != 0], 1 / 0.75))


def test_dropout_masks_are_reproducible_from_the_seed_and_differ_between_steps() -> None:
    layer = _layer(lora_dropout=0.5).train()
    x = _input(requires_grad=False)
    torch.manual_seed(3)
    first, second = layer(x), layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), first)
    assert not torch.equal(first, second)


class _TwoReaders(nn.Module):
    """Two linear layers reading one tensor, as q and k do."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(IN, OUT), nn.Linear(IN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x) + self.k(x)


def _two_readers(p: float, share: bool = False) -> nn.Module:
    torch.manual_seed(0)
    strategy = LoRA(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=p,
        target_modules=["q", "k"],
        init_lora_weights=False,
        share_dropout_mask=share,
    )
    return strategy.apply(_TwoReaders()).train()


def _keep_patterns(model: nn.Module, p: float, rows: int = 40_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rows of one tensor q's and k's dropout kept in their first input column (bool, rows)."""
    for layer in (model.q, model.k):
        with torch.no_grad():  # the update reads x[:, 0] through the mask, scaled back to 1
            layer.lora_A.zero_()
            layer.lora_A[0, 0] = 1.0
            layer.lora_B.zero_()
            layer.lora_B[0, 0] = (1 - p) / SCALE
    x = torch.ones(rows, IN)
    kept = [(layer(x) - layer.base_layer(x))[:, 0].detach() > 0.5 for layer in (model.q, model.k)]
    return kept[0], kept[1]


@pytest.mark.parametrize("path", ["fused", "unfused"])
def test_layers_reading_one_tensor_draw_independent_masks_by_default(path: str) -> None:
    # peft's (and torchtune's, LitGPT's) dropout: one mask per layer, so q and k keep an element
    # together with probability (1 - p)^2, not 1 - p as one shared mask would
    p = 0.25
    model = _two_readers(p)
    if path == "unfused":
        for layer in (model.q, model.k):
            layer.base_layer.register_forward_hook(lambda *args: None)
    torch.manual_seed(0)
    q_kept, k_kept = _keep_patterns(model, p)  # 40k rows: standard errors about 0.0025
    assert abs(q_kept.float().mean().item() - (1 - p)) < 0.015
    assert abs(k_kept.float().mean().item() - (1 - p)) < 0.015
    assert abs((q_kept & k_kept).float().mean().item() - (1 - p) ** 2) < 0.015
    assert abs((~q_kept & ~k_kept).float().mean().item() - p**2) < 0.015
    correlation = torch.corrcoef(torch.stack([q_kept.float(), k_kept.float()]))[0, 1]
    assert abs(correlation.item()) < 0.03


def test_layers_reading_one_tensor_share_its_mask_when_asked() -> None:
    p = 0.25
    model = _two_readers(p, share=True)
    torch.manual_seed(0)
    q_kept, k_kept = _keep_patterns(model, p)
    assert abs(q_kept.float().mean().item() - (1 - p)) < 0.015
    assert torch.equal(q_kept, k_kept)


@pytest.mark.parametrize("path", ["fused", "unfused"])
def test_default_masks_are_one_draw_per_layer_in_call_order_each_kept_as_bits(path: str) -> None:
    model = _two_readers(0.3)
    if path == "unfused":
        for layer in (model.q, model.k):
            layer.base_layer.register_forward_hook(lambda *args: None)
    x = _input()
    adapters = (model.q.lora_A, model.q.lora_B, model.k.lora_A, model.k.lora_B)
    torch.manual_seed(7)
    got = model(x)
    got_grads = _grads(got, x, *adapters)
    torch.manual_seed(7)
    masks = [keep_mask(x.shape, 0.3) for _ in range(2)]  # q's draw, then k's
    expected = sum(
        F.linear(x, m.base_layer.weight, m.base_layer.bias)
        + SCALE * F.linear(F.linear(x * keep / keep_p, m.lora_A), m.lora_B)
        for m, (keep, keep_p) in zip((model.q, model.k), masks, strict=True)
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(got_grads, _grads(expected, x, *adapters), strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    # backward keeps each layer's mask as bits: 240 elements, 30 bytes per layer
    assert _saved_bytes(model, x) - _saved_bytes(_two_readers(0.0), x) == 2 * x.numel() // 8


@pytest.mark.parametrize("path", ["fused", "unfused"])
def test_shared_masks_are_drawn_and_kept_once_for_the_layers_reading_one_tensor(path: str) -> None:
    model = _two_readers(0.3, share=True)
    if path == "unfused":
        for layer in (model.q, model.k):
            layer.base_layer.register_forward_hook(lambda *args: None)
    x = _input()
    adapters = (model.q.lora_A, model.q.lora_B, model.k.lora_A, model.k.lora_B)
    torch.manual_seed(7)
    got = model(x)
    got_grads = _grads(got, x, *adapters)
    torch.manual_seed(7)
    keep, keep_p = keep_mask(x.shape, 0.3)  # one draw, for both layers
    expected = sum(
        F.linear(x, m.base_layer.weight, m.base_layer.bias)
        + SCALE * F.linear(F.linear(x * keep / keep_p, m.lora_A), m.lora_B)
        for m in (model.q, model.k)
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(got_grads, _grads(expected, x, *adapters), strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    # backward keeps the mask's bits once, whichever layers read x: 240 elements, 30 bytes
    with_dropout = _saved_bytes(model, x)
    assert with_dropout - _saved_bytes(_two_readers(0.0, share=True), x) == x.numel() // 8


def test_a_mask_is_shared_only_for_the_same_unchanged_tensor_and_p_and_once_per_layer() -> None:
    q, k = object(), object()
    x = _input(requires_grad=False)
    first = shared_dropout_mask(x, 0.5, q)
    assert shared_dropout_mask(x, 0.5, k).packed is first.packed  # another reader: the same draw
    again = shared_dropout_mask(x, 0.5, q)  # q reads x a second time (a second forward): a new draw
    assert not torch.equal(again.packed, first.packed)
    assert shared_dropout_mask(x, 0.5, k).packed is again.packed  # and k follows q's second forward
    assert shared_dropout_mask(x, 0.25, k).packed is not again.packed  # another p
    changed = shared_dropout_mask(x, 0.25, q).packed
    x.mul_(1.0)  # changed in place since the draw
    assert shared_dropout_mask(x, 0.25, k).packed is not changed
    assert shared_dropout_mask(x.clone(), 0.25, k).packed is not changed  # an equal but other tensor


def test_a_dropout_mask_agrees_with_its_bits_and_keeps_about_one_minus_p() -> None:
    mask = dropout_mask(torch.zeros(1000, 64), 0.25)
    assert torch.equal(mask.keep, _unpack_bits(mask.packed, mask.keep.shape, torch.float32))
    assert abs(mask.keep.mean().item() - 0.75) < 0.01 and set(mask.keep.unique().tolist()) == {0.0, 1.0}


def test_shared_draws_leave_the_tensors_alone_and_go_with_them(tmp_path) -> None:
    from lightning_peft.strategies import lora_autograd

    model = _two_readers(0.5, share=True)
    before = len(lora_autograd._DRAWS)
    x = _input(requires_grad=False)
    model(x).sum()
    assert len(lora_autograd._DRAWS) == before + 1
    # nothing is attached to the batch: it saves and loads as plain weights
    assert not x.__dict__
    torch.save({"batch": x}, tmp_path / "batch.pt")
    assert torch.equal(torch.load(tmp_path / "batch.pt", weights_only=True)["batch"], x)
    del x
    gc.collect()
    assert len(lora_autograd._DRAWS) == before  # the draw went with its tensor


def test_shared_dropout_under_inference_mode_draws_per_layer() -> None:
    # inference tensors have no version counter, so nothing is shared; the layers still drop
    model = _two_readers(0.5, share=True)
    with torch.inference_mode():
        x = _input(requires_grad=False)
        torch.manual_seed(7)
        got = model(x)
        torch.manual_seed(7)
        masks = [keep_mask(x.shape, 0.5) for _ in range(2)]  # two draws, one per layer
        expected = sum(
            F.linear(x, m.base_layer.weight, m.base_layer.bias)
            + SCALE * F.linear(F.linear(x * keep / keep_p, m.lora_A), m.lora_B)
            for m, (keep, keep_p) in zip((model.q, model.k), masks, strict=True)
        )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("share", "per_block"), [(False, 7), (True, 4)], ids=["per-layer", "shared"])
def test_llama_keeps_one_packed_mask_per_layer_or_per_input_tensor_when_shared(
    share: bool, per_block: int, ids: torch.Tensor
) -> None:
    # shared, per block: q/k/v share the normed input, gate/up the normed residual; o and down their own
    model = LoRA(r=4, lora_dropout=0.1, share_dropout_mask=share).apply(tiny_llama()).train()
    masks: set[int] = set()

    def keep_bits(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype == torch.uint8:
            masks.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep_bits, lambda t: t):
        model(ids)
    assert len(masks) == 2 * per_block


@pytest.mark.parametrize("shape", [(3, 5, 16), (7, 3)], ids=["multiple-of-8", "padded"])
def test_packed_mask_round_trips(shape: tuple[int, ...]) -> None:
    mask = torch.empty(shape).bernoulli_(0.5, generator=torch.Generator().manual_seed(0))
    packed = _pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(_unpack_bits(packed, mask.shape, mask.dtype), mask)


def test_dropout_is_off_in_eval_mode() -> None:
    layer = _layer(lora_dropout=0.5).eval()
    x = _input(requires_grad=False)
    W, b, A, B = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B
    torch.testing.assert_close(layer(x), F.linear(x, W, b) + SCALE * F.linear(F.linear(x, A), B))


def test_backward_uses_the_forward_mask_whatever_runs_in_between() -> None:
    layer = _layer(lora_dropout=0.3).train()
    x = _input()
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(999)  # anything run between forward and backward must not change the mask
    torch.rand(100)
    got = _grads(out, x, layer.lora_A)
    torch.manual_seed(7)
    expected = _grads(layer(x), x, layer.lora_A)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


# ------------------------------------------------------------------------------------------------ DoRA


def _dora_layer(**extra: object) -> LoRALinear:
    layer = _layer(use_dora=True, **extra)
    with torch.no_grad():
        layer.lora_magnitude_vector.uniform_(0.5, 1.5)
    return layer


def _dora_reference(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    W, b, A, B, m = (
        layer.base_layer.weight,
        layer.base_layer.bias,
        layer.lora_A,
        layer.lora_B,
        layer.lora_magnitude_vector,
    )
    norm = (W + SCALE * B @ A).norm(dim=1).detach()  # a constant for autograd (DoRA sec. 4.3)
    return m / norm * (F.linear(x, W) + SCALE * F.linear(F.linear(x, A), B)) + b


def test_dora_row_norm_matches_the_norm_of_the_built_weight() -> None:
    layer = _dora_layer()
    W = layer.base_layer.weight
    expected = (W + SCALE * layer.lora_B @ layer.lora_A).norm(dim=1)
    torch.testing.assert_close(layer._dora_row_norm(layer.base_weight()), expected.detach())


def test_dora_row_norm_follows_in_place_changes_of_the_base_weight() -> None:
    layer = _dora_layer()
    layer._dora_row_norm(layer.base_weight())  # fills the cache of ||W||^2
    with torch.no_grad():
        layer.base_layer.weight.mul_(2.0)
    expected = (layer.base_layer.weight + SCALE * layer.lora_B @ layer.lora_A).norm(dim=1)
    torch.testing.assert_close(layer._dora_row_norm(layer.base_weight()), expected.detach())


@pytest.mark.parametrize("path", ["fused-saves-output", "fused-recomputes", "unfused"])
@pytest.mark.parametrize("zero_magnitude", [False, True], ids=["magnitude", "zero-magnitude"])
def test_dora_outputs_and_gradients_match_the_straightforward_formulation(
    zero_magnitude: bool, path: str
) -> None:
    layer = _dora_layer()
    layer.dora_saves_output = path == "fused-saves-output"
    if path == "unfused":  # a hooked base takes the general path
        layer.base_layer.register_forward_hook(lambda *args: None)
    if zero_magnitude:  # the output cannot give the sum back on this row: recomputed (or saved, unfused)
        with torch.no_grad():
            layer.lora_magnitude_vector[3] = 0.0
    x = _input()
    params = (x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)
    got = layer(x)
    assert ("Fused" in type(got.grad_fn).__name__) == path.startswith("fused")
    got_grads = _grads(got, *params)
    expected = _dora_reference(layer, x)
    expected_grads = _grads(expected, *params)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_fused_dora_gives_the_base_weight_and_bias_their_gradients_when_they_train() -> None:
    layer = _dora_layer()
    W, b = layer.base_layer.weight, layer.base_layer.bias
    W.requires_grad_(True)
    b.requires_grad_(True)
    x = _input()
    got = layer(x)
    assert "Fused" in type(got.grad_fn).__name__
    tensors = (x, W, b, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)
    # the reference treats the norm as a constant, as DoRA does: no gradient reaches W through it
    for g, e in zip(_grads(got, *tensors), _grads(_dora_reference(layer, x), *tensors), strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("saves_output", [True, False], ids=["saves-output", "recomputes"])
def test_dora_with_dropout_matches_the_straightforward_formulation(saves_output: bool) -> None:
    layer = _dora_layer(lora_dropout=0.2).train()
    layer.dora_saves_output = saves_output
    x = _input()
    params = (x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)
    torch.manual_seed(5)
    got = layer(x)
    got_grads = _grads(got, *params)
    W, b, A, B, m = (layer.base_layer.weight, layer.base_layer.bias, *params[1:])
    norm = (W + SCALE * B @ A).norm(dim=1).detach()
    torch.manual_seed(5)
    keep, keep_p = keep_mask(x.shape, 0.2)
    dropped = x * keep / keep_p
    expected = m / norm * (F.linear(x, W) + SCALE * F.linear(F.linear(dropped, A), B)) + b
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(got_grads, _grads(expected, *params), strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_dora_merge_and_unmerge_keep_outputs_with_the_cached_norm() -> None:
    layer = _dora_layer()
    x = _input(requires_grad=False)
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        layer.unmerge()  # the base weight moved twice: the cached ||W||^2 must follow
        torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------- saved activations


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(0))


def _ours(**lora: object) -> nn.Module:
    return LoRA(r=4, lora_alpha=8, **lora).apply(tiny_llama()).train()


def test_lora_saves_no_more_activations_than_peft(ids: torch.Tensor) -> None:
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    assert _saved_bytes(_ours(), ids) <= _saved_bytes(theirs.train(), ids)


def test_lora_dropout_saves_no_dropped_copies(ids: torch.Tensor) -> None:
    assert _saved_bytes(_ours(lora_dropout=0.1), ids) <= 1.05 * _saved_bytes(_ours(), ids)


def test_dora_saves_less_than_the_straightforward_formulation(ids: torch.Tensor) -> None:
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)
    )
    ours = _ours(use_dora=True)
    assert _saved_bytes(ours, ids) < _saved_bytes(theirs.train(), ids)


def test_dora_saves_at_most_10_percent_more_than_lora(ids: torch.Tensor) -> None:
    # Llama: v, gate and up keep their outputs (the model saves them anyway), q, k, o, down recompute
    dora = _ours(use_dora=True)
    kept = {n.rsplit(".", 1)[-1] for n, m in dora.named_modules() if getattr(m, "dora_saves_output", False)}
    assert kept == {"v_proj", "gate_proj", "up_proj"}
    assert _saved_bytes(dora, ids) <= 1.1 * _saved_bytes(_ours(), ids)


def test_a_changed_deep_copy_of_a_dora_model_recomputes_its_norm_cache(ids: torch.Tensor) -> None:
    model = _ours(use_dora=True).eval()
    with torch.no_grad():
        model(ids)
        twin = copy.deepcopy(model)
        for p in twin.parameters():
            if not p.requires_grad:
                p.mul_(1.5)
        layer = twin.model.layers[0].self_attn.q_proj
        W = layer.base_layer.weight
        reference = (W + layer.scaling * layer.lora_B @ layer.lora_A).norm(dim=1)
        torch.testing.assert_close(layer._dora_row_norm(layer.base_weight()), reference)


# ------------------------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("path", ["fused", "unfused"])
@pytest.mark.parametrize("method", ["lora", "dropout", "dora"])
def test_bf16_autocast_computes_as_autocast_would(path: str, method: str) -> None:
    # mixed precision (Lightning's precision="bf16-mixed"): our nodes run in autocast's dtype and give
    # what the layers composed of autocast's own F.linear give
    extra = {"lora": {}, "dropout": {"lora_dropout": 0.3}, "dora": {"use_dora": True}}[method]
    layer = _layer(**extra).train()
    if path == "unfused":
        layer.base_layer.register_forward_hook(lambda *args: None)
    W, b, A, B = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B
    x = _input()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(7)
        got = layer(x)
        torch.manual_seed(7)
        keep, keep_p = keep_mask(x.shape, 0.3) if method == "dropout" else (torch.ones_like(x), 1.0)
        summed = F.linear(x, W) + SCALE * F.linear(F.linear(x * keep / keep_p, A), B)
        if method == "dora":
            norm = (W + SCALE * B @ A).norm(dim=1).detach()
            summed = summed * (layer.lora_magnitude_vector / norm)
        expected = summed + b
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), atol=0.05, rtol=0.02)
    for g, e in zip(_grads(got.float(), x, A, B), _grads(expected.float(), x, A, B), strict=True):
        assert g.dtype == e.dtype == torch.float32  # back to the parameters' dtype
        torch.testing.assert_close(g, e, atol=0.05, rtol=0.05)
