"""Several tasks in one run: a task-mixing loader and a callback that gives each task its own adapter.

::

    MultiTaskLoader({"a": loader_a, "b": loader_b}, sampling="temperature", temperature=2.0)
        step:    0    1    2    3    4   ...      task drawn from p_i ∝ n_i^(1/T), seeded per epoch
        task:    a    b    a    a    b   ...      -> loader.current_task
        batch:  a0   b0   a1   a2   b1   ...      each task's own batches, unchanged
                 |
    MultiTaskSchedule(tasks=["a", "b"], strategy=LoRA(r=8))
        on_train_batch_start: only the current task's adapter contributes
        base -> LoRA(a) -> LoRA(b)               (named adapters stacked on the frozen base)

- :class:`TaskSampler` and :class:`MultiTaskLoader` are plain PyTorch (no Lightning): an iterable with
  ``len`` whose ``sampler`` draws the task sequence from ``seed + epoch`` (the same on every rank and
  after a resume; Lightning calls ``sampler.set_epoch`` every epoch), and whose position within the
  epoch is in ``state_dict``/``load_state_dict``, which Lightning's fit loop saves in checkpoints and
  restores mid-epoch, so that a resume continues the same task sequence. ``sampling="sequential"``
  trains one task after the other (continual learning).
- :class:`MultiTaskSchedule` is the Lightning glue: it adds one named adapter per task (or one shared
  adapter) before the optimizer is built, switches the active adapter with each batch's task (and with
  each validation/test loader when they are given as a dict keyed by task), and logs per-task metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from typing_extensions import override

from lightning_peft.callbacks.model_hooks import is_waiting, stop_waiting, wait_for_model
from lightning_peft.callbacks.module_path import missing_module_error, module_path_problems, resolve_module
from lightning_peft.callbacks.peft import PEFT
from lightning_peft.data.mixing import MultiTaskLoader
from lightning_peft.strategies.base import (
    APPLIED_ATTR,
    DEFAULT_ADAPTER,
    PEFTStrategy,
    adapter_modules,
    count_parameters,
)
from lightning_peft.strategies.compose import as_strategy
from lightning_peft.strategies.named import adapter_names, add_adapter
from lightning_peft.strategies.targeting import validation_error

SHARED_ADAPTER = "shared"


class MultiTaskSchedule(Callback):
    """Train the tasks of a :class:`MultiTaskLoader` with an adapter per task (or one shared adapter).

    The adapters are added before the optimizer is built (at ``setup``, or right after the module's
    ``configure_model`` when the model is built there); the base is frozen. During training only the
    adapter of the current batch's task contributes, so an adapter learns from its own task only.
    Validation and test loaders given as a dict keyed by task run each with their task's adapter (other
    loaders run with the adapters as training left them).

    With a ``PEFT`` callback in the same Trainer (listed before this one), the PEFT callback's choices
    stay: ``PEFT(Freeze())`` keeps checkpoints adapter-only (they then hold every task's adapter), and
    ``PEFT(LoRA(...))`` adds a shared adapter that stays active next to the task's own. Alone, this
    callback freezes the base itself and checkpoints are full.

    Args:
        tasks: the task names, as in the ``MultiTaskLoader``.
        strategy: the adapter to build for every task (``adapter_per_task=True``) or once, shared by all
            tasks and named ``"shared"``; a list is one ``Compose``. None: add nothing; with
            ``adapter_per_task`` the model must already carry adapters named after the tasks.
        module: dotted path of the submodule to adapt (like ``PEFT(module=...)``); None is the whole module.
        adapter_per_task: one adapter per task, switched with every batch; False trains one for all.
        log_metrics: log ``train_loss/<task>`` (the epoch's mean ``training_step`` loss over that task's
            batches) and ``task_batches/<task>`` (how many batches each task had in the epoch).

    With tasks that share a head, ``training_step`` stays as it is. For a head per task, read the task
    in ``training_step`` with ``task = self.trainer.train_dataloader.current_task`` (and in
    ``validation_step`` from a dict of loaders: ``list(self.trainer.val_dataloaders)[dataloader_idx]``).

    Under DDP an adapter per task needs ``strategy=DDPStrategy(find_unused_parameters=True)``: the
    inactive adapters get no gradient in a step.

    Example::

        loader = MultiTaskLoader({"sst2": sst2, "mnli": mnli}, sampling="temperature", temperature=2)
        trainer = L.Trainer(callbacks=[
            PEFT(Freeze(), module="model"),
            MultiTaskSchedule(["sst2", "mnli"], strategy=LoRA(r=8), module="model"),
        ])
        trainer.fit(module, train_dataloaders=loader, val_dataloaders={"sst2": sst2_val, "mnli": mnli_val})
    """

    def __init__(
        self,
        tasks: Sequence[str],
        strategy: PEFTStrategy | Sequence[PEFTStrategy] | None = None,
        module: str | None = None,
        adapter_per_task: bool = True,
        log_metrics: bool = True,
    ) -> None:
        problems = []
        names = list(tasks) if isinstance(tasks, Sequence) and not isinstance(tasks, str) else []
        if not names:
            problems.append(f"tasks must be a non-empty list of task names, got {tasks!r}")
        bad = [t for t in names if not isinstance(t, str) or not t]
        if bad:
            problems.append(f"task names must be non-empty strings, got {bad}")
        repeated = sorted({t for t in names if names.count(t) > 1}, key=str)
        if repeated:
            problems.append(f"task names must be unique; repeated: {repeated}")
        if strategy is not None:
            try:
                strategy = as_strategy(strategy)
            except (TypeError, ValueError) as err:
                problems.append(f"strategy: {err}")
        problems.extend(module_path_problems(module))
        if not isinstance(adapter_per_task, bool):
            problems.append(f"adapter_per_task must be True or False, got {adapter_per_task!r}")
        if not isinstance(log_metrics, bool):
            problems.append(f"log_metrics must be True or False, got {log_metrics!r}")
        validation_error("MultiTaskSchedule", problems)
        self.tasks = names
        self.strategy = strategy
        self.module = module
        self.adapter_per_task = adapter_per_task
        self.log_metrics = log_metrics
        self._loader: MultiTaskLoader | None = None
        self._owned: list[tuple[nn.Module, str]] | None = None
        self._batches = dict.fromkeys(self.tasks, 0)

    @property
    def adapters(self) -> list[str]:
        """The adapters this schedule switches: one per task, or the shared one."""
        return list(self.tasks) if self.adapter_per_task else [SHARED_ADAPTER]

    def adapter_of(self, task: str) -> str:
        """The adapter that trains ``task``."""
        return task if self.adapter_per_task else SHARED_ADAPTER

    @property
    def current_task(self) -> str | None:
        """The task of the batch being trained (None before training)."""
        return self._loader.current_task if self._loader is not None else None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(tasks=tuple(self.tasks), module=self.module)

    @override
    def state_dict(self) -> dict[str, Any]:
        # the loader's own position is saved by Lightning's fit loop (MultiTaskLoader.state_dict); the
        # recipe of the adapters lets a loader outside the Trainer rebuild them before loading
        return {
            "task_batches": dict(self._batches),
            "adapters": self.adapters,
            "strategy": self.strategy.to_config() if self.strategy is not None else None,
            "module": self.module,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._batches.update(state_dict.get("task_batches", {}))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._check_trainer(trainer)
        self._owned = None
        if self.strategy is not None and not self.add_adapters(pl_module, trainer, required=False):
            # built in setup()/configure_model(): added when assigned, after PEFT (see model_hooks)
            wait_for_model(
                self, pl_module, self.module, lambda: self.add_adapters(pl_module, trainer, required=False)
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        stop_waiting(self)

    def _check_trainer(self, trainer: pl.Trainer) -> None:
        problems = []
        position = trainer.callbacks.index(self)
        late = [type(c).__name__ for c in trainer.callbacks[position + 1 :] if isinstance(c, PEFT)]
        if late:
            problems.append(
                "the PEFT callback must come before MultiTaskSchedule in callbacks (it prepares the base "
                "that the task adapters are added to): callbacks=[PEFT(...), MultiTaskSchedule(...)]"
            )
        strategy = trainer.strategy
        if (
            self.adapter_per_task
            and len(self.tasks) > 1
            and isinstance(strategy, DDPStrategy)
            and not getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False)
        ):
            problems.append(
                "an adapter per task under DDP needs find_unused_parameters=True (the inactive adapters get "
                "no gradient): Trainer(strategy=DDPStrategy(find_unused_parameters=True)) or "
                "strategy='ddp_find_unused_parameters_true'"
            )
        if problems:
            raise ValueError("MultiTaskSchedule cannot run in this Trainer:\n  - " + "\n  - ".join(problems))

    def add_adapters(
        self, pl_module: pl.LightningModule, trainer: pl.Trainer | None = None, required: bool = True
    ) -> bool:
        """Add the missing adapters to the target module; False if that module does not exist yet.

        After a ``PEFT`` callback the base stays as it left it (what it trains still trains); alone, the
        base is frozen. Calling it again adds nothing.
        """
        target = resolve_module(pl_module, self.module)
        if target is None or not any(True for _ in target.parameters()):
            if required:
                raise missing_module_error("MultiTaskSchedule", self.module, pl_module)
            return False
        missing = [n for n in self.adapters if n not in adapter_names(target)]
        if not missing or self.strategy is None:
            return True
        after_peft = getattr(target, APPLIED_ATTR, None) is not None
        keep = [p for p in target.parameters() if p.requires_grad] if after_peft else []
        for name in missing:
            add_adapter(target, name, self.strategy)
        for param in keep:
            param.requires_grad_(True)
        self._owned = None
        _record_in_peft(trainer, pl_module)
        trainable, total = count_parameters(pl_module)
        rank_zero_info(
            f"lightning_peft: MultiTaskSchedule added {type(self.strategy).__name__} adapters {missing} to "
            f"{self.module or type(pl_module).__name__}; trainable params: {trainable:,} of {total:,}"
        )
        return True

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if is_waiting(self):  # setup() and configure_model() are over and no model came
            stop_waiting(self)
            raise missing_module_error("MultiTaskSchedule", self.module, pl_module)
        self._owned = self._find_owned(pl_module)  # fails early when adapters are missing

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loader = _find_loader(trainer.train_dataloader)
        if self._loader is None:
            raise ValueError(
                "MultiTaskSchedule needs a MultiTaskLoader as the train dataloader, got "
                f"{type(trainer.train_dataloader).__name__}"
            )
        if set(self._loader.tasks) != set(self.tasks):
            raise ValueError(
                f"the MultiTaskLoader's tasks {self._loader.tasks} are not the schedule's tasks {self.tasks}"
            )
        if trainer.world_size > 1:
            unsharded = [
                t
                for t, loader in self._loader.loaders.items()
                if isinstance(loader, DataLoader) and not isinstance(loader.sampler, DistributedSampler)
            ]
            if unsharded:
                rank_zero_warn(
                    f"the loaders of tasks {unsharded} have no DistributedSampler: every rank trains on the "
                    "same batches (Lightning does not add samplers inside a MultiTaskLoader)"
                )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        task = self.current_task
        if task is not None:
            self._activate(pl_module, task)
            self._batches[task] += 1

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        task = self.current_task
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if self.log_metrics and task is not None and isinstance(loss, torch.Tensor):
            # Lightning hands over the loss divided for gradient accumulation
            loss = loss.detach() * trainer.accumulate_grad_batches
            pl_module.log(
                f"train_loss/{task}", loss, on_step=False, on_epoch=True, batch_size=1, sync_dist=True
            )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.log_metrics:
            for task, count in self._batches.items():
                pl_module.log(
                    f"task_batches/{task}", float(count), on_step=False, on_epoch=True, sync_dist=True
                )
        self._batches = dict.fromkeys(self.tasks, 0)

    @override
    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._activate_for_loader(pl_module, trainer.val_dataloaders, dataloader_idx)

    @override
    def on_test_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._activate_for_loader(pl_module, trainer.test_dataloaders, dataloader_idx)

    def _activate_for_loader(self, pl_module: pl.LightningModule, loaders: Any, dataloader_idx: int) -> None:
        # a dict of loaders keyed by task: Lightning numbers them in the dict's order
        if isinstance(loaders, Mapping):
            task = list(loaders)[dataloader_idx]
            if task in self.tasks:
                self._activate(pl_module, task)

    def _activate(self, pl_module: pl.LightningModule, task: str) -> None:
        """Let the adapter of ``task`` contribute and the other schedule adapters not; others stay as they are."""
        if self._owned is None:
            self._owned = self._find_owned(pl_module)
        wanted = self.adapter_of(task)
        for module, name in self._owned:
            module.set_adapter_enabled(name == wanted)

    def _find_owned(self, pl_module: pl.LightningModule) -> list[tuple[nn.Module, str]]:
        target = resolve_module(pl_module, self.module)
        found = (
            []
            if target is None
            else [(m, getattr(m, "adapter_name", DEFAULT_ADAPTER)) for _, m in adapter_modules(target)]
        )
        owned = [(m, name) for m, name in found if name in self.adapters]
        missing = sorted(set(self.adapters) - {name for _, name in owned})
        if missing and (self.adapter_per_task or self.strategy is not None):
            raise ValueError(
                f"MultiTaskSchedule: no adapter named {missing} in {self.module or type(pl_module).__name__}; "
                f"adapters here: {sorted({name for _, name in found}) or 'none'} (give strategy= to add them)"
            )
        return owned


def _find_loader(loaders: Any) -> MultiTaskLoader | None:
    """The MultiTaskLoader among the train dataloaders (one of them, or the only one)."""
    if isinstance(loaders, MultiTaskLoader):
        return loaders
    values = (
        loaders.values()
        if isinstance(loaders, Mapping)
        else loaders
        if isinstance(loaders, list | tuple)
        else []
    )
    found = [v for v in values if isinstance(v, MultiTaskLoader)]
    return found[0] if len(found) == 1 else None


def _record_in_peft(trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> None:
    """Tell the PEFT callback about the new adapters, so that it accepts them when a checkpoint is loaded."""
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, PEFT) and callback._shapes:
            callback.record_parameters(pl_module)
