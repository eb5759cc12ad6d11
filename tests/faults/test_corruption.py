"""Every file the project reads is verified: one changed byte is a ValueError naming the file."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from helpers import Holder, flip_byte, lora, tensor_offset, tiny_llama, write_checkpoint
from safetensors import safe_open

from lightning_peft import export_adapter, load_adapter, load_from_checkpoint
from lightning_peft.callbacks.checkpoint import AtomicCheckpointIO
from lightning_peft.formats.tensor_files import CHECKSUM_KEY, read_safetensors

pytestmark = pytest.mark.filterwarnings("ignore")  # tiny random models make transformers and Lightning warn


def test_a_flipped_byte_in_a_checkpoint_tensor_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "a.ckpt"
    write_checkpoint(path)
    flip_byte(path, tensor_offset(path))
    torch.load(path, weights_only=True)  # torch itself reads it without noticing
    for read in (
        lambda: load_from_checkpoint(Holder, path),
        lambda: export_adapter(path, tmp_path / "out"),
    ):
        with pytest.raises(
            ValueError, match=r"a\.ckpt is corrupt: its record 'a/data/0' does not match its CRC"
        ):
            read()
    assert not (tmp_path / "out").exists()


def test_a_flipped_byte_in_optimizer_state_is_refused_when_resuming(tmp_path):
    path = tmp_path / "a.ckpt"
    checkpoint = write_checkpoint(path)
    checkpoint["optimizer_states"] = [{"state": {0: {"exp_avg": torch.randn(64, 64)}}}]
    torch.save(checkpoint, path)
    flip_byte(path, tensor_offset(path, largest=True))  # the optimizer's 64 x 64 moment
    with pytest.raises(ValueError, match=r"a\.ckpt is corrupt"):
        AtomicCheckpointIO().load_checkpoint(path)  # what a Trainer of `lightning-peft fit` resumes through


def test_random_bytes_as_a_checkpoint_are_refused_without_unpickling_advice(tmp_path):
    path = tmp_path / "noise.ckpt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match=r"noise\.ckpt is not a PyTorch checkpoint") as error:
        load_from_checkpoint(Holder, path)
    assert "weights_only" not in str(error.value)


def test_a_flipped_byte_in_an_exported_adapter_is_refused_naming_the_file(tmp_path):
    model = lora().apply(tiny_llama())
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_()
    export_adapter(model, tmp_path / "out")
    weights = tmp_path / "out" / "adapter_model.safetensors"
    with safe_open(weights, "pt") as file:
        assert set(file.metadata()) == {"format", CHECKSUM_KEY}
    flip_byte(weights, os.path.getsize(weights) - 3)  # inside the last tensor's bytes
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is corrupt"):
        load_adapter(tiny_llama(), tmp_path / "out")


def test_a_flipped_byte_in_a_bin_adapter_is_refused_naming_the_file(tmp_path):
    """The adapter_model.bin of older peft versions: a torch zip file, checked through its CRCs."""
    model = lora().apply(tiny_llama())
    export_adapter(model, tmp_path / "out")
    tensors = read_safetensors(tmp_path / "out" / "adapter_model.safetensors")
    (tmp_path / "out" / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "out" / "adapter_model.bin")
    load_adapter(tiny_llama(), tmp_path / "out")  # intact: loads
    flip_byte(tmp_path / "out" / "adapter_model.bin", tensor_offset(tmp_path / "out" / "adapter_model.bin"))
    with pytest.raises(ValueError, match=r"adapter_model\.bin is corrupt"):
        load_adapter(tiny_llama(), tmp_path / "out")


def test_a_checkpoint_written_through_the_atomic_writer_loads_back(tmp_path):
    trainer = L.Trainer(
        plugins=[AtomicCheckpointIO()],
        logger=False,
        enable_progress_bar=False,
        max_steps=0,
        enable_model_summary=False,
    )
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    checkpoint = {"state_dict": {"w": torch.arange(6.0)}}
    trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, tmp_path / "c.ckpt")
    assert torch.equal(
        AtomicCheckpointIO().load_checkpoint(tmp_path / "c.ckpt")["state_dict"]["w"], torch.arange(6.0)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ckpt"]
