"""From the composed config to the objects a ``fit`` run needs: callbacks, the PEFT strategy, the
Lightning strategy. A value the classes refuse fails here, before any training."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def instantiate(node: Any, **kwargs: Any) -> Any:
    """Hydra's ``instantiate``, with a bad value reported as the constructor's own error.

    Hydra wraps what a constructor raises in an ``InstantiationException`` that shows the error's repr,
    which prints the line breaks of our multi-problem messages as a literal ``\\n``.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if type(cause) not in (ValueError, TypeError):
            raise
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        raise type(cause)(f"{target}: {cause}" if target else str(cause)) from None


def build_callbacks(cfg: DictConfig) -> list[Any]:
    """The ``PEFT`` callback first, then every entry of ``callbacks`` and ``schedule`` that is set."""
    from lightning_peft.callbacks.peft import PEFT

    strategy = instantiate(_strategy_node(cfg), _convert_="all")
    head = cfg.get("peft_head")
    if head and not _has_field(cfg.peft, "modules_to_save") and not _has_field(cfg.peft, "trainable_modules"):
        from lightning_peft.strategies import Compose, Freeze

        # prompt and prefix tuning have no modules_to_save: the head beside the model trains through Freeze
        strategy = Compose([strategy, Freeze(trainable_modules=list(head))])
    callbacks = [
        PEFT(
            strategy,
            module=cfg.get("peft_module"),
            stop_on_non_finite_loss=cfg.get("stop_on_non_finite_loss", True),
        )
    ]
    for group in ("callbacks", "schedule"):
        node = cfg.get(group) or {}
        # a group holds one callback (a node with _target_) or several keyed by name
        entries = {group: node} if "_target_" in node else dict(node)
        for name, entry in entries.items():
            if entry is not None and "_target_" in entry:
                callbacks.append(instantiate(entry, _convert_="all"))
            elif entry is not None:
                raise ValueError(f"{group}.{name} has no _target_; every entry must name a class")
    return callbacks


def _fields(node: DictConfig) -> set[str] | None:
    import dataclasses

    from hydra.utils import get_class

    target = get_class(node._target_)
    if not dataclasses.is_dataclass(target):
        return None
    return {f.name for f in dataclasses.fields(target) if f.init}


def _has_field(node: DictConfig, name: str) -> bool:
    return name in (_fields(node) or ())


def _strategy_node(cfg: DictConfig) -> DictConfig:
    """``cfg.peft`` with the model's head (``peft_head``) added to what trains whole; a key the method does
    not take is an error, since a run or a sweep over it would silently train something else."""
    node = cfg.peft
    fields = _fields(node)
    if fields is None:
        return node
    extra = [k for k in node if k != "_target_" and k not in fields]
    if extra:
        choice = HydraConfig.get().runtime.choices.get("peft") if HydraConfig.initialized() else None
        raise ValueError(
            f"peft{'=' + choice if choice else ''} ({node._target_.rpartition('.')[2]}) takes no "
            f"{', '.join(extra)}; its options: {', '.join(sorted(fields))}"
        )
    head = cfg.get("peft_head")
    if not head:
        return node
    data = OmegaConf.to_container(node, resolve=True)
    for key in ("modules_to_save", "trainable_modules"):
        if key in fields:
            own = data.get(key)
            if isinstance(own, str):  # a regex: the head is the user's to include
                continue
            data[key] = list(dict.fromkeys([*(own or []), *head]))
    return OmegaConf.create(data)


class FinalCheckpoint(L.Callback):
    """Writes the adapter-only checkpoint when training ends, inside the training processes: under
    ``ddp_spawn`` the main process's module never carries the adapters, so it cannot write one."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a full save, so that the PEFT callback's on_save_checkpoint records the strategy at the top of
        # the file as well; the optimizer state it adds is adapter-sized
        trainer.save_checkpoint(self.path, weights_only=False)


def trainer_strategy(cfg: DictConfig) -> str | None:
    """The Lightning strategy to use instead of the configured one, if any: inside a ``-m`` sweep ``ddp``
    becomes ``ddp_spawn``, since ``ddp`` starts its other ranks by re-running the command line, which
    would run the whole sweep again in each of them."""
    from hydra.types import RunMode

    name = cfg.trainer.get("strategy")
    if not (isinstance(name, str) and name.startswith("ddp") and "spawn" not in name):
        return None
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    from lightning.pytorch.strategies import StrategyRegistry

    spawned = name.replace("ddp", "ddp_spawn", 1)
    if spawned not in StrategyRegistry:
        raise ValueError(
            f"trainer.strategy={name} re-runs the command line in its other processes, which a -m sweep does "
            "not survive; use a spawning strategy (ddp_spawn) in sweeps"
        )
    log.warning(
        "trainer.strategy=%s inside a -m sweep runs as %s (ddp would re-run the sweep)", name, spawned
    )
    return spawned
