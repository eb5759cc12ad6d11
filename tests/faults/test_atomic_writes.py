"""Everything the project writes appears whole or not at all: a writer killed at random points, with
$TMPDIR on another file system, never leaves a truncated file under a final name."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_peft.callbacks.checkpoint import AtomicCheckpointIO
from lightning_peft.formats.checkpoints import verify_zip
from lightning_peft.formats.tensor_files import read_safetensors

pytestmark = pytest.mark.filterwarnings("ignore")  # tiny random models make transformers and Lightning warn

HERE = Path(__file__).parent
SHM = Path("/dev/shm")

WRITER = """
import sys
from pathlib import Path
import torch
from lightning_peft.callbacks.checkpoint import AtomicCheckpointIO
from lightning_peft.formats.files import write_json
from lightning_peft.formats.tensor_files import write_safetensors
from lightning_peft.cli.curves import write_curves

out = Path(sys.argv[1])
io = AtomicCheckpointIO()
big = {"state_dict": {"w": torch.randn(512, 1024)}, "optimizer_states": [{"m": torch.randn(512, 1024)}]}
csv = out / "metrics.csv"
csv.write_text("step,train_loss\\n" + "".join(f"{i},{1 / (i + 1)}\\n" for i in range(50)))
print("ready", flush=True)
for k in range(10**6):
    io.save_checkpoint(big, out / f"epoch={k % 3}.ckpt")  # new names and names written before
    write_safetensors({"a": torch.randn(256, 256)}, out / "adapter_model.safetensors")
    write_json({"step": k, "values": list(range(2000))}, out / "metrics.json")
    write_curves(csv, out / "curves.png")
"""


def _check_complete(path: Path) -> None:
    if path.suffix == ".ckpt":
        verify_zip(path)
        assert torch.load(path, weights_only=True)["state_dict"]["w"].shape == (512, 1024)
    elif path.suffix == ".safetensors":
        read_safetensors(path)  # its checksum holds
    elif path.suffix == ".json":
        assert len(json.loads(path.read_text())["values"]) == 2000
    elif path.suffix == ".png":
        assert path.read_bytes().endswith(b"IEND\xaeB`\x82")


@pytest.mark.skipif(not SHM.is_dir(), reason="needs a tmpfs at /dev/shm for $TMPDIR")
def test_a_writer_killed_at_random_points_leaves_no_truncated_file(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    out = tmp_path / "run"
    out.mkdir()
    tmpdir = SHM / f"lightning-peft-faults-{os.getpid()}"
    tmpdir.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmpdir), "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    checked = 0
    for _ in range(8):  # each start imports torch (about 4 s): 8 kills at random points, 30+ files read back
        process = subprocess.Popen(
            [sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True, env=env
        )
        assert process.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.8))
        process.send_signal(signal.SIGKILL)
        process.wait()
        for path in out.iterdir():
            if not path.name.startswith("."):  # hidden: the temporary files of an unfinished write
                _check_complete(path)
                checked += 1
    tmpdir.rmdir()  # nothing went through $TMPDIR
    assert checked > 20


def test_fit_saves_its_checkpoints_through_the_atomic_writer(tmp_path, monkeypatch):
    """`lightning-peft fit` gives its Trainer AtomicCheckpointIO (Lightning's own goes through $TMPDIR)."""
    import lightning as L
    from hydra import compose, initialize_config_module

    from lightning_peft.cli import fit

    trainers = []

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    def capture(self, *args, **kwargs):
        trainers.append((self, kwargs))

    monkeypatch.setattr(L.Trainer, "fit", capture)

    # the final checkpoint: only what run() reads back before it exports
    def save(self, path, **kwargs):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"global_step": 0}, path)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", save)
    monkeypatch.setattr("lightning_peft.formats.export_adapter", stop)
    with initialize_config_module("lightning_peft.conf", version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["model=tiny_llama", "callbacks=none", f"+output_dir={tmp_path}", "ckpt_path=x.ckpt"],
        )
    with pytest.raises(Stop):
        fit.run(cfg)
    ((trainer, kwargs),) = trainers
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert kwargs["ckpt_path"] == "x.ckpt"
