"""The LoRA layers: LoRA (Hu et al., 2021), rsLoRA (Kalajdzievski, 2023) and DoRA (Liu et al., 2024).

A frozen weight ``W`` gets a trainable low-rank update::

    x ──► W ─────────────────────────► (+) ──► y          y = W x + b + s · B A dropout(x)
    └───► dropout ─► A (r × in) ─► B (out × r) ─► · s ─┘

    s = lora_alpha / r          (LoRA)
    s = lora_alpha / sqrt(r)    (rsLoRA: keeps the update's scale stable as r grows)

``B`` starts at zero, so an adapted model starts exactly where its base model is. DoRA splits the
weight into a magnitude ``m`` (one number per output) and a direction, and LoRA updates the
direction::

    y = m / ||W + s B A||  ·  (W x + s B A dropout(x))  +  b

with the norm taken per output row and treated as a constant in the backward pass (DoRA, sec. 4.3).
Parameter names follow peft (``lora_A``, ``lora_B``, ``lora_embedding_A``, ``lora_magnitude_vector``)
so that exports map one to one.

The base layer may be quantized by bitsandbytes (4-bit ``Linear4bit``, 8-bit ``Linear8bitLt``, as
QLoRA does): the forward calls it as it is, DoRA and merging read its weight through
:func:`dense_weight`, and merging replaces it by a dense ``nn.Linear``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Literal

import torch
from torch import nn

from lightning_peft.strategies.base import PEFTLayer, merged_stack
from lightning_peft.strategies.quantized import dense_weight, dequantized_linear, quantized_kind
from lightning_peft.strategies.targeting import inner_layer

InitLoRA = bool | Literal["gaussian"]


def _autocasts(kind: str) -> bool:
    """Whether autocast is on for this device type (``meta`` and some others have none)."""
    return torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """Autocast's dtype when it is on for ``x``'s device, else None."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if _autocasts(kind) else None


