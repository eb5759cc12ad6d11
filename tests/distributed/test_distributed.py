"""LoRA under Lightning's DDP and FSDP on 2 processes: adapter-only checkpoints hold the whole adapter.

Each strategy runs ``train_adapter.py`` in a subprocess (Lightning's ``ddp`` re-launches ``sys.argv``,
so it cannot run inside pytest): 2 epochs straight, then a fresh Trainer and module in the same 2
processes resume from the straight run's epoch-0 checkpoint for the second epoch. One FSDP resume also
starts new processes, as a restarted job does. Sharded runs are where other libraries save one rank's
shard of the adapter (or the whole model); here every checkpoint must hold exactly the adapter, at full
shape, and reproduce the trained model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import train_adapter as script  # this folder is on sys.path (pytest's default rootdir import)
from safetensors.torch import load_file

from lightning_peft import LoRA, load_from_checkpoint, trainable_state_dict

SCRIPT = Path(script.__file__)
TIMEOUT_S = 240
STRATEGIES = [
    "ddp",
    "fsdp",  # on the CPU through train_adapter.CPUFSDPStrategy: why it needs one is in its docstring
    pytest.param(
        "fsdp-cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
        ],
    ),
]

# where each run's module builds its network: both places the PEFT callback must find it
BUILD_IN = {"ddp": "init", "fsdp": "configure_model", "fsdp-cuda": "configure_model"}


def train(strategy: str, out: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(SCRIPT), "--strategy", strategy, "--out", str(out), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


_RUNS: dict[str, dict] = {}


def run_pair(strategy: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """2 epochs straight, then a fresh Trainer resumed from the epoch-0 checkpoint (cached per session)."""
    if strategy not in _RUNS:
        root = tmp_path_factory.mktemp(strategy)
        train(strategy, root, "--max-epochs", "2", "--then-resume", "--build-in", BUILD_IN[strategy])
        _RUNS[strategy] = {
            "straight": json.loads((root / "straight" / "results.json").read_text()),
            "resumed": json.loads((root / "resumed" / "results.json").read_text()),
            "root": root,
        }
    return _RUNS[strategy]


@pytest.fixture(scope="module", params=STRATEGIES)
def runs(request, tmp_path_factory) -> dict:
    return run_pair(request.param, tmp_path_factory)


def single_process_model() -> script.TinyLM:
    """The same module, adapted in this process without any distributed wrapper: the reference."""
    module = script.TinyLM()
    LoRA(**script.LORA).apply(module.model)
    return module


def checkpoints(run: dict) -> list[Path]:
    ends = [run["final_checkpoint"], run["weights_only_checkpoint"]]
    return [Path(p) for p in [*run["checkpoints"], *ends]]


def test_checkpoints_hold_the_whole_adapter_and_nothing_else(runs):
    reference = {k: tuple(v.shape) for k, v in trainable_state_dict(single_process_model()).items()}
    assert reference and all(".lora_" in k for k in reference)
    for run in ("straight", "resumed"):
        assert runs[run]["world_size"] == 2
        for path in checkpoints(runs[run]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            saved = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
            assert saved == reference, path  # full shapes: not one rank's shard, no wrapper prefixes
            # weights-only files carry the record in the state dict's metadata
            meta = (
                checkpoint.get("lightning_peft") or checkpoint["state_dict"]._metadata[""]["lightning_peft"]
            )
            assert meta["trainable"] == {k: list(v) for k, v in reference.items()}
            assert meta["module"] == "model"
            assert meta["strategy"] == LoRA(**script.LORA).to_config()


def test_checkpoint_holds_the_trained_adapter_values(runs):
    for run in ("straight", "resumed"):
        trained = load_file(runs["root"] / run / "final_state.safetensors")
        final = torch.load(runs[run]["final_checkpoint"], map_location="cpu", weights_only=True)
        last_epoch = torch.load(runs[run]["checkpoints"][-1], map_location="cpu", weights_only=True)
        for key, value in final["state_dict"].items():
            assert torch.equal(value, trained[key]), key
            assert torch.equal(last_epoch["state_dict"][key], value), key
        assert any(v.abs().sum() > 0 for k, v in final["state_dict"].items() if k.endswith("lora_B"))


def test_resume_from_adapter_only_checkpoint_continues_training(runs):
    straight, resumed = runs["straight"], runs["resumed"]
    steps_per_epoch = len(straight["losses"]) // 2
    assert resumed["global_step"] == straight["global_step"] == 2 * steps_per_epoch
    assert resumed["losses"] == pytest.approx(straight["losses"][steps_per_epoch:], abs=1e-5)
    # the optimizer state came back too: the adapters end where 2 epochs straight end
    end_straight = load_file(runs["root"] / "straight" / "final_state.safetensors")
    end_resumed = load_file(runs["root"] / "resumed" / "final_state.safetensors")
    for key in trainable_state_dict(single_process_model()):
        torch.testing.assert_close(end_resumed[key], end_straight[key], rtol=0, atol=1e-6)


def test_base_weights_stay_bit_identical_to_the_seed_built_model(runs):
    reference = single_process_model()
    adapters = set(trainable_state_dict(reference))
    base = {k: v for k, v in reference.state_dict().items() if k not in adapters}
    for run in ("straight", "resumed"):
        trained = load_file(runs["root"] / run / "final_state.safetensors")
        assert set(trained) == set(reference.state_dict())
        for key, value in base.items():
            assert torch.equal(trained[key].cpu(), value), f"{run}: base weight {key} changed"


def test_adapter_only_checkpoint_loads_in_one_process_with_the_trained_outputs(runs):
    probe = script.token_ids(script.PROBE, seed=2)
    for run in ("straight", "resumed"):
        for path in (runs[run]["final_checkpoint"], runs[run]["weights_only_checkpoint"]):
            module = load_from_checkpoint(script.TinyLM, path)  # builds where the run built (hparams)
            with torch.no_grad():
                logits = module(probe)
            for rank in range(2):  # each rank validated its share of the probe with the trained weights
                seen = torch.load(runs["root"] / run / f"predictions_rank{rank}.pt", weights_only=True)
                torch.testing.assert_close(logits[seen["index"]], seen["logits"], rtol=1e-4, atol=1e-5)


def test_fsdp_and_ddp_train_the_same(tmp_path_factory):
    # the same global batches and the same sum of 2 gradients: sharding changes no number
    ddp = run_pair("ddp", tmp_path_factory)["straight"]["losses"]
    fsdp = run_pair("fsdp", tmp_path_factory)["straight"]["losses"]
    assert fsdp == pytest.approx(ddp, abs=1e-5)


def test_fsdp_resumes_in_new_processes(tmp_path_factory):
    pair = run_pair("fsdp", tmp_path_factory)
    first_epoch = pair["straight"]["checkpoints"][0]
    out = tmp_path_factory.mktemp("fsdp-restart")
    train("fsdp", out, "--max-epochs", "2", "--ckpt-path", first_epoch, "--build-in", BUILD_IN["fsdp"])
    restarted = json.loads((out / "results.json").read_text())
    assert restarted["losses"] == pytest.approx(pair["resumed"]["losses"], abs=1e-5)
    trained = load_file(pair["root"] / "straight" / "final_state.safetensors")
    final = torch.load(restarted["final_checkpoint"], map_location="cpu", weights_only=True)
    for key, value in final["state_dict"].items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=1e-6)
