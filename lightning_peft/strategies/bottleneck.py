"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020).

A small two-layer network is inserted after a sublayer's output, before the block's residual sum
and layer norm::

    h ──► sublayer ──► x ──┬──► down (m × d) ──► act ──► up (d × m) ──► (+) ──► y
                           └──────────────────────────────────────────┘

    y = x + W_up act(W_down x + b_down) + b_up         m = d / reduction_factor

``W_up`` and ``b_up`` start at zero, so an adapted model starts exactly where its base model is
(Houlsby sec. 3.1 asks for a near-identity start). Placements:

- ``"houlsby"``: two adapters per block, after the attention output projection and after the
  feed-forward output (Houlsby, fig. 2);
- ``"pfeiffer"``: one adapter per block, after the feed-forward output only (Pfeiffer et al.,
  "AdapterFusion", sec. 3; about half the parameters for the same quality).

The adapter adds a non-linearity, so it cannot be merged into the base weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.strategies.base import PEFTStrategy, plain_lists
from lightning_peft.strategies.modules_to_save import wrap_modules_to_save
from lightning_peft.strategies.targeting import (
    check_spec,
    find_targets,
    is_conv1d,
    linear_types,
    model_type,
    replace_module,
    validation_error,
)

NonLinearity = Literal["relu", "gelu", "silu", "tanh"]
Placement = Literal["houlsby", "pfeiffer"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}

# model_type -> (attention output, feed-forward output): regex tails of the modules whose output
# feeds the block's residual sum. Each is a linear projection, so its width is the hidden size.
ADAPTER_SITES: dict[str, tuple[str, str]] = {
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"),
        (r"self_attn\.o_proj", r"mlp\.down_proj"),
    ),
    "phi": (r"self_attn\.dense", r"mlp\.fc2"),
    "gpt2": (r"attn\.c_proj", r"mlp\.c_proj"),
    "gpt_bigcode": (r"attn\.c_proj", r"mlp\.c_proj"),
    "gpt_neox": (r"attention\.dense", r"mlp\.dense_4h_to_h"),
    "bloom": (r"self_attention\.dense", r"mlp\.dense_4h_to_h"),
    "opt": (r"self_attn\.out_proj", r"layers\.\d+\.fc2"),
    # BERT-likes: the dense layer before dropout, the residual sum and LayerNorm (Houlsby fig. 2)
    **dict.fromkeys(
        ("bert", "roberta", "xlm-roberta", "electra"),
        (r"attention\.output\.dense", r"layer\.\d+\.output\.dense"),
    ),
    "distilbert": (r"attention\.out_lin", r"ffn\.lin2"),
}


def output_features(module: nn.Module) -> int | None:
    """Width of ``module``'s output: its own for a linear layer, else that of its last linear layer."""
    if is_conv1d(module):
        return module.weight.shape[1]  # Conv1D stores (in, out)
    if isinstance(module, nn.Linear):
        return module.out_features
    last = [m for m in module.modules() if m is not module and isinstance(m, linear_types())]
    return output_features(last[-1]) if last else None


