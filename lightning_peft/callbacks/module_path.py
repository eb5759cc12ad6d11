"""The ``module=`` argument that the callbacks share: a dotted path to the submodule they act on."""

from __future__ import annotations

from typing import Any

from torch import nn


def resolve_module(pl_module: nn.Module, path: str | None) -> nn.Module | None:
    """The submodule at dotted ``path`` (the module itself for None), or None if it does not exist yet."""
    if not path:
        return pl_module
    module: Any = pl_module
    for part in path.split("."):
        module = getattr(module, part, None)
    return module if isinstance(module, nn.Module) else None


def module_path_problems(module: Any) -> list[str]:
    """``[]`` for a valid ``module=`` argument (None or a dotted attribute path), else the problem."""
    if module is None or (isinstance(module, str) and all(module.split("."))):
        return []
    return [f"module must be a dotted attribute path like 'model' or 'backbone.encoder', got {module!r}"]


def missing_module_error(owner: str, path: str | None, pl_module: nn.Module) -> ValueError:
    """The error for a ``module=`` path that names nothing (yet): it lists the submodules that exist."""
    children = ", ".join(n for n, _ in pl_module.named_children()) or "none"
    return ValueError(
        f"{owner}(module={path!r}) found no model after setup() and configure_model(); "
        f"submodules of {type(pl_module).__name__}: {children}"
    )
