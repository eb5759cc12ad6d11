"""LoRA and DoRA on ``nn.Linear`` and transformers' GPT-2 style ``Conv1D`` (see ``lora_layers.py``).

The forward runs through the fused autograd nodes of ``lora_autograd.py`` when the base is a plain
dense ``nn.Linear``; a quantized, hooked or stacked base runs as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.strategies.lora_autograd import (
    DropoutMask,
    _DoRAScale,
    _DroppedLoRA,
    _FusedDoRALinear,
    _FusedLoRALinear,
    dropout_mask,
    shared_dropout_mask,
)
from lightning_peft.strategies.lora_layers import (
    InitLoRA,
    LoRABase,
    adapter_dtype,
    autocast_dtype,
    autocast_off,
    init_pair,
)
from lightning_peft.strategies.targeting import inner_layer, is_conv1d


class LoRALinear(LoRABase):
    """LoRA (and DoRA) around an ``nn.Linear`` or a transformers ``Conv1D`` (``fan_in_fan_out``)."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init_lora_weights: InitLoRA = True,
        share_dropout_mask: bool = False,
    ) -> None:
        super().__init__()
        self._setup(base_layer, r, lora_alpha, use_rslora, init_lora_weights)
        self.share_dropout_mask = share_dropout_mask
        inner = inner_layer(base_layer)
        self.fan_in_fan_out = is_conv1d(inner)
        weight = base_layer.weight
        if isinstance(inner, nn.Linear):  # read the sizes without dequantizing a quantized weight
            out_features, in_features = inner.out_features, inner.in_features
        else:
            out_features, in_features = self.base_weight().shape
        kwargs = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **kwargs))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **kwargs))
        init_pair(self.lora_A, self.lora_B, init_lora_weights, r)
        # the rate lives on the module (peft's layout; export reads it there); the layer applies it
        # itself (dropout_mask), keeping the mask as bits; each layer draws its own unless
        # share_dropout_mask (see LoRA)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        if use_dora:
            with torch.no_grad():
                norm = self.base_weight().float().norm(dim=1).to(kwargs["dtype"])
            self.lora_magnitude_vector = nn.Parameter(norm)
            self.forward = self._forward_dora  # decided once, not per call
        # DoRA's magnitude gradient reads the output: save it (free where the model keeps it anyway)
        # or recompute the base matmul in backward; LoRA.inject sets it per layer (DORA_KEPT_OUTPUTS)
        self.dora_saves_output = True

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        # one dtype for x, A and B: autocast's when it is on (our autograd nodes compute with it off),
        # else x's; float32 adapters over a bfloat16 model (QLoRA) cast the small (r x in, out x r)
        # matrices, not the input, as autocast would: a float32 copy of x would be saved per layer
        dtype = autocast_dtype(x) or x.dtype
        with autocast_off(x):
            lora_x, lora_a, lora_b = x.to(dtype), self.lora_A.to(dtype), self.lora_B.to(dtype)
            mask = self._dropout_mask(x, dtype)
            if mask is not None:
                return _DroppedLoRA.apply(lora_x, lora_a, lora_b, self.scaling, mask)
            # scaling the (..., r) hidden rather than B: autograd then saves nothing larger than peft does
            return F.linear(F.linear(lora_x, lora_a) * self.scaling, lora_b)  # (..., out)

    @property
    def dropout_p(self) -> float:
        return getattr(self.lora_dropout, "p", 0.0)

    def _dropout_mask(self, x: torch.Tensor, dtype: torch.dtype) -> DropoutMask | None:
        if not (self.dropout_p > 0 and self.training):
            return None
        if self.share_dropout_mask:
            return shared_dropout_mask(x, self.dropout_p, self, dtype)
        return dropout_mask(x, self.dropout_p, dtype)

    def _fused_operands(self, base: nn.Module, x: torch.Tensor) -> tuple | None:
        """``(x, W, b, A, B)`` in one dtype when one fused autograd node can stand for the base and
        the adapter, else None: a plain dense ``nn.Linear`` base without hooks (they must run), and
        one dtype throughout, or autocast on (everything then in its dtype, as its ``F.linear`` would
        compute). Checked per call: a merge of a quantized base, a hook or ``.to()`` may change these."""
        if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
            return None
        operands = (x, base.weight, base.bias, self.lora_A, self.lora_B)
        dtype = autocast_dtype(x)
        if dtype is not None:
            return tuple(t if t is None else t.to(dtype) for t in operands)
        return operands if x.dtype == base.weight.dtype == self.lora_A.dtype else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            return self.base_layer(x)
        base = self.base_layer
        operands = self._fused_operands(base, x)
        if operands is not None:
            mask = self._dropout_mask(x, operands[0].dtype)  # drawn for x itself (the layers' dtype)
            with autocast_off(x):
                return _FusedLoRALinear.apply(*operands, self.scaling, mask)
        # a quantized, hooked or stacked base, a Conv1D or mixed dtypes: the layers as they are
        result = base(x)  # (..., out)
        return result + self._lora(x).to(result.dtype)

    def _forward_dora(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            return self.base_layer(x)
        base = self.base_layer
        if isinstance(base, LoRABase):
            return self._forward_dora_stacked(x)
        operands = self._fused_operands(base, x)
        if operands is not None:
            mask = self._dropout_mask(x, operands[0].dtype)
            magnitude, norm = self.lora_magnitude_vector, self._dora_row_norm(base.weight)
            with autocast_off(x):
                return _FusedDoRALinear.apply(
                    *operands, magnitude, norm, self.scaling, mask, self.dora_saves_output
                )
        # a dequantized base weight may come back in another dtype than x (LLM.int8 gives float32)
        weight = self.base_weight()
        base = F.linear(x, weight.to(x.dtype))  # (..., out), bias added last
        norm = self._dora_row_norm(weight)
        result = _DoRAScale.apply(base + self._lora(x).to(base.dtype), self.lora_magnitude_vector, norm)
        bias = self.bias
        return result if bias is None else result + bias.to(result.dtype)

    def _forward_dora_stacked(self, x: torch.Tensor) -> torch.Tensor:
        """DoRA on another named adapter: it decomposes the weight that adapter gives (W + its update),
        whose product with ``x`` the layer below computes, gradients to its adapter included. Its
        magnitude starts at the norm of the base weight alone (as peft's), so the adapter is an
        identity when it is the only active one."""
        bias = self.bias
        below = self.base_layer(x)  # (..., out): W' x + b
        base = below if bias is None else below - bias.to(below.dtype)
        with torch.no_grad():
            norm = (self.weight_below() + self.delta_weight()).float().norm(dim=1)  # (out,)
        result = _DoRAScale.apply(base + self._lora(x).to(base.dtype), self.lora_magnitude_vector, norm)
        return result if bias is None else result + bias.to(result.dtype)
