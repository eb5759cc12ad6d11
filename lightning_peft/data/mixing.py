"""Mixing several tasks' data loaders into one stream, in plain PyTorch (no Lightning).

:class:`TaskSampler` draws which task each step trains ("proportional" p_i ∝ n_i, "temperature"
p_i ∝ n_i^(1/T), "round_robin", or "sequential" for continual learning) from ``seed + epoch``, so every
rank and every resume sees the same sequence. :class:`MultiTaskLoader` yields each chosen task's batch
unchanged, exposes ``current_task``, and keeps its position in ``state_dict``/``load_state_dict`` (which
Lightning's fit loop saves and restores mid-epoch). The Lightning glue is
``lightning_peft.callbacks.multitask.MultiTaskSchedule``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch.utils.data import Sampler

from lightning_peft.strategies.targeting import validation_error

Sampling = Literal["proportional", "temperature", "round_robin", "sequential"]
SAMPLINGS: tuple[str, ...] = ("proportional", "temperature", "round_robin", "sequential")


def _sized(obj: object) -> int | None:
    try:
        return len(obj)  # type: ignore[arg-type]
    except TypeError:
        return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class TaskSampler(Sampler[str]):
    """The task of every step of an epoch, drawn from ``seed + epoch``: the same on every rank and on resume.

    Like ``DistributedSampler``, it is told the epoch with :meth:`set_epoch` (Lightning does so at the
    start of every epoch, as for any loader's ``sampler``).

    Args:
        sizes: task -> n_i, in the order of the tasks (``round_robin`` and ``sequential`` ignore n_i).
        sampling, temperature, steps_per_epoch, epochs_per_task, seed: as in :class:`MultiTaskLoader`.

    Example::

        sampler = TaskSampler({"a": 100, "b": 900}, sampling="temperature", temperature=2.0, steps_per_epoch=50)
        sampler.set_epoch(3)
        tasks = list(sampler)   # 50 task names
    """

    def __init__(
        self,
        sizes: Mapping[str, float],
        sampling: Sampling,
        temperature: float,
        steps_per_epoch: int,
        epochs_per_task: int = 1,
        seed: int = 0,
    ) -> None:
        self.tasks = list(sizes)
        self.sampling = sampling
        self.steps_per_epoch = steps_per_epoch
        self.epochs_per_task = epochs_per_task
        self.seed = seed
        self.epoch = 0
        power = 1.0 / temperature if sampling == "temperature" else 1.0
        weights = [
            float(sizes[t]) ** power if sampling in ("proportional", "temperature") else 1.0
            for t in self.tasks
        ]
        self.probabilities = {t: w / sum(weights) for t, w in zip(self.tasks, weights, strict=True)}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[str]:
        return iter(self.task_order(self.epoch))

    def task_order(self, epoch: int) -> list[str]:
        """The task of every step of ``epoch``: a function of (sampling, seed, epoch) only."""
        steps, n = self.steps_per_epoch, len(self.tasks)
        if self.sampling == "round_robin":  # the cycle continues across epochs
            return [self.tasks[(epoch * steps + step) % n] for step in range(steps)]
        if self.sampling == "sequential":
            return [self.tasks[(epoch // self.epochs_per_task) % n]] * steps
        generator = torch.Generator().manual_seed(self.seed + epoch)
        weights = torch.tensor([self.probabilities[t] for t in self.tasks], dtype=torch.float64)
        drawn = torch.multinomial(weights, steps, replacement=True, generator=generator)
        return [self.tasks[i] for i in drawn.tolist()]


class MultiTaskLoader:
    """One training stream over several tasks: every step draws a task, then yields that task's next batch.

    Batches are passed through unchanged; ``current_task`` names the task of the batch yielded last.
    Every epoch starts each task's loader from its beginning (shuffle them to see new batches), and a
    task whose loader runs out within the epoch starts it again.

    Args:
        loaders: task name -> that task's ``DataLoader`` (any iterable works; one with ``len`` unless
            ``steps_per_epoch`` is given).
        sampling: how the task of each step is chosen:
            ``"proportional"``: at random with p_i ∝ n_i (examples-proportional mixing);
            ``"temperature"``: at random with p_i ∝ n_i^(1/T) (T=1 is proportional, large T uniform);
            ``"round_robin"``: the tasks in turn, in the order of ``loaders``, continuing across epochs;
            ``"sequential"``: one task per ``epochs_per_task`` epochs, in order (continual learning;
            after the last task the sequence starts again).
        temperature: T of ``"temperature"`` sampling.
        sizes: task -> n_i for the random samplings. Default: ``len(loader.dataset)`` when every loader
            has a sized dataset (examples), else ``len(loader)`` (batches).
        steps_per_epoch: batches per epoch. Default: the sum of the loaders' lengths (one pass over all
            the data); for ``"sequential"`` the longest loader (shorter ones start again).
        epochs_per_task: for ``"sequential"``: how many epochs each task lasts.
        seed: the task sequence of epoch ``e`` is drawn from ``seed + e`` (see :class:`TaskSampler`).

    The epoch comes from ``loader.sampler.set_epoch``, which Lightning calls every epoch; a loop of
    your own may call it too, or simply iterate again: a finished epoch moves on to the next. The
    position within an epoch is in ``state_dict``, which Lightning's fit loop saves in checkpoints and
    restores on a mid-epoch resume, so a resume continues the same task sequence (and, for loaders
    without shuffling, the same batches).

    Under DDP, Lightning injects no ``DistributedSampler`` here (this is not a ``DataLoader``): give each
    task's ``DataLoader`` its own ``DistributedSampler``. Every rank draws the same task sequence, so a
    step trains the same task (and adapter) on all ranks.

    Example::

        loader = MultiTaskLoader({"sst2": sst2_loader, "mnli": mnli_loader}, sampling="temperature", temperature=2)
        trainer.fit(module, train_dataloaders=loader)
    """

    def __init__(
        self,
        loaders: Mapping[str, Iterable[Any]],
        sampling: Sampling = "proportional",
        temperature: float = 1.0,
        sizes: Mapping[str, int] | None = None,
        steps_per_epoch: int | None = None,
        epochs_per_task: int = 1,
        seed: int = 0,
    ) -> None:
        problems = []
        if not isinstance(loaders, Mapping) or not loaders:
            problems.append(f"loaders must be a non-empty dict of task name -> DataLoader, got {loaders!r}")
            loaders = {}
        bad_names = [k for k in loaders if not isinstance(k, str) or not k]
        if bad_names:
            problems.append(f"task names must be non-empty strings, got {bad_names}")
        if sampling not in SAMPLINGS:
            problems.append(f"sampling={sampling!r} is unknown; choose one of {', '.join(SAMPLINGS)}")
        if not isinstance(temperature, int | float) or isinstance(temperature, bool) or not temperature > 0:
            problems.append(f"temperature must be a positive number, got {temperature!r}")
        if steps_per_epoch is not None and (not _is_int(steps_per_epoch) or steps_per_epoch <= 0):
            problems.append(f"steps_per_epoch must be a positive integer or None, got {steps_per_epoch!r}")
        if not _is_int(epochs_per_task) or epochs_per_task <= 0:
            problems.append(f"epochs_per_task must be a positive integer, got {epochs_per_task!r}")
        if not _is_int(seed):
            problems.append(f"seed must be an integer, got {seed!r}")
        lengths = {task: _sized(loader) for task, loader in loaders.items()}
        empty = [t for t, n in lengths.items() if n == 0]
        if empty:
            problems.append(f"the loaders of {empty} are empty")
        unsized = [t for t, n in lengths.items() if n is None]
        if steps_per_epoch is None and unsized:
            problems.append(f"the loaders of {unsized} have no len(); give steps_per_epoch")
        if sampling in ("proportional", "temperature"):
            sizes = _task_sizes(loaders, sizes, lengths, problems)
        validation_error("MultiTaskLoader", problems)

        self.loaders = dict(loaders)
        self.tasks = list(self.loaders)
        if steps_per_epoch is None:
            known = [n for n in lengths.values() if n is not None]
            steps_per_epoch = max(known) if sampling == "sequential" else sum(known)
        self.sampler = TaskSampler(
            sizes or dict.fromkeys(self.tasks, 1),
            sampling,
            temperature,
            steps_per_epoch,
            epochs_per_task,
            seed,
        )
        self.current_task: str | None = None
        # where the stream stands: its epoch, the batches yielded in it, and per task the batches
        # taken from the current pass of its loader (to fast-forward a plain loader on resume)
        self.epoch = 0
        self.position = 0
        self._streams: dict[str, Iterator[Any]] = {}
        self._taken: dict[str, int] = dict.fromkeys(self.tasks, 0)
        self._skip: dict[str, int] = {}

    @property
    def probabilities(self) -> dict[str, float]:
        """The chance of each task at every step (uniform shares for round_robin and sequential)."""
        return dict(self.sampler.probabilities)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def task_order(self, epoch: int) -> list[str]:
        """The task of every step of ``epoch``."""
        return self.sampler.task_order(epoch)

    def __len__(self) -> int:
        # a length also keeps Lightning from prefetching, so current_task is the batch being trained
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[Any]:
        # a generator: nothing moves until the first batch is asked for (Lightning calls iter() once
        # just to check that the loader is iterable)
        if self.sampler.epoch != self.epoch:  # set_epoch moved on
            self._start_epoch(self.sampler.epoch)
        elif self.position >= self.steps_per_epoch:  # iterated again after a full epoch
            self.sampler.set_epoch(self.epoch + 1)
            self._start_epoch(self.epoch + 1)
        order = self.sampler.task_order(self.epoch)
        while self.position < self.steps_per_epoch:
            task = order[self.position]
            batch = self._next_batch(task)
            self.current_task = task
            self.position += 1
            yield batch

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0
        self._streams, self._skip = {}, {}

    def _next_batch(self, task: str) -> Any:
        stream = self._streams.get(task)
        if stream is None:
            stream = self._start_pass(task)
        try:
            batch = next(stream)
        except StopIteration:
            stream = self._start_pass(task)
            try:
                batch = next(stream)
            except StopIteration:
                raise RuntimeError(f"the loader of task {task!r} yielded no batch") from None
        self._taken[task] += 1
        return batch

    def _start_pass(self, task: str) -> Iterator[Any]:
        stream = iter(self.loaders[task])
        skip = self._skip.pop(task, 0)
        for _ in range(skip):  # resuming a plain loader mid-pass: drop what was trained on already
            next(stream, None)
        self._taken[task] = skip
        self._streams[task] = stream
        return stream

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands; Lightning stores it in every checkpoint (in its fit loop's state)."""
        state: dict[str, Any] = {
            "tasks": list(self.tasks),
            "epoch": self.epoch,
            "position": self.position,
            "taken": dict(self._taken),
        }
        stateful = {t: loader.state_dict() for t, loader in self.loaders.items() if _is_stateful(loader)}
        if stateful:
            state["loaders"] = stateful
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``: the next batch is the one that followed it in the saved run.

        Loaders with their own ``state_dict`` (torchdata's ``StatefulDataLoader``) resume from it; plain
        ones restart their current pass and skip the batches already taken from it.
        """
        if list(state.get("tasks", [])) != self.tasks:
            raise ValueError(f"the saved loader had tasks {state.get('tasks')}, this one has {self.tasks}")
        self._start_epoch(int(state["epoch"]))
        self.sampler.set_epoch(self.epoch)
        self.position = int(state["position"])
        loader_states = state.get("loaders", {})
        for task, loader in self.loaders.items():
            if task in loader_states and _is_stateful(loader):
                loader.load_state_dict(loader_states[task])
            else:
                self._skip[task] = int(state.get("taken", {}).get(task, 0))


def _task_sizes(
    loaders: Mapping[str, Any],
    sizes: Mapping[str, int] | None,
    lengths: Mapping[str, int | None],
    problems: list[str],
) -> dict[str, int] | None:
    """n_i of every task for the random samplings: given, or examples, or batches."""
    if sizes is not None:
        if not isinstance(sizes, Mapping) or set(sizes) != set(loaders):
            problems.append(f"sizes must have one entry per task {sorted(loaders)}, got {sizes!r}")
            return None
        bad = {t: n for t, n in sizes.items() if not _is_int(n) or n <= 0}
        if bad:
            problems.append(f"sizes must be positive integers, got {bad}")
        return {t: sizes[t] for t in loaders}
    examples = {t: _sized(getattr(loader, "dataset", None)) for t, loader in loaders.items()}
    found = examples if all(examples.values()) else lengths
    unknown = [t for t, n in found.items() if not n]
    if unknown:
        problems.append(f"the sizes of {unknown} are unknown (no len()); give sizes={{task: n, ...}}")
        return None
    return dict(found)  # type: ignore[arg-type]


def _is_stateful(loader: object) -> bool:
    return callable(getattr(loader, "state_dict", None)) and callable(
        getattr(loader, "load_state_dict", None)
    )
