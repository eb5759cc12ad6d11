"""NaN and infinity: refused when loading, exporting and merging (named; a flag allows them); a run
whose loss diverges stops before the step that would spoil the weights; logs and plots handle NaN."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from helpers import TINY, Holder, lora, tiny_llama, write_checkpoint

from lightning_peft import PEFT, LoRA, export_adapter, export_merged, load_adapter, load_from_checkpoint
from lightning_peft.cli.curves import write_curves
from lightning_peft.formats import merge_and_unwrap
from lightning_peft.formats.files import json_text
from lightning_peft.formats.tensor_files import read_safetensors
from lightning_peft.models.tasks import CausalLM

pytestmark = pytest.mark.filterwarnings("ignore")  # tiny random models make transformers and Lightning warn

NAN_TENSOR = "model.model.layers.0.self_attn.q_proj.lora_B"


def _nan_checkpoint(path):
    checkpoint = write_checkpoint(path)
    checkpoint["state_dict"][NAN_TENSOR][0, 0] = float("nan")
    checkpoint["state_dict"]["model.model.layers.1.self_attn.v_proj.lora_A"][1, 1] = float("inf")
    torch.save(checkpoint, path)


def test_load_from_checkpoint_refuses_nan_and_inf_naming_the_tensors(tmp_path):
    _nan_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(
        ValueError, match=r"a\.ckpt: 2 tensors hold NaN or infinity: .*q_proj\.lora_B, .*v_proj\.lora_A"
    ):
        load_from_checkpoint(Holder, tmp_path / "a.ckpt")
    module = load_from_checkpoint(Holder, tmp_path / "a.ckpt", allow_non_finite=True)  # for forensics
    assert torch.isnan(module.model.model.layers[0].self_attn.q_proj.lora_B[0, 0])


def test_exports_refuse_non_finite_tensors_and_write_nothing(tmp_path):
    _nan_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match="2 tensors hold NaN or infinity"):
        export_adapter(tmp_path / "a.ckpt", tmp_path / "out")
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="2 tensors hold NaN or infinity"):
        export_merged(tmp_path / "a.ckpt", tmp_path / "merged", base=tmp_path / "base")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "base"]
    export_adapter(tmp_path / "a.ckpt", tmp_path / "out", allow_non_finite=True)
    assert read_safetensors(tmp_path / "out" / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    ][0, 0].isnan()


def test_load_adapter_and_merge_refuse_non_finite_tensors(tmp_path):
    model = lora().apply(tiny_llama())
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B[0, 0] = float("inf")
    with pytest.raises(
        ValueError,
        match=r"LlamaForCausalLM: 1 tensors hold NaN or infinity: model\.layers\.0\.self_attn\.q_proj\.lora_B",
    ):
        merge_and_unwrap(model)
    with pytest.raises(ValueError, match="1 tensors hold NaN or infinity"):
        export_adapter(model, tmp_path / "out")
    export_adapter(model, tmp_path / "out", allow_non_finite=True)
    with pytest.raises(
        ValueError,
        match=r"out: 1 tensors hold NaN or infinity: base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_B\.weight",
    ):
        load_adapter(tiny_llama(), tmp_path / "out")
    loaded = load_adapter(tiny_llama(), tmp_path / "out", allow_non_finite=True)
    assert loaded.model.layers[0].self_attn.q_proj.lora_B[0, 0] == float("inf")


class DivergingLM(CausalLM):
    """Its loss turns NaN at the third step, as a diverging run's does."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step == 2 else loss


def _diverging_fit(tmp_path, **peft):
    from lightning_peft.data.datamodules import SequenceData

    module = DivergingLM(config=TINY, lr=0.01)
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[
            PEFT(LoRA(r=2, target_modules=["q_proj", "v_proj"]), module="model", verbose=False, **peft)
        ],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    data = SequenceData(vocab_size=32, length=8, train_size=64, val_size=8, batch_size=8)
    return module, trainer, data


def test_a_diverging_run_stops_before_the_step_that_spoils_the_weights(tmp_path):
    module, trainer, data = _diverging_fit(tmp_path)
    with pytest.raises(
        FloatingPointError, match=r"the training loss is nan at step 2 .*stop_on_non_finite_loss=False"
    ):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())  # the NaN step changed nothing


def test_stopping_on_a_non_finite_loss_can_be_switched_off(tmp_path):
    module, trainer, data = _diverging_fit(tmp_path, stop_on_non_finite_loss=False)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 8
    assert not all(torch.isfinite(p).all() for p in module.parameters() if p.requires_grad)


def test_metrics_json_writes_nan_as_null():
    text = json_text({"metrics": {"val_loss": float("nan"), "train_loss": float("inf"), "step": 3}})
    assert json.loads(text) == {"metrics": {"val_loss": None, "train_loss": None, "step": 3}}


def test_curves_with_nan_values_render_a_gap(tmp_path):
    from matplotlib.image import imread

    csv = tmp_path / "metrics.csv"
    csv.write_text("step,train_loss,val_loss\n1,2.0,\n2,1.5,nan\n3,nan,\n4,inf,nan\n5,1.0,\n")
    png = write_curves(csv, tmp_path / "curves.png")
    assert imread(png).shape == (360, 480, 4)  # one panel; a val_loss of only NaN draws no point


FIT = [sys.executable, "-m", "lightning_peft.cli.main", "fit"]
DIVERGING = [
    "model=tiny_llama",
    "model.lr=1e20",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "data.train_size=64",
    "data.batch_size=8",
]


def _fit(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*FIT, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_fit_stops_a_diverging_run_with_an_error_and_exports_nothing(tmp_path):
    result = _fit(*DIVERGING, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 1
    assert (
        "the training loss is nan at step 1" in result.stderr or "the training loss is inf" in result.stderr
    )
    assert not (tmp_path / "run" / "adapter").exists()
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_fit_told_to_go_on_still_refuses_to_export_the_diverged_adapter(tmp_path):
    result = _fit(
        *DIVERGING, "stop_on_non_finite_loss=false", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path
    )
    # the export then refuses the NaN adapter, so the run fails there, having written its checkpoint
    assert result.returncode == 1, result.stderr[-2000:]
    assert "tensors hold NaN or infinity" in result.stderr
    assert not (tmp_path / "run" / "adapter").exists()
