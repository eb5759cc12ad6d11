"""``CurriculumSchedule``: phases of training that change the data, what trains, the learning rate
and the active adapter at declared epochs or steps.

::

    epoch        0            1            2            3
                 | phase 0    | phase 1                 | phase 2
    trainable    | adapters   | + block 5               | + blocks 4, 5
    lr           | 1e-3       | 5e-4                    | 2e-4
    data         | easy       | medium                  | hard

How a phase opens up parameters, also under DDP (which registers only the parameters that require
grad when it wraps the model, so unfreezing later fails):

- at ``setup``, or for a model built in ``setup()``/``configure_model()`` the moment it is assigned
  (after the ``PEFT`` callback adapted it, and before the optimizer, DDP and a resumed checkpoint see
  it; see ``model_hooks``), every parameter that some phase trains gets
  ``requires_grad=True``; the optimizer and DDP hold it from the start, and adapter-only checkpoints
  save it;
- outside its phases, its gradient is dropped (set to None) right before each optimizer step, after
  DDP averaged it. Torch optimizers skip a parameter without a gradient, so it stays bit-identical (no
  update, no weight decay, no momentum, no step count) and enters its phase with fresh optimizer
  state, as if it had just been added to the optimizer. The price: its gradient is computed from the
  first step on.

Parameters are told apart by identity, never by value. Phases only open up parameters that are frozen
at setup; whatever trains from the start (the adapters) trains in every phase.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_peft.callbacks.model_hooks import is_waiting, stop_waiting, wait_for_model
from lightning_peft.callbacks.module_path import missing_module_error, module_path_problems, resolve_module
from lightning_peft.callbacks.peft import PEFT
from lightning_peft.callbacks.phases import Phase, as_phases, check_optimizers_hold, sources
from lightning_peft.strategies.freeze import find_blocks
from lightning_peft.strategies.modules_to_save import frozen_copy_prefixes
from lightning_peft.strategies.named import adapter_names, set_active_adapters
from lightning_peft.strategies.targeting import (
    candidate_modules,
    describe_modules,
    matches,
    validation_error,
)

# set on the adapted module: the names of its parameters that trained before any phase opened more
_BASELINE_ATTR = "_lightning_peft_curriculum_baseline"
_INHERITED = ("trainable", "last_n_blocks", "lr", "adapter", "data")


class CurriculumSchedule(Callback):
    """Train in phases that change the data, the trainable modules, the learning rate and the active
    adapter at declared epochs or steps. It may come before or after the ``PEFT`` callback.

    Args:
        phases: :class:`Phase` objects or dicts with the same keys, by increasing ``start``; the first
            starts at 0.
        unit: phases start at an ``"epoch"`` (``trainer.current_epoch``) or a ``"step"``
            (``trainer.global_step``, optimizer steps).
        module: dotted path of the submodule that phase names refer to (``"model"``); None: the whole
            LightningModule.
        blocks: qualified name of the block ``ModuleList`` for ``last_n_blocks``; found when None.
        set_data: where a phase's ``data`` goes: the name of a method of the datamodule (looked up
            first) or of the LightningModule, called with the value; or any callable taking it.

    When ``data`` arrives: as soon as the unit before the phase ends (the end of the previous epoch
    or step), and at the start of fit for the phase training starts or resumes in. So:

    - epoch phases: loaders rebuilt with ``Trainer(reload_dataloaders_every_n_epochs=1)`` are built
      with the new value, and datasets or samplers that read it when iterated see it from the
      phase's first batch;
    - step phases: a dataset or sampler that reads the value as it draws gives the boundary step its
      batch (with ``num_workers=0``; with worker processes the batches already in flight come first).

    Parameters that a phase trains require grad from the start and their gradients are dropped
    outside their phases: the optimizer must hold every parameter that requires grad (checked at fit
    start). A phase's ``lr`` replaces every param group's learning rate when the phase begins: leave it
    None if an LR scheduler sets the learning rate. Switching adapters under DDP leaves the inactive
    adapter's parameters unused: use ``strategy="ddp_find_unused_parameters_true"``.

    Example::

        curriculum = CurriculumSchedule(
            [
                {"start": 0, "lr": 1e-3, "data": {"difficulty": "easy"}},
                {"start": 1, "last_n_blocks": 1, "lr": 5e-4, "data": {"difficulty": "medium"}},
                {"start": 3, "last_n_blocks": 2, "lr": 2e-4, "data": {"difficulty": "hard"}},
            ],
            unit="epoch",
            module="model",
        )
        trainer = L.Trainer(callbacks=[PEFT(LoRA(r=8), module="model"), curriculum],
                            reload_dataloaders_every_n_epochs=1)
        trainer.fit(module, datamodule=data)  # data.set_phase({"difficulty": ...}) is called
    """

    def __init__(
        self,
        phases: Sequence[Phase | Mapping[str, Any]],
        unit: Literal["epoch", "step"] = "epoch",
        module: str | None = None,
        blocks: str | None = None,
        set_data: str | Callable[[Any], None] = "set_phase",
    ) -> None:
        problems: list[str] = []
        self.phases = as_phases(phases, problems)
        if unit not in ("epoch", "step"):
            problems.append(f"unit must be 'epoch' or 'step', got {unit!r}")
        problems.extend(module_path_problems(module))
        if blocks is not None and (not isinstance(blocks, str) or not blocks):
            problems.append(f"blocks must be the name of a ModuleList or None, got {blocks!r}")
        if not (callable(set_data) or (isinstance(set_data, str) and set_data.isidentifier())):
            problems.append(f"set_data must be a method name or a callable, got {set_data!r}")
        validation_error("CurriculumSchedule", problems)
        self.unit = unit
        self.module = module
        self.blocks = blocks
        self.set_data = set_data
        self._starts = [p.start for p in self.phases]
        # for each field, per phase: the index of the phase whose value is in force there (None: none yet)
        self._source: dict[str, list[int | None]] = {name: sources(self.phases, name) for name in _INHERITED}
        self._params: dict[int, tuple[str, nn.Parameter]] = {}  # id -> (name, parameter) a phase trains
        self._active: list[frozenset[int]] = [frozenset() for _ in self.phases]  # ids trained, per phase
        self._position = 0  # the epoch or step training goes on from
        self._entered: int | None = None
        self._data_from: int | None = None  # the phase whose data was handed over last

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module, unit=self.unit)

    @property
    def phase(self) -> int | None:
        """Index of the phase in force (None before training starts)."""
        return self._entered

    def phase_at(self, position: int) -> int:
        """Index of the phase in force at an epoch or step (``unit``)."""
        return bisect.bisect_right(self._starts, position) - 1

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "starts": list(self._starts),
            "position": self._position,
            "phase": self.phase_at(self._position),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("unit") != self.unit or state_dict.get("starts") != self._starts:
            rank_zero_warn(
                f"CurriculumSchedule: the checkpoint's phases start at {state_dict.get('unit')}s "
                f"{state_dict.get('starts')}, this run's at {self.unit}s {self._starts}; going on with this run's"
            )
        self._position = int(state_dict.get("position", 0))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for callback in trainer.callbacks[trainer.callbacks.index(self) + 1 :]:
            if isinstance(callback, PEFT):
                # the phases are resolved on the adapted model: a PEFT callback listed after this one
                # sets up (adapts, or starts waiting for the model) first; its setup is idempotent
                callback.setup(trainer, pl_module, stage)
        if self._model_exists(pl_module):
            self.prepare(pl_module, trainer)
        else:  # built in setup()/configure_model(): prepared when assigned, after PEFT adapted it
            wait_for_model(self, pl_module, self.module, lambda: self._prepare_if_built(pl_module, trainer))
        self._position = trainer.global_step if self.unit == "step" else trainer.current_epoch
        self._entered = self._data_from = None

    def _model_exists(self, pl_module: pl.LightningModule) -> bool:
        target = resolve_module(pl_module, self.module)
        return target is not None and any(True for _ in target.parameters())

    def _prepare_if_built(self, pl_module: pl.LightningModule, trainer: pl.Trainer) -> bool:
        if not self._model_exists(pl_module):
            return False
        self.prepare(pl_module, trainer)
        return True

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        stop_waiting(self)

    def prepare(self, pl_module: pl.LightningModule, trainer: pl.Trainer | None = None) -> None:
        """Resolve every phase against the model and let each parameter a phase trains require grad.

        Runs right after ``configure_model``; raises one ``ValueError`` listing every phase that does not
        fit the model (names that match no module, too many blocks, unknown adapters, data nowhere to go).
        """
        target = resolve_module(pl_module, self.module)
        if target is None or not any(True for _ in target.parameters()):
            raise missing_module_error("CurriculumSchedule", self.module, pl_module)
        baseline = getattr(target, _BASELINE_ATTR, None)
        if baseline is None:  # the first fit: later ones find the phase parameters requiring grad already
            baseline = frozenset(n for n, p in target.named_parameters() if p.requires_grad)
            object.__setattr__(target, _BASELINE_ATTR, baseline)
        prefixes, problems = self._resolve(target, trainer, pl_module)
        validation_error("CurriculumSchedule", problems)

        params = dict(target.named_parameters())
        frozen_copies = frozen_copy_prefixes(target)
        opened: dict[tuple[str, int], set[str]] = {}  # (field, declaring phase) -> parameter names it opens
        for (field, i), module_names in prefixes.items():
            under = {
                n
                for n, p in params.items()
                if any(n.startswith(m + ".") for m in module_names)
                and not any(n.startswith(c) for c in frozen_copies)
                and p.is_floating_point()
            }
            opened[field, i] = under - baseline
            if under and not opened[field, i]:
                rank_zero_warn(
                    f"CurriculumSchedule: phases[{i}].{field} names only parameters that train from the start; phases "
                    f"open up frozen parameters (freeze the base first, e.g. PEFT(Freeze(...)))"
                )
        per_phase = [
            opened.get(("trainable", self._source["trainable"][i]), set())
            | opened.get(("last_n_blocks", self._source["last_n_blocks"][i]), set())
            for i in range(len(self.phases))
        ]
        prefix = f"{self.module}." if self.module else ""
        everything = set().union(*per_phase)
        self._params = {id(p): (prefix + n, p) for n, p in params.items() if n in everything}
        self._active = [frozenset(id(params[n]) for n in names) for names in per_phase]
        for _, param in self._params.values():
            param.requires_grad_(True)
        if self._params:
            count = sum(p.numel() for _, p in self._params.values())
            rank_zero_info(
                f"CurriculumSchedule: {len(self.phases)} phases by {self.unit} (starts {self._starts}); "
                f"{len(self._params)} frozen tensors ({count:,} parameters) train in their phases only"
            )

    def _resolve(
        self, target: nn.Module, trainer: pl.Trainer | None, pl_module: pl.LightningModule
    ) -> tuple[dict[tuple[str, int], list[str]], list[str]]:
        """The module names each phase's ``trainable`` and ``last_n_blocks`` open up, and every problem."""
        problems: list[str] = []
        prefixes: dict[tuple[str, int], list[str]] = {}
        candidates = candidate_modules(target)
        adapters = adapter_names(target)
        for i, phase in enumerate(self.phases):
            if phase.trainable is not None and phase.trainable != ():
                chosen = [n for n, _ in candidates if matches(n, phase.trainable)]
                if not chosen:
                    problems.append(
                        f"phases[{i}].trainable={phase.trainable!r} matched no module; "
                        f"modules here: {describe_modules(candidates)}"
                    )
                prefixes["trainable", i] = chosen
            if phase.last_n_blocks:
                try:
                    name, blocks = find_blocks(target, self.blocks)
                except ValueError as err:
                    problems.append(f"phases[{i}].last_n_blocks: {err}")
                else:
                    if phase.last_n_blocks > len(blocks):
                        problems.append(
                            f"phases[{i}].last_n_blocks={phase.last_n_blocks} but {name!r} has {len(blocks)} blocks"
                        )
                    first = len(blocks) - phase.last_n_blocks
                    prefixes["last_n_blocks", i] = [f"{name}.{j}" for j in range(first, len(blocks))]
            if phase.adapter is not None:
                wanted = {phase.adapter} if isinstance(phase.adapter, str) else set(phase.adapter)
                unknown = sorted(wanted - set(adapters))
                if unknown:
                    problems.append(
                        f"phases[{i}].adapter: no adapter named {unknown}; adapters here: {adapters or 'none'}"
                    )
        by_name = trainer is not None and not callable(self.set_data)
        if (
            by_name
            and any(p.data is not None for p in self.phases)
            and self._data_owner(trainer, pl_module) is None
        ):
            owners = [type(o).__name__ for o in (trainer.datamodule, pl_module) if o is not None]
            problems.append(
                f"phases give data but {' and '.join(owners)} {'have' if len(owners) > 1 else 'has'} no method "
                f"{self.set_data!r}; add one, or pass set_data=a callable"
            )
        return prefixes, problems

    def _data_owner(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        for owner in (trainer.datamodule, pl_module):
            if owner is not None and callable(getattr(owner, str(self.set_data), None)):
                return owner
        return None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if is_waiting(self):  # setup() and configure_model() are over and no model came
            stop_waiting(self)
            raise missing_module_error("CurriculumSchedule", self.module, pl_module)
        check_optimizers_hold(trainer.optimizers, self._params)
        # before the first loader is built; on a resume, self._position came from the checkpoint
        self._enter(trainer, pl_module, self.phase_at(self._position))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the loops are restored now, and so are the optimizer's learning rates: apply the phase again
        self._position = trainer.global_step if self.unit == "step" else trainer.current_epoch
        self._enter(trainer, pl_module, self.phase_at(self._position))

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unit == "epoch":
            self._position = trainer.current_epoch
            self._enter(trainer, pl_module, self.phase_at(self._position))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unit == "epoch":  # before the next epoch's loader is rebuilt
            self._position = trainer.current_epoch + 1
            self._hand_over_data(trainer, pl_module, self.phase_at(self._position))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.unit == "step":
            self._position = trainer.global_step
            self._enter(trainer, pl_module, self.phase_at(self._position))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.unit == "step":  # before the next batch is drawn
            self._position = trainer.global_step
            self._hand_over_data(trainer, pl_module, self.phase_at(self._position))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        active = self._active[self._entered] if self._entered is not None else frozenset()
        for key, (_, param) in self._params.items():
            if key not in active:
                param.grad = None  # the optimizer skips it: no update, no weight decay, no state

    def _enter(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int) -> None:
        """Put phase ``index`` in force: learning rate, active adapter, data (idempotent)."""
        lr_from, adapter_from = self._source["lr"][index], self._source["adapter"][index]
        if lr_from is not None:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = self.phases[lr_from].lr
        if adapter_from is not None:
            set_active_adapters(resolve_module(pl_module, self.module), self.phases[adapter_from].adapter)
        self._hand_over_data(trainer, pl_module, index)
        if index != self._entered:
            phase = self.phases[index]
            rank_zero_info(
                f"CurriculumSchedule: phase {index} from {self.unit} {phase.start}: "
                f"{len(self._active[index])} of {len(self._params)} phase tensors train"
                + (f", lr {self.phases[lr_from].lr}" if lr_from is not None else "")
                + (f", adapter {self.phases[adapter_from].adapter!r}" if adapter_from is not None else "")
            )
        self._entered = index

    def _hand_over_data(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int) -> None:
        source = self._source["data"][index]
        if source is None or source == self._data_from:
            return
        value = self.phases[source].data
        if callable(self.set_data):
            self.set_data(value)
        else:
            getattr(self._data_owner(trainer, pl_module), self.set_data)(value)
        self._data_from = source
