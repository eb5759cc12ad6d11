"""Every code block and command of README.md runs as written, in order, in one scratch folder.

- ``python`` blocks run each in a fresh namespace holding tiny stand-ins for the names the README says
  are the user's (``MyModule``, ``train_loader``, ``model``, ...); their imports are their own. Every
  ``lightning.Trainer`` is cut to two steps.
- ``bash`` blocks and ``$ `` lines of ``text`` blocks run as shell commands. ``pip install ...`` and
  ``python -m pytest`` steps are left out (this is that environment, and that run); ``lightning-peft fit``
  gets tiny settings appended (``trainer.max_steps=2`` ...), except for ``--help``.
- ``yaml`` blocks that start with ``# your <path>`` are written to that path.
- A block preceded by ``<!-- readme-test: skip (why) -->`` is left out: the README marks only blocks that
  need a GPU or that show output or a layout.
Files the README's commands expect to exist (``epoch=2.ckpt``, ``path/to/base-model``, ...) are made by
the fixture from a tiny Llama.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
from conftest import VOCAB, tiny_bert, tiny_llama

REPOSITORY = Path(__file__).resolve().parents[1]
README = REPOSITORY / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip")
TINY_FIT = ["trainer.max_steps=2", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false"]

pytestmark = pytest.mark.slow


def blocks() -> list[tuple[int, str, str]]:
    """(line, language, text) of every fenced block not marked to skip."""
    lines = README.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        indent, language, start = fence.group(1), fence.group(2), i
        body = []
        i += 1
        while not lines[i].strip().startswith("```"):
            body.append(lines[i][len(indent) :])
            i += 1
        previous = next((line for line in reversed(lines[:start]) if line.strip()), "")
        if not SKIP.search(previous):
            found.append((start + 1, language, "\n".join(body)))
        i += 1
    return found


def commands(text: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, comments, pip installs and pytest left out."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        elif line.startswith(("|", "#")) or not line:
            continue
        line = re.sub(r"\s+#\s.*$", "", line)  # a trailing comment
        steps = [step.strip() for step in line.split("&&")]
        steps = [s for s in steps if not s.startswith(("pip install", "python -m pytest"))]
        out += [_tiny(step) for step in steps]
    return out


def _tiny(command: str) -> str:
    # the README runs from the repository root; the scratch folder holds no lightning_peft/ folder of its
    # own, which `python -m lightning_peft.cli.fit` (DDP's other ranks) would import as an empty namespace
    command = command.replace("lightning_peft/data/", f"{REPOSITORY / 'lightning_peft' / 'data'}/")
    words = shlex.split(command)
    if words[:2] == ["lightning-peft", "fit"] and "--help" not in words:
        return command + " " + " ".join(TINY_FIT)
    return command


class MyModule(lightning.LightningModule):
    """A user's classifier: an encoder at ``self.model``, a head beside it at ``self.classifier``."""

    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = tiny_bert().bert.train()
        self.classifier = torch.nn.Linear(32, 4)

    def forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.classifier(hidden.mean(1))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(
            self(batch["input_ids"], batch["attention_mask"]), batch["labels"]
        )

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.training_step(batch, batch_idx))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    rows = [
        {
            "input_ids": torch.randint(3, VOCAB, (8,), generator=g),
            "attention_mask": torch.ones(8, dtype=torch.long),
            "labels": torch.tensor(i % 4),
        }
        for i in range(8)
    ]
    return torch.utils.data.DataLoader(rows, batch_size=4)


class TwoStepTrainer(lightning.Trainer):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.update(max_steps=2, max_epochs=1, limit_val_batches=1, logger=False, enable_progress_bar=False)
        kwargs.setdefault("enable_checkpointing", False)
        super().__init__(*args, **kwargs)


def stand_ins(folder: Path) -> dict:
    from hydra import compose, initialize_config_dir

    from lightning_peft.data.tokenizer import char_tokenizer

    llama = tiny_llama()
    names = {
        "MyModule": MyModule,
        "train_loader": loader(),
        "val_loader": loader(),
        "model": tiny_llama(),
        "x": torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0)),
        "tokenizer": char_tokenizer(),
        "records": [{"instruction": "Uppercase the word.", "input": "cat", "output": "CAT"}] * 4,
        "config": llama.config,
        "base_state_dict": llama.state_dict(),
    }
    if (folder / "conf" / "config.yaml").is_file():
        with initialize_config_dir(config_dir=str(folder / "conf"), version_base="1.3"):
            names["cfg"] = compose(config_name="config")
    return names


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A scratch folder with the files the README's commands expect to find."""
    from lightning_peft import PEFT, LoRA, export_adapter

    root = tmp_path_factory.mktemp("readme")
    for base in ("base-model", "path/to/base-model"):
        tiny_llama().save_pretrained(root / base)

    class CausalLM(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_llama().train()

    module = CausalLM()
    callback = PEFT(LoRA(r=4, target_modules=["q_proj", "v_proj"]), module="model", verbose=False)
    callback.adapt(module)
    checkpoint = {"state_dict": module.state_dict()}
    callback.prune_checkpoint(module, checkpoint)
    torch.save(checkpoint, root / "epoch=2.ckpt")
    export_adapter(root / "epoch=2.ckpt", root / "peft-adapter")
    # the example's checkpoint, for the resume and load_from_checkpoint blocks
    lora = LoRA(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    trainer = TwoStepTrainer(callbacks=[PEFT(lora, verbose=False)], enable_model_summary=False)
    trainer.fit(MyModule(), loader())
    trainer.save_checkpoint(root / "outputs" / "finetune_minilm" / "checkpoints" / "last-adapter.ckpt")
    return root


BLOCKS = blocks()


def test_the_readme_marks_few_blocks_to_skip():
    skipped = len(SKIP.findall(README.read_text()))
    assert skipped <= 4, f"{skipped} README blocks are skipped by the README test"


@pytest.mark.parametrize(
    ("line", "language", "text"), BLOCKS, ids=[f"line{b[0]}-{b[1] or 'text'}" for b in BLOCKS]
)
def test_readme_block_runs_as_written(folder, monkeypatch, line, language, text):
    monkeypatch.chdir(folder)
    if language == "python":
        monkeypatch.setattr(lightning, "Trainer", TwoStepTrainer)
        monkeypatch.setattr(lightning.pytorch, "Trainer", TwoStepTrainer)
        exec(compile(text, f"README.md:{line}", "exec"), stand_ins(folder))
    elif language == "yaml":
        first = text.splitlines()[0]
        path = re.match(r"#\s*your\s+(\S+)", first)
        assert path, f"README.md:{line}: a yaml block starts with '# your <path>'"
        (folder / path.group(1)).parent.mkdir(parents=True, exist_ok=True)
        (folder / path.group(1)).write_text(text + "\n")
    elif language in ("bash", "text"):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
        for command in commands(text):
            done = subprocess.run(
                command, shell=True, cwd=folder, capture_output=True, text=True, env=env, timeout=600
            )
            assert done.returncode == 0, (
                f"README.md:{line}: {command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
            )
    else:
        pytest.fail(f"README.md:{line}: a block without a language; mark it skip if it shows a layout")
