"""benchmarks/step_time.py on a tiny Llama: the table's columns hold what they say.

Only what is exact is asserted (parameter counts, checkpoint bytes, saved-activation bytes, the FLOP
floor); step times are whatever the machine gives and are only checked to be recorded.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import step_time  # noqa: E402  (a plain import: a broken benchmark fails here, it is not skipped)

METHODS = ["limit", "lora", "lora-input-grads", "peft-lora", "lora-dropout", "dora", "qlora", "full"]
HIDDEN, INTERMEDIATE, LAYERS, R = 64, 128, 2, 16


def _run(tmp_path: Path, dtype: str) -> dict[str, dict]:
    out = tmp_path / f"{dtype}.json"
    step_time.main(
        [
            *("--hidden", str(HIDDEN), "--intermediate", str(INTERMEDIATE), "--layers", str(LAYERS)),
            *("--vocab", "128", "--seq", "16", "--threads", "1", "--rounds", "2", "--warmup", "0"),
            *("--methods", ",".join(METHODS), "--dtype", dtype, "--json", str(out)),
        ]
    )
    record = json.loads(out.read_text())
    assert record["settings"]["dtype"] == f"torch.{dtype}"
    return record


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("bench")
    return {dtype: _run(tmp, dtype) for dtype in ("float32", "bfloat16")}


def _rows(record: dict) -> dict[str, dict]:
    return {row["method"]: row for row in record["rows"]}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_method_is_timed_against_the_limit(runs: dict[str, dict], dtype: str) -> None:
    rows = _rows(runs[dtype])
    assert list(rows) == METHODS
    for row in rows.values():  # each ratio is the median of the per-round ratios to the limit
        ratios = [t / lt for t, lt in zip(row["times_s"], rows["limit"]["times_s"], strict=True)]
        assert len(ratios) == 2 and row["x_limit"] == pytest.approx(sum(ratios) / 2)
    assert rows["lora"]["x_peft"] is not None and rows["dora"]["x_peft"] is None  # peft-dora not run


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_parameter_counts_and_checkpoint_bytes_are_the_adapters(runs: dict[str, dict], dtype: str) -> None:
    rows = _rows(runs[dtype])
    # r (in + out) per projection: q, k, v, o (64 -> 64), gate, up (64 -> 128), down (128 -> 64)
    per_layer = R * (4 * 2 * HIDDEN + 3 * (HIDDEN + INTERMEDIATE))
    for method in ("lora", "lora-input-grads", "peft-lora", "lora-dropout", "qlora"):
        assert rows[method]["trainable"] == LAYERS * per_layer, method
    # DoRA adds a magnitude per output: q, k, v, o, down (64) and gate, up (128)
    assert rows["dora"]["trainable"] == LAYERS * (per_layer + 5 * HIDDEN + 2 * INTERMEDIATE)
    assert rows["full"]["trainable"] == rows["full"]["total"] == rows["limit"]["total"]
    lora_bytes = rows["lora"]["ckpt_kib"] * 1024
    itemsize = {"float32": 4, "bfloat16": 2}[dtype]  # the adapters take the base's dtype
    assert LAYERS * per_layer * itemsize < lora_bytes < LAYERS * per_layer * itemsize + 8192  # + header


def test_saved_activations_follow_the_method_and_the_dtype(runs: dict[str, dict]) -> None:
    fp32, bf16 = _rows(runs["float32"]), _rows(runs["bfloat16"])
    # stopping at the first adapter keeps less than going on to the inputs; dropout's bits are small
    assert fp32["lora"]["saved_mib"] < fp32["lora-input-grads"]["saved_mib"]
    assert fp32["lora"]["saved_mib"] <= fp32["peft-lora"]["saved_mib"]
    assert fp32["lora-dropout"]["saved_mib"] <= 1.05 * fp32["lora"]["saved_mib"]
    # bfloat16 halves what the model keeps (the loss's float32 logits stay)
    ratio = bf16["limit"]["saved_mib"] / fp32["limit"]["saved_mib"]
    assert 0.5 <= ratio < 0.7


def test_the_flop_floor_counts_the_skipped_input_gradients(runs: dict[str, dict]) -> None:
    floor = runs["float32"]["lora_flop_floor"]
    # with every input gradient: 1 + 6 L / 4 P over the linear weights, the head included
    lora = LAYERS * R * (4 * 2 * HIDDEN + 3 * (HIDDEN + INTERMEDIATE))
    linear = LAYERS * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE) + 128 * HIDDEN
    assert floor["with_input_grads"] == pytest.approx(1 + 6 * lora / (4 * linear))
    # as run: the first block's q, k, v skip the base's 2 in out and the adapter's 2 r in per token
    skipped = 3 * (2 * HIDDEN * HIDDEN + 2 * R * HIDDEN)
    assert floor["as_run"] == pytest.approx(floor["with_input_grads"] - skipped / (4 * linear))


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCHMARKS.glob("*.py")))
def test_every_benchmark_script_imports(script: str) -> None:
    module = importlib.import_module(script)
    assert callable(getattr(module, "main", None)), f"benchmarks/{script}.py has no main()"


# ---------------------------------------------------------------- every other script, to the end, tiny


def test_method_table_prints_a_row_per_method_with_the_counts_of_the_readme(capsys) -> None:
    import method_table

    method_table.main()
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert len(rows) == len(method_table.METHODS)
    # the README's table: LoRA r=8 on every linear layer of MiniLM, IA3's defaults, 20 virtual tokens
    assert "| `LoRA(r=8)` | 337,920 |" in out
    assert "| `IA3()` | 16,128 |" in out
    assert "| `PromptTuning(num_virtual_tokens=20)` | 7,680 |" in out
    assert "| `PrefixTuning(num_virtual_tokens=20)` | 92,160 |" in out


def test_inference_benchmark_runs_and_its_variants_agree(tmp_path: Path) -> None:
    import inference

    out = tmp_path / "inference.json"
    inference.main(["--tiny", "--rounds", "1", "--warmup", "0", "--threads", "1", "--json", str(out)])
    record = json.loads(out.read_text())
    assert record["settings"]["hidden"] == 64
    rows = {row["model"]: row for row in record["rows"]}
    assert set(rows) == {"base", "merged", "unwrapped", "unmerged", "peft-unmerged", "peft-merged"}
    assert all(len(row["times_s"]) == 1 for row in rows.values())
    # the merged and unwrapped models compute what the unmerged adapter computes
    assert all(row["max_abs_diff"] < 1e-4 for row in rows.values() if row["model"] != "base")


def test_qlora_memory_benchmark_reports_4_bit_under_8_bit_storage(capsys) -> None:
    import qlora_memory

    qlora_memory.main(["--hidden", "64", "--intermediate", "128", "--vocab", "128", "--tokens", "8"])
    rows = [
        line.split("|")
        for line in capsys.readouterr().out.splitlines()
        if line.startswith(("| nf4", "| fp4", "| int8"))
    ]
    per_weight = {(row[1].strip(), row[2].strip()): float(row[3]) for row in rows}
    assert len(per_weight) == 5
    # 4 bits plus a 4-byte absmax per 64 weights = 0.5625 bytes, a little more on such small layers;
    # int8 about 1 byte
    assert 0.56 <= per_weight[("nf4", "False")] < 0.6 and 1.0 <= per_weight[("int8", "-")] < 1.1


def test_chart_draws_a_png_from_a_step_time_record(runs: dict[str, dict], tmp_path: Path) -> None:
    import chart

    results = tmp_path / "float32.json"
    results.write_text(json.dumps(runs["float32"]))
    chart.main([str(results), str(tmp_path / "chart.png")])
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (axes,) = chart.figure(runs["float32"]).axes
    rows = [row for row in runs["float32"]["rows"] if row["method"] != "limit"]
    assert [t.get_text() for t in axes.get_yticklabels()] == [row["method"] for row in rows]
    times, saved = axes.containers  # bars as long as the recorded ratios
    assert [bar.get_width() for bar in times] == [row["x_limit"] for row in rows]
    assert [bar.get_width() for bar in saved] == [row["saved_vs_limit"] for row in rows]


@pytest.mark.slow
def test_plan_memory_benchmark_plans_7b_and_matches_a_measured_step(tmp_path: Path) -> None:
    import plan_memory

    out = tmp_path / "plan.json"
    plan_memory.main(["--json", str(out)])
    record = json.loads(out.read_text())
    assert record["meta_apply"]["all_parameters_on_meta"] is True
    assert [p["method"] for p in record["plans_7b"][:3]] == ["full", "lora", "qlora"]
    assert all(0.85 <= row["ratio"] <= 1.15 for row in record["against_measured"])


@pytest.mark.slow
def test_compile_adds_a_compiled_twin_of_each_method_compared_to_eager_and_to_peft(tmp_path: Path) -> None:
    out = tmp_path / "compiled.json"
    step_time.main(
        [
            *("--hidden", str(HIDDEN), "--intermediate", str(INTERMEDIATE), "--layers", str(LAYERS)),
            *("--vocab", "128", "--seq", "16", "--threads", "1", "--rounds", "2", "--warmup", "0"),
            *("--methods", "lora,peft-lora", "--compile", "--json", str(out)),
        ]
    )
    record = json.loads(out.read_text())
    assert record["settings"]["warmup"] == 2  # the compiling steps are never timed
    rows = _rows(record)
    assert list(rows) == ["limit", "limit+compile", "lora", "lora+compile", "peft-lora", "peft-lora+compile"]
    compiled, eager, theirs = rows["lora+compile"], rows["lora"], rows["peft-lora+compile"]
    pairs = zip(compiled["times_s"], eager["times_s"], strict=True)
    assert compiled["x_eager"] == pytest.approx(sum(c / e for c, e in pairs) / 2)
    pairs = zip(compiled["times_s"], theirs["times_s"], strict=True)
    assert compiled["x_peft"] == pytest.approx(sum(c / t for c, t in pairs) / 2)  # over peft compiled
    assert compiled["trainable"] == eager["trainable"] and compiled["saved_mib"] == 0  # not counted


def test_fit_step_times_lightning_and_the_plain_loop_on_the_same_batches(tmp_path: Path) -> None:
    import fit_step

    out = tmp_path / "fit_step.json"
    argv = [
        "--hidden",
        "64",
        "--vocab",
        "128",
        "--seq",
        "16",
        "--steps",
        "4",
        "--rounds",
        "3",
        "--threads",
        "1",
    ]
    result = fit_step.main([*argv, "--no-progress-bar", "--json", str(out)])
    record = json.loads(out.read_text())
    assert len(record["rounds"]) == 3 and record["x_plain"] == pytest.approx(result["x_plain"])
    ratios = sorted(r["lightning_s"] / r["plain_s"] for r in record["rounds"])
    assert record["x_plain"] == pytest.approx(ratios[1])  # the median of the per-round ratios
    assert record["x_plain_min"] == pytest.approx(ratios[0]) and record["x_plain_max"] == pytest.approx(
        ratios[2]
    )
