"""Several strategies on one model, e.g. LoRA on every block plus the last blocks trained in full."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_peft.strategies.base import PEFTStrategy, plain_lists, strategy_from_config


@dataclass
class Compose(PEFTStrategy):
    """Apply ``strategies`` in order; what any of them trains stays trainable, the rest is frozen.

    Example::

        Compose([LoRA(r=8), Freeze(trainable_modules=["classifier"])]).apply(model)
    """

    strategies: list[PEFTStrategy] = field(default_factory=list)

    def __post_init__(self) -> None:
        plain_lists(self)
        wrong = [s for s in self.strategies if not isinstance(s, PEFTStrategy)]
        if not self.strategies or wrong:
            raise ValueError(
                f"Compose needs a non-empty list of PEFTStrategy objects, got {self.strategies!r}"
            )

    def inject(self, model: nn.Module) -> None:
        for strategy in self.strategies:
            strategy.inject(model)

    def extra_trainable(self, model: nn.Module) -> set[str]:
        return set().union(*(s.extra_trainable(model) for s in self.strategies))

    def to_config(self) -> dict[str, Any]:
        return {
            "class": f"{__name__}.Compose",
            "config": {"strategies": [s.to_config() for s in self.strategies]},
        }

    @classmethod
    def from_config_dict(cls, config: dict[str, Any]) -> Compose:
        return cls([strategy_from_config(s) for s in config.get("strategies", [])])


def as_strategy(strategy: PEFTStrategy | Sequence[PEFTStrategy]) -> PEFTStrategy:
    """A single strategy as it is, a list of them as :class:`Compose`."""
    if isinstance(strategy, PEFTStrategy):
        return strategy
    if isinstance(strategy, Sequence) and not isinstance(strategy, str):
        return Compose(list(strategy))
    raise TypeError(f"expected a PEFTStrategy or a list of them, got {type(strategy).__name__}")
