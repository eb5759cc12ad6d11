"""What an export starts from: a strategy and its tensors, read from a checkpoint or an adapted module.

A Lightning checkpoint written with the ``PEFT`` callback holds both (``checkpoint["lightning_peft"]``
records the strategy, ``state_dict`` the trainable tensors). An adapted module holds the tensors; its
strategy is the one the callback (or :func:`~lightning_peft.load_adapter`) recorded on it, or, for a
model adapted with ``strategy.apply``, one rebuilt from its adapter layers.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_peft.formats.checkpoints import CHECKPOINT_KEY, checkpoint_entry, load_checkpoint_file
from lightning_peft.formats.checks import check_sizes, strategy_from_record
from lightning_peft.formats.peft_layout import NotInPeftFormat
from lightning_peft.strategies.base import (
    APPLIED_ATTR,
    DEFAULT_ADAPTER,
    PEFTStrategy,
    adapter_modules,
    adapter_parameter_names,
    strategy_from_config,
)
from lightning_peft.strategies.bottleneck import ACTIVATIONS, BottleneckAdapter, BottleneckLayer
from lightning_peft.strategies.compose import Compose
from lightning_peft.strategies.freeze import Freeze
from lightning_peft.strategies.ia3 import IA3, IA3_LAYERS
from lightning_peft.strategies.lora import LORA_LAYERS, LoRA, LoRAEmbedding, LoRAMultiheadAttention
from lightning_peft.strategies.lora_init import WEIGHT_INITS, plain_lora_pair, rewrites_base
from lightning_peft.strategies.modules_to_save import ModuleToSave
from lightning_peft.strategies.named import adapter_names, adapter_state_dict, canonical_name
from lightning_peft.strategies.prompt import PrefixEncoder, PrefixTuning, PromptEncoder, PromptTuning
from lightning_peft.strategies.state import clean_name, trainable_state_dict
from lightning_peft.strategies.trainable_tokens import TrainableTokens


@dataclass
class AdapterSource:
    """One adapter to export.

    ``tensors`` are keyed relative to the adapted module, as in its ``state_dict()``. ``model`` is the
    adapted module itself when the source was a module (None for a checkpoint); ``module`` is its
    attribute path inside the LightningModule, as the ``PEFT`` callback records it.
    """

    strategy: PEFTStrategy
    tensors: dict[str, torch.Tensor]
    origin: str
    module: str | None = None
    model: nn.Module | None = None
    adapter_name: str = DEFAULT_ADAPTER
    whole_lightning_module: bool = False
    left_out: list[str] = field(default_factory=list)


def source_from_checkpoint(path: str | Path, adapter_name: str | None = None) -> AdapterSource:
    """Read the strategy and the adapter tensors of a checkpoint written with the ``PEFT`` callback.

    The file's CRCs, its ``lightning_peft`` entry and the strategy's sizes against the tensors are
    checked (``ValueError`` naming what is wrong); non-finite values are the caller's to check."""
    checkpoint = load_checkpoint_file(path)
    meta = checkpoint_entry(checkpoint, CHECKPOINT_KEY, str(path))
    if meta is None:
        raise ValueError(
            f"{path} was not written with the PEFT callback (it has no {CHECKPOINT_KEY!r} entry), so it does "
            "not say which strategy built its tensors"
        )
    if adapter_name not in (None, DEFAULT_ADAPTER):
        raise ValueError(
            f"adapter_name={adapter_name!r}: a checkpoint of the PEFT callback holds one adapter, "
            f"named {DEFAULT_ADAPTER!r}"
        )
    module = meta.get("module")
    prefix = f"{module}." if module else ""
    tensors, outside = {}, []
    for key, value in checkpoint["state_dict"].items():
        key = clean_name(key)
        if key.startswith(prefix):
            tensors[key[len(prefix) :]] = value
        else:
            outside.append(key)
    if outside:
        warnings.warn(
            f"{len(outside)} trainable tensors of {path} lie outside the adapted module {module!r} and are not "
            f"part of its adapter; they are not exported: {', '.join(outside[:6])}",
            stacklevel=3,
        )
    strategy = strategy_from_record(meta["strategy"], str(path), f"{CHECKPOINT_KEY}['strategy']")
    check_sizes(strategy, tensors, str(path))
    return AdapterSource(
        strategy=strategy,
        tensors=tensors,
        origin=str(path),
        module=module,
        whole_lightning_module=not module,
        left_out=outside,
    )


def source_from_module(model: nn.Module, adapter_name: str | None = None) -> AdapterSource:
    """The adapter inside ``model`` (a LightningModule the ``PEFT`` callback adapted, or an adapted model)."""
    path, adapted, recorded = adapted_module(model)
    names = adapter_names(adapted)
    if not names:
        raise ValueError(f"{type(model).__name__} carries no adapter to export")
    if adapter_name is None:
        if len(names) > 1:
            raise ValueError(f"the model carries several adapters; pass adapter_name= one of {names}")
        adapter_name = names[0]
    elif adapter_name not in names:
        raise ValueError(f"no adapter named {adapter_name!r}; adapters here: {names}")
    if len(names) == 1:
        tensors = trainable_state_dict(adapted)
        strategy = strategy_from_config(recorded) if recorded else infer_strategy(adapted, adapter_name)
    else:  # one of several named adapters: its own tensors, under names without the stacking links
        tensors = adapter_state_dict(adapted, adapter_name)
        strategy = infer_strategy(adapted, adapter_name)
    return AdapterSource(
        strategy=strategy,
        tensors={k: v.detach().cpu() for k, v in tensors.items()},
        origin=type(model).__name__,
        module=path,
        model=adapted,
        adapter_name=adapter_name,
    )


