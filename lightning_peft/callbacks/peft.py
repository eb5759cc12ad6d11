"""The ``PEFT`` callback: apply a strategy to a LightningModule and keep checkpoints adapter-only.

It acts through Lightning's callback hooks and torch's public, removable module hooks; it replaces
nothing on the LightningModule, so the module's own ``configure_model``, ``on_save_checkpoint`` and
``on_load_checkpoint`` run as written, and a copy of the module (EMA, SWA) carries no callback.

- ``setup``: if the model already exists (built in ``__init__``), the strategy is applied now;
  otherwise it is applied the moment ``setup()`` or ``configure_model()`` assigns it (see
  ``model_hooks``): still before a checkpoint is restored and before the optimizer is built, so the
  optimizer and DDP see only the adapters;
- a state-dict post-hook on the LightningModule (module-level, because Lightning skips callback hooks
  for weights-only checkpoints): while the Trainer runs, the module's own ``state_dict()`` (what a
  checkpoint stores) is cut to the trainable tensors, with the strategy's config in the state dict's
  metadata; ``on_save_checkpoint`` also stores it under ``checkpoint["lightning_peft"]``;
- a load-state-dict pre-hook: the checkpoint is checked against the model before anything is
  loaded; missing adapter tensors, wrong shapes or another strategy raise an error naming them.
  Frozen base weights are never touched by an adapter-only checkpoint.
- ``teardown`` removes the hooks: after ``fit`` the module's ``state_dict()`` is whole again.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_peft.callbacks.model_hooks import is_waiting, stop_waiting, wait_for_model
from lightning_peft.callbacks.module_path import missing_module_error, module_path_problems, resolve_module
from lightning_peft.formats.checkpoints import CHECKPOINT_KEY, FORMAT_VERSION
from lightning_peft.strategies.base import APPLIED_ATTR, PEFTStrategy, adapter_modules, count_parameters
from lightning_peft.strategies.compose import as_strategy
from lightning_peft.strategies.state import clean_name, config_differences, mismatches, trainable_names


class PEFT(Callback):
    """Apply a :class:`~lightning_peft.PEFTStrategy` to the LightningModule (or one of its submodules).

    Args:
        strategy: what to do to the model; a list is applied as one ``Compose``.
        module: dotted attribute path of the submodule to adapt (``"model"``, ``"backbone.encoder"``);
            None adapts the whole LightningModule.
        verbose: print the summary table of trainable parameters.
        save_rng_state: store torch's random number generator states in checkpoints and restore them
            on resume, so that runs with dropout resume exactly (single process; under DDP every rank
            gets rank 0's state back).
        stop_on_non_finite_loss: raise ``FloatingPointError`` as soon as a training loss is NaN or
            infinite, before its backward pass and the optimizer step: the weights stay finite, and no
            checkpoint or export of a diverged run is written after it.

    Example::

        trainer = L.Trainer(callbacks=[PEFT(LoRA(r=16, lora_alpha=32), module="model")])
        trainer.fit(MyModule())
    """

    def __init__(
        self,
        strategy: PEFTStrategy | Sequence[PEFTStrategy],
        module: str | None = None,
        verbose: bool = True,
        save_rng_state: bool = True,
        stop_on_non_finite_loss: bool = True,
    ) -> None:
        self.strategy = as_strategy(strategy)
        if problems := module_path_problems(module):
            raise ValueError(problems[0])
        self.module = module
        self.verbose = verbose
        self.save_rng_state = save_rng_state
        self.stop_on_non_finite_loss = stop_on_non_finite_loss
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._pretrained: Any = None  # set by from_pretrained: weights to load right after applying
        self._handles: list[Any] = []  # the module hooks of the running Trainer

    @classmethod
    def from_pretrained(
        cls, path: str | Path, module: str | None = None, allow_non_finite: bool = False, **kwargs: Any
    ) -> PEFT:
        """A callback that applies the adapter saved in folder ``path`` and loads its weights.

        The folder is a Hugging Face PEFT adapter (``adapter_config.json``) or one that
        ``lightning_peft.export_adapter`` wrote; the strategy is built from its config, and the weights
        are loaded as soon as the strategy is applied (before a checkpoint is restored, so resuming
        still works). Tensors holding NaN or infinity are refused unless ``allow_non_finite``. Other
        keyword arguments go to ``PEFT``.

        Example::

            trainer = L.Trainer(callbacks=[PEFT.from_pretrained("my-adapter", module="model")])
        """
        from lightning_peft.formats import read_adapter  # formats imports this module

        adapter = read_adapter(path, allow_non_finite)
        callback = cls(adapter.strategy, module=module, **kwargs)
        callback._pretrained = adapter
        return callback

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module)

    @override
    def state_dict(self) -> dict[str, Any]:
        if not self.save_rng_state:
            return {}
        state: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.save_rng_state:
            return
        if "torch_rng" in state_dict:
            torch.set_rng_state(state_dict["torch_rng"])
        if "cuda_rng" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda_rng"])

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        others = [c for c in trainer.callbacks if isinstance(c, PEFT) and c is not self]
        if others:
            raise ValueError(
                "a Trainer takes one PEFT callback; pass several strategies as a list: PEFT([LoRA(...), Freeze(...)])"
            )
        self._remove_hooks()
        self._handles = [
            pl_module.register_state_dict_post_hook(_PruneCheckpoint(self, pl_module)),
            pl_module.register_load_state_dict_pre_hook(_CheckCheckpoint(self, pl_module)),
        ]
        if not self.adapt(pl_module, trainer, required=False) and not self._is_applied(pl_module):
            wait_for_model(
                self, pl_module, self.module, lambda: self.adapt(pl_module, trainer, required=False)
            )

    def _stop_waiting(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, fitting: bool = False
    ) -> None:
        """At the start of a stage the model must be adapted: setup()/configure_model() are over."""
        if not is_waiting(self):
            return
        stop_waiting(self)
        target = resolve_module(pl_module, self.module)
        if target is None or not any(True for _ in target.parameters()):
            raise missing_module_error("PEFT", self.module, pl_module)
        if fitting:  # the optimizer was built from the unadapted model
            raise ValueError(
                f"PEFT(module={self.module!r}) found the model only after configure_optimizers: it got its "
                "parameters after it was assigned in setup()/configure_model(); build the model, then assign "
                "it to the LightningModule"
            )
        self.adapt(pl_module, trainer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_waiting(trainer, pl_module, fitting=True)
        root = trainer.strategy.model  # wrapped by now: FSDP reads the checkpoint from its wrapper
        if isinstance(root, nn.Module) and root is not pl_module and len(self._handles) == 2:
            self._handles.append(root.register_state_dict_post_hook(_PruneCheckpoint(self, pl_module, root)))

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_waiting(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_waiting(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_waiting(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        stop_waiting(self)
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # during a run _PruneCheckpoint pruned the state dict already; trainer.save_checkpoint after
        # the run (hooks removed) is pruned here (weights-only saves after the run stay whole)
        self.prune_checkpoint(pl_module, checkpoint)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # _CheckCheckpoint checked the tensors before loading; this also covers FSDP and DeepSpeed,
        # which load without the module's load_state_dict, and files with the record only up here
        self.check_checkpoint(pl_module, checkpoint)

    def _is_applied(self, pl_module: nn.Module) -> bool:
        return getattr(resolve_module(pl_module, self.module), APPLIED_ATTR, None) is not None

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self.stop_on_non_finite_loss and not bool(torch.isfinite(loss.detach()).all()):
            raise FloatingPointError(
                f"the training loss is {loss.detach().float().mean().item()} at step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}, batch {trainer.fit_loop.epoch_loop.batch_idx}): training "
                "diverged, so it stops here, before this step changes the weights. Lower the learning rate, or "
                "pass PEFT(stop_on_non_finite_loss=False) to go on"
            )

    def adapt(
        self, pl_module: pl.LightningModule, trainer: pl.Trainer | None = None, required: bool = True
    ) -> bool:
        """Apply the strategy to the target module once; later calls (every fit/validate/test) do nothing."""
        target = resolve_module(pl_module, self.module)
        if target is None or not any(True for _ in target.parameters()):
            if required:
                raise missing_module_error("PEFT", self.module, pl_module)
            return False
        config = self.strategy.to_config()
        applied = getattr(target, APPLIED_ATTR, None)
        if applied is not None:
            if applied != config:
                raise ValueError(
                    f"{type(target).__name__} was already adapted with another strategy: "
                    + "; ".join(config_differences(applied, config))
                )
            if not self._shapes:  # a new callback on a module adapted before (strategy.apply records it)
                self._shapes = {clean_name(n): tuple(p.shape) for n, p in pl_module.named_parameters()}
                pl_module.strict_loading = False  # the check in on_load_checkpoint replaces it
            return False
        self.strategy.apply(target)
        if self._pretrained is not None:
            self._pretrained.load_into(target)
        object.__setattr__(target, APPLIED_ATTR, config)
        # the checkpoint holds only the adapters; the check in on_load_checkpoint replaces strict loading
        pl_module.strict_loading = False
        self._shapes = {clean_name(n): tuple(p.shape) for n, p in pl_module.named_parameters()}
        self._report(pl_module, target, trainer)
        return True

    def record_parameters(self, pl_module: pl.LightningModule) -> None:
        """Take note of the module's parameters as they are now (call it before DDP/FSDP wraps the model).

        The checkpoint check accepts exactly these tensors; other callbacks that add adapters after the
        strategy (multi-task schedules) call this so that their adapters resume too.
        """
        self._shapes = {clean_name(n): tuple(p.shape) for n, p in pl_module.named_parameters()}

    def checkpoint_metadata(self, pl_module: pl.LightningModule, state: dict[str, Any]) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "module": self.module,
            "strategy": self.strategy.to_config(),
            "trainable": {k: list(v.shape) for k, v in state.items()},
        }

    def prune_checkpoint(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Cut ``checkpoint["state_dict"]`` to the trainable tensors and record the strategy."""
        state = checkpoint.get("state_dict")
        if state is None or not self._is_applied(pl_module):
            return
        keep = set(trainable_names(pl_module))
        for key in [k for k in state if clean_name(k) not in keep]:
            del state[key]
        checkpoint[CHECKPOINT_KEY] = self.checkpoint_metadata(pl_module, state)
        metadata = getattr(state, "_metadata", None)  # what the load pre-hook sees (_CheckCheckpoint)
        if metadata is not None:
            metadata.setdefault("", {})[CHECKPOINT_KEY] = checkpoint[CHECKPOINT_KEY]

    def check_checkpoint(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming every way ``checkpoint`` does not fit the adapted model."""
        meta = checkpoint.get(CHECKPOINT_KEY)
        if meta is not None and not isinstance(meta, dict):
            raise ValueError(
                f"the checkpoint's {CHECKPOINT_KEY!r} entry must be a dict, got {type(meta).__name__}"
            )
        problems = []
        if meta is not None:
            problems += config_differences(meta.get("strategy"), self.strategy.to_config())
            if meta.get("module") != self.module:
                problems.append(f"module: checkpoint {meta.get('module')!r} vs this run {self.module!r}")
        state = checkpoint.get("state_dict")
        if state is not None:
            found = {clean_name(k): tuple(v.shape) for k, v in state.items()}
        else:  # FSDP loaded the tensors itself and removed them from the dict; use the recorded shapes
            found = {k: tuple(v) for k, v in (meta or {}).get("trainable", {}).items()}
        expected = {n: self._shapes.get(n, ()) for n in trainable_names(pl_module)}
        problems += mismatches(expected, found, known=set(self._shapes) | _buffer_names(pl_module))
        if problems:
            raise ValueError("the checkpoint does not fit the adapted model:\n  - " + "\n  - ".join(problems))

    def _report(self, pl_module: pl.LightningModule, target: nn.Module, trainer: pl.Trainer | None) -> None:
        trainable, total = count_parameters(pl_module)
        percent = 100.0 * trainable / max(total, 1)
        if trainer is not None:
            for logger in trainer.loggers:
                logger.log_hyperparams(
                    {
                        "peft/trainable_params": trainable,
                        "peft/total_params": total,
                        "peft/trainable_percent": percent,
                    }
                )
        if not self.verbose:
            return
        rows: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for _, module in adapter_modules(target):
            base = getattr(module, "base_layer", None)
            kind = type(module).__name__ + (f"({type(base).__name__})" if base is not None else "")
            rows[kind][0] += 1
            own = set(module.adapter_params())
            rows[kind][1] += sum(p.numel() for n, p in module.named_parameters() if n in own)
        name = type(self.strategy).__name__
        lines = [f"lightning_peft: {name} applied to {self.module or type(pl_module).__name__}"]
        if rows:
            width = max(len(k) for k in rows)
            lines.append(f"  {'adapted layer':<{width}}  {'count':>6}  {'adapter params':>14}")
            lines += [f"  {k:<{width}}  {c:>6}  {p:>14,}" for k, (c, p) in sorted(rows.items())]
        lines.append(f"  trainable params: {trainable:,} of {total:,} ({percent:.4f}%)")
        rank_zero_info("\n".join(lines))


class _PruneCheckpoint:
    """State-dict post-hook: the LightningModule's own ``state_dict()`` holds only what trains.

    Only the module it was registered on, called at the top (a checkpoint's ``state_dict``): a copy
    (``deepcopy`` by EMA or SWA) or a submodule's ``state_dict()`` is left whole. A copy shares this
    object instead of copying the callback.
    """

    def __init__(self, callback: PEFT, pl_module: nn.Module, root: nn.Module | None = None) -> None:
        # root: the module Lightning reads the checkpoint from when it is not the LightningModule
        # itself (FSDP wraps it); its own post-hook has cleaned the names before this one runs
        self.callback, self.pl_module, self.root = callback, pl_module, root or pl_module

    def __deepcopy__(self, memo: dict[int, Any]) -> _PruneCheckpoint:
        return self

    def __call__(self, module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: dict) -> None:
        if module is not self.root or prefix:
            return
        record: dict[str, Any] = {"state_dict": state}
        self.callback.prune_checkpoint(self.pl_module, record)
        if CHECKPOINT_KEY in record:  # read back by load_from_checkpoint for weights-only files
            local_metadata[CHECKPOINT_KEY] = record[CHECKPOINT_KEY]


class _CheckCheckpoint:
    """Load-state-dict pre-hook: adapt the model if needed, then check the state dict before loading."""

    def __init__(self, callback: PEFT, pl_module: nn.Module) -> None:
        self.callback, self.pl_module = callback, pl_module

    def __deepcopy__(self, memo: dict[int, Any]) -> _CheckCheckpoint:
        return self

    def __call__(
        self, module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: dict, *_: Any
    ) -> None:
        if module is not self.pl_module or prefix:
            return
        stop_waiting(self.callback)
        self.callback.adapt(module, required=True)
        self.callback.check_checkpoint(
            module, {"state_dict": state, CHECKPOINT_KEY: local_metadata.get(CHECKPOINT_KEY)}
        )


def _buffer_names(pl_module: nn.Module) -> set[str]:
    return {clean_name(n) for n, _ in pl_module.named_buffers()}
