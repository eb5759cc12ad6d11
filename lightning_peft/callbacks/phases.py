"""A curriculum's phases: the ``Phase`` record and the checks of a list of them (no torch in this file).

:class:`~lightning_peft.callbacks.curriculum.CurriculumSchedule` takes a list of phases, as ``Phase``
objects or dicts (Hydra); :func:`as_phases` turns either into ``Phase`` objects and collects every
problem, so one error lists them all.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_peft.strategies.targeting import check_spec


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stretch of training, from ``start`` until the next phase starts.

    Every field but ``start`` may be None: the value of the previous phase carries on (for the first
    phase, None leaves things as the model and the optimizer have them).

    Args:
        start: the epoch or step (``CurriculumSchedule(unit=...)``) at which the phase begins.
        trainable: modules whose frozen parameters train in this phase, by peft's rules: a full-match
            regex or a list of names/dotted suffixes. ``[]`` trains none of them.
        last_n_blocks: the last N entries of the model's block list also train (0: none).
        lr: the learning rate of every optimizer param group.
        adapter: the named adapter(s) that are active (``[]``: none).
        data: any value, handed to the data (see ``CurriculumSchedule(set_data=...)``).

    Example::

        Phase(start=2, last_n_blocks=2, lr=2e-4, data={"difficulty": "hard"})
    """

    start: int
    trainable: str | Sequence[str] | None = None
    last_n_blocks: int | None = None
    lr: float | None = None
    adapter: str | Sequence[str] | None = None
    data: Any = None

    def __post_init__(self) -> None:
        # lists become tuples: the phase never shares a list with its caller
        for name in ("trainable", "adapter"):
            value = getattr(self, name)
            if isinstance(value, Sequence) and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))


_FIELDS = tuple(f.name for f in dataclasses.fields(Phase))


def as_phases(phases: Any, problems: list[str]) -> list[Phase]:
    """``phases`` as ``Phase`` objects; appends every problem found to ``problems``."""
    if isinstance(phases, str | Mapping) or not isinstance(phases, Sequence) or not phases:
        problems.append(f"phases must be a non-empty list of Phase objects or dicts, got {phases!r}")
        return []
    result: list[Phase] = []
    for i, item in enumerate(phases):
        if isinstance(item, Mapping):
            unknown = [k for k in item if k not in _FIELDS]
            if unknown:
                problems.append(f"phases[{i}] has unknown keys {unknown}; a phase takes {list(_FIELDS)}")
            if "start" not in item:
                problems.append(f"phases[{i}] has no 'start'")
                continue
            item = Phase(**{k: v for k, v in item.items() if k in _FIELDS})
        elif not isinstance(item, Phase):
            problems.append(f"phases[{i}] must be a Phase or a dict, got {type(item).__name__}")
            continue
        problems.extend(phase_problems(f"phases[{i}]", item))
        result.append(item)
    starts = [p.start for p in result if is_count(p.start)]
    if starts and (starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:], strict=False))):
        problems.append(
            f"phase starts must begin at 0 and increase strictly (sorted, no duplicates); got {starts}"
        )
    return result


def phase_problems(where: str, phase: Phase) -> list[str]:
    problems: list[str] = []
    if not is_count(phase.start):
        problems.append(f"{where}.start must be a non-negative integer, got {phase.start!r}")
    check_spec(f"{where}.trainable", phase.trainable, problems)
    if phase.last_n_blocks is not None and not is_count(phase.last_n_blocks):
        problems.append(f"{where}.last_n_blocks must be a non-negative integer, got {phase.last_n_blocks!r}")
    lr = phase.lr
    if lr is not None and (
        isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr < 0
    ):
        problems.append(f"{where}.lr must be a finite number >= 0, got {lr!r}")
    adapter = phase.adapter
    if adapter is not None and not (
        (isinstance(adapter, str) and adapter)
        or (isinstance(adapter, tuple) and all(isinstance(a, str) for a in adapter))
    ):
        problems.append(f"{where}.adapter must be an adapter name, a list of names, or None; got {adapter!r}")
    return problems


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def sources(phases: list[Phase], name: str) -> list[int | None]:
    """For each phase, the index of the latest phase up to it that sets ``name`` (None if none does)."""
    sources: list[int | None] = []
    for i, phase in enumerate(phases):
        sources.append(i if getattr(phase, name) is not None else (sources[-1] if sources else None))
    return sources


def check_optimizers_hold(optimizers: Sequence[Any], params: Mapping[int, tuple[str, Any]]) -> None:
    """Raise unless some optimizer holds each parameter that a phase trains (``params``: id -> (name,
    parameter)); compared by identity, since two frozen tensors can be equal."""
    held = {id(p) for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]}
    missing = [name for key, (name, _) in params.items() if key not in held]
    if missing:
        more = f", ... and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(
            f"CurriculumSchedule: no optimizer holds {len(missing)} parameters that phases train: "
            f"{', '.join(missing[:8])}{more}. They require grad from the start (so DDP registers them): "
            "build the optimizer from every parameter with requires_grad in configure_optimizers"
        )