def adapted_module(model: nn.Module) -> tuple[str | None, nn.Module, dict[str, Any] | None]:
    """(path, module, recorded strategy config) of the module the ``PEFT`` callback adapted inside
    ``model``; ``model`` itself, with no record, when nothing inside carries one."""
    marked = [(n, m) for n, m in model.named_modules() if getattr(m, APPLIED_ATTR, None) is not None]
    if len(marked) > 1:
        raise ValueError(f"several adapted modules inside {type(model).__name__}: {[n for n, _ in marked]}")
    if marked:
        name, module = marked[0]
        return name or None, module, getattr(module, APPLIED_ATTR)
    return None, model, None


def infer_strategy(model: nn.Module, adapter_name: str) -> PEFTStrategy:
    """The strategy that builds adapter ``adapter_name`` of ``model`` again, read from its layers.

    Targets become exact module names, so the strategy rebuilds the same layers on the same model.
    """
    layers = [
        (canonical_name(path), module)
        for path, module in adapter_modules(model)
        if getattr(module, "adapter_name", DEFAULT_ADAPTER) == adapter_name
    ]
    saved = [path for path, m in layers if isinstance(m, ModuleToSave)] or None
    layers = [(path, m) for path, m in layers if not isinstance(m, ModuleToSave)]
    kinds = sorted({type(m).__name__ for _, m in layers})
    paths = [path for path, _ in layers]
    lora_kinds = (*LORA_LAYERS, TrainableTokens)
    if any(isinstance(m, LORA_LAYERS) for _, m in layers) and all(
        isinstance(m, lora_kinds) for _, m in layers
    ):
        strategy: PEFTStrategy = _lora_from_layers(layers, saved, model)
    elif layers and all(isinstance(m, IA3_LAYERS) for _, m in layers):
        feedforward = [path for path, m in layers if m.is_feedforward]
        strategy = IA3(target_modules=paths, feedforward_modules=feedforward, modules_to_save=saved)
    elif kinds == ["PromptEncoder"]:
        (encoder,) = [m for _, m in layers if isinstance(m, PromptEncoder)]
        strategy = PromptTuning(num_virtual_tokens=encoder.num_virtual_tokens)
    elif kinds == ["PrefixEncoder"]:
        (encoder,) = [m for _, m in layers if isinstance(m, PrefixEncoder)]
        projection = "transform" in encoder._modules
        strategy = PrefixTuning(
            num_virtual_tokens=encoder.num_virtual_tokens,
            prefix_projection=projection,
            encoder_hidden_size=encoder.transform[0].out_features if projection else None,
        )
    elif kinds == ["BottleneckLayer"]:
        strategy = _adapter_from_layers(layers, saved)
    else:
        raise ValueError(
            f"cannot tell which strategy built the adapter {adapter_name!r} (layers: {kinds or 'none'}); "
            "export it from its Lightning checkpoint, or adapt the model through the PEFT callback or "
            "load_adapter, which record the strategy"
        )
    return _with_extra_trainables(strategy, model, adapter_name)


def _lora_from_layers(layers: list[tuple[str, nn.Module]], saved: list[str] | None, model: nn.Module) -> LoRA:
    """The LoRA that builds these layers: the most common rank and alpha, and patterns (exact module
    names) for the layers that differ. Alpha is read as ``scaling * r``, the same scaling as whatever
    ``lora_alpha``/``use_rslora`` built it."""
    tokens = {path: m.token_indices.tolist() for path, m in layers if isinstance(m, TrainableTokens)}
    layers = [(path, m) for path, m in layers if not isinstance(m, TrainableTokens)]
    # embeddings have no dropout (token ids are not dropped), so only the other layers tell
    # (nor attention modules: their update acts through the weights, as in peft)
    dropouts = {
        getattr(m.lora_dropout, "p", 0.0)
        for _, m in layers
        if not isinstance(m, LoRAEmbedding | LoRAMultiheadAttention)
    }
    doras = {hasattr(m, "lora_magnitude_vector") for _, m in layers}
    if len(doras) > 1 or len(dropouts) > 1:
        raise ValueError(
            "the LoRA layers differ in DoRA or dropout; export the model from its checkpoint, which "
            "records its strategies"
        )
    ranks = {path: m.r for path, m in layers}
    alphas = {path: round(m.scaling * m.r, 6) for path, m in layers}
    r, alpha = _most_common(ranks), _most_common(alphas)
    return LoRA(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropouts.pop() if dropouts else 0.0,
        target_modules=[path for path, _ in layers],
        modules_to_save=saved,
        use_dora=doras.pop(),
        bias=_lora_bias(model, [path for path, _ in layers]),
        rank_pattern={p: v for p, v in ranks.items() if v != r} or None,
        alpha_pattern={p: v for p, v in alphas.items() if v != alpha} or None,
        lora_bias=any(hasattr(m, "lora_B_bias") for _, m in layers),
        trainable_token_indices=tokens or None,
    )


