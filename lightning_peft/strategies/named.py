"""Several named adapters on one base model: add, activate, disable, delete, save and load each.

Each named adapter is an ordinary set of adapter modules tagged with its name. A second adapter on
the same layer wraps the first one (``q_proj -> LoRALinear(task_b) -> LoRALinear(task_a) -> Linear``);
an inactive adapter passes its input straight through, so the active one sees the base layer's
output. No layer keeps a dictionary of adapters, and every method gets named adapters for free.

Merging (``PEFTStrategy.merge``) folds in the active adapters only, inner ones first; the base layer
records the order and ``unmerge`` takes them out in reverse, as peft does. A DoRA adapter stacked on
another decomposes the weight that adapter gives; a merged adapter is part of the base weight for
the ones merged after it.

State is keyed by *canonical* names: the module path without the ``base_layer`` links that stacking
adds (``model.layers.0.self_attn.q_proj.lora_A``), so an adapter saved from one stack loads into
another whatever the order in which adapters were added.

Example::

    add_adapter(model, "sentiment", LoRA(r=8))
    add_adapter(model, "topic", LoRA(r=8))
    set_active_adapters(model, "topic")          # only "topic" contributes now
    state = adapter_state_dict(model, "topic")   # that adapter alone
    delete_adapter(model, "sentiment")
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_peft.strategies.base import DEFAULT_ADAPTER, PEFTLayer, PEFTStrategy, adapter_modules
from lightning_peft.strategies.modules_to_save import ModuleToSave
from lightning_peft.strategies.state import mismatches
from lightning_peft.strategies.targeting import replace_module, stacking_adapters

_STACK_LINK = ".base_layer"


def canonical_name(name: str) -> str:
    """``q_proj.base_layer.lora_A`` -> ``q_proj.lora_A``: the name the adapter would have alone."""
    return name.replace(_STACK_LINK + ".", ".").removesuffix(_STACK_LINK)


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters in ``model``, sorted."""
    return sorted({_name_of(m) for _, m in adapter_modules(model)})


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters that currently contribute to the outputs, sorted."""
    return sorted({_name_of(m) for _, m in adapter_modules(model) if getattr(m, "enabled", True)})


def add_adapter(model: nn.Module, name: str, strategy: PEFTStrategy) -> nn.Module:
    """Add the adapter ``name`` built by ``strategy``. It is active only if it is the first adapter.

    Every adapter parameter stays trainable; an inactive adapter simply gets no gradient. What earlier
    adapters made trainable (biases, modules trained whole) stays trainable: the new strategy only adds.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"an adapter name must be a non-empty string, got {name!r}")
    existing = adapter_names(model)
    if name in existing:
        raise ValueError(f"adapter {name!r} exists already; adapters here: {existing}")
    active = active_adapters(model)
    # by identity: wrapping renames parameters (q_proj.bias -> q_proj.base_layer.bias)
    trainable = [p for p in model.parameters() if p.requires_grad] if existing else []
    with stacking_adapters():
        strategy.apply(model, adapter_name=name)  # freezes all but what this strategy trains
    for param in trainable:
        param.requires_grad_(True)
    if existing:
        set_active_adapters(model, active)
    return model


def set_active_adapters(model: nn.Module, names: str | Iterable[str] | None) -> None:
    """Let only the adapters in ``names`` contribute (None or [] disables them all)."""
    wanted = {names} if isinstance(names, str) else set(names or ())
    unknown = wanted - set(adapter_names(model))
    if unknown:
        raise ValueError(f"no adapter named {sorted(unknown)}; adapters here: {adapter_names(model)}")
    for _, module in adapter_modules(model):
        module.set_adapter_enabled(_name_of(module) in wanted)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove the adapter ``name``: wrappers give their place back to the layer they wrapped, and a
    module trained whole (``modules_to_save``) goes back to its untouched original."""
    modules = _modules_of(model, name)
    if any(getattr(m, "merged", False) for _, m in modules):
        # its update is in the base weights: removing the layers would leave it there for good
        raise ValueError(
            f"adapter {name!r} is merged into the base weights; unmerge it first (PEFTStrategy.unmerge(model))"
        )
    # deepest first, so the names of the outer ones stay valid while inner ones are removed
    for path, module in sorted(modules, key=lambda item: -item[0].count(".")):
        base = getattr(module, "base_layer", None)
        if isinstance(module, ModuleToSave):
            replace_module(model, path, module.original)
        elif isinstance(base, nn.Module):
            replace_module(model, path, base)
        elif callable(getattr(module, "remove_adapter", None)):
            module.remove_adapter(model)
        else:
            parent_name, _, child = path.rpartition(".")
            delattr(model.get_submodule(parent_name) if parent_name else model, child)


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The tensors of adapter ``name`` alone, under canonical names."""
    state = {}
    for path, module in _modules_of(model, name):
        params = dict(module.named_parameters())
        for local in module.adapter_params():
            state[canonical_name(f"{path}.{local}" if path else local)] = params[local].detach()
    return state


def load_adapter_state_dict(model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from :func:`adapter_state_dict`) into adapter ``name``, after checking that it fits."""
    targets: dict[str, nn.Parameter] = {}
    for path, module in _modules_of(model, name):
        params = dict(module.named_parameters())
        for local in module.adapter_params():
            targets[canonical_name(f"{path}.{local}" if path else local)] = params[local]
    problems = mismatches(
        {k: tuple(p.shape) for k, p in targets.items()},
        {k: tuple(v.shape) for k, v in state.items()},
        known=set(targets),
    )
    if problems:
        raise ValueError(f"state does not fit adapter {name!r}:\n  - " + "\n  - ".join(problems))
    with torch.no_grad():
        for key, param in targets.items():
            param.copy_(state[key])


def _name_of(module: Any) -> str:
    return getattr(module, "adapter_name", DEFAULT_ADAPTER)


def _modules_of(model: nn.Module, name: str) -> list[tuple[str, PEFTLayer]]:
    found = [(p, m) for p, m in adapter_modules(model) if _name_of(m) == name]
    if not found:
        raise ValueError(f"no adapter named {name!r}; adapters here: {adapter_names(model)}")
    return found
