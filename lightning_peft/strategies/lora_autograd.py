"""Custom autograd functions behind LoRA's hot paths (see ``benchmarks/README.md`` for the numbers).

- :class:`_FusedLoRALinear`: ``W x + b + s B A dropout(x)`` for a dense ``nn.Linear`` base, adding the
  update into the base output in place in forward and backward (no extra output-sized sums).
- :class:`_DroppedLoRA`: the dropout branch of the other layers; like the fused one it keeps ``x`` and
  the dropout mask packed one bit per element (1/32 of a float32 copy) and rebuilds the dropped
  input in backward.
- :func:`dropout_mask`: dropout masks from 16-bit uniform numbers, four per 64-bit draw, one per
  layer; :func:`shared_dropout_mask` (opt-in) shares one among the layers that read the same tensor.
- :class:`_DoRAScale`: DoRA's ``m / ||W + s B A||`` scaling; it saves the layer output and recovers the
  unscaled sum in backward instead of saving a second output-sized tensor.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

_GATHER = 0x0102040810204080  # times eight 0/1 bytes (one int64): byte i's bit lands on bit 56 + i
_SPREAD = 0x0101010101010101  # times a byte: that byte in all eight
_SELECT = 0x8040201008040201 - (1 << 64)  # then byte i keeps bit i (as a signed int64 constant)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 (bool or numeric) tensor as one bit per element: uint8, eight elements a byte, zero-padded.

    Eight mask bytes read as one int64 and multiplied by ``_GATHER`` carry their eight bits in the
    product's top byte: one multiply and one shift per eight elements instead of a sum over a dim.
    """
    flat = mask.flatten().to(torch.uint8)
    flat = F.pad(flat, (0, -flat.numel() % 8))
    return ((flat.view(torch.int64) * _GATHER) >> 56).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, shape: torch.Size, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """The 0/1 tensor of ``shape`` back from :func:`_pack_bits`, as ``dtype`` (bool or floating)."""
    spread = (packed.to(torch.int64) * _SPREAD) & _SELECT  # (bytes,) int64: one mask bit in each byte
    flat = spread.view(torch.uint8)[: shape.numel()]  # byte i holds 0 or 2**(i % 8)
    if dtype == torch.bool:
        return flat.ne(0).view(shape)
    # uint8 -> float and a clamp: a quarter of the cost of going through bool
    return flat.to(dtype).clamp_(max=1).view(shape)


