"""Layer-wise learning rates: blocks closer to the output learn faster (layer-wise lr decay, as in
ELECTRA and BEiT fine-tuning).

With ``N`` blocks (the model's repeated layers, ``model.layers`` or ``encoder.layer``)::

    parameters before the blocks (embeddings)   base_lr * decay^N        (below the first block)
    block i (0 = nearest the input)             base_lr * decay^(N-1-i)
    parameters after the blocks (norm, head)    base_lr

"Before" and "after" follow the order in which the model registers its parameters, which for
Hugging Face models is the order of the computation. Only trainable parameters are grouped.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_peft.callbacks.module_path import missing_module_error, module_path_problems, resolve_module


def find_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.Module]:
    """(path, container) of the model's blocks: ``blocks`` if given, else the ``nn.ModuleList`` with the
    most entries among those holding trainable parameters."""
    lists = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList | nn.Sequential) and name and len(m) > 0
    ]
    if blocks is not None:
        found = dict(lists).get(blocks)
        if found is None:
            names = ", ".join(n for n, m in lists if isinstance(m, nn.ModuleList)) or "none"
            raise ValueError(
                f"blocks={blocks!r} is not a ModuleList in {type(model).__name__}; ModuleLists: {names}"
            )
        return blocks, found
    candidates = [
        (n, m)
        for n, m in lists
        if isinstance(m, nn.ModuleList) and any(p.requires_grad for p in m.parameters())
    ]
    if not candidates:
        raise ValueError(
            f"found no nn.ModuleList of blocks with trainable parameters in {type(model).__name__}; "
            "name them with blocks='model.layers'"
        )
    return max(candidates, key=lambda item: len(item[1]))  # max keeps the first of equals


def layer_scales(model: nn.Module, decay: float, blocks: str | None = None) -> dict[str, float]:
    """The lr multiplier of every trainable parameter of ``model``, by name (see the module docstring)."""
    path, container = find_blocks(model, blocks)
    count = len(container)
    scales: dict[str, float] = {}
    seen_blocks = False
    for name, param in model.named_parameters():
        index = _block_index(name, path)
        if index is not None:
            seen_blocks = True
            depth = index
        else:
            depth = count - 1 if seen_blocks else -1
        if param.requires_grad:
            scales[name] = decay ** (count - 1 - depth)
    return scales


def layerwise_param_groups(
    model: nn.Module, base_lr: float, decay: float = 0.8, blocks: str | None = None
) -> list[dict[str, Any]]:
    """Optimizer parameter groups, one per learning rate, for the trainable parameters of ``model``.

    Example::

        def configure_optimizers(self):
            return torch.optim.AdamW(layerwise_param_groups(self.model, base_lr=1e-3, decay=0.8))
    """
    _check(decay, base_lr)
    params = dict(model.named_parameters())
    groups: dict[float, list[nn.Parameter]] = {}
    for name, scale in layer_scales(model, decay, blocks).items():
        groups.setdefault(scale, []).append(params[name])
    return [{"params": ps, "lr": base_lr * scale} for scale, ps in sorted(groups.items())]


class LayerwiseLR(Callback):
    """Rewrite the optimizer's parameter groups at ``on_fit_start`` so that each block gets its own lr.

    Each group from ``configure_optimizers`` is split by block; the new groups keep every other
    hyperparameter of the group (betas, weight decay, ...). Parameters are matched by identity.
    Parameters outside ``module`` keep their group's lr. Learning-rate schedulers keep one entry per
    group, so with a scheduler call :func:`layerwise_param_groups` in ``configure_optimizers`` instead.

    Args:
        decay: lr ratio between neighbouring blocks, in (0, 1].
        base_lr: the lr of the last block and the head; None takes each group's own lr.
        module: dotted path of the submodule holding the blocks (``"model"``); None is the whole module.
        blocks: dotted path (inside ``module``) of the block list; None finds the longest ``ModuleList``.

    Example::

        trainer = L.Trainer(callbacks=[PEFT(Freeze(last_n_blocks=4), module="model"),
                                       LayerwiseLR(decay=0.8, module="model")])
    """

    def __init__(
        self,
        decay: float = 0.8,
        base_lr: float | None = None,
        module: str | None = None,
        blocks: str | None = None,
    ) -> None:
        _check(decay, base_lr, module)
        self.decay = float(decay)
        self.base_lr = None if base_lr is None else float(base_lr)
        self.module = module
        self.blocks = blocks

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        target = resolve_module(pl_module, self.module)
        if target is None:
            raise missing_module_error("LayerwiseLR", self.module, pl_module)
        params = dict(target.named_parameters())
        scales = {id(params[n]): s for n, s in layer_scales(target, self.decay, self.blocks).items()}
        scheduled = {id(config.scheduler.optimizer) for config in trainer.lr_scheduler_configs}
        for optimizer in trainer.optimizers:
            if id(optimizer) in scheduled:
                raise ValueError(
                    "LayerwiseLR cannot split the groups of an optimizer that has a learning-rate scheduler; "
                    "use layerwise_param_groups(...) in configure_optimizers instead"
                )
            optimizer.param_groups = [
                g for group in optimizer.param_groups for g in self._split(group, scales)
            ]

    def _split(self, group: dict[str, Any], scales: dict[int, float]) -> list[dict[str, Any]]:
        by_lr: dict[float, list[nn.Parameter]] = {}
        for param in group["params"]:
            scale = scales.get(id(param))
            lr = group["lr"] if scale is None else (self.base_lr or group["lr"]) * scale
            by_lr.setdefault(lr, []).append(param)
        return [{**group, "params": ps, "lr": lr} for lr, ps in by_lr.items()]


def _block_index(name: str, path: str) -> int | None:
    if not name.startswith(path + "."):
        return None
    head = name[len(path) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _check(decay: Any, base_lr: Any, module: Any = None) -> None:
    problems = []
    if not isinstance(decay, int | float) or isinstance(decay, bool) or not 0 < decay <= 1:
        problems.append(f"decay must be in (0, 1], got {decay!r}")
    if base_lr is not None and (not isinstance(base_lr, int | float) or not base_lr > 0):
        problems.append(f"base_lr must be > 0 or None, got {base_lr!r}")
    problems.extend(module_path_problems(module))
    if problems:
        raise ValueError("layer-wise lr: " + "; ".join(problems))
