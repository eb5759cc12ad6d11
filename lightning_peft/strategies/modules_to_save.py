"""Modules trained whole next to the adapters (a new classifier head, an extended embedding).

The trained module keeps its place; a frozen copy of the original is kept beside it so that
``disable_adapters`` still gives the base model's outputs exactly.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from lightning_peft.strategies.targeting import (
    TargetSpec,
    candidate_modules,
    check_entries,
    matches,
    replace_module,
)


class ModuleToSave(nn.Module):
    """``trained`` runs while adapters are enabled, the untouched ``original`` while they are disabled."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.trained = module
        self.original = copy.deepcopy(module).requires_grad_(False)
        self.enabled = True

    def adapter_params(self) -> list[str]:
        return [f"trained.{name}" for name, _ in self.trained.named_parameters()]

    def set_adapter_enabled(self, enabled: bool) -> None:
        self.enabled = enabled

    def shadow_parameters(self) -> list[nn.Parameter]:
        """Parameters kept only to be restored (not counted as the model's size)."""
        return list(self.original.parameters())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (self.trained if self.enabled else self.original)(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # code that reads attributes of the wrapped module (``head.out_features``) keeps working
        try:
            return super().__getattr__(name)
        except AttributeError:
            trained = self.__dict__.get("_modules", {}).get("trained")
            if trained is None:
                raise
            return getattr(trained, name)


def select_modules_to_save(model: nn.Module, spec: TargetSpec, owner: str) -> list[str]:
    """Names of the outermost modules selected by ``spec``; raises if an entry selects nothing
    (:func:`check_entries`). Changes nothing."""
    if not spec:
        return []
    check_entries(model, owner, {"modules_to_save": spec})
    chosen = [n for n, _ in candidate_modules(model) if matches(n, spec)]
    # keep only the outermost match: wrapping a parent already covers its children
    return [n for n in chosen if not any(n.startswith(o + ".") for o in chosen if o != n)]


def wrap_modules_to_save(model: nn.Module, spec: TargetSpec, owner: str) -> list[str]:
    """Wrap every module selected by ``spec`` in :class:`ModuleToSave`; returns their names."""
    names = select_modules_to_save(model, spec, owner)
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, ModuleToSave):
            replace_module(model, name, ModuleToSave(module))
    return names


def frozen_copy_prefixes(model: nn.Module) -> list[str]:
    """Name prefixes of the frozen originals kept by :class:`ModuleToSave`; they never train."""
    return [
        f"{name}.original." if name else "original."
        for name, m in model.named_modules()
        if isinstance(m, ModuleToSave)
    ]
