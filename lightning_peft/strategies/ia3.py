"""(IA)^3: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al., 2022).

A learned vector ``l`` rescales activations of frozen linear layers, one number per feature (per
channel for 2-d and 3-d convolutions)::

    keys, values (sec. 3.3):   y = l_out ⊙ (W x + b)        l_out: (out, 1)
    feed-forward:              y = W (l_in ⊙ x) + b         l_in:  (1, in)

    x ──► W, b ──► ⊙ l_out ──► y              x ──► ⊙ l_in ──► W, b ──► y

The vectors start at one, so an adapted model starts exactly where its base model is. Folding ``l``
into ``W`` scales its rows (and the bias) or its columns, so (IA)^3 merges at no inference cost.
Names and shapes follow peft (``ia3_l``, ``(out, 1)`` or ``(1, in)``, the bias scaled with the
output) and so do the per-architecture default targets, so exports map one to one and configs
carry over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lightning_peft.strategies.base import PEFTStrategy, merged_stack, plain_lists
from lightning_peft.strategies.modules_to_save import wrap_modules_to_save
from lightning_peft.strategies.targeting import (
    ALL_LINEAR,
    TargetSpec,
    check_spec,
    describe_modules,
    find_targets,
    is_conv1d,
    linear_types,
    matches,
    model_type,
    read_through,
    replace_module,
    validation_error,
)

# model_type -> (target_modules, feedforward_modules), peft's defaults (peft/utils/constants.py).
# peft keys a few families on q_proj rather than the paper's k_proj; we keep its choice so that a
# default config means the same adapter in both libraries.
IA3_DEFAULT_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "t5": (["k", "v", "wo"], ["wo"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
}


class IA3Linear(nn.Module):
    """(IA)^3 around an ``nn.Linear`` or a transformers ``Conv1D``: scales its output or its input."""

    def __init__(
        self, base_layer: nn.Module, is_feedforward: bool = False, init_ia3_weights: bool = True
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.is_feedforward = is_feedforward
        self.fan_in_fan_out = is_conv1d(base_layer)  # Conv1D stores its weight as (in, out)
        weight = base_layer.weight
        if self.fan_in_fan_out:
            in_features, out_features = weight.shape
        else:
            in_features, out_features = base_layer.in_features, base_layer.out_features
        # quantized bases store integers; their vectors train in float32
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        shape = (1, in_features) if is_feedforward else (out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=weight.device, dtype=dtype))
        if not init_ia3_weights:  # random vectors: not an identity, for tests (as peft)
            with torch.no_grad():
                self.ia3_l.normal_()
        self.merged = False
        self.enabled = True
        if is_feedforward:
            self.forward = self._scale_input  # decided once, not per call

    def adapter_params(self) -> list[str]:
        return ["ia3_l"]

    def set_adapter_enabled(self, enabled: bool) -> None:
        self.enabled = enabled

    def base_weight(self) -> torch.Tensor:
        """The base weight as an ``(out, in)`` view, whatever the layer's own storage order."""
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Output scaling (keys, values); feed-forward layers run :meth:`_scale_input` instead."""
        result = self.base_layer(x)  # (..., out)
        if self.merged or not self.enabled:
            return result
        scale = self.ia3_l.view(-1)  # (out,)
        return (result.to(scale.dtype) * scale).to(result.dtype)

    def _scale_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            return self.base_layer(x)
        scale = self.ia3_l.view(-1)  # (in,)
        return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))  # (..., in) -> (..., out)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``l`` into the weight's rows and bias (output scaling) or its columns (feed-forward)."""
        if self.merged:
            return
        weight, bias = self.base_weight(), self.base_layer.bias
        if not weight.is_floating_point():
            raise TypeError(f"cannot merge into a {weight.dtype} base weight; dequantize it first")
        scale = self.ia3_l.to(weight.dtype)  # (out, 1) or (1, in): broadcasts over (out, in)
        _fold_scale(self, weight, scale, None if self.is_feedforward else bias)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide ``l`` back out (exact up to float rounding); refuses when ``l`` holds a zero."""
        if not self.merged:
            return
        weight, bias = self.base_weight(), self.base_layer.bias
        _unfold_scale(self, weight, self.ia3_l.to(weight.dtype), None if self.is_feedforward else bias)


class IA3Conv(nn.Module):
    """(IA)^3 around an ``nn.Conv2d`` or ``nn.Conv3d``: one number per output channel, or per input
    channel for a feed-forward layer.

    ``ia3_l`` is ``(out, 1, 1, ...)`` (output scaling) or ``(1, in, 1, ...)`` (input scaling), so the
    two kinds stay apart in a saved file; peft stores both as ``(1, channels, 1, ...)``.
    """

    def __init__(
        self, base_layer: nn.Module, is_feedforward: bool = False, init_ia3_weights: bool = True
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.is_feedforward = is_feedforward
        weight = base_layer.weight  # (out, in / groups, *kernel)
        self.ones = (1,) * (weight.dim() - 2)
        shape = (1, base_layer.in_channels) if is_feedforward else (base_layer.out_channels, 1)
        self.ia3_l = nn.Parameter(torch.ones(*shape, *self.ones, device=weight.device, dtype=weight.dtype))
        if not init_ia3_weights:  # random vectors: not an identity, for tests (as peft)
            with torch.no_grad():
                self.ia3_l.normal_()
        self.merged = False
        self.enabled = True

    def adapter_params(self) -> list[str]:
        return ["ia3_l"]

    def set_adapter_enabled(self, enabled: bool) -> None:
        self.enabled = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            return self.base_layer(x)
        scale = self.ia3_l.view(1, -1, *self.ones)  # broadcasts over (N, channels, *spatial)
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))
        result = self.base_layer(x)
        return (result.to(scale.dtype) * scale).to(result.dtype)

    def _weight_scale(self) -> torch.Tensor:
        """``l`` shaped to multiply the ``(out, in / groups, *kernel)`` weight."""
        conv = self.base_layer
        if not self.is_feedforward:
            return self.ia3_l  # (out, 1, *ones)
        groups = conv.groups
        per_group = self.ia3_l.view(groups, 1, conv.in_channels // groups)  # input channels by group
        expanded = per_group.expand(groups, conv.out_channels // groups, -1)
        return expanded.reshape(conv.out_channels, -1, *self.ones)  # (out, in / groups, *ones)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``l`` into the kernels (and the bias, for output scaling)."""
        if self.merged:
            return
        weight, bias = self.base_layer.weight, self.base_layer.bias
        _fold_scale(
            self, weight, self._weight_scale().to(weight.dtype), None if self.is_feedforward else bias
        )

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide ``l`` back out (exact up to float rounding); refuses when ``l`` holds a zero."""
        if not self.merged:
            return
        weight, bias = self.base_layer.weight, self.base_layer.bias
        _unfold_scale(
            self, weight, self._weight_scale().to(weight.dtype), None if self.is_feedforward else bias
        )


def _fold_scale(
    layer: nn.Module, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Multiply ``weight`` by ``scale`` (and ``bias``, if given, by ``l``) in place, refusing a result
    that is not finite; record the merge in the order :meth:`PEFTStrategy.unmerge` reverses."""
    new_weight = weight * scale
    new_bias = bias * layer.ia3_l.view(-1).to(bias.dtype) if bias is not None else None
    if not (torch.isfinite(new_weight).all() and (new_bias is None or torch.isfinite(new_bias).all())):
        raise ValueError(
            f"merging {type(layer).__name__} gives non-finite weights; the adapter is left unmerged"
        )
    weight.copy_(new_weight)
    if new_bias is not None:
        bias.copy_(new_bias)
    layer.merged = True
    merged_stack(layer).append(layer)


