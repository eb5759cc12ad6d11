"""Instruction tuning end to end, as the README runs it: `fit experiment=instruct_tiny_llama`, then
`generate` with the merged model and the same template."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from test_fit import fit

from lightning_peft.cli.main import main
from lightning_peft.data.records import toy_instructions
from lightning_peft.generation.templates import ALPACA


def test_instruction_tuning_then_generation_with_the_same_template(tmp_path):
    run = tmp_path / "run"
    result = fit(
        "experiment=instruct_tiny_llama",
        "trainer.enable_progress_bar=false",
        "callbacks=none",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run / "metrics.json").read_text())
    rows = list(csv.DictReader((run / "logs" / "version_0" / "metrics.csv").open()))
    val = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    assert val[-1] < 0.5 * val[0], val  # the response loss falls by more than half
    adapter, merged = Path(record["adapter"]), Path(record["merged"])
    assert (adapter / "tokenizer.json").is_file() and (merged / "tokenizer.json").is_file()
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()

    records = toy_instructions(40, seed=123)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "completions.jsonl"
    argv = ["generate", "--model", str(merged), "--template", "alpaca", "--prompts", str(prompts)]
    argv += ["--stop", "\\n", "--max-new-tokens", "12", "--jsonl", str(out)]
    assert main(argv) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["prompt"] for w in written] == [ALPACA.prompt_text(r) for r in records]
    pairs = [(w["completion"].strip(), r["output"]) for w, r in zip(written, records, strict=True)]
    assert sum(got == want for got, want in pairs) >= len(records) // 2, pairs