def _most_common(values: dict[str, float]) -> float:
    counts = Counter(values.values())
    return max(counts, key=lambda v: (counts[v], -list(values.values()).index(v)))


def _lora_bias(model: nn.Module, lora_paths: list[str]) -> str:
    adapters = set(adapter_parameter_names(model))
    biases = [
        clean_name(n)
        for n, p in model.named_parameters()
        if p.requires_grad and n not in adapters and n.rsplit(".", 1)[-1] == "bias"
    ]
    if not biases:
        return "none"
    own = {f"{path}.base_layer.bias" for path in lora_paths}
    return (
        "lora_only" if all(canonical_name(b) in {canonical_name(o) for o in own} for b in biases) else "all"
    )


def _adapter_from_layers(layers: list[tuple[str, nn.Module]], saved: list[str] | None) -> BottleneckAdapter:
    names = {cls: name for name, cls in ACTIVATIONS.items()}
    settings = {
        (
            m.adapter_up_weight.shape[0] // m.adapter_down_weight.shape[0],
            names.get(type(m.act), "relu"),
            m.residual,
        )
        for _, m in layers
        if isinstance(m, BottleneckLayer)
    }
    if len(settings) > 1:
        raise ValueError(
            "the bottleneck adapters differ in size or activation; export them from a checkpoint"
        )
    ((factor, activation, residual),) = settings
    return BottleneckAdapter(
        reduction_factor=factor,
        non_linearity=activation,
        residual=residual,
        target_modules=[path for path, _ in layers],
        modules_to_save=saved,
    )


def _with_extra_trainables(strategy: PEFTStrategy, model: nn.Module, adapter_name: str) -> PEFTStrategy:
    """Add a ``Freeze`` for trainable base tensors that no adapter owns (other than LoRA's biases)."""
    if len(adapter_names(model)) > 1:
        return strategy  # a named adapter of several: only its own tensors are exported
    adapters = set(adapter_parameter_names(model))
    extra = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad
        and n not in adapters
        and not (isinstance(strategy, LoRA) and strategy.bias != "none" and n.endswith("bias"))
    ]
    if not extra:
        return strategy
    owners = sorted({canonical_name(n.rpartition(".")[0]) for n in extra})
    return Compose([strategy, Freeze(trainable_modules=owners)])


def with_plain_lora(adapter: AdapterSource, method: LoRA) -> AdapterSource:
    """The adapter as a plain LoRA on the original base weights, when ``method`` started from them
    (PiSSA, OLoRA; see ``lora_init.py``): each layer's ``(A, B)`` becomes the rank-``2r`` pair
    ``([A; A₀], [B, -B₀])`` and the config doubles ``r`` and ``lora_alpha`` (``√2`` with rsLoRA), so
    the scaling stays. Other adapters come back as they are.

    A checkpoint holds no ``A₀``/``B₀``: ``"pissa"`` and ``"olora"`` stay as they are (peft computes the
    same start from the base model when it loads them); ``"pissa_niter_<k>"`` draws at random, so it
    raises :class:`~lightning_peft.formats.peft_layout.NotInPeftFormat`.
    """
    if not rewrites_base(method.init_lora_weights):
        return adapter
    if adapter.model is None:
        if method.init_lora_weights in WEIGHT_INITS:
            return adapter
        raise NotInPeftFormat(
            f"init_lora_weights={method.init_lora_weights!r} starts from a randomised SVD that peft cannot "
            "repeat, and a checkpoint does not hold that start; export from the adapted module instead"
        )
    tensors = dict(adapter.tensors)
    for path, layer in adapter.model.named_modules():
        if hasattr(layer, "lora_A_initial") and f"{clean_name(path)}.lora_A" in tensors:
            a, b = plain_lora_pair(layer)
            tensors[f"{clean_name(path)}.lora_A"], tensors[f"{clean_name(path)}.lora_B"] = a.cpu(), b.cpu()
    factor = 2**0.5 if method.use_rslora else 2.0
    plain = dataclasses.replace(
        method,
        r=2 * method.r,
        lora_alpha=method.lora_alpha * factor,
        rank_pattern={k: 2 * v for k, v in method.rank_pattern.items()} if method.rank_pattern else None,
        alpha_pattern={k: v * factor for k, v in method.alpha_pattern.items()}
        if method.alpha_pattern
        else None,
        init_lora_weights=True,
    )
    strategy = adapter.strategy
    if isinstance(strategy, Compose):
        strategy = Compose([plain if s is method else s for s in strategy.strategies])
    else:
        strategy = plain
    return dataclasses.replace(adapter, strategy=strategy, tensors=tensors)