def _unfold_scale(
    layer: nn.Module, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Divide what :func:`_fold_scale` multiplied back out (exact up to float rounding)."""
    if not bool((layer.ia3_l != 0).all()):
        raise ValueError(
            f"cannot unmerge {type(layer).__name__}: its scaling vector holds zeros, so the merged weight lost "
            "those rows or columns; reload the base weights instead"
        )
    weight.div_(scale)
    if bias is not None:
        bias.div_(layer.ia3_l.view(-1).to(bias.dtype))
    layer.merged = False
    stack = merged_stack(layer)
    if layer in stack:
        stack.remove(layer)


read_through(
    IA3Conv, ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")
)

IA3_LAYERS = (IA3Linear, IA3Conv)


@dataclass
class IA3(PEFTStrategy):
    """(IA)^3 scaling vectors on attention keys and values and on the feed-forward input.

    Args:
        target_modules: linear, ``Conv1D``, ``Conv2d`` or ``Conv3d`` layers to scale: a full-match regex, a list of names or
            suffixes, or ``"all-linear"``. None (default) takes peft's default for the architecture,
            read from ``config.model_type`` (Llama: ``k_proj``, ``v_proj``, ``down_proj``).
        feedforward_modules: which targets scale their *input* (the feed-forward layers, sec. 3.3);
            the rest scale their output. None takes the architecture's default, or none at all for
            a model without one; given explicitly, each entry must match a target.
        exclude_modules: same forms as ``target_modules``; never adapted.
        layers_to_transform: only blocks with these indices (``layers.<i>.``).
        layers_pattern: the name of the block list when it is not ``layers``/``layer``/``h``/``blocks``.
        modules_to_save: modules trained whole (e.g. a new classifier head).
        init_ia3_weights: ``True`` (vectors of ones: the identity) or ``False`` (random, for tests).

    Example::

        model = IA3().apply(llama)  # keys, values and the down projection of every block
        model = IA3(target_modules=["k", "v", "wo"], feedforward_modules=["wo"]).apply(model)
    """

    target_modules: str | list[str] | None = None
    feedforward_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        plain_lists(self)
        problems: list[str] = []
        for name in ("target_modules", "feedforward_modules", "exclude_modules", "modules_to_save"):
            check_spec(name, getattr(self, name), problems)
        if self.feedforward_modules == ALL_LINEAR:
            problems.append("feedforward_modules does not take 'all-linear'; name the feed-forward layers")
        if not isinstance(self.init_ia3_weights, bool):
            problems.append(f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")
        layers = self.layers_to_transform
        if layers is not None and not (
            isinstance(layers, int) or (isinstance(layers, list) and all(isinstance(i, int) for i in layers))
        ):
            problems.append(f"layers_to_transform must be an int or a list of ints, got {layers!r}")
        validation_error(type(self).__name__, problems)

    def resolved_targets(self, model: nn.Module) -> tuple[TargetSpec, TargetSpec]:
        """(target_modules, feedforward_modules) for ``model``, with the architecture's defaults filled in."""
        kind = model_type(model)
        default_targets, default_feedforward = IA3_DEFAULT_TARGETS.get(kind or "", (None, None))
        targets = self.target_modules if self.target_modules is not None else default_targets
        if targets is None:
            found = (
                f"model_type {kind!r}" if kind else f"a {type(model).__name__} without a Hugging Face config"
            )
            raise ValueError(
                f"IA3 has no default targets for {found} (known: {', '.join(sorted(IA3_DEFAULT_TARGETS))}); "
                "pass target_modules= (the key, value and feed-forward layers) and feedforward_modules= "
                "(those of them whose input is scaled), e.g. "
                "IA3(target_modules=['k_proj', 'v_proj', 'down_proj'], feedforward_modules=['down_proj'])"
            )
        feedforward = (
            self.feedforward_modules if self.feedforward_modules is not None else default_feedforward
        )
        return targets, feedforward

    def inject(self, model: nn.Module) -> None:
        targets_spec, feedforward_spec = self.resolved_targets(model)
        saved = wrap_modules_to_save(model, self.modules_to_save, "IA3")
        targets = find_targets(
            model,
            owner="IA3",
            target_modules=targets_spec,
            supported=(*linear_types(), nn.Conv2d, nn.Conv3d),
            exclude_modules=self.exclude_modules,
            layers_to_transform=self.layers_to_transform,
            layers_pattern=self.layers_pattern,
            skip={n for s in saved for n in (s, s + ".trained", s + ".original")},
            default_targets=self.target_modules is None,
        )
        names = [name for name, _ in targets]
        problems = [
            f"{name!r} is inside modules_to_save; it is trained whole already"
            for name in names
            if any(name == s or name.startswith(s + ".") for s in saved)
        ]
        feedforward = self.feedforward_modules
        if feedforward:  # given explicitly: a typo must not silently scale outputs instead of inputs
            specs = [feedforward] if isinstance(feedforward, str) else [[entry] for entry in feedforward]
            for spec in specs:
                if not any(matches(name, spec) for name in names):
                    shown = spec if isinstance(spec, str) else spec[0]
                    problems.append(
                        f"feedforward_modules entry {shown!r} matches none of the targets: "
                        f"{describe_modules(targets)}"
                    )
        validation_error("IA3", problems)
        for name, module in targets:
            kind = IA3Conv if isinstance(module, nn.Conv2d | nn.Conv3d) else IA3Linear
            layer = kind(module, matches(name, feedforward_spec), self.init_ia3_weights)
            replace_module(model, name, layer)
