"""What every PEFT method shares: the `PEFTStrategy` contract and the `PEFTLayer` protocol.

A strategy is a plain configuration object. ``strategy.apply(model)`` changes ``model`` in place:

1. ``inject``: put the method's adapter modules into the model (LoRA layers, ...);
2. freeze every parameter except the adapters' own and the ones the strategy names
   (``modules_to_save``, biases, the blocks a ``Freeze`` opens up).

Adapter layers are found through the :class:`PEFTLayer` protocol (``adapter_params()``), never by
matching parameter names, so a strategy knows exactly which tensors it owns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from lightning_peft.strategies.transformers_compat import checkpointing_modules

DEFAULT_ADAPTER = "default"
# set on a module once a strategy was applied to it: the applied strategy's config (makes apply idempotent)
APPLIED_ATTR = "_lightning_peft_config"


@runtime_checkable
class PEFTLayer(Protocol):
    """A module that carries adapter tensors next to (or around) frozen base weights."""

    def adapter_params(self) -> list[str]:
        """Local names of the parameters that belong to the adapter (not to the base layer)."""
        ...

    def set_adapter_enabled(self, enabled: bool) -> None:
        """Turn the adapter's contribution on or off (off gives the base layer's output exactly)."""
        ...


@runtime_checkable
class MergeableLayer(PEFTLayer, Protocol):
    merged: bool

    def merge(self) -> None: ...

    def unmerge(self) -> None: ...


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, PEFTLayer]]:
    """Every adapter module inside ``model``, with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, PEFTLayer):
            yield name, module


_MERGED_ATTR = "_lightning_peft_merged"


def merged_stack(layer: nn.Module) -> list[nn.Module]:
    """The adapter layers merged into the weight under ``layer``, oldest first.

    The list lives on the original layer (the end of the ``base_layer`` links), so every named adapter
    stacked on it shares it, as peft's ``merged_adapters``: they come out in reverse order.
    """
    while isinstance(getattr(layer, "base_layer", None), nn.Module):
        layer = layer.base_layer
    stack = layer.__dict__.get(_MERGED_ATTR)
    if stack is None:
        stack = []
        layer.__dict__[_MERGED_ATTR] = stack  # a plain attribute: not a submodule, not in the state dict
    return stack


def _unmerge_order(modules: list[Any]) -> list[Any]:
    """The merged ones among ``modules``, last merged first (per weight; weights are independent)."""
    merged = [m for m in modules if isinstance(m, MergeableLayer) and m.merged]

    def position(module: Any) -> int:
        stack = merged_stack(module)
        return stack.index(module) if module in stack else -1

    return sorted(merged, key=position, reverse=True)


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Qualified names of all adapter parameters in ``model`` (read from the adapters, not guessed)."""
    names = []
    for prefix, module in adapter_modules(model):
        names.extend(f"{prefix}.{local}" if prefix else local for local in module.adapter_params())
    return names


def freeze_all_but(model: nn.Module, trainable: set[str]) -> None:
    """Set ``requires_grad`` to True exactly for the parameters named in ``trainable``."""
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model: every adapter contributes nothing inside the block.

    The outputs inside are exactly those of the unadapted model. Merged adapters are unmerged for the
    duration (last merged first) and merged back afterwards in their original order; subtracting the
    update again restores the base weights only up to float rounding (about 1e-7 relative in
    float32), so for them the outputs match closely, not bit for bit.

    Example::

        with disable_adapters(model):
            reference = model(x)
    """
    modules = [m for _, m in adapter_modules(model)]
    was_enabled = [getattr(m, "enabled", True) for m in modules]
    for module in modules:
        module.set_adapter_enabled(False)
    merged = _unmerge_order(modules)
    for module in merged:
        module.unmerge()
    try:
        yield model
    finally:
        # oldest first and with every adapter still off: each merges onto the weight it was merged onto
        for module in reversed(merged):
            module.merge()
        for module, enabled in zip(modules, was_enabled, strict=True):
            module.set_adapter_enabled(enabled)


def _shared_base_weights(model: nn.Module, modules: list[tuple[str, Any]]) -> list[str]:
    """One line per adapter of ``modules`` whose base weight another module uses too (tied embeddings)."""
    users: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        users.setdefault(id(param), []).append(name)
    problems = []
    for prefix, module in modules:
        weight = getattr(getattr(module, "base_layer", None), "weight", None)
        others = [n for n in users.get(id(weight), []) if prefix and not n.startswith(prefix + ".")]
        if others:
            problems.append(
                f"{prefix!r} shares its base weight with {', '.join(others)} (tied weights); "
                f"untie them first, e.g. give the other module its own copy of the weight"
            )
    return problems


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def plain_lists(strategy: Any) -> None:
    """Make every list-like field of a strategy dataclass a plain ``list`` (Hydra passes ``ListConfig``,
    users may pass tuples), so that configurations compare, print and serialise alike."""
    for field in dataclasses.fields(strategy):
        value = getattr(strategy, field.name)
        if isinstance(value, Sequence) and not isinstance(value, str | bytes | list):
            setattr(strategy, field.name, list(value))


