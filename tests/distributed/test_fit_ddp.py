"""`lightning-peft fit` on 2 CPU processes (gloo), started the way the console script starts it.

The console script's ``__main__`` has no module spec and its ``sys.argv[0]`` is not a file Python can
run again, which is what Lightning's ``ddp`` launcher re-runs in its other processes; ``python -c`` gives
the same conditions. Runs are tiny (the random tiny Llama, a few steps) but real: two ranks train, the
checkpoints hold the whole adapter and rank 0 exports it.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# what pip's console script does: call cli.main with the command's own name as sys.argv[0]
CONSOLE_SCRIPT = [
    sys.executable,
    "-c",
    "import sys; from lightning_peft.cli.main import main; sys.argv[0] = 'lightning-peft'; sys.exit(main())",
]
TINY = [
    "model=tiny_llama",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
]

pytestmark = pytest.mark.slow


def fit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    command = [*CONSOLE_SCRIPT, "fit", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def lora_tensors_of_tiny_llama() -> set[str]:
    # every linear layer of the 2 blocks (q, k, v, o, gate, up, down), A and B each
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    projections += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    return {f"model.model.layers.{i}.{p}.lora_{m}" for i in range(2) for p in projections for m in "AB"}


def check_run(run: Path, output: str) -> None:
    """Both ranks trained; the checkpoints hold the adapter; the adapter folder is the best checkpoint's."""
    assert output.count("MEMBER: 2/2") == 1 and "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    record = json.loads((run / "metrics.json").read_text())
    assert record["metrics"]["global_step"] == 4
    last = torch.load(run / "checkpoints" / "last-adapter.ckpt", weights_only=True)
    assert set(last["state_dict"]) == lora_tensors_of_tiny_llama()
    assert last["state_dict"]["model.model.layers.0.self_attn.q_proj.lora_B"].abs().sum() > 0  # trained
    best = Path(record["best_checkpoint"])
    assert best.parent == run / "checkpoints" and best.name.startswith("epoch0-val_loss")
    assert record["adapter_from"] == str(best)
    exported = load_file(run / "adapter" / "adapter_model.safetensors")
    state = torch.load(best, weights_only=True)["state_dict"]
    assert len(exported) == len(state) == 28
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    torch.testing.assert_close(
        exported[key], state["model.model.layers.1.mlp.down_proj.lora_B"], rtol=0, atol=0
    )


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_fit_on_two_processes_trains_checkpoints_and_exports(tmp_path, strategy):
    run = tmp_path / "run"
    result = fit(*TINY, "trainer=ddp", f"trainer.strategy={strategy}", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    check_run(run, result.stdout + result.stderr)


def test_ddp_inside_a_sweep_runs_each_job_once_on_two_processes(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "trainer=ddp", "peft.r=2,4", f"hydra.sweep.dir={sweep}"]
    result = fit(*args, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "runs as ddp_spawn" in output
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok"] and len({r["overrides"] for r in rows}) == 2
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]  # no rank re-ran the sweep
    assert output.count("GLOBAL_RANK: 1, MEMBER: 2/2") == 2
    for job, r in (("0", 2), ("1", 4)):
        exported = load_file(sweep / job / "adapter" / "adapter_model.safetensors")
        assert exported["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == r
