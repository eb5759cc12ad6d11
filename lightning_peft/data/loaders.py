"""Data loaders that resume mid-epoch exactly, in plain PyTorch (no Lightning, no new dependency).

Lightning's fit loop saves ``state_dict()`` of every training loader that has one in each checkpoint,
and on a mid-epoch resume hands it back through ``load_state_dict`` before the epoch goes on. A plain
``DataLoader`` has no such state: a resumed run starts the epoch again, in a new random order.

- :class:`SeededSampler` draws its order from ``(seed, epoch, pass)``, not from torch's global random
  state, so a resumed run can draw the same order again. ``set_epoch`` (Lightning calls it every epoch)
  starts a new order; a loader iterated several times in one epoch (a task loader inside a
  ``MultiTaskLoader``) gets a new order on every pass.
- :class:`ResumableDataLoader` is a ``DataLoader`` that counts the batches it handed out in the current
  pass. Its state is that count and the sampler's ``(epoch, pass)``; after ``load_state_dict`` the next
  pass draws the same order and skips the batches already trained on, without loading them.

The count is of batches handed out: exact with Lightning's loop for loaders with a length (it then
fetches no batch ahead), which every ``DataLoader`` over a sized dataset has.

Example::

    loader = ResumableDataLoader(dataset, batch_size=16, sampler=SeededSampler(len(dataset), seed=0))
    trainer.fit(module, train_dataloaders=loader, ckpt_path="mid-epoch.ckpt")   # continues the epoch
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class SeededSampler(Sampler[int]):
    """Indices ``0 .. size-1`` in an order drawn from ``(seed, epoch, pass)`` (or in order, unshuffled).

    Args:
        size: the number of examples.
        seed: with the epoch and the pass within it, decides the order.
        shuffle: False yields ``0 .. size-1`` in order.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"SeededSampler: size must be a non-negative int, got {size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"SeededSampler: seed must be an int, got {seed!r}")
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.passes = 0  # passes started since the last set_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.passes = 0

    def __len__(self) -> int:
        return self.size

    def order(self, epoch: int, pass_index: int) -> list[int]:
        """The indices of pass ``pass_index`` of ``epoch``."""
        if not self.shuffle:
            return list(range(self.size))
        # one 63-bit seed per (seed, epoch, pass); the large odd factors keep nearby triples apart
        mixed = (self.seed * 0x9E3779B97F4A7C15 + epoch * 0xC2B2AE3D27D4EB4F + pass_index) % (1 << 63)
        generator = torch.Generator().manual_seed(mixed)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch, self.passes)
        self.passes += 1
        return iter(order)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "passes": self.passes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.passes = int(state["passes"])


class _SkipBatches:
    """The batches of index lists of ``batches`` after the first ``skip``: skipped without loading them."""

    def __init__(self, batches: Any, skip: int) -> None:
        self.batches = batches
        self.skip = skip

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batches), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.batches) - self.skip, 0)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` with ``state_dict``/``load_state_dict``: a resumed run continues its epoch with
    the batch that followed the checkpoint (see the module docstring). It takes ``DataLoader``'s
    arguments; give it a :class:`SeededSampler` (``shuffle=True`` draws from torch's global random state,
    which a resume cannot replay)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0  # batches handed out in the current pass
        self._skip = 0  # batches to skip at the start of the next pass (set by load_state_dict)
        self._pass_start: Any = None  # the sampler's state when the current pass started
        self._run = 0  # which pass is current, so that a dropped older iterator does not reset it

    def __iter__(self) -> Iterator[Any]:
        # a generator: nothing moves until the first batch is asked for, after Lightning's set_epoch
        self._run += 1
        run = self._run
        skip, self._skip = self._skip, 0
        if skip >= len(self):  # saved after the last batch of a pass: the next pass starts whole
            skip = 0
        self._pass_start = self._sampler_state()
        self._yielded = skip
        try:
            for batch in self._batches(skip):
                self._yielded += 1
                yield batch
        finally:
            if self._run == run:
                self._pass_start, self._yielded = None, 0

    def _batches(self, skip: int) -> Iterator[Any]:
        if skip == 0:
            return super().__iter__()
        if self.batch_sampler is None:  # no batching: skip examples by loading them, the only way
            return itertools.islice(super().__iter__(), skip, None)
        return iter(
            DataLoader(
                self.dataset,
                batch_sampler=_SkipBatches(self.batch_sampler, skip),
                num_workers=self.num_workers,
                collate_fn=self.collate_fn,
                pin_memory=self.pin_memory,
                timeout=self.timeout,
                worker_init_fn=self.worker_init_fn,
                multiprocessing_context=self.multiprocessing_context,
                generator=self.generator,
            )
        )

    def _sampler_state(self) -> Any:
        state = getattr(self.sampler, "state_dict", None)
        return state() if callable(state) else None

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands: the sampler's state when the current pass began, and the batches
        handed out since (none, between passes)."""
        if self._pass_start is not None:
            return {"sampler": self._pass_start, "batches": self._yielded}
        return {"sampler": self._sampler_state(), "batches": 0}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next pass draw the saved pass's order and skip the batches handed out already."""
        if not isinstance(state, Mapping) or not isinstance(state.get("batches"), int):
            raise ValueError(f"ResumableDataLoader: a saved state is a dict with 'batches', got {state!r}")
        sampler_state = state.get("sampler")
        if sampler_state is not None and callable(getattr(self.sampler, "load_state_dict", None)):
            self.sampler.load_state_dict(sampler_state)
        self._skip = state["batches"]
