"""Knowledge distillation (Hinton et al. 2015) as a callback, with the base model as a free teacher.

::

    student logits  z_s  <- your training_step, unchanged (the callback records the forward call)
    teacher logits  z_t  <- the same inputs through the teacher (no grad, eval mode)
    loss = (1 - alpha) * task_loss + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

With ``teacher="base"`` the teacher is the adapted model itself with its adapters switched off
(:func:`~lightning_peft.disable_adapters`): the pretrained model's outputs, and no second copy of the
model in memory. This keeps an adapter close to what the base model knew (a guard against forgetting).
Only adapter modules are switched off: other trained parameters (a new classification head,
``modules_to_save``) are the same in teacher and student.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_peft.callbacks import loss_terms
from lightning_peft.callbacks.module_path import missing_module_error, module_path_problems, resolve_module
from lightning_peft.strategies.base import adapter_modules, disable_adapters


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over every position.

    The last dimension holds the classes (vocabulary); all others (batch, sequence) are positions.
    The ``T^2`` keeps the gradient's size independent of the temperature (Hinton et al. 2015, section 2).
    """
    log_s = F.log_softmax(student.float() / temperature, dim=-1).flatten(0, -2)  # (positions, classes)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2


class Distillation(Callback):
    """Add a distillation term to the loss that ``training_step`` returns.

    The callback wraps ``training_step`` on the module instance (see ``loss_terms``): while your step
    runs, a forward hook records the first call of the target module (its inputs and output); the
    teacher then runs on the same inputs and ``(1 - alpha) * loss + alpha * KL`` replaces your loss
    before Lightning calls ``backward``. The KL is logged as ``train_distill_kl``.

    Args:
        teacher: ``"base"`` for the target module with its adapters disabled (no copy), or any
            ``nn.Module`` called with the same arguments as the target (it is put in eval mode and on
            the module's device, and never trained or saved).
        alpha: weight of the distillation term, in [0, 1]; 1 trains on the teacher alone.
        temperature: softens both distributions (> 0).
        logits_key: where the logits are in a model's output that is a dict or a Hugging Face
            ``ModelOutput``; a plain tensor output is taken as the logits.
        module: dotted path of the submodule whose forward call gives the student logits (``"model"``);
            None means the LightningModule's own ``forward`` (``self(...)`` in ``training_step``).

    Example::

        trainer = L.Trainer(callbacks=[PEFT(LoRA(r=8), module="model"),
                                       Distillation(teacher="base", alpha=0.5, module="model")])
    """

    def __init__(
        self,
        teacher: Literal["base"] | nn.Module = "base",
        alpha: float = 0.5,
        temperature: float = 2.0,
        logits_key: str = "logits",
        module: str | None = None,
    ) -> None:
        problems = []
        if not (teacher == "base" if isinstance(teacher, str) else isinstance(teacher, nn.Module)):
            problems.append(f"teacher must be 'base' or an nn.Module, got {teacher!r}")
        if not isinstance(alpha, int | float) or not 0.0 <= alpha <= 1.0:
            problems.append(f"alpha must be in [0, 1], got {alpha!r}")
        if not isinstance(temperature, int | float) or not temperature > 0:
            problems.append(f"temperature must be > 0, got {temperature!r}")
        if not isinstance(logits_key, str) or not logits_key:
            problems.append(f"logits_key must be a non-empty string, got {logits_key!r}")
        problems.extend(module_path_problems(module))
        if problems:
            raise ValueError("Distillation: " + "; ".join(problems))
        self.teacher = teacher
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.logits_key = logits_key
        self.module = module
        self.last_kl: torch.Tensor | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            loss_terms.install(pl_module, self)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        target = self._target(pl_module)
        if isinstance(self.teacher, nn.Module):
            self.teacher.to(pl_module.device).eval()
        elif not any(True for _ in adapter_modules(target)):
            rank_zero_warn(
                f"Distillation(teacher='base'): {self.module or type(pl_module).__name__} has no adapters, "
                "so the teacher is the student itself and the distillation term is zero"
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        loss_terms.uninstall(pl_module, self)

    def wrap_training_step(
        self, pl_module: pl.LightningModule, step: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        target = self._target(pl_module)
        calls: list[tuple[tuple[Any, ...], dict[str, Any], Any]] = []

        def record(module: nn.Module, inputs: tuple[Any, ...], kw: dict[str, Any], output: Any) -> None:
            if not calls:
                calls.append((inputs, kw, output))

        handle = target.register_forward_hook(record, with_kwargs=True)
        try:
            output = step(*args, **kwargs)
        finally:
            handle.remove()
        if not calls:
            name = self.module or type(pl_module).__name__
            raise ValueError(
                f"Distillation(module={self.module!r}): training_step never called {name}; name the submodule "
                f"that gives the logits, e.g. module='model' (submodules: "
                f"{', '.join(n for n, _ in pl_module.named_children()) or 'none'})"
            )
        inputs, kw, student_output = calls[0]
        student = self._logits(student_output, "student")
        with torch.no_grad():
            teacher = self._logits(self._teach(target, inputs, kw), "teacher")
        if teacher.shape != student.shape:
            raise ValueError(
                f"Distillation: teacher logits {tuple(teacher.shape)} and student logits "
                f"{tuple(student.shape)} differ in shape"
            )
        kl = distillation_kl(student, teacher, self.temperature)
        self.last_kl = kl.detach()
        pl_module.log("train_distill_kl", self.last_kl, batch_size=student.shape[0])
        return loss_terms.map_loss(output, lambda loss: (1.0 - self.alpha) * loss + self.alpha * kl)

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        target = resolve_module(pl_module, self.module)
        if target is None:
            raise missing_module_error("Distillation", self.module, pl_module)
        return target

    def _teach(self, target: nn.Module, inputs: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        if isinstance(self.teacher, nn.Module):
            return self.teacher(*inputs, **kw)
        # the base model in eval mode (no dropout, no training-only noise), then every mode restored
        modes = [(m, m.training) for m in target.modules()]
        target.eval()
        try:
            with disable_adapters(target):
                return target(*inputs, **kw)
        finally:
            for m, training in modes:
                m.training = training

    def _logits(self, output: Any, whose: str) -> torch.Tensor:
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, Mapping) and isinstance(output.get(self.logits_key), torch.Tensor):
            return output[self.logits_key]
        found = list(output) if isinstance(output, Mapping) else type(output).__name__
        raise ValueError(
            f"Distillation: the {whose} output has no tensor under logits_key={self.logits_key!r}; found {found}"
        )
