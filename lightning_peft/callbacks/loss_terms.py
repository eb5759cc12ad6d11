"""Adding a term to the loss that the user's ``training_step`` returns, before Lightning backpropagates it.

Lightning's automatic optimization calls ``training_step`` and then ``backward`` on the loss it
returned; a callback hook such as ``on_train_batch_end`` runs after ``backward``, too late to change
the gradient. So the technique callbacks (distillation, regularization) wrap ``training_step`` on the
module *instance* with a ``functools.partial`` of a module-level function (as the ``PEFT`` callback
wraps ``configure_model``): the user's code stays unchanged, the wrapper is picklable (``ddp_spawn``),
and several callbacks chain, each calling the one below it. The added term goes through Lightning's
gradient-accumulation scaling, precision plugins and gradient clipping exactly like the user's loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Protocol

import lightning.pytorch as pl
import torch


class LossTerm(Protocol):
    """A callback that runs ``step`` (the user's ``training_step``) and returns its output, changed."""

    def wrap_training_step(
        self, pl_module: pl.LightningModule, step: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any: ...


def install(pl_module: pl.LightningModule, owner: LossTerm) -> None:
    """Route ``pl_module.training_step`` through ``owner`` (once, however often ``setup`` runs)."""
    if not pl_module.automatic_optimization:
        raise ValueError(
            f"{type(owner).__name__} adds to the loss that training_step returns, which needs automatic "
            f"optimization; {type(pl_module).__name__}.automatic_optimization is False"
        )
    link = pl_module.__dict__.get("training_step")
    while isinstance(link, partial) and link.func is _step_with:
        if link.args[0] is owner:
            return
        link = link.args[2]
    pl_module.training_step = _signed(
        partial(_step_with, owner, pl_module, pl_module.__dict__.get("training_step")), pl_module
    )


def uninstall(pl_module: pl.LightningModule, owner: LossTerm) -> None:
    """Take ``owner`` out of the chain; the module's own ``training_step`` is back once all are out."""
    rest = _without(pl_module.__dict__.get("training_step"), owner)
    if rest is None:
        pl_module.__dict__.pop("training_step", None)
    else:
        pl_module.training_step = rest


def _signed(link: partial, pl_module: pl.LightningModule) -> partial:
    """``link`` showing the signature of the user's own ``training_step``: Lightning reads it (through
    ``__wrapped__``) to decide what to pass, e.g. ``dataloader_iter`` instead of a batch, and a bare
    ``(*args, **kwargs)`` would hide it."""
    own = pl_module.__dict__.get("training_step")
    while isinstance(own, partial) and own.func is _step_with:
        own = own.args[2]
    link.__wrapped__ = own if own is not None else type(pl_module).training_step  # type: ignore[attr-defined]
    return link


def map_loss(output: Any, change: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``output`` of a ``training_step`` (a tensor or a dict with ``"loss"``) with its loss changed."""
    if isinstance(output, torch.Tensor):
        return change(output)
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        return {**output, "loss": change(output["loss"])}
    return output  # None: Lightning skips the batch, and so do we


def _step_with(owner: LossTerm, pl_module: pl.LightningModule, below: Any, *args: Any, **kwargs: Any) -> Any:
    step = below if below is not None else partial(type(pl_module).training_step, pl_module)
    return owner.wrap_training_step(pl_module, step, *args, **kwargs)


def _without(link: Any, owner: LossTerm) -> Any:
    if not (isinstance(link, partial) and link.func is _step_with):
        return link
    this, pl_module, below = link.args
    rest = _without(below, owner)
    return rest if this is owner else _signed(partial(_step_with, this, pl_module, rest), pl_module)
