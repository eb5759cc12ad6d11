"""The LoRA strategy: which layers get a LoRA layer, with what settings.

See ``lora_layers.py`` for the method itself (LoRA, rsLoRA, DoRA), one file per layer kind for the
layers (``lora_linear.py``, ``lora_embedding.py``, ``lora_conv.py``, ``lora_mha.py``) and
``lora_autograd.py`` for the linear layers' fast paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from lightning_peft.strategies.base import PEFTStrategy, plain_lists
from lightning_peft.strategies.lora_conv import (
    LORA_CONV_LAYERS,
    LoRAConv,
    LoRAConv1d,
    LoRAConv2d,
    LoRAConv3d,
)
from lightning_peft.strategies.lora_embedding import LoRAEmbedding
from lightning_peft.strategies.lora_fields import field_problems, pattern_value, plain
from lightning_peft.strategies.lora_init import initialise_from_base, rewrites_base
from lightning_peft.strategies.lora_layers import InitLoRA
from lightning_peft.strategies.lora_linear import LoRALinear
from lightning_peft.strategies.lora_loftq import LOFTQ, initialise_loftq, loftq_problems, require_bitsandbytes
from lightning_peft.strategies.lora_mha import LoRAMultiheadAttention
from lightning_peft.strategies.lora_parameters import LoRAParameter, parameter_targets
from lightning_peft.strategies.modules_to_save import (
    frozen_copy_prefixes,
    select_modules_to_save,
    wrap_modules_to_save,
)
from lightning_peft.strategies.targeting import (
    ALL_LINEAR,
    check_entries,
    check_spec,
    find_targets,
    inner_layer,
    is_conv1d,
    linear_types,
    matches,
    model_type,
    replace_module,
    validation_error,
)
from lightning_peft.strategies.trainable_tokens import (
    add_trainable_tokens,
    token_targets,
)

__all__ = [
    "DORA_KEPT_OUTPUTS",
    "LORA_LAYERS",
    "InitLoRA",
    "LoRA",
    "LoRAConv",
    "LoRAConv1d",
    "LoRAConv2d",
    "LoRAConv3d",
    "LoRAEmbedding",
    "LoRALinear",
    "LoRAMultiheadAttention",
]

LORA_LAYERS = (LoRALinear, LoRAEmbedding, LoRAConv, LoRAMultiheadAttention)
# the layer kinds LoRA adapts besides the linear ones (nn.Linear, transformers' Conv1D)
_OTHER_KINDS = (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)

# Layers (name suffixes) whose output the model itself keeps for backward (attention's values, an
# activation's input, a gated product's operands), per architecture. DoRA saves the output of these (free) and recomputes
# the base matmul of the others in backward rather than keep an output-sized tensor for them (see
# _FusedDoRALinear). Architectures not listed save every output: faster, more memory.
_LLAMA_LIKE = frozenset({"v_proj", "gate_proj", "up_proj"})
DORA_KEPT_OUTPUTS: dict[str, frozenset[str]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gpt2": frozenset({"c_attn", "c_fc"}),
    "bert": frozenset({"value", "intermediate.dense"}),
}


@dataclass
class LoRA(PEFTStrategy):
    """Low-rank adapters on linear, Conv1D, embedding, convolution (1-, 2-, 3-d) and attention layers.

    ``nn.MultiheadAttention`` is adapted as one module (its packed q/k/v and output projections,
    without dropout, as peft); target the attention module, not its ``out_proj``.

    Args:
        r: rank of the update (LoRA sec. 4.1).
        lora_alpha: the update is scaled by ``lora_alpha / r`` (or ``/ sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout on the adapter's input only (the base path is untouched). Each adapted
            layer draws its own mask, as peft, torchtune and LitGPT do; the rate is applied in steps
            of 1/65536.
        target_modules: a full-match regex, a list of names or suffixes, or ``"all-linear"`` (default).
        exclude_modules: same forms; never adapted.
        layers_to_transform: only blocks with these indices (``layers.<i>.``).
        layers_pattern: the name of the block list when it is not ``layers``/``layer``/``h``/``blocks``.
        modules_to_save: modules trained whole (e.g. a new classifier head).
        bias: ``"none"``, ``"all"`` (every bias trains) or ``"lora_only"`` (biases of adapted layers).
        use_rslora: rank-stabilised scaling.
        use_dora: weight-decomposed LoRA (linear, embedding and convolution layers; not grouped
            convolutions or ``nn.MultiheadAttention``).
        init_lora_weights: ``True`` (B = 0), ``"gaussian"`` (A ~ N(0, 1/r), B = 0), ``False``
            (both random: not an identity, for tests), or one that starts from the base weight and
            rewrites it (``nn.Linear`` layers): ``"pissa"``, ``"pissa_niter_<k>"`` or ``"olora"``
            (see ``lora_init.py``; an export turns such an adapter into a plain LoRA of rank ``2r``);
            or ``"loftq"`` (``nn.Linear`` layers, needs bitsandbytes): the base weight becomes its NF4
            quantization (dequantized; ``QLoRA`` keeps it 4-bit) and ``A``, ``B`` start from the best
            rank-``r`` fit of the quantization error (see ``lora_loftq.py``). An export of it is a plain
            LoRA on that LoftQ base, as peft saves one; load it onto that base.
        loftq_config: with ``init_lora_weights="loftq"``: ``{"loftq_bits": 4, "loftq_iter": k}`` (peft's
            ``LoftQConfig``; ``k`` alternating quantize/fit steps, default 1). Only 4 bits (NF4).
        rank_pattern: per-module ranks, ``{pattern: r}``; a module takes the first pattern that
            matches the end of its name as a regex (peft's rule: ``(.*\.)?pattern$``), else ``r``.
        alpha_pattern: per-module ``lora_alpha`` in the same way.
        lora_bias: ``B`` gets a trainable bias too (linear and convolution layers; not with DoRA).
            Merging adds it to the base layer's bias, so that layer must have one.
        trainable_token_indices: rows of the input embedding that train whole (new special tokens),
            the rest stays frozen: a list of token ids for the model's input embedding, or
            ``{module name: ids}``. The embedding's weight must not be tied to an output head.
        target_parameters: ``nn.Parameter`` weights to adapt by name (or name ending), e.g.
            ``["experts.gate_up_proj", "experts.down_proj"]``: 2-D weights, or 3-D expert stacks with
            one update per expert (see ``lora_parameters.py``); set ``target_modules=[]`` to adapt
            only these. No dropout, DoRA or ``lora_bias`` there (as peft).
        share_dropout_mask: with ``lora_dropout``, layers that read the same tensor (q, k and v; gate
            and up) use one mask instead of one each. It trades the method's semantics for speed and
            memory: one draw instead of three, and backward keeps one packed mask per input instead
            of one per layer (1/32 of a float32 input each). Each layer still drops a fraction
            ``lora_dropout``, but the layers drop the same elements, so training is no longer what
            peft's recipes with the same ``lora_dropout`` describe. Eager mode only (torch.compile
            raises); plain ``nn.Linear``/``Conv1D`` layers (convolutions draw their own).

    Example::

        model = LoRA(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]).apply(model)
    """

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: str | list[str] | None = "all-linear"
    exclude_modules: str | list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | Literal["gaussian"] = True
    loftq_config: dict[str, int] | None = None
    share_dropout_mask: bool = False
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    lora_bias: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    target_parameters: list[str] | None = None

    def __post_init__(self) -> None:
        plain_lists(self)
        for name in ("rank_pattern", "alpha_pattern", "trainable_token_indices", "loftq_config"):
            setattr(self, name, plain(getattr(self, name)))  # Hydra passes DictConfig/ListConfig
        validation_error(type(self).__name__, self._problems())

    def _problems(self) -> list[str]:
        """Every problem with the configuration (subclasses add theirs, so one error lists them all)."""
        problems: list[str] = []
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            problems.append(f"r must be a positive integer, got {self.r!r}")
        if not isinstance(self.lora_alpha, int | float) or self.lora_alpha <= 0:
            problems.append(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, int | float) or not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.target_modules is None:
            problems.append("target_modules is required: a regex, a list of names, or 'all-linear'")
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            check_spec(name, getattr(self, name), problems)
        if self.bias not in ("none", "all", "lora_only"):
            problems.append(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian", LOFTQ) and not rewrites_base(
            self.init_lora_weights
        ):
            problems.append(
                "init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<k>', 'olora' or "
                f"'loftq', got {self.init_lora_weights!r}"
            )
        problems += field_problems(self) + loftq_problems(self)
        if not isinstance(self.share_dropout_mask, bool):
            problems.append(f"share_dropout_mask must be True or False, got {self.share_dropout_mask!r}")
        layers = self.layers_to_transform
        if layers is not None and not (
            isinstance(layers, int) or (isinstance(layers, list) and all(isinstance(i, int) for i in layers))
        ):
            problems.append(f"layers_to_transform must be an int or a list of ints, got {layers!r}")
        return problems

    def layer_settings(self, name: str) -> tuple[int, float]:
        """``(r, lora_alpha)`` of the module ``name``: from ``rank_pattern``/``alpha_pattern``, else the defaults."""
        return (
            pattern_value(self.rank_pattern, name, self.r),
            pattern_value(self.alpha_pattern, name, self.lora_alpha),
        )

    def _checked_targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The modules to adapt; raises before anything changes if the config does not fit ``model``."""
        owner = type(self).__name__
        if self.target_modules == []:  # only parameters (target_parameters) are adapted
            return []
        # one error for every misspelled entry, before the checks below raise for one field each
        fields = ("target_modules", "exclude_modules", "modules_to_save")
        check_entries(model, owner, {field: getattr(self, field) for field in fields})
        saved = select_modules_to_save(model, self.modules_to_save, owner)
        targets = find_targets(
            model,
            owner=owner,
            target_modules=self.target_modules,
            supported=(*linear_types(), *_OTHER_KINDS),
            exclude_modules=self.exclude_modules,
            layers_to_transform=self.layers_to_transform,
            layers_pattern=self.layers_pattern,
            skip={n for s in saved for n in (s, s + ".trained", s + ".original")},
        )
        # an attention module reads its out_proj's weight without calling it: a LoRA layer there
        # would never run (the attention module itself is the target)
        unused = {f"{n}.out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
        if self.target_modules == ALL_LINEAR:
            targets = [(n, m) for n, m in targets if n not in unused]
        problems = []
        for name, target in targets:
            if any(name == s or name.startswith(s + ".") for s in saved):
                problems.append(f"{name!r} is inside modules_to_save; it is trained whole already")
            elif name in unused:
                problems.append(
                    f"{name!r} is the output projection of an nn.MultiheadAttention, which never calls "
                    f"it; target the attention module {name.rpartition('.')[0]!r} (it adapts both projections)"
                )
            else:
                problems.extend(self._layer_problems(name, inner_layer(target)))
        validation_error(owner, problems)
        return targets

    def _layer_problems(self, name: str, module: nn.Module) -> list[str]:
        """Why LoRA with these settings cannot adapt ``module`` (the original layer under any adapters)."""
        problems = []
        if isinstance(module, nn.MultiheadAttention):
            if self.use_dora:
                problems.append(
                    f"{name!r} is an nn.MultiheadAttention; use_dora does not apply to it (nor in peft)"
                )
            if not module._qkv_same_embed_dim:
                problems.append(
                    f"{name!r}: LoRA supports nn.MultiheadAttention with kdim == vdim == embed_dim"
                )
        elif isinstance(module, tuple(LORA_CONV_LAYERS)):
            kind = type(module).__name__
            if module.padding_mode != "zeros":
                problems.append(f"{name!r}: LoRA supports {kind} with padding_mode='zeros'")
            r = self.layer_settings(name)[0]
            if module.groups > 1 and r % module.groups:
                problems.append(
                    f"{name!r} is a {kind} with groups={module.groups}: r must be a multiple of it, got r={r}"
                )
            if module.groups > 1 and self.use_dora:
                problems.append(f"{name!r} is a {kind} with groups={module.groups}; use_dora needs groups=1")
        if self.lora_bias and isinstance(module, nn.Embedding | nn.MultiheadAttention):
            problems.append(
                f"{name!r} is an {type(module).__name__}; lora_bias supports linear and convolution layers (as peft)"
            )
        if rewrites_base(self.init_lora_weights) and not _rewritable(module, self.init_lora_weights):
            problems.append(
                f"{name!r} is a {type(module).__name__}; init_lora_weights={self.init_lora_weights!r} "
                "rewrites loaded (not meta) dense nn.Linear weights, and GPT-2 Conv1D ones for PiSSA"
            )
        if self.init_lora_weights == LOFTQ and not self._loftq_ready(name, module):
            problems.append(
                f"{name!r} is a {type(module).__name__}; init_lora_weights='loftq' quantizes loaded (not meta) "
                "dense nn.Linear weights"
            )
        return problems

    def _loftq_ready(self, name: str, module: nn.Module) -> bool:
        """Whether LoftQ can start the adapter of ``module`` (QLoRA also takes the layers it quantized by it)."""
        return type(module) is nn.Linear and _rewritable(module, LOFTQ)

    def _start_loftq(self, name: str, layer: nn.Module) -> None:
        """Run LoftQ for the new LoRA layer ``name`` (QLoRA sets the starts it computed while quantizing)."""
        initialise_loftq(layer, self.loftq_config)

    def inject(self, model: nn.Module) -> None:
        # everything is checked before the model is touched: a bad config leaves it as it was
        targets = self._checked_targets(model)
        if self.init_lora_weights == LOFTQ:
            require_bitsandbytes()
        tokens = token_targets(model, self.trainable_token_indices, self.modules_to_save, type(self).__name__)
        chosen = self._checked_parameters(model)
        both = sorted({n for n, _ in targets} & {n for n, _, _ in tokens})
        validation_error(
            type(self).__name__, [f"{n!r} is a LoRA target and in trainable_token_indices" for n in both]
        )
        wrap_modules_to_save(model, self.modules_to_save, type(self).__name__)
        kept = DORA_KEPT_OUTPUTS.get(model_type(model) or "") if self.use_dora else None
        kept_names = sorted(kept) if kept is not None else None
        for name, module in targets:
            new = self._lora_layer(name, module)
            if kept_names is not None and isinstance(new, LoRALinear):
                new.dora_saves_output = matches(name, kept_names)
            if self.lora_bias:
                new.add_lora_bias()
            if rewrites_base(self.init_lora_weights):
                initialise_from_base(new, self.init_lora_weights)
            elif self.init_lora_weights == LOFTQ:
                self._start_loftq(name, new)
            replace_module(model, name, new)
        add_trainable_tokens(model, tokens)
        self._wrap_parameters(model, chosen)

    def _checked_parameters(self, model: nn.Module) -> list[tuple[str, str, str]]:
        if not self.target_parameters:
            return []
        chosen = parameter_targets(model, self.target_parameters)
        unused = [e for e in self.target_parameters if not any(e == entry for _, _, entry in chosen)]
        validation_error(
            type(self).__name__,
            [f"target_parameters: {e!r} matches no parameter of the model" for e in unused],
        )
        return chosen

    def _wrap_parameters(self, model: nn.Module, chosen: list[tuple[str, str, str]]) -> None:
        for module_name, param_name, _ in chosen:  # a second parameter of a module wraps the first wrapper
            r, alpha = self.layer_settings(f"{module_name}.{param_name}")
            wrapper = LoRAParameter(model.get_submodule(module_name), param_name, r, alpha, self.use_rslora)
            replace_module(model, module_name, wrapper)

    def _lora_layer(self, name: str, module: nn.Module) -> nn.Module:
        """The LoRA layer around ``module``, with that module's rank and alpha."""
        r, alpha = self.layer_settings(name)
        # an init that starts from the base weight starts from B = 0 here; A and B are set afterwards
        init = self.init_lora_weights if self.init_lora_weights in (True, False, "gaussian") else True
        common = {"r": r, "lora_alpha": alpha, "use_rslora": self.use_rslora, "init_lora_weights": init}
        # the layer's kind is that of the original layer, also below other named adapters
        layer = inner_layer(module)
        if isinstance(layer, nn.Embedding):
            return LoRAEmbedding(module, use_dora=self.use_dora, **common)
        if isinstance(layer, nn.MultiheadAttention):
            return LoRAMultiheadAttention(module, **common)
        if isinstance(layer, tuple(LORA_CONV_LAYERS)):
            kind = next(c for t, c in LORA_CONV_LAYERS.items() if isinstance(layer, t))
            return kind(module, lora_dropout=self.lora_dropout, use_dora=self.use_dora, **common)
        return LoRALinear(
            module,
            lora_dropout=self.lora_dropout,
            use_dora=self.use_dora,
            share_dropout_mask=self.share_dropout_mask,
            **common,
        )

    def extra_trainable(self, model: nn.Module) -> set[str]:
        if self.bias == "lora_only":
            names = set()
            for name, module in model.named_modules():
                if isinstance(module, LORA_LAYERS) and isinstance(
                    getattr(module, "bias", None), nn.Parameter
                ):
                    while isinstance(getattr(module, "base_layer", None), nn.Module):
                        name, module = f"{name}.base_layer", module.base_layer
                    names.add(f"{name}.bias")
            return names
        if self.bias == "all":
            frozen_copies = frozen_copy_prefixes(model)
            return {
                name
                for name, _ in model.named_parameters()
                if name.rsplit(".", 1)[-1] == "bias" and not any(name.startswith(c) for c in frozen_copies)
            }
        return set()


def _rewritable(module: nn.Module, init: str) -> bool:
    """Whether a base-rewriting ``init`` can start from ``module``'s weight (peft's OLoRA has no
    transposed-weight form for ``Conv1D``, so neither has ours)."""
    dense = type(module) is nn.Linear or (is_conv1d(module) and init != "olora")
    return dense and module.weight.is_floating_point() and module.weight.device.type != "meta"