class PEFTStrategy:
    """Base class of every method: what to inject into a model and what to leave trainable.

    Subclasses are dataclasses whose fields are the whole configuration; they override
    :meth:`inject` and, if they open up base parameters, :meth:`extra_trainable`.

    Example::

        model = LoRA(r=8, target_modules=["q_proj", "v_proj"]).apply(model)
    """

    def inject(self, model: nn.Module) -> None:
        """Add this method's adapter modules to ``model`` in place."""

    def extra_trainable(self, model: nn.Module) -> set[str]:
        """Names of base parameters (not adapter parameters) that this method trains."""
        return set()

    def apply(self, model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
        """Adapt ``model`` in place: inject adapters, then freeze all but what the method trains.

        The new adapter modules are tagged with ``adapter_name`` (see ``named.add_adapter`` for
        several named adapters on one model). Hugging Face models also get the hook that reentrant
        gradient checkpointing needs (:func:`require_grad_from_input_embeddings`).
        """
        before = {id(m) for _, m in adapter_modules(model)}
        self.inject(model)
        for _, module in adapter_modules(model):
            if id(module) not in before:
                module.adapter_name = adapter_name
        freeze_all_but(model, set(adapter_parameter_names(model)) | self.extra_trainable(model))
        require_grad_from_input_embeddings(model)  # only acts while gradient checkpointing is on
        _record_applied(model, self, adapter_name)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold every active mergeable adapter into its base weights (outputs unchanged), as peft's
        ``merge_adapter``: inactive named adapters stay unmerged and keep contributing nothing.

        Adapters stacked on one layer merge from the inside out; each base layer records the order,
        and :meth:`unmerge` takes them out in reverse. Raises ``ValueError`` before changing anything
        if a base weight is shared with another module (tied input and output embeddings): merging
        would change that module's outputs too, or if a layer cannot merge (its ``merge_refusal``).
        """
        chosen = [
            (name, m)
            for name, m in adapter_modules(model)
            if isinstance(m, MergeableLayer) and not m.merged and getattr(m, "enabled", True)
        ]
        # layers that cannot fold their update into the weight say why (LoRA on a grouped convolution)
        refused = [f"{name}: {m.merge_refusal}" for name, m in chosen if getattr(m, "merge_refusal", None)]
        if refused:
            lines = "\n".join(f"  - {p}" for p in refused)
            raise ValueError(f"cannot merge, nothing was changed:\n{lines}")
        shared = _shared_base_weights(model, chosen)
        if shared:
            lines = "\n".join(f"  - {p}" for p in shared)
            raise ValueError(f"cannot merge: merging would change other modules too:\n{lines}")
        for _, module in reversed(chosen):  # named_modules lists a wrapper before the adapter inside it
            module.merge()
        return model

    def unmerge(self, model: nn.Module) -> nn.Module:
        """Undo :meth:`merge`: every merged adapter, the last merged into a weight first."""
        for module in _unmerge_order([m for _, m in adapter_modules(model)]):
            module.unmerge()
        return model

    def to_config(self) -> dict[str, Any]:
        """The strategy as plain JSON-able data: ``{"class": ..., "config": {...}}``."""
        if not dataclasses.is_dataclass(self):
            raise TypeError(f"{type(self).__name__} must be a dataclass to describe its config")
        fields = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}", "config": fields}

    @classmethod
    def from_config_dict(cls, config: dict[str, Any]) -> PEFTStrategy:
        """Build the strategy from the ``"config"`` part of :meth:`to_config`."""
        return cls(**config)


def _record_applied(model: nn.Module, strategy: PEFTStrategy, adapter_name: str) -> None:
    """Record the strategy on the model, so that an export writes the fields the user set (not ones
    guessed from the layers). A second, different strategy on the same model drops the record: one
    config no longer describes the model, and the export reads its layers instead."""
    if adapter_name != DEFAULT_ADAPTER:
        return
    config = strategy.to_config()
    recorded = model.__dict__.get(APPLIED_ATTR)
    if recorded is None:
        object.__setattr__(model, APPLIED_ATTR, config)
    elif recorded != config:
        object.__delattr__(model, APPLIED_ATTR)


# classes that moved or were renamed since 0.1.0: checkpoints and adapter folders written before still load
_RENAMED = {
    "lightning_peft.strategies.adapter.Adapter": "lightning_peft.strategies.bottleneck.BottleneckAdapter",
}


def strategy_from_config(data: dict[str, Any]) -> PEFTStrategy:
    """Rebuild a strategy from :meth:`PEFTStrategy.to_config` output."""
    path = data.get("class", "")
    path = _RENAMED.get(path, path)
    module_name, _, class_name = path.rpartition(".")
    if not module_name.startswith("lightning_peft."):
        raise ValueError(
            f"refusing to build strategy class {path!r}: only lightning_peft classes are allowed"
        )
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, PEFTStrategy)):
        raise ValueError(f"{path!r} is not a PEFTStrategy")
    return cls.from_config_dict(data.get("config", {}))


def reset_adapters(model: nn.Module) -> int:
    """Initialise every adapter layer of ``model`` that can (``reset_parameters``); returns how many.

    For the large-model path: build the model on the ``meta`` device, ``strategy.apply`` it there
    (no memory), materialise it (``model.to_empty(device=...)``), load the base weights, then call
    this so the adapters start where they would have on a real model (LoRA: ``B A = 0``).

    Example::

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        LoRA(r=16, target_modules="all-linear").apply(model)
        model.to_empty(device="cpu")
        load_base_weights(model, base_state_dict)   # lightning_peft.strategies.state
        reset_adapters(model)
    """
    layers = [m for m in model.modules() if isinstance(m, PEFTLayer) and hasattr(m, "reset_parameters")]
    for layer in layers:
        layer.reset_parameters()
    return len(layers)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once.

    Frozen copies that adapters keep only to be disabled (``ModuleToSave.original``) are not counted:
    the total is the size of the user's model plus the adapters.
    """
    seen: set[int] = {id(p) for m in model.modules() for p in getattr(m, "shadow_parameters", list)()}
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = _numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def _numel(param: torch.Tensor) -> int:
    # bitsandbytes packs 4-bit weights two per byte; report the logical size when it is known
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and hasattr(quant_state, "shape"):
        return int(torch.Size(quant_state.shape).numel())
    return param.numel()


def input_embeddings_of(module: nn.Module) -> nn.Module | None:
    """``module.get_input_embeddings()`` when it has one that returns a module (Hugging Face models)."""
    getter = getattr(module, "get_input_embeddings", None)
    if not callable(getter):
        return None
    try:
        found = getter()
    except (AttributeError, NotImplementedError):
        return None
    return found if isinstance(found, nn.Module) else None


def find_input_embeddings(model: nn.Module, caller: str) -> tuple[nn.Module, nn.Module]:
    """(the outermost module of ``model`` with ``get_input_embeddings()``, its embedding module)."""
    for owner in model.modules():
        embeddings = input_embeddings_of(owner)
        if embeddings is not None:
            return owner, embeddings
    raise ValueError(
        f"{caller} found no model with get_input_embeddings() in {type(model).__name__}; it needs a Hugging "
        "Face model (or any module with that method)"
    )


class _OutputRequiresGradWhileCheckpointing:
    """Forward hook: the output of frozen input embeddings requires grad while ``owner`` checkpoints.

    The modules that carry transformers' ``gradient_checkpointing`` flag are found once, on the
    first training forward (a walk over every module of a large model is too slow for every step).
    A class, so that models still pickle and deep-copy (the references follow the copy).
    """

    def __init__(self, owner: nn.Module) -> None:
        self.owner = owner
        self.flagged: list[nn.Module] | None = None

    def __call__(self, module: nn.Module, args: object, output: object) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor)) or output.requires_grad:
            return
        if self.flagged is None:
            self.flagged = checkpointing_modules(self.owner)
        if any(m.gradient_checkpointing is True for m in self.flagged):
            output.requires_grad_(True)


def require_grad_from_input_embeddings(model: nn.Module) -> None:
    """While activation checkpointing is on, make the input embeddings' output require grad.

    Reentrant checkpointing backpropagates into a block only if one of its tensor inputs requires
    grad; with frozen embeddings none does and the adapters inside get no gradient. transformers'
    ``enable_input_require_grads()`` does the same, but not in every version nor in every order of
    calls. The hook looks at the model's ``gradient_checkpointing`` flags on every training forward,
    so checkpointing may be switched on or off before or after the adapters are applied. Without
    checkpointing nothing is done: the backward then stops at the first adapter and skips the first
    block's gradient with respect to its input (for which nothing is trained). Calling it again adds
    no second hook. Blocks checkpointed by hand with ``use_reentrant=True`` need
    ``model.enable_input_require_grads()``.
    """
    for module in model.modules():
        embeddings = input_embeddings_of(module)
        if embeddings is not None and not any(
            isinstance(hook, _OutputRequiresGradWhileCheckpointing)
            for hook in embeddings._forward_hooks.values()
        ):
            embeddings.register_forward_hook(_OutputRequiresGradWhileCheckpointing(module))
