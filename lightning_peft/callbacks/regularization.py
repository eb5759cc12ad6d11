"""Penalties on the trained weights: L1, L2, and L2-SP (L2 toward the starting point, Li et al. 2018).

::

    loss = task_loss + l1 * sum|w| + l2 * sum w^2 + l2_sp * sum (w - w_0)^2

``w_0`` is a copy of each weight taken when training starts (``on_train_start``) and kept in the
callback's state, so a resumed run pulls toward the same point. The penalty joins the loss that
``training_step`` returns (see ``loss_terms``) rather than the gradients: it then works with every
optimizer, and gradient accumulation, mixed precision and gradient clipping treat it like the task
loss. (Decoupled weight decay, AdamW's ``weight_decay``, is a different thing: it skips Adam's scaling.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_peft.callbacks import loss_terms
from lightning_peft.strategies.base import adapter_parameter_names


class AdapterRegularization(Callback):
    """Add L1, L2 and L2-SP penalties on the trained parameters to the loss; logs ``train_reg_penalty``.

    Args:
        l1: weight of ``sum |w|`` (drives small weights to zero).
        l2: weight of ``sum w^2`` (no factor 1/2: the gradient is ``2 * l2 * w``).
        l2_sp: weight of ``sum (w - w_0)^2``, ``w_0`` being the value when training started.
        parameters: ``"trainable"`` for every parameter with ``requires_grad`` (adapters, heads,
            ``modules_to_save``), ``"adapters"`` for the adapter modules' own parameters only.

    Example::

        trainer = L.Trainer(callbacks=[PEFT(LoRA(r=8), module="model"), AdapterRegularization(l2_sp=1e-3)])
    """

    def __init__(
        self,
        l1: float = 0.0,
        l2: float = 0.0,
        l2_sp: float = 0.0,
        parameters: Literal["trainable", "adapters"] = "trainable",
    ) -> None:
        problems = [
            f"{name} must be a number >= 0, got {value!r}"
            for name, value in (("l1", l1), ("l2", l2), ("l2_sp", l2_sp))
            if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0
        ]
        if parameters not in ("trainable", "adapters"):
            problems.append(f"parameters must be 'trainable' or 'adapters', got {parameters!r}")
        if problems:
            raise ValueError("AdapterRegularization: " + "; ".join(problems))
        self.l1, self.l2, self.l2_sp = float(l1), float(l2), float(l2_sp)
        self.parameters = parameters
        self.start: dict[str, torch.Tensor] = {}  # w_0 for L2-SP, by parameter name
        self._params: dict[str, nn.Parameter] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(l1=self.l1, l2=self.l2, l2_sp=self.l2_sp, parameters=self.parameters)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"start": {k: v.cpu() for k, v in self.start.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.start = dict(state_dict.get("start", {}))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            loss_terms.install(pl_module, self)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._params = self.regularized(pl_module)
        if self.l2_sp == 0:
            return
        if set(self.start) != set(self._params):  # a fresh run (a resume brings w_0 back)
            self.start = {n: p.detach().clone() for n, p in self._params.items()}
        self.start = {n: w.to(self._params[n].device) for n, w in self.start.items()}

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        loss_terms.uninstall(pl_module, self)
        self._params = {}

    def regularized(self, pl_module: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters the penalty applies to, by name."""
        params = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        if self.parameters == "adapters":
            names = set(adapter_parameter_names(pl_module))
            params = {n: p for n, p in params.items() if n in names}
        if not params:
            raise ValueError(
                f"AdapterRegularization(parameters={self.parameters!r}) found no such parameter in "
                f"{type(pl_module).__name__}; is a PEFT callback applying adapters?"
            )
        return params

    def penalty(self) -> torch.Tensor:
        """``l1 * sum|w| + l2 * sum w^2 + l2_sp * sum (w - w_0)^2`` over the regularized parameters."""
        total = torch.zeros((), device=next(iter(self._params.values())).device)
        for name, w in self._params.items():
            if self.l1:
                total = total + self.l1 * w.abs().sum()
            if self.l2:
                total = total + self.l2 * w.pow(2).sum()
            if self.l2_sp:
                total = total + self.l2_sp * (w - self.start[name]).pow(2).sum()
        return total

    def wrap_training_step(
        self, pl_module: pl.LightningModule, step: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        output = step(*args, **kwargs)
        if not self._params:
            self._params = self.regularized(pl_module)
        penalty = self.penalty()
        pl_module.log("train_reg_penalty", penalty.detach(), batch_size=1)
        return loss_terms.map_loss(output, lambda loss: loss + penalty.to(loss.dtype))
