"""Reading and writing export folders safely: staged writes, safetensors, JSON and tokenizer files.

Nothing here unpickles arbitrary objects: tensors are read from safetensors, or with
``torch.load(weights_only=True)``. A truncated or corrupt file gives a ``ValueError`` that names it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lightning_peft.checkpoint import read_checkpoint

# files that make up a Hugging Face tokenizer (fast, slow and sentencepiece ones, chat templates)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)


@contextlib.contextmanager
def staged_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A new folder next to ``out_dir`` to write into; it becomes ``out_dir`` only if the block succeeds.

    If the block raises (or is interrupted), the staged folder is deleted and ``out_dir`` is left as it
    was. An existing ``out_dir`` is refused unless ``overwrite``; it is then swapped for the new one by
    two renames on the same file system and deleted afterwards.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another output path")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists already; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staged
        _swap_in(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def _swap_in(staged: Path, out: Path) -> None:
    if not out.exists():
        staged.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    out.rename(old)
    try:
        staged.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Save with the metadata ``{"format": "pt"}`` that transformers and peft expect."""
    # clone: safetensors refuses tensors that share memory (tied weights), and views of larger tensors
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(plain, str(path), metadata={"format": "pt"})


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from ``.safetensors``, or from a ``.bin`` with ``torch.load(weights_only=True)``."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and I/O errors alike: the file cannot be trusted or read
        raise ValueError(
            f"{path} is not a readable tensor file (truncated, corrupt or not weights only?): {err}"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat dictionary of tensors")
    return state


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupt?): {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def write_text_staged(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """Write ``text`` to a file beside ``path``, then rename it into place: never a half-written file.

    With ``overwrite=False`` an existing ``path`` raises ``FileExistsError``.
    """
    out = Path(path)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists already; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, staged = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(staged, 0o644)
        os.replace(staged, out)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise
    return out


def write_json(data: Mapping[str, Any], path: Path) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint read with ``weights_only=True``; any unreadable file is a ``ValueError``."""
    try:
        return read_checkpoint(path)
    except FileNotFoundError:
        raise
    except OSError as err:  # torch reports some truncated archives as I/O errors
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): {err}") from err


def copy_tokenizer(source: Any, out_dir: Path) -> list[str]:
    """Put a tokenizer into ``out_dir``: from an object with ``save_pretrained`` or a folder's tokenizer
    files. Returns the names written (empty if ``source`` holds no tokenizer)."""
    if source is None:
        return []
    if callable(getattr(source, "save_pretrained", None)):
        before = {p.name for p in out_dir.iterdir()}
        source.save_pretrained(str(out_dir))
        return sorted(p.name for p in out_dir.iterdir() if p.name not in before)
    folder = Path(source)
    copied = []
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, out_dir / name)
            copied.append(name)
    return copied
