"""LoRA and DoRA on ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` (see ``lora_layers.py``).

``A`` is a convolution with the base layer's kernel, stride, padding and dilation and ``r`` output
channels; ``B`` is a 1x1 convolution back to the base layer's output channels::

    x ──► conv(W, groups) ─────────────────────────────► (+) ──► y
    └───► dropout ─► conv(A: r × in × k) ─► conv(B: out × r/groups × 1) ─► · s ─┘

With ``groups > 1`` (depthwise and grouped convolutions) ``A`` still reads every input channel and
``B`` is grouped: each group of output channels reads its ``r / groups`` of the hidden channels (as
peft's layer, so ``r`` must be a multiple of ``groups``). Such an update couples channels that the
grouped base weight keeps apart, so it cannot be folded into that weight: these layers do not merge,
and DoRA (whose norm is that of the merged weight) does not apply to them.

DoRA's magnitude holds one number per output channel, the norm of its whole kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.strategies.lora_layers import InitLoRA, LoRABase, adapter_dtype, init_pair
from lightning_peft.strategies.targeting import inner_layer, read_through

_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoRAConv(LoRABase):
    """LoRA (and DoRA) around a 1-, 2- or 3-d convolution; see the module docstring."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init_lora_weights: InitLoRA = True,
    ) -> None:
        super().__init__()
        self._setup(base_layer, r, lora_alpha, use_rslora, init_lora_weights)
        conv = inner_layer(base_layer)
        weight = conv.weight  # (out, in / groups, *kernel)
        self.spatial_dims = weight.dim() - 2
        self.conv_fn = _CONV_FUNCTIONS[self.spatial_dims]
        self.groups = conv.groups
        if r % conv.groups:
            raise ValueError(f"r={r} must be a multiple of the convolution's groups={conv.groups}")
        kwargs = {"device": weight.device, "dtype": adapter_dtype(weight)}
        ones = (1,) * self.spatial_dims
        self.lora_A = nn.Parameter(torch.empty(r, conv.in_channels, *weight.shape[2:], **kwargs))
        self.lora_B = nn.Parameter(torch.empty(weight.shape[0], r // conv.groups, *ones, **kwargs))
        init_pair(self.lora_A, self.lora_B, init_lora_weights, r)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        if use_dora:
            if conv.groups != 1:
                raise ValueError(f"use_dora needs a convolution with groups=1, got groups={conv.groups}")
            with torch.no_grad():
                norm = weight.float().flatten(1).norm(dim=1).to(kwargs["dtype"])  # (out,)
            self.lora_magnitude_vector = nn.Parameter(norm)
            self.forward = self._forward_dora  # decided once, not per call

    @property
    def merge_refusal(self) -> str | None:
        """Why this layer cannot merge, or None: a grouped convolution's weight cannot hold the update."""
        if self.groups == 1:
            return None
        return (
            f"LoRA on a convolution with groups={self.groups} cannot be merged: its update mixes channels "
            "that the grouped base weight keeps apart (peft refuses to merge it too)"
        )

    def delta_weight(self) -> torch.Tensor:
        if self.merge_refusal:
            raise ValueError(self.merge_refusal)
        product = self.lora_B.flatten(1) @ self.lora_A.flatten(1)  # (out, in * prod(kernel))
        return product.view(self.inner_layer().weight.shape) * self.scaling

    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.inner_layer()
        dropped = self.lora_dropout(x.to(self.lora_A.dtype))  # (N, in, *spatial)
        hidden = self.conv_fn(dropped, self.lora_A, None, conv.stride, conv.padding, conv.dilation)
        return self.conv_fn(hidden, self.lora_B * self.scaling, groups=self.groups)  # (N, out, *spatial')

    def _channels(self, vector: torch.Tensor) -> torch.Tensor:
        """A per-channel ``(out,)`` vector shaped to broadcast over ``(N, out, *spatial)``."""
        return vector.view(1, -1, *(1,) * self.spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (N, out, *spatial')
        if self.merged or not self.enabled:
            return result
        return result + self._lora(x).to(result.dtype)

    def _forward_dora(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            return self.base_layer(x)
        conv = self.inner_layer()
        if isinstance(self.base_layer, LoRABase):  # on another adapter: the weight it gives, applied by it
            below = self.base_layer(x)
            base = below if conv.bias is None else below - self._channels(conv.bias)
        else:
            base = self.conv_fn(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        gain = self._channels(self._dora_gain().to(base.dtype))
        result = gain * (base + self._lora(x).to(base.dtype))
        return result if conv.bias is None else result + self._channels(conv.bias)


class LoRAConv1d(LoRAConv):
    """LoRA (and DoRA) around an ``nn.Conv1d`` (Whisper's audio stem, wav2vec2's feature encoder)."""


class LoRAConv2d(LoRAConv):
    """LoRA (and DoRA) around an ``nn.Conv2d``."""


class LoRAConv3d(LoRAConv):
    """LoRA (and DoRA) around an ``nn.Conv3d`` (video patch embeddings)."""


CONV_ATTRIBUTES = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "padding_mode",
)
read_through(LoRAConv, CONV_ATTRIBUTES)

LORA_CONV_LAYERS: dict[type[nn.Module], type[LoRAConv]] = {
    nn.Conv1d: LoRAConv1d,
    nn.Conv2d: LoRAConv2d,
    nn.Conv3d: LoRAConv3d,
}
