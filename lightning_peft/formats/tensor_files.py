"""Tensor files: safetensors written with a checksum and read back checked, and ``.bin`` files read with
``torch.load(weights_only=True)`` after their zip archive was checked."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from lightning_peft.formats.checkpoints import verify_zip
from lightning_peft.formats.files import write_bytes

CHECKSUM_KEY = "lightning_peft_sha256"  # in the safetensors metadata: SHA-256 of names, dtypes, shapes, bytes


def tensors_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the names, dtypes, shapes and bytes of ``tensors`` (in name order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{value.dtype}\0{tuple(value.shape)}\0".encode())
        digest.update(memoryview(value.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Save with the metadata ``{"format": "pt"}`` that transformers and peft expect, plus a SHA-256 of
    the tensors that :func:`read_safetensors` checks."""
    # clone: safetensors refuses tensors that share memory (tied weights), and views of larger tensors
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {"format": "pt", CHECKSUM_KEY: tensors_checksum(plain)}
    write_bytes(path, save(plain, metadata=metadata))


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; a checksum in its metadata (ours) is verified."""
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    expected = metadata.get(CHECKSUM_KEY)
    if expected is not None and tensors_checksum(tensors) != expected:
        raise ValueError(
            f"{path} is corrupt: its tensors differ from the checksum stored when it was written "
            "(changed bytes on disk or in transfer); export it again"
        )
    return tensors


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from ``.safetensors``, or from a ``.bin`` with ``torch.load(weights_only=True)``."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    verify_zip(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and I/O errors alike: the file cannot be trusted or read
        raise ValueError(
            f"{path} is not a readable tensor file (truncated, corrupt or not weights only?): {err}"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat dictionary of tensors")
    return state
