"""Loading adapter-only Lightning checkpoints outside a Trainer, and writing checkpoints safely.

``LightningModule.load_from_checkpoint`` runs no callbacks, so it never injects the adapters an
adapter-only checkpoint was written for. :func:`load_from_checkpoint` rebuilds the module from its saved
hyperparameters, applies the recorded strategy and loads the adapters after checking that they fit.

Every checkpoint is checked before it is unpickled: it must be a zip archive (what ``torch.save``
writes) whose CRCs all match, so one changed byte anywhere, optimizer state included, is an error that
names the file. :class:`AtomicCheckpointIO` writes checkpoints beside their final name and renames
them when complete (Lightning's own writer goes through ``$TMPDIR`` and copies across file systems).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_peft.callbacks.module_path import resolve_module
from lightning_peft.formats.checkpoints import CHECKPOINT_KEY, checkpoint_entry, read_checkpoint, verify_zip
from lightning_peft.strategies.base import APPLIED_ATTR
from lightning_peft.strategies.state import load_trainable_state_dict

ModuleT = TypeVar("ModuleT", bound=pl.LightningModule)


def load_from_checkpoint(
    module_cls: type[ModuleT],
    checkpoint_path: str | Path,
    map_location: Any = "cpu",
    weights_only: bool = True,
    allow_non_finite: bool = False,
    **kwargs: Any,
) -> ModuleT:
    """Rebuild ``module_cls`` from an adapter-only checkpoint written with the ``PEFT`` callback.

    The module is constructed from the checkpoint's hyperparameters (overridden by ``kwargs``), its
    ``configure_model`` runs if it has one (``setup("predict")`` too when the model is built there), the saved strategy is applied, and the adapters are loaded.
    Base weights come from the module's own construction (e.g. ``from_pretrained``), never from the file.
    Returned in eval mode. Tensors holding NaN or infinity are refused unless ``allow_non_finite``; the
    recorded strategy's sizes are checked against the saved tensors before any layer is built.

    Example::

        model = load_from_checkpoint(MyModule, "epoch=1-step=20.ckpt")
    """
    from lightning_peft.formats.checks import check_finite, check_sizes, strategy_from_record

    checkpoint = read_checkpoint(checkpoint_path, map_location, weights_only)
    meta = checkpoint_entry(checkpoint, CHECKPOINT_KEY, str(checkpoint_path))
    if meta is None:
        raise ValueError(
            f"{checkpoint_path} was not written with the PEFT callback (no {CHECKPOINT_KEY!r} entry); "
            f"use {module_cls.__name__}.load_from_checkpoint for full checkpoints"
        )
    strategy = strategy_from_record(meta["strategy"], str(checkpoint_path), f"{CHECKPOINT_KEY}['strategy']")
    check_sizes(strategy, checkpoint["state_dict"], str(checkpoint_path))
    check_finite(checkpoint["state_dict"], str(checkpoint_path), allow_non_finite)
    saved_hparams = checkpoint.get("hyper_parameters") or {}
    if not isinstance(saved_hparams, dict):
        raise ValueError(
            f"{checkpoint_path}: 'hyper_parameters' must be a dict, got {type(saved_hparams).__name__}"
        )
    hparams = {**saved_hparams, **kwargs}
    parameters = inspect.signature(module_cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        hparams = {k: v for k, v in hparams.items() if k in parameters}
    module = module_cls(**hparams)
    if is_overridden("configure_model", module):
        module.configure_model()
    target = resolve_module(module, meta.get("module"))
    if target is None and is_overridden("setup", module):
        module.setup("predict")  # models built in setup() exist only after it ran
        target = resolve_module(module, meta.get("module"))
    if target is None:
        raise ValueError(
            f"{module_cls.__name__} has no submodule {meta.get('module')!r} to load the adapters into"
        )
    strategy.apply(target)
    object.__setattr__(target, APPLIED_ATTR, strategy.to_config())
    module.strict_loading = False
    load_trainable_state_dict(module, checkpoint["state_dict"], source=str(checkpoint_path))
    return module.eval()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, writing each checkpoint beside its final name (flushed to disk,
    then renamed) and checking a checkpoint's CRCs before loading it.

    Lightning's default writes into ``$TMPDIR`` and moves the file: across file systems that move is a
    copy, and a crash during it leaves a truncated checkpoint under the final name. ``lightning-peft
    fit`` installs this plugin; pass it yourself elsewhere (local paths only).

    Example::

        trainer = L.Trainer(plugins=[AtomicCheckpointIO()], callbacks=[PEFT(LoRA(r=8), module="model")])
    """

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        from lightning_peft.formats.files import atomic_file

        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}"
            )
        with atomic_file(path, "wb") as file:
            torch.save(checkpoint, file)

    @override
    def load_checkpoint(
        self,
        path: Any,
        map_location: Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if Path(path).is_file():
            verify_zip(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