def _uniform16(numel: int, p: float, device: torch.device | str) -> tuple[torch.Tensor, int, float]:
    """``numel`` uniform int16 numbers (four per 64-bit draw of the default generator), the value from
    which an element is kept, and the exact keep probability (``p`` in steps of 1/65536).

    The draw is out of place (``torch.randint``, the same stream as ``random_``): torch.compile traces
    it, where an in-place ``random_`` breaks the graph. At least one value in 65536 is kept, so a
    ``p`` just below 1 still has a nonzero keep probability to divide by.
    """
    threshold = min(round(p * 65536), 65535)
    words = torch.randint(-(2**63), 2**63 - 1, (-(-numel // 4),), dtype=torch.int64, device=device)
    return words.view(torch.int16)[:numel], threshold - 32768, (65536 - threshold) / 65536


def keep_mask(
    shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, float]:
    """Dropout's keep mask (bool, ``shape``) and the probability it keeps, from the default generator.

    Four 16-bit uniform numbers come out of each 64-bit draw, so this costs about a fifth of
    ``bernoulli_`` on the CPU. ``p`` is rounded to a multiple of 1/65536 (0.05 -> 0.0500031), at most
    65535/65536; the returned keep probability is the exact one, for the ``1 / keep`` of inverted
    dropout.
    """
    uniform, lowest_kept, keep_p = _uniform16(math.prod(shape), p, device)
    return (uniform >= lowest_kept).view(shape), keep_p


class DropoutMask(NamedTuple):
    """One dropout draw for an input ``x``: ``keep`` (0/1 in ``x``'s dtype and shape), the same mask
    packed one bit per element (what backward keeps), and the probability of keeping."""

    keep: torch.Tensor
    packed: torch.Tensor
    keep_p: float


def dropout_mask(x: torch.Tensor, p: float, dtype: torch.dtype | None = None) -> DropoutMask:
    """A new dropout mask for ``x``: each call (each layer) draws its own, as peft, torchtune and LitGPT do.

    ``keep`` comes in ``dtype`` (default: ``x``'s), for a layer that computes in another one
    (autocast). Traceable by torch.compile (no in-place random ops, no host synchronisation).
    """
    uniform, lowest_kept, keep_p = _uniform16(x.numel(), p, x.device)
    # keep = clamp(u - lowest_kept + 1, 0, 1): floats straight from the integers, cheaper than a bool
    # mask times x (a mixed-dtype multiply); exact in float32 for every int16 value
    keep = (uniform.to(torch.float32) - (lowest_kept - 1)).clamp(0, 1).view(x.shape).to(dtype or x.dtype)
    return DropoutMask(keep, _pack_bits(uniform >= lowest_kept), keep_p)


class _SharedDraw(NamedTuple):
    tensor: weakref.ref  # the tensor it was drawn for: the entry goes when the tensor goes
    version: int
    p: float
    packed: torch.Tensor  # only the bits: a float mask would live as long as the tensor
    keep_p: float
    readers: set[int]


# id(tensor) -> its latest shared draw. Kept beside the tensors, not on them: an attribute on a tensor
# would be pickled with it (torch.save of a batch) and refused by torch.load(weights_only=True).
_DRAWS: dict[int, _SharedDraw] = {}


def _forget(key: int) -> Callable[[weakref.ref], None]:
    def forget(ref: weakref.ref) -> None:
        entry = _DRAWS.get(key)
        if entry is not None and entry.tensor is ref:
            del _DRAWS[key]

    return forget


def shared_dropout_mask(
    x: torch.Tensor, p: float, reader: object, dtype: torch.dtype | None = None
) -> DropoutMask:
    """The dropout mask ``reader`` (a LoRA layer) applies to ``x`` when layers share masks
    (``LoRA(share_dropout_mask=True)``): the one drawn for this same tensor by another layer (same
    ``p``, ``x`` unchanged since), else a new draw.

    Layers that read one tensor (q, k and v; gate and up) then share one mask, drawn once and kept
    once (its packed bits are the same storage in every layer's backward). Per layer the distribution
    is dropout's, but the layers' masks are identical instead of independent: not peft's method. The
    draw is remembered while ``x`` lives (a weak reference); a layer that reads ``x`` again (a second
    forward on the same tensor) draws afresh. Eager mode only: tensor identities and version counters
    are not traceable by torch.compile.
    """
    if torch.compiler.is_compiling():
        raise RuntimeError(
            "share_dropout_mask=True works in eager mode only (it finds a tensor's mask by the tensor's "
            "identity, which torch.compile cannot trace); compile with share_dropout_mask=False"
        )
    try:
        version = x._version
    except RuntimeError:  # an inference-mode tensor has no version counter: no sharing
        return dropout_mask(x, p, dtype)
    key, reader_key = id(x), id(reader)
    shared = _DRAWS.get(key)
    if (
        shared is not None
        and shared.tensor() is x
        and shared.version == version
        and shared.p == p
        and reader_key not in shared.readers
    ):
        shared.readers.add(reader_key)
        keep = _unpack_bits(shared.packed, x.shape, dtype or x.dtype)
        return DropoutMask(keep, shared.packed, shared.keep_p)
    mask = dropout_mask(x, p, dtype)
    _DRAWS[key] = _SharedDraw(
        weakref.ref(x, _forget(key)), version, p, mask.packed, mask.keep_p, {reader_key}
    )
    return mask


class _DroppedLoRA(torch.autograd.Function):
    """``s · B A dropout(x)`` that keeps no dropped copy of ``x`` for backward (for the unfused path:
    Conv1D, quantized or hooked bases, DoRA).

    Autograd would save, for every adapted layer, ``dropout(x)`` (the size of ``x``) and its mask; the
    q, k and v projections read one ``x`` but each drops it on its own, so that is three copies. Here
    backward rebuilds ``dropout(x)`` from ``x`` (kept anyway for ``A``'s gradient, and shared by the
    projections reading the same tensor) and the mask's bits (:func:`dropout_mask`): 1/32 of a
    float32 copy per layer (one for all the layers that read ``x`` when they share masks).
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scaling, mask):  # type: ignore[override]
        # the 1 / keep_p of inverted dropout goes on the (..., r) hidden, not on the (..., in) input
        hidden = F.linear(x * mask.keep, lora_a) * (scaling / mask.keep_p)  # (..., r)
        ctx.save_for_backward(x, lora_a, lora_b, hidden, mask.packed)
        ctx.scale = scaling / mask.keep_p
        return F.linear(hidden, lora_b)  # (..., out)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, lora_a, lora_b, hidden, packed = ctx.saved_tensors
        keep = _unpack_bits(packed, x.shape, x.dtype)
        grad_hidden = (grad_out @ lora_b) * ctx.scale  # (..., r), with 1 / keep_p
        grad_b = grad_out.flatten(0, -2).T @ hidden.flatten(0, -2) if ctx.needs_input_grad[2] else None
        grad_a = None
        if ctx.needs_input_grad[1]:
            grad_a = grad_hidden.flatten(0, -2).T @ (x * keep).flatten(0, -2)  # (r, in)
        grad_x = (grad_hidden @ lora_a).mul_(keep) if ctx.needs_input_grad[0] else None
        return grad_x, grad_a, grad_b, None, None


def _down_projection(
    rows: torch.Tensor, lora_a: torch.Tensor, scaling: float, mask: DropoutMask | None
) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    """``(hidden, scale, packed mask)``: ``hidden = scale · dropout(rows) Aᵀ`` (N, r), where ``scale``
    includes inverted dropout's ``1 / keep``; the packed mask is None without dropout."""
    if mask is None:
        return (rows @ lora_a.T).mul_(scaling), scaling, None
    scaling = scaling / mask.keep_p
    return ((rows * mask.keep.view(rows.shape)) @ lora_a.T).mul_(scaling), scaling, mask.packed


def _input_grad(
    grad_base: torch.Tensor,
    weight: torch.Tensor,
    grad_hidden: torch.Tensor,
    lora_a: torch.Tensor,
    keep: torch.Tensor | None,
) -> torch.Tensor:
    """``g W + (g_hidden A) ⊙ keep``: the base's and the adapter's input gradients in one buffer."""
    if keep is None:
        return (grad_base @ weight).addmm_(grad_hidden, lora_a)
    return (grad_base @ weight).addcmul_(grad_hidden @ lora_a, keep)


class _FusedLoRALinear(torch.autograd.Function):
    """``x Wᵀ + b + (s · dropout(x) Aᵀ) Bᵀ`` as one node for a dense ``nn.Linear`` base.

    The update is added into the base output in place (``addmm_``), and in backward the adapter's
    input gradient into the base's, instead of autograd allocating a sum for each. Saves ``x`` and
    the ``(..., r)`` hidden, as the unfused form does, plus with dropout (a ``mask``) the keep mask as
    bits (see :class:`_DroppedLoRA`); ``mask=None`` is plain LoRA.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, mask):  # type: ignore[override]
        rows = x.reshape(-1, x.shape[-1])  # (N, in)
        hidden, scaling, packed = _down_projection(rows, lora_a, scaling, mask)  # (N, r)
        out = rows @ weight.T if bias is None else torch.addmm(bias, rows, weight.T)  # (N, out)
        out.addmm_(hidden, lora_b.T)
        ctx.save_for_backward(x, weight, lora_a, lora_b, hidden, packed)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, lora_a, lora_b, hidden, packed = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        rows = x.reshape(-1, x.shape[-1])
        keep = None if packed is None else _unpack_bits(packed, rows.shape, rows.dtype)
        dropped = rows if keep is None else rows * keep
        grad_hidden = (grad @ lora_b).mul_(ctx.scaling)  # (N, r)
        need_x, need_w, need_b, need_a, need_lora_b, _, _ = ctx.needs_input_grad
        grad_x = _input_grad(grad, weight, grad_hidden, lora_a, keep).view_as(x) if need_x else None
        grad_w = grad.T @ rows if need_w else None
        grad_bias = grad.sum(dim=0) if need_b and ctx.has_bias else None
        grad_a = grad_hidden.T @ dropped if need_a else None
        grad_b = grad.T @ hidden if need_lora_b else None
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None


def _all_nonzero(magnitude: torch.Tensor) -> bool:
    """Whether the output ``y = m / n · s`` gives the sum ``s`` back (no ``m`` is zero).

    Eager mode checks (one host synchronisation per layer). A compiled graph cannot branch on a
    tensor's values: it answers False, and the DoRA nodes keep what works for every magnitude (the
    fused one recomputes ``s`` in backward, :class:`_DoRAScale` saves it), same gradients.
    """
    return not torch.compiler.is_compiling() and bool((magnitude != 0).all())


class _FusedDoRALinear(torch.autograd.Function):
    """DoRA on a dense ``nn.Linear`` as one node: ``y = m / n · (x Wᵀ + s · dropout(x) Aᵀ Bᵀ) + b``.

    ``n = ||W + s B A||`` per output is a constant (DoRA sec. 4.3). The sum is built in place in one
    output-sized buffer (``addmm_``, ``mul_``, ``add_``). The magnitude's gradient needs the unscaled
    sum ``s_full`` (one value per token and output): with ``save_output`` the output ``y`` is saved
    and ``s_full = (y - b) n / m`` recovered, which is free where the model keeps ``y`` anyway (an
    activation's input, a product's operand, attention's values); without it, nothing output-sized
    is saved and backward recomputes ``s_full = x Wᵀ + hidden Bᵀ`` (one more base matmul). A zero
    magnitude cannot give ``s_full`` back from ``y``, so it recomputes too.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, magnitude, norm, scaling, mask, save_output):  # type: ignore[override]
        rows = x.reshape(-1, x.shape[-1])  # (N, in)
        hidden, scaling, packed = _down_projection(rows, lora_a, scaling, mask)  # (N, r)
        out = rows @ weight.T  # (N, out)
        out.addmm_(hidden, lora_b.T)  # s_full
        gain = (magnitude / norm).to(out.dtype)  # (out,)
        out.mul_(gain)
        if bias is not None:
            out.add_(bias)
        keep_y = save_output and ctx.needs_input_grad[5] and _all_nonzero(magnitude)
        ctx.save_for_backward(
            x, weight, bias, lora_a, lora_b, hidden, gain, norm, packed, out if keep_y else None
        )
        ctx.scaling, ctx.magnitude_dtype = scaling, magnitude.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, bias, lora_a, lora_b, hidden, gain, norm, packed, out = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        grad = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        rows = x.reshape(-1, x.shape[-1])
        keep = None if packed is None else _unpack_bits(packed, rows.shape, rows.dtype)
        grad_sum = grad * gain  # (N, out): the gradient of s_full
        grad_hidden = (grad_sum @ lora_b).mul_(ctx.scaling)  # (N, r)
        grad_x = grad_w = grad_bias = grad_a = grad_b = grad_m = None
        if need_x:
            grad_x = _input_grad(grad_sum, weight, grad_hidden, lora_a, keep).view_as(x)
        if need_w:
            grad_w = grad_sum.T @ rows
        if need_bias and bias is not None:
            grad_bias = grad.sum(dim=0)
        if need_a:
            grad_a = grad_hidden.T @ (rows if keep is None else rows * keep)
        if need_b:
            grad_b = grad_sum.T @ hidden
        if need_m:
            if out is not None:  # s_full = (y - b) / gain
                per_out = (grad * out).sum(dim=0, dtype=torch.float32)
                if bias is not None:
                    per_out -= bias.float() * grad.sum(dim=0, dtype=torch.float32)
                grad_m = per_out / (gain.float() * norm.float())
            else:
                summed = (rows @ weight.T).addmm_(hidden, lora_b.T)  # recomputed s_full
                grad_m = (grad * summed).sum(dim=0, dtype=torch.float32) / norm.float()
            grad_m = grad_m.to(ctx.magnitude_dtype)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_m, None, None, None, None


class _DoRAScale(torch.autograd.Function):
    """``m / norm · s`` per output, with the norm a constant (DoRA sec. 4.3).

    The magnitude's gradient needs ``s`` (the size of the output). Autograd would save it; here the
    output ``y`` is saved instead and ``s = y · norm / m`` recovered in backward: the layers whose
    output the model keeps anyway (SiLU's input, a product's operand, attention's values) then keep
    one tensor, not two. Where some magnitude is zero the output cannot give ``s`` back and ``s``
    itself is saved.
    """

    @staticmethod
    def forward(ctx, summed, magnitude, norm):  # type: ignore[override]
        gain = (magnitude / norm).to(summed.dtype)
        out = summed * gain
        if not ctx.needs_input_grad[1]:
            ctx.save_for_backward(gain, None, None, norm)
        elif _all_nonzero(magnitude):
            ctx.save_for_backward(gain, None, out, norm)
        else:
            ctx.save_for_backward(gain, summed, None, norm)
        ctx.magnitude_dtype = magnitude.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        gain, summed, out, norm = ctx.saved_tensors
        grad_summed = grad_out * gain if ctx.needs_input_grad[0] else None
        grad_m = None
        if ctx.needs_input_grad[1]:
            rows = grad_out.flatten(0, -2)  # (N, out)
            if summed is not None:
                per_out = (rows * summed.flatten(0, -2)).sum(dim=0, dtype=torch.float32)
                grad_m = per_out / norm.float()
            else:
                per_out = (rows * out.flatten(0, -2)).sum(dim=0, dtype=torch.float32)
                grad_m = per_out / (gain.float() * norm.float())
            grad_m = grad_m.to(ctx.magnitude_dtype)
        return grad_summed, grad_m, None