class BottleneckLayer(nn.Module):
    """Runs ``base_layer`` and passes its output (the first element of a tuple) through an adapter."""

    def __init__(
        self,
        base_layer: nn.Module,
        features: int,
        bottleneck: int,
        non_linearity: NonLinearity = "relu",
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        reference = next((p for p in base_layer.parameters() if p.is_floating_point()), None)
        kwargs: dict[str, Any] = {"dtype": reference.dtype if reference is not None else torch.float32}
        if reference is not None:
            kwargs["device"] = reference.device
        self.adapter_down_weight = nn.Parameter(torch.empty(bottleneck, features, **kwargs))
        self.adapter_down_bias = nn.Parameter(torch.zeros(bottleneck, **kwargs))
        self.adapter_up_weight = nn.Parameter(torch.zeros(features, bottleneck, **kwargs))
        self.adapter_up_bias = nn.Parameter(torch.zeros(features, **kwargs))
        nn.init.kaiming_uniform_(self.adapter_down_weight, a=math.sqrt(5))  # nn.Linear's default
        self.act = ACTIVATIONS[non_linearity]()
        self.residual = residual
        self.enabled = True
        if not residual:
            self.adapt = self._bottleneck  # decided once, not per call

    def adapter_params(self) -> list[str]:
        return ["adapter_down_weight", "adapter_down_bias", "adapter_up_weight", "adapter_up_bias"]

    def set_adapter_enabled(self, enabled: bool) -> None:
        self.enabled = enabled

    def _bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(
            x.to(self.adapter_down_weight.dtype), self.adapter_down_weight, self.adapter_down_bias
        )
        hidden = self.act(hidden)  # (..., m)
        return F.linear(hidden, self.adapter_up_weight, self.adapter_up_bias).to(x.dtype)  # (..., d)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter applied to one sublayer output ``x`` of shape ``(..., d)``."""
        return x + self._bottleneck(x)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        if not self.enabled:
            return out
        if isinstance(out, tuple):  # attention modules return (hidden, attention weights, ...)
            return (self.adapt(out[0]), *out[1:])
        return self.adapt(out)  # (..., d)


@dataclass
class BottleneckAdapter(PEFTStrategy):
    """Bottleneck adapters after the attention and feed-forward sublayers of every block.

    Args:
        reduction_factor: hidden size / bottleneck size (Pfeiffer's "reduction factor"; Houlsby's
            bottleneck ``m = d / reduction_factor``).
        non_linearity: activation between the down and up projections.
        residual: add the adapter to the sublayer output (``x + adapter(x)``, the identity at init);
            False replaces the output with ``adapter(x)`` (not an identity at init).
        placement: ``"houlsby"`` (after attention and feed-forward) or ``"pfeiffer"`` (after the
            feed-forward only); the modules are found from ``config.model_type``.
        target_modules: modules whose output gets an adapter (a full-match regex or a list of names or
            suffixes); overrides ``placement``. A module returning a tuple has its first element adapted.
        modules_to_save: modules trained whole (e.g. a new classifier head).
        layers_to_transform: only blocks with these indices (``layers.<i>.``).

    Example::

        model = BottleneckAdapter(reduction_factor=16, placement="pfeiffer").apply(llama)
        model = BottleneckAdapter(target_modules=["attn.out_proj", "mlp.fc2"]).apply(my_transformer)
    """

    reduction_factor: int = 16
    non_linearity: NonLinearity = "relu"
    residual: bool = True
    placement: Placement = "houlsby"
    target_modules: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: int | list[int] | None = None

    def __post_init__(self) -> None:
        plain_lists(self)
        problems: list[str] = []
        factor = self.reduction_factor
        if not isinstance(factor, int) or isinstance(factor, bool) or factor <= 0:
            problems.append(f"reduction_factor must be a positive integer, got {factor!r}")
        if self.non_linearity not in ACTIVATIONS:
            problems.append(
                f"non_linearity must be one of {', '.join(ACTIVATIONS)}, got {self.non_linearity!r}"
            )
        if not isinstance(self.residual, bool):
            problems.append(f"residual must be True or False, got {self.residual!r}")
        if self.placement not in ("houlsby", "pfeiffer"):
            problems.append(f"placement must be 'houlsby' or 'pfeiffer', got {self.placement!r}")
        for name in ("target_modules", "modules_to_save"):
            check_spec(name, getattr(self, name), problems)
        layers = self.layers_to_transform
        if layers is not None and not (
            isinstance(layers, int) or (isinstance(layers, list) and all(isinstance(i, int) for i in layers))
        ):
            problems.append(f"layers_to_transform must be an int or a list of ints, got {layers!r}")
        validation_error(type(self).__name__, problems)

    def resolved_targets(self, model: nn.Module) -> str | list[str]:
        """``target_modules``, or the modules that ``placement`` names for this architecture (a regex)."""
        if self.target_modules is not None:
            return self.target_modules
        kind = model_type(model)
        if kind not in ADAPTER_SITES:
            found = (
                f"model_type {kind!r}" if kind else f"a {type(model).__name__} without a Hugging Face config"
            )
            raise ValueError(
                f"BottleneckAdapter has no default placement for {found} (known: {', '.join(sorted(ADAPTER_SITES))}); "
                "pass target_modules= naming the modules whose output gets an adapter, e.g. each block's "
                "attention output projection and feed-forward output: "
                "BottleneckAdapter(target_modules=['self_attn.o_proj', 'mlp.down_proj'])"
            )
        attention, feedforward = ADAPTER_SITES[kind]
        sites = (attention, feedforward) if self.placement == "houlsby" else (feedforward,)
        return "|".join(rf"(?:.*\.)?{site}" for site in sites)

    def inject(self, model: nn.Module) -> None:
        targets_spec = self.resolved_targets(model)
        saved = wrap_modules_to_save(model, self.modules_to_save, "BottleneckAdapter")
        targets = find_targets(
            model,
            owner="BottleneckAdapter",
            target_modules=targets_spec,
            supported=(nn.Module,),
            layers_to_transform=self.layers_to_transform,
            skip={n for s in saved for n in (s, s + ".trained", s + ".original")},
            default_targets=self.target_modules is None,
        )
        names = [name for name, _ in targets]
        problems = []
        widths: dict[str, int] = {}
        for name, module in targets:
            width = output_features(module)
            if any(name == s or name.startswith(s + ".") for s in saved):
                problems.append(f"{name!r} is inside modules_to_save; it is trained whole already")
            elif any(name.startswith(other + ".") for other in names):
                problems.append(f"{name!r} is inside another target; adapters would stack, name one of them")
            elif width is None:
                problems.append(
                    f"{name!r} ({type(module).__name__}) has no linear layer to read its output width from; "
                    "target its output projection instead"
                )
            elif width // self.reduction_factor < 1:
                problems.append(
                    f"reduction_factor={self.reduction_factor} leaves no bottleneck for {name!r} "
                    f"({width} features); use at most {width}"
                )
            else:
                widths[name] = width
        validation_error("BottleneckAdapter", problems)
        for name, module in targets:
            width = widths[name]
            layer = BottleneckLayer(
                module, width, width // self.reduction_factor, self.non_linearity, self.residual
            )
            replace_module(model, name, layer)
