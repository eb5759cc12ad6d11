"""Freezing without adapters: feature extraction and layer-specific tuning.

``Freeze`` trains only what it names: modules (by peft's target rules) and/or the last ``N`` blocks of
the model's block list. Everything else is frozen. With ``Compose`` it opens those modules up next to
another method's adapters (LoRA on every block, the last two blocks trained in full).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lightning_peft.strategies.base import PEFTStrategy, plain_lists
from lightning_peft.strategies.modules_to_save import frozen_copy_prefixes
from lightning_peft.strategies.targeting import (
    DEFAULT_LAYERS_PATTERNS,
    candidate_modules,
    check_spec,
    describe_modules,
    matches,
    validation_error,
)


def find_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.ModuleList]:
    """The model's list of repeated blocks: the named one, or the largest ``ModuleList`` called
    ``layers``/``layer``/``h``/``blocks``/``block`` (the largest ``ModuleList`` of any name otherwise)."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if blocks is not None:
        for name, module in lists:
            if name == blocks or name.endswith("." + blocks):
                return name, module
        raise ValueError(
            f"blocks={blocks!r} is not a ModuleList here; ModuleLists: {[n for n, _ in lists] or 'none'}"
        )
    if not lists:
        raise ValueError(
            "found no nn.ModuleList of blocks in this model; name the modules with trainable_modules"
        )

    def size(item: tuple[str, nn.ModuleList]) -> tuple[bool, int]:
        name, module = item
        return name.rsplit(".", 1)[-1] in DEFAULT_LAYERS_PATTERNS, sum(p.numel() for p in module.parameters())

    return max(lists, key=size)


@dataclass
class Freeze(PEFTStrategy):
    """Freeze the model except the named modules and/or the last ``last_n_blocks`` blocks.

    Args:
        trainable_modules: modules that stay trainable: a full-match regex or a list of names/suffixes.
        last_n_blocks: also train the last N entries of the block list (0 trains none).
        blocks: the qualified name of the block ``ModuleList``; found automatically when None.

    Example::

        Freeze(trainable_modules=["classifier"]).apply(model)      # feature extraction
        Freeze(last_n_blocks=2, trainable_modules=["classifier"])   # layer-specific tuning
    """

    trainable_modules: str | list[str] | None = None
    last_n_blocks: int | None = None
    blocks: str | None = None

    def __post_init__(self) -> None:
        plain_lists(self)
        problems: list[str] = []
        check_spec("trainable_modules", self.trainable_modules, problems)
        n = self.last_n_blocks
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            problems.append(f"last_n_blocks must be a non-negative integer, got {n!r}")
        validation_error("Freeze", problems)

    def extra_trainable(self, model: nn.Module) -> set[str]:
        prefixes: list[str] = []
        if self.trainable_modules is not None:
            candidates = candidate_modules(model)
            chosen = [name for name, _ in candidates if matches(name, self.trainable_modules)]
            if not chosen:
                raise ValueError(
                    f"Freeze: trainable_modules={self.trainable_modules!r} matched no module. "
                    f"Modules in this model: {describe_modules(candidates)}"
                )
            prefixes.extend(chosen)
        if self.last_n_blocks:
            name, blocks = find_blocks(model, self.blocks)
            if self.last_n_blocks > len(blocks):
                raise ValueError(
                    f"Freeze: last_n_blocks={self.last_n_blocks} but {name!r} has {len(blocks)} blocks"
                )
            first = len(blocks) - self.last_n_blocks
            prefixes.extend(f"{name}.{i}" for i in range(first, len(blocks)))
        frozen_copies = frozen_copy_prefixes(model)
        return {
            name
            for name, _ in model.named_parameters()
            if any(name.startswith(p + ".") for p in prefixes)
            and not any(name.startswith(c) for c in frozen_copies)
        }
