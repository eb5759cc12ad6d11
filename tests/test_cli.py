"""The ``lightning-peft`` command line: ``export`` on a checkpoint a real Trainer wrote, its messages
and its exit codes (0 ok, 1 error, 2 usage)."""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from pathlib import Path

import lightning as L
import peft
import pytest
import torch
import transformers
from conftest import VOCAB, tiny_llama

from lightning_peft import PEFT, LoRA
from lightning_peft.cli.main import main


class CausalLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama().train()

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=5e-2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, CausalLM]:
    """(checkpoint, base model folder, trained module): 3 LoRA steps on a tiny Llama."""
    folder = tmp_path_factory.mktemp("trained")
    module = CausalLM()
    batches = [torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    trainer = L.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PEFT(LoRA(r=4, target_modules=["q_proj", "v_proj"]), module="model", verbose=False)],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    trainer.save_checkpoint(folder / "adapter.ckpt")
    tiny_llama().save_pretrained(folder / "base")
    return folder / "adapter.ckpt", folder / "base", module.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_help_describes_export_and_the_exit_codes(capsys):
    assert main(["--help"]) == 0
    assert "export" in capsys.readouterr().out
    assert main(["export", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--merged" in text and "--base MODEL_DIR" in text and "--adapter-name" in text
    assert "exit codes: 0 success, 1 error" in text and "2 usage error" in text


def test_console_script_is_installed():
    script = shutil.which("lightning-peft")
    assert script is not None, "run `pip install -e . --no-deps` to install the console script"
    done = subprocess.run([script, "export", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage: lightning-peft export" in done.stdout


def test_export_writes_a_peft_folder_that_peft_loads(trained, tmp_path, capsys):
    checkpoint, _, module = trained
    assert main(["export", str(checkpoint), str(tmp_path / "out")]) == 0
    assert "wrote peft export to" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["r"] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out")).eval()
    torch.testing.assert_close(_logits(theirs), _logits(module.model), atol=1e-5, rtol=0)


def test_merged_export_reports_progress_and_loads_as_a_plain_model(trained, tmp_path, capsys):
    checkpoint, base, module = trained
    assert main(["export", str(checkpoint), str(tmp_path / "merged"), "--merged", "--base", str(base)]) == 0
    err = capsys.readouterr().err
    assert "lightning-peft: reading" in err and "merging 4 adapter layers" in err and "writing" in err
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(merged), _logits(module.model), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "extra",
    [
        ["--merged"],
        ["--base", "somewhere"],
        ["--format", "zip"],
        ["--no-such-option"],
        ["--merged", "--base", "b", "--task-type", "CAUSAL_LM"],  # --root is valid with --merged
    ],
)
def test_usage_errors_exit_with_2(extra, tmp_path, capsys):
    assert main(["export", "a.ckpt", str(tmp_path / "out"), *extra]) == 2
    assert "usage: lightning-peft export" in capsys.readouterr().err


def test_errors_exit_with_1_and_one_line_without_traceback(trained, tmp_path, capsys):
    checkpoint, _, _ = trained
    assert main(["export", str(tmp_path / "missing.ckpt"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("lightning-peft export: error: no checkpoint file at")
    assert not any(line.startswith(("Traceback", "  File")) for line in err)
    (tmp_path / "broken.ckpt").write_bytes(checkpoint.read_bytes()[:1000])
    assert main(["export", str(tmp_path / "broken.ckpt"), str(tmp_path / "out")]) == 1
    assert "truncated or corrupt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_refused_unless_overwrite(trained, tmp_path, capsys):
    checkpoint, _, _ = trained
    (tmp_path / "out").mkdir()
    assert main(["export", str(checkpoint), str(tmp_path / "out")]) == 1
    assert "exists already" in capsys.readouterr().err
    assert main(["export", str(checkpoint), str(tmp_path / "out"), "--overwrite"]) == 0
    assert (tmp_path / "out" / "adapter_config.json").is_file()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["export", str(tmp_path / "missing.ckpt"), str(tmp_path / "out"), "--debug"])


def test_export_merged_of_a_whole_module_checkpoint_with_root_writes_the_encoder_and_the_head(
    tmp_path, capsys
):
    from test_formats import IDS, PooledClassifier, _adapted_classifier, _rebuilt_from_merged

    lit = _adapted_classifier(tmp_path / "a.ckpt")
    PooledClassifier().model.save_pretrained(tmp_path / "base")
    args = [
        "export",
        str(tmp_path / "a.ckpt"),
        str(tmp_path / "merged"),
        "--merged",
        "--base",
        str(tmp_path / "base"),
    ]
    assert main(args) == 1
    assert "--root model" in capsys.readouterr().err
    assert main([*args, "--root", "model"]) == 0
    assert "module_weights.safetensors" in capsys.readouterr().err
    with torch.no_grad():
        torch.testing.assert_close(
            _rebuilt_from_merged(tmp_path / "merged")(IDS), lit(IDS), atol=1e-5, rtol=0
        )
