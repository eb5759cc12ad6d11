"""Adapter files and checkpoints for the fault tests: tiny, written the way the PEFT callback writes them."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from conftest import VOCAB, tiny_llama  # noqa: F401  (VOCAB is used by the fault tests)

from lightning_peft import PEFT, LoRA
from lightning_peft.strategies.base import PEFTStrategy

# a one-block Llama for the Trainer runs of the fault tests (the model=tiny_llama shape, smaller)
TINY = {
    "model_type": "llama",
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 32,
}


class Holder(L.LightningModule):
    """A user's module holding a Hugging Face model at ``self.model`` (built from ``seed``)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = tiny_llama(seed)


def lora() -> PEFTStrategy:
    return LoRA(r=2, target_modules=["q_proj", "v_proj"])


def write_checkpoint(path: Path, strategy: PEFTStrategy | None = None, scale: float = 0.2) -> dict:
    """An adapter-only checkpoint of :class:`Holder`, its adapters moved away from zero; returns it."""
    module = Holder()
    callback = PEFT(strategy or lora(), module="model", verbose=False)
    callback.adapt(module)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    callback.prune_checkpoint(module, checkpoint)
    torch.save(checkpoint, path)
    return checkpoint


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def tensor_offset(path: Path, largest: bool = False) -> int:
    """The offset of a byte in the middle of a tensor record of a torch zip file: the first tensor's
    (``data/0``), or the largest one's."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        records = [i for i in archive.infolist() if "/data/" in i.filename]
        info = max(records, key=lambda i: i.file_size) if largest else records[0]
    with path.open("rb") as file:
        file.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", file.read(4))
    return info.header_offset + 30 + name_length + extra_length + info.file_size // 2