def autocast_off(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast switched off for ``x``'s device while our autograd nodes run (their operands are
    cast beforehand: in-place sums and hand-written backwards need one dtype throughout)."""
    kind = x.device.type
    return torch.autocast(kind, enabled=False) if _autocasts(kind) else contextlib.nullcontext()


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    # quantized bases store integers; their adapters train in float32
    return weight.dtype if weight.is_floating_point() else torch.float32


def init_pair(a: torch.Tensor, b: torch.Tensor, init: InitLoRA, r: int, a_is_zero: bool = False) -> None:
    """Initialise (A, B) so that B A = 0 unless ``init`` is False (then both random, for tests)."""
    with torch.no_grad():
        first, second = (b, a) if a_is_zero else (a, b)
        if init == "gaussian":
            nn.init.normal_(first, std=1 / r)
        elif a_is_zero:
            nn.init.normal_(first)
        else:
            nn.init.kaiming_uniform_(first, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(second, a=math.sqrt(5))
        else:
            nn.init.zeros_(second)


class LoRABase(nn.Module):
    """State and merge logic shared by the LoRA layers; each layer defines ``delta_weight`` and ``forward``."""

    base_layer: nn.Module
    scaling: float
    a_is_zero = False  # which factor starts at zero: B (linear, conv), or A (embeddings, as peft)
    stored_in_out = False  # the base stores its weight as (in, out) (embedding tables)

    def _setup(
        self, base_layer: nn.Module, r: int, lora_alpha: float, use_rslora: bool, init: InitLoRA
    ) -> None:
        self.base_layer = base_layer
        self.r = r
        self.init_lora_weights = init
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.merged = False
        self.enabled = True

    def adapter_params(self) -> list[str]:
        return [name for name, _ in self.named_parameters(recurse=False)]

    def set_adapter_enabled(self, enabled: bool) -> None:
        self.enabled = enabled

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the adapter as at construction: ``B A = 0`` and DoRA's magnitude ``||W||``.

        For a model adapted on the ``meta`` device and materialised later (``to_empty``, FSDP's
        per-module ``reset_parameters``): call it once the base weights are loaded, as DoRA's
        magnitude is read from them. :func:`~lightning_peft.strategies.base.reset_adapters` does
        it for a whole model.
        """
        a, b = self.adapter_pair()
        init_pair(a, b, self.init_lora_weights, self.r, a_is_zero=self.a_is_zero)
        if hasattr(self, "lora_magnitude_vector"):
            norm = self.base_weight().float().flatten(1).norm(dim=1)
            self.lora_magnitude_vector.copy_(norm)
        if getattr(self, "lora_B_bias", None) is not None:
            self.lora_B_bias.zero_()

    def adapter_pair(self) -> tuple[nn.Parameter, nn.Parameter]:
        """``(A, B)``: the down- and up-projection."""
        return self.lora_A, self.lora_B

    def inner_layer(self) -> nn.Module:
        """The original layer, below any other named adapters stacked on it."""
        return inner_layer(self)

    @property
    def weight(self) -> torch.Tensor:
        # code that reads ``layer.weight`` (weight tying, output heads) keeps working on adapted layers
        return self.inner_layer().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.inner_layer().bias

    def base_weight(self) -> torch.Tensor:
        """The base weight as ``(out, in, ...)``, whatever the layer's own storage order.

        A quantized base layer gives a dequantized copy (see :func:`dense_weight`).
        """
        weight = dense_weight(self.inner_layer())
        return weight.T if self.stored_in_out or getattr(self, "fan_in_fan_out", False) else weight

    def delta_weight(self) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must define delta_weight")

    def adapters_below(self) -> list[nn.Module]:
        """The named adapters this one is stacked on, nearest first."""
        found, module = [], self.base_layer
        while isinstance(module, nn.Module):
            if isinstance(module, PEFTLayer):
                found.append(module)
            module = getattr(module, "base_layer", None)
        return found

    def weight_below(self) -> torch.Tensor:
        """The weight this adapter applies to, as ``(out, in, ...)``: the base weight with the active,
        unmerged LoRA adapters below folded in (merged ones are in the base weight already)."""
        below = self.base_layer
        return below.adapted_weight() if isinstance(below, LoRABase) else self.base_weight()

    @torch.no_grad()
    def adapted_weight(self) -> torch.Tensor:
        """The weight the layer computes with, as ``(out, in, ...)`` (a new tensor, no gradient):
        :meth:`weight_below` with this adapter's update, if it is active and unmerged."""
        below = self.weight_below()
        if self.merged or not self.enabled:
            return below
        summed = below + self.delta_weight().to(below.dtype)
        if not hasattr(self, "lora_magnitude_vector"):
            return summed
        gain = (self.lora_magnitude_vector / summed.flatten(1).norm(dim=1)).to(below.dtype)
        return summed * gain.view(-1, *[1] * (summed.dim() - 1))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight; the layer's outputs do not change.

        The adapters this one is stacked on must be merged or inactive (their updates come first:
        DoRA normalises the weight they give). :meth:`PEFTStrategy.merge` merges a stack from the
        inside out. The base layer keeps a record of what was merged into it, in order, so that
        :meth:`unmerge` can insist on the reverse order.

        A quantized base layer is first replaced by its dequantized ``nn.Linear`` (with a warning): the
        merged weights are dense and carry the base's quantization error. :meth:`unmerge` leaves the
        base dense.
        """
        if self.merged:
            return
        self._check_merge_order()
        if getattr(self, "lora_B_bias", None) is not None and self.bias is None:
            raise ValueError(
                f"cannot merge adapter {adapter_name_of(self)!r}: it has lora_bias=True but its base layer "
                "has no bias to fold it into"
            )
        if quantized_kind(self.inner_layer()) is not None:
            self._dequantize_base()
        weight = self.base_weight()
        if not weight.is_floating_point():
            raise TypeError(f"cannot merge into a {weight.dtype} base weight; dequantize it first")
        delta = self.delta_weight().to(weight.dtype)
        if hasattr(self, "lora_magnitude_vector"):
            norm = (weight + delta).flatten(1).norm(dim=1)
            self._merge_norm = norm
            gain = (self.lora_magnitude_vector / norm).to(weight.dtype)
            new = (weight + delta) * gain.view(-1, *[1] * (weight.dim() - 1))
        else:
            new = weight + delta
        if not torch.isfinite(new).all():
            raise ValueError(
                f"merging {type(self).__name__} gives non-finite weights; the adapter is left unmerged"
            )
        weight.copy_(new)
        self._fold_lora_bias(1.0)
        self.merged = True
        merged_stack(self).append(self)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight saved before :meth:`merge` (up to float rounding).

        Adapters merged into the same weight after this one must be unmerged first (peft's order:
        the last merged comes out first); :meth:`PEFTStrategy.unmerge` does so.
        """
        if not self.merged:
            return
        self._check_unmerge_order()
        weight = self.base_weight()
        delta = self.delta_weight().to(weight.dtype)
        if hasattr(self, "lora_magnitude_vector"):
            gain = (self.lora_magnitude_vector / self._merge_norm).to(weight.dtype)
            weight.copy_(weight / gain.view(-1, *[1] * (weight.dim() - 1)) - delta)
        else:
            weight.sub_(delta)
        self._fold_lora_bias(-1.0)
        self._pop_merged()

    def _check_merge_order(self) -> None:
        """Raise unless every active adapter this one is stacked on is merged already."""
        pending = [
            m
            for m in self.adapters_below()
            if getattr(m, "enabled", True) and not getattr(m, "merged", False)
        ]
        if pending:
            names = ", ".join(repr(adapter_name_of(m)) for m in pending)
            raise ValueError(
                f"cannot merge adapter {adapter_name_of(self)!r} before the active adapters below it ({names}): "
                f"merge those first, or merge the whole model with PEFTStrategy.merge(model)"
            )

    def _check_unmerge_order(self) -> None:
        """Raise if an adapter merged into the same weight after this one is still merged."""
        stack = merged_stack(self)
        if self in stack and stack[-1] is not self:
            later = ", ".join(repr(adapter_name_of(m)) for m in stack[stack.index(self) + 1 :])
            raise ValueError(
                f"cannot unmerge adapter {adapter_name_of(self)!r} while {later}, merged into the same weight "
                f"after it, is merged: unmerge in reverse order, e.g. with PEFTStrategy.unmerge(model)"
            )

    def _pop_merged(self) -> None:
        self.merged = False
        stack = merged_stack(self)
        if self in stack:
            stack.remove(self)

    def add_lora_bias(self) -> None:
        """Give ``B`` a trainable bias (peft's ``lora_bias``), zero at first: the update becomes
        ``s · (B A dropout(x) + b_B)``. Linear and convolution layers; merging adds ``s · b_B`` to the
        base bias."""
        out = self.lora_B.shape[0]
        self.lora_B_bias = nn.Parameter(torch.zeros(out, device=self.lora_B.device, dtype=self.lora_B.dtype))
        self._forward_unbiased = self.forward
        self.forward = self._forward_lora_bias  # decided once, not per call

    def _forward_lora_bias(self, x: torch.Tensor) -> torch.Tensor:
        result = self._forward_unbiased(x)
        if self.merged or not self.enabled:
            return result
        bias = (self.lora_B_bias * self.scaling).to(result.dtype)
        return result + bias.view(-1, *[1] * (self.lora_B.dim() - 2))  # conv outputs: (N, out, ...)

    def _fold_lora_bias(self, sign: float) -> None:
        if getattr(self, "lora_B_bias", None) is not None:
            self.bias.add_(sign * self.scaling * self.lora_B_bias.to(self.bias.dtype))

    def _dequantize_base(self) -> None:
        quantized = self.inner_layer()
        dense = dequantized_linear(quantized)
        # one message for all layers: Python shows it once instead of once per layer
        warnings.warn(
            f"merging LoRA into {quantized_kind(quantized)} quantized layers: their weights are dequantized "
            f"to {dense.weight.dtype} and the layers become dense nn.Linear layers (more memory; the merged "
            f"weights keep the quantization error)",
            stacklevel=4,  # the caller of merge(), past the no_grad wrapper
        )
        holder: nn.Module = self
        while holder.base_layer is not quantized:
            holder = holder.base_layer
        holder.base_layer = dense

    def _dora_gain(self) -> torch.Tensor:
        """m / ||W + s B A|| per output, W the weight below; the norm is a constant for autograd
        (DoRA sec. 4.3)."""
        with torch.no_grad():
            norm = (self.weight_below() + self.delta_weight()).flatten(1).norm(dim=1)
        return self.lora_magnitude_vector / norm

    def _dora_row_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + s B A|| per output row without building ``W + s B A`` (a no-grad constant).

        ``||w_i + s b_i A||² = ||w_i||² + 2 s b_i·(A w_i) + s² b_i (A Aᵀ) b_iᵀ``: one skinny product
        ``W Aᵀ`` (out × r) instead of an out × in sum, and ``||W||²`` is cached until the base weight
        changes (merge, unmerge, an in-place edit or a new base layer: its version counter moves).
        """
        with torch.no_grad():
            weight = weight.flatten(1)  # (out, in): the base weight as base_weight() gives it
            weight_sq = self._weight_sq(weight)  # (out,)
            a, b = self.adapter_pair()
            a, b = a.flatten(1), b.flatten(1)  # (r, in), (out, r)
            w_at = (weight @ a.to(weight.dtype).T).float()  # (out, r)
            a, b = a.float(), b.float()
            cross = (b * w_at).sum(dim=1)
            update = ((b @ (a @ a.T)) * b).sum(dim=1)
            s = self.scaling
            squared = weight_sq + 2 * s * cross + s * s * update
            return squared.clamp_min(0).sqrt()  # (out,) float32

    def _weight_sq(self, weight: torch.Tensor) -> torch.Tensor:
        """``||w_i||²`` per output row of the (out, in) ``weight``; eager mode caches it on the layer.

        A compiled graph computes it each call (one fused reduction): the cache key (the stored
        tensor's identity, address and version counter) and the attribute writes are not traceable.
        """
        if torch.compiler.is_compiling():
            return weight.float().square().sum(dim=1)
        stored = self.inner_layer().weight  # a quantized weight's dequantized copy is new each call
        key = (id(stored), stored.data_ptr(), stored._version)
        if getattr(self, "_weight_sq_key", None) != key:
            self._weight_sq_cache = weight.float().square().sum(dim=1)
            self._weight_sq_key = key
        return self._weight_sq_cache


def adapter_name_of(module: nn.Module) -> str:
    return getattr(module, "adapter_name", "default")
