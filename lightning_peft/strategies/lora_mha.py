"""LoRA on ``nn.MultiheadAttention``: its packed query/key/value projection and its output projection.

``nn.MultiheadAttention`` keeps the q, k, v projections as one ``(3 E, E)`` parameter,
``in_proj_weight``, and reads ``out_proj.weight`` directly instead of calling ``out_proj``: there is
no linear layer to wrap. Each of the two weights gets its own low-rank update, and the attention runs
on the updated weights (``torch.func.functional_call``, so gradients reach ``A`` and ``B``)::

    in_proj_weight   (3E, E)  +  s · B (3E × r) A (r × E)
    out_proj.weight  (E, E)   +  s · B_out (E × r) A_out (r × E)

Shapes and saved names follow peft (``lora_A``/``lora_B`` on the attention module, the output
projection's pair under ``base_layer.out_proj``), which adapts both weights together. As in peft, the
update acts through the weights, so ``lora_dropout`` does not apply here, there is no DoRA, and the
query, key and value inputs must share one size (``kdim == vdim == embed_dim``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import functional_call

from lightning_peft.strategies.base import merged_stack
from lightning_peft.strategies.lora_layers import InitLoRA, LoRABase, adapter_dtype, init_pair
from lightning_peft.strategies.targeting import inner_layer


class AdaptedProjection(NamedTuple):
    """The output projection's weight as adapted, and its bias (what ``attention.out_proj`` gives)."""

    weight: torch.Tensor
    bias: torch.Tensor | None


class LoRAMultiheadAttention(LoRABase):
    """LoRA on both projections of an ``nn.MultiheadAttention``; see the module docstring."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        use_rslora: bool = False,
        init_lora_weights: InitLoRA = True,
    ) -> None:
        super().__init__()
        self._setup(base_layer, r, lora_alpha, use_rslora, init_lora_weights)
        attention = inner_layer(base_layer)
        if not attention._qkv_same_embed_dim:
            raise ValueError(
                f"LoRA needs an nn.MultiheadAttention whose kdim and vdim equal embed_dim "
                f"({attention.embed_dim}), got kdim={attention.kdim}, vdim={attention.vdim}"
            )
        embed = attention.embed_dim
        weight = attention.in_proj_weight
        kwargs = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.lora_A = nn.Parameter(torch.empty(r, embed, **kwargs))
        self.lora_B = nn.Parameter(torch.empty(3 * embed, r, **kwargs))
        self.out_proj_lora_A = nn.Parameter(torch.empty(r, embed, **kwargs))
        self.out_proj_lora_B = nn.Parameter(torch.empty(embed, r, **kwargs))
        init_pair(self.lora_A, self.lora_B, init_lora_weights, r)
        init_pair(self.out_proj_lora_A, self.out_proj_lora_B, init_lora_weights, r)

    # What code around an attention module reads of it (nn.TransformerEncoderLayer's inference fast
    # path reads the projection weights and calls its own kernel): the weights as adapted.
    @property
    def embed_dim(self) -> int:
        return self.inner_layer().embed_dim

    @property
    def num_heads(self) -> int:
        return self.inner_layer().num_heads

    @property
    def batch_first(self) -> bool:
        return self.inner_layer().batch_first

    @property
    def _qkv_same_embed_dim(self) -> bool:
        return self.inner_layer()._qkv_same_embed_dim

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return self.inner_layer().in_proj_bias

    @property
    def in_proj_weight(self) -> torch.Tensor:
        return self.effective_weights()[0]

    @property
    def out_proj(self) -> AdaptedProjection:
        return AdaptedProjection(self.effective_weights()[1], self.inner_layer().out_proj.bias)

    def merge_masks(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner_layer().merge_masks(*args, **kwargs)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_pair(self.lora_A, self.lora_B, self.init_lora_weights, self.r)
        init_pair(self.out_proj_lora_A, self.out_proj_lora_B, self.init_lora_weights, self.r)

    def base_weight(self) -> torch.Tensor:
        return self.inner_layer().in_proj_weight  # (3E, E)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (3E, E)

    def out_delta_weight(self) -> torch.Tensor:
        return (self.out_proj_lora_B @ self.out_proj_lora_A) * self.scaling  # (E, E)

    def effective_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(in_proj_weight, out_proj.weight)`` as the attention computes with them: the base weights
        with the active, unmerged updates of this adapter and of those it is stacked on."""
        below = self.base_layer
        if isinstance(below, LoRAMultiheadAttention):
            in_weight, out_weight = below.effective_weights()
        else:
            attention = self.inner_layer()
            in_weight, out_weight = attention.in_proj_weight, attention.out_proj.weight
        if self.merged or not self.enabled:
            return in_weight, out_weight
        in_delta, out_delta = self.delta_weight(), self.out_delta_weight()
        return in_weight + in_delta.to(in_weight.dtype), out_weight + out_delta.to(out_weight.dtype)

    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.merged or not self.enabled:
            return self.base_layer(query, *args, **kwargs)
        in_weight, out_weight = self.effective_weights()
        weights = {"in_proj_weight": in_weight, "out_proj.weight": out_weight}
        return functional_call(self.inner_layer(), weights, (query, *args), kwargs)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold both updates into ``in_proj_weight`` and ``out_proj.weight``; outputs do not change."""
        if self.merged:
            return
        self._check_merge_order()
        attention = self.inner_layer()
        in_weight, out_weight = attention.in_proj_weight, attention.out_proj.weight
        new_in = in_weight + self.delta_weight().to(in_weight.dtype)
        new_out = out_weight + self.out_delta_weight().to(out_weight.dtype)
        if not (torch.isfinite(new_in).all() and torch.isfinite(new_out).all()):
            raise ValueError(
                "merging LoRAMultiheadAttention gives non-finite weights; the adapter is left unmerged"
            )
        in_weight.copy_(new_in)
        out_weight.copy_(new_out)
        self.merged = True
        merged_stack(self).append(self)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract both updates again (up to float rounding)."""
        if not self.merged:
            return
        self._check_unmerge_order()
        attention = self.inner_layer()
        attention.in_proj_weight.sub_(self.delta_weight().to(attention.in_proj_weight.dtype))
        attention.out_proj.weight.sub_(self.out_delta_weight().to(attention.out_proj.weight.dtype))
        self._pop_merged()
