"""Custom autograd functions behind LoRA's hot paths (see ``benchmarks/README.md`` for the numbers).

- :class:`_FusedLoRALinear`: ``W x + b + s B (A x)`` for a dense ``nn.Linear`` base, adding the update
  into the base output in place in forward and backward (no extra output-sized sums).
- :class:`_DroppedLoRA`: the dropout branch; it keeps ``x`` and the dropout mask packed one bit per
  element (1/32 of a float32 copy) and rebuilds the dropped input in backward.
- :class:`_DoRAScale`: DoRA's ``m / ||W + s B A||`` scaling; it saves the layer output and recovers the
  unscaled sum in backward instead of saving a second output-sized tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_BITS = (1, 2, 4, 8, 16, 32, 64, 128)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 tensor as one bit per element (uint8, eight elements a byte, zero-padded)."""
    flat = mask.flatten().to(torch.uint8)
    flat = F.pad(flat, (0, -flat.numel() % 8))
    bits = torch.tensor(_BITS, dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, 8) * bits).sum(dim=1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    bits = torch.tensor(_BITS, dtype=torch.uint8, device=packed.device)
    flat = packed.unsqueeze(1).bitwise_and(bits).ne(0).flatten()
    return flat[: shape.numel()].view(shape).to(dtype)


class _DroppedLoRA(torch.autograd.Function):
    """``s · B A dropout(x)`` that keeps no dropped copy of ``x`` for backward.

    Autograd would save, for every adapted layer, ``dropout(x)`` (the size of ``x``) and its mask; the
    q, k and v projections read one ``x`` but each drops it on its own, so that is three copies. Here
    backward rebuilds ``dropout(x)`` from ``x`` (kept anyway for ``A``'s gradient, and shared by the
    projections reading the same tensor) and the mask, saved as one bit per element: 1/32 of a
    float32 copy. Redrawing the mask from a saved random state would save even that, but on the CPU
    a Bernoulli draw costs about three times packing and unpacking the bits. The mask is the one
    ``nn.Dropout`` draws on the CPU (same generator, same draws); each layer's mask is independent,
    as in peft.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scaling, p):  # type: ignore[override]
        keep = 1.0 - p
        mask = torch.empty(x.shape, dtype=torch.uint8, device=x.device).bernoulli_(keep)  # F.dropout's draw
        # the 1 / keep of inverted dropout goes on the (..., r) hidden, not on the (..., in) input
        hidden = F.linear(x * mask, lora_a) * (scaling / keep)  # (..., r)
        ctx.save_for_backward(x, lora_a, lora_b, hidden, _pack_bits(mask))
        ctx.scale = scaling / keep
        return F.linear(hidden, lora_b)  # (..., out)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, lora_a, lora_b, hidden, packed = ctx.saved_tensors
        mask = _unpack_bits(packed, x.shape, x.dtype)
        grad_hidden = (grad_out @ lora_b) * ctx.scale  # (..., r), with 1 / keep
        grad_b = grad_out.flatten(0, -2).T @ hidden.flatten(0, -2) if ctx.needs_input_grad[2] else None
        grad_a = None
        if ctx.needs_input_grad[1]:
            grad_a = grad_hidden.flatten(0, -2).T @ (x * mask).flatten(0, -2)  # (r, in)
        grad_x = (grad_hidden @ lora_a).mul_(mask) if ctx.needs_input_grad[0] else None
        return grad_x, grad_a, grad_b, None, None


class _FusedLoRALinear(torch.autograd.Function):
    """``x Wᵀ + b + (s x Aᵀ) Bᵀ`` as one node: the update is added into the base output in place
    (``addmm_``), and in backward the adapter's input gradient into the base's, instead of autograd
    allocating a sum for each. Saves ``x`` and the ``(..., r)`` hidden, as the unfused form does."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):  # type: ignore[override]
        rows = x.reshape(-1, x.shape[-1])  # (N, in)
        hidden = (rows @ lora_a.T).mul_(scaling)  # (N, r)
        out = rows @ weight.T if bias is None else torch.addmm(bias, rows, weight.T)  # (N, out)
        out.addmm_(hidden, lora_b.T)
        ctx.save_for_backward(x, weight, lora_a, lora_b, hidden)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, lora_a, lora_b, hidden = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        rows = x.reshape(-1, x.shape[-1])
        grad_hidden = (grad @ lora_b).mul_(ctx.scaling)  # (N, r)
        need_x, need_w, need_b, need_a, need_lora_b, _ = ctx.needs_input_grad
        grad_x = (grad @ weight).addmm_(grad_hidden, lora_a).view_as(x) if need_x else None
        grad_w = grad.T @ rows if need_w else None
        grad_bias = grad.sum(dim=0) if need_b and ctx.has_bias else None
        grad_a = grad_hidden.T @ rows if need_a else None
        grad_b = grad.T @ hidden if need_lora_b else None
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None


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
        elif bool((magnitude != 0).all()):
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
