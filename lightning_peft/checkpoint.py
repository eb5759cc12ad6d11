"""Loading adapter-only Lightning checkpoints outside a Trainer.

``LightningModule.load_from_checkpoint`` runs no callbacks, so it never injects the adapters an
adapter-only checkpoint was written for. :func:`load_from_checkpoint` rebuilds the module from its saved
hyperparameters, applies the recorded strategy and loads the adapters after checking that they fit.
"""

from __future__ import annotations

import inspect
import pickle
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_peft.callbacks.peft import _APPLIED_ATTR, CHECKPOINT_KEY, resolve_module
from lightning_peft.strategies.base import strategy_from_config
from lightning_peft.strategies.state import load_trainable_state_dict

ModuleT = TypeVar("ModuleT", bound=pl.LightningModule)


def read_checkpoint(path: str | Path, map_location: Any = "cpu", weights_only: bool = True) -> dict[str, Any]:
    """``torch.load`` a Lightning checkpoint (tensors and plain data only unless ``weights_only=False``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds objects other than tensors and plain data, which are not loaded by default. "
            f"Pass weights_only=False only for a file you trust. ({err})"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:  # torch 2.13 reports some truncations as OSError
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): {err}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint: it has no 'state_dict'")
    return checkpoint


def load_from_checkpoint(
    module_cls: type[ModuleT],
    checkpoint_path: str | Path,
    map_location: Any = "cpu",
    weights_only: bool = True,
    **kwargs: Any,
) -> ModuleT:
    """Rebuild ``module_cls`` from an adapter-only checkpoint written with the ``PEFT`` callback.

    The module is constructed from the checkpoint's hyperparameters (overridden by ``kwargs``), its
    ``configure_model`` runs if it has one (``setup("predict")`` too when the model is built there), the saved strategy is applied, and the adapters are loaded.
    Base weights come from the module's own construction (e.g. ``from_pretrained``), never from the file.
    Returned in eval mode.

    Example::

        model = load_from_checkpoint(MyModule, "epoch=1-step=20.ckpt")
    """
    checkpoint = read_checkpoint(checkpoint_path, map_location, weights_only)
    meta = checkpoint.get(CHECKPOINT_KEY)
    if meta is None:  # weights-only checkpoints: the record is in the state dict's own metadata
        meta = (getattr(checkpoint["state_dict"], "_metadata", None) or {}).get("", {}).get(CHECKPOINT_KEY)
    if meta is None:
        raise ValueError(
            f"{checkpoint_path} was not written with the PEFT callback (no {CHECKPOINT_KEY!r} entry); "
            f"use {module_cls.__name__}.load_from_checkpoint for full checkpoints"
        )
    hparams = {**(checkpoint.get("hyper_parameters") or {}), **kwargs}
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
    strategy = strategy_from_config(meta["strategy"])
    strategy.apply(target)
    object.__setattr__(target, _APPLIED_ATTR, strategy.to_config())
    module.strict_loading = False
    load_trainable_state_dict(module, checkpoint["state_dict"], source=str(checkpoint_path))
    return module.eval()
