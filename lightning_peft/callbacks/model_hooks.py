"""Acting on a model that the LightningModule builds in ``setup()`` or ``configure_model()``.

Lightning calls no callback hook between the module's ``configure_model`` and
``configure_optimizers`` (``Trainer._run``: ``_call_setup_hook``, ``_call_configure_model``, the
checkpoint restore, ``strategy.setup``). Adapters must exist before both the restore and the
optimizer, so a callback cannot wait for a later hook. The public mechanism that sees the model
arrive is torch's global module-registration hook
(``torch.nn.modules.module.register_module_module_registration_hook``): it fires when the user's
code assigns the model (``self.model = ...``) and returns a removable handle. Replacing the module's
bound ``configure_model`` (the former scheme) stayed bound to the first callback, overwrote what
other code set on the instance and was copied by ``deepcopy``.

One registration hook serves every waiting callback, in the order they called :func:`wait_for_model`
(the order of ``trainer.callbacks``): the PEFT callback adapts before a schedule prepares its phases.
The hook attaches the new module first (``add_module``, what torch does next anyway) so that the
actions see the model as the user's code will. It is installed only while some callback waits
(between a callback's ``setup`` and the start of the stage) and removed after.

Consequence for users: the model is adapted at the moment it is assigned. Code in ``configure_model``
that runs after the assignment sees the adapted model (load base weights before assigning, or use
``lightning_peft.strategies.state.load_base_weights``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook
from torch.utils.hooks import RemovableHandle


@dataclass
class _Wait:
    owner: object
    pl_module: nn.Module
    path: str | None
    action: Callable[[], bool]  # True once it acted: the wait ends

    def concerns(self, parent: nn.Module) -> bool:
        """Whether a module assigned onto ``parent`` can complete the target at ``path``."""
        if parent is self.pl_module:
            return True
        module: Any = self.pl_module
        for part in (self.path or "").split(".")[:-1]:  # the target's ancestors below the root
            module = getattr(module, part, None)
            if module is parent:
                return True
        return False


_waits: list[_Wait] = []
_handle: RemovableHandle | None = None
_attaching = False


def wait_for_model(owner: object, pl_module: nn.Module, path: str | None, action: Callable[[], bool]) -> None:
    """Run ``action`` each time a module is assigned on the way to ``pl_module``'s module at ``path``
    (None: ``pl_module`` itself) until it returns True. One wait per ``owner``: a later call replaces
    it in its place, so the order stays that of the first calls (a callback set up early by another
    one, then again by Lightning, keeps its turn)."""
    global _handle
    wait = _Wait(owner, pl_module, path, action)
    places = [i for i, w in enumerate(_waits) if w.owner is owner]
    if places:
        _waits[places[0]] = wait
    else:
        _waits.append(wait)
    if _handle is None:
        _handle = register_module_module_registration_hook(_on_registration)


def is_waiting(owner: object) -> bool:
    return any(w.owner is owner for w in _waits)


def stop_waiting(owner: object) -> None:
    """End ``owner``'s wait; the global hook goes when nothing waits any more."""
    global _handle
    _waits[:] = [w for w in _waits if w.owner is not owner]
    if not _waits and _handle is not None:
        _handle.remove()
        _handle = None


def _on_registration(parent: nn.Module, name: str, module: nn.Module | None) -> None:
    global _attaching
    if _attaching or module is None or not any(w.concerns(parent) for w in _waits):
        return None
    _attaching = True
    try:
        parent.add_module(name, module)  # attached now, so the actions see the whole model
        for wait in list(_waits):
            if wait in _waits and wait.concerns(parent) and wait.action():
                stop_waiting(wait.owner)
    finally:
        _attaching = False
    return None
