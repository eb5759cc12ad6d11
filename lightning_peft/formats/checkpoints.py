"""Lightning checkpoint files read without Lightning: checked, then loaded with ``weights_only=True``.

Every checkpoint is checked before it is unpickled: it must be a zip archive (what ``torch.save``
writes) whose CRCs all match, so one changed byte anywhere, optimizer state included, is an error that
names the file. The ``lightning_peft`` entry that the PEFT callback adds to a checkpoint is checked
field by field.
"""

from __future__ import annotations

import pickle
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_KEY = "lightning_peft"  # the checkpoint entry the PEFT callback writes
FORMAT_VERSION = 1


def verify_zip(path: str | Path) -> None:
    """Raise ``ValueError`` unless ``path`` is a zip archive (``torch.save``'s format) whose every record
    matches its CRC: ``torch.load`` itself reads corrupt records without noticing."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        raise ValueError(
            f"{path} is not a PyTorch checkpoint (not a readable zip archive: truncated or corrupt, or another "
            f"kind of file): {err}"
        ) from err
    if bad is not None:
        raise ValueError(
            f"{path} is corrupt: its record {bad!r} does not match its CRC (changed bytes on disk?)"
        )


def read_checkpoint(path: str | Path, map_location: Any = "cpu", weights_only: bool = True) -> dict[str, Any]:
    """``torch.load`` a Lightning checkpoint (tensors and plain data only unless ``weights_only=False``),
    after :func:`verify_zip`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    verify_zip(path)
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


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint read with ``weights_only=True``; any unreadable file is a ``ValueError``."""
    try:
        return read_checkpoint(path)
    except FileNotFoundError:
        raise
    except OSError as err:  # torch reports some truncated archives as I/O errors
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): {err}") from err


def checkpoint_entry(checkpoint: Mapping[str, Any], key: str, source: str) -> dict[str, Any] | None:
    """The ``lightning_peft`` entry of a checkpoint, checked field by field (None if there is none)."""
    entry = checkpoint.get(key)
    if (
        entry is None
    ):  # a weights-only save: the PEFT callback's hook keeps its record in the state dict's metadata
        entry = (getattr(checkpoint.get("state_dict"), "_metadata", None) or {}).get("", {}).get(key)
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise ValueError(f"{source}: checkpoint[{key!r}] must be a dict, got {type(entry).__name__}")
    problems = []
    if not isinstance(entry.get("strategy"), dict):
        problems.append(f"'strategy' must be a dict, got {type(entry.get('strategy')).__name__}")
    module = entry.get("module")
    if module is not None and not (isinstance(module, str) and all(module.split("."))):
        problems.append(f"'module' must be None or a dotted attribute path, got {module!r}")
    trainable = entry.get("trainable", {})
    if not isinstance(trainable, dict) or not all(
        isinstance(v, list | tuple) and all(isinstance(d, int) and d >= 0 for d in v)
        for v in trainable.values()
    ):
        problems.append("'trainable' must map tensor names to shapes (lists of sizes)")
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        problems.append("'state_dict' must map names to tensors")
    if problems:
        raise ValueError(f"{source}: checkpoint[{key!r}] is malformed:\n  - " + "\n  - ".join(problems))
    return entry
