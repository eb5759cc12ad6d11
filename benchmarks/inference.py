"""Inference cost of an adapted model: merged against the base model, unmerged against peft.

An eval-mode forward (``torch.inference_mode``) of the Llama of ``step_time.py`` with LoRA r=16 on all
linear layers, for six models built in one process and run in turn (interleaved), median over the
rounds after a warm-up (ratios: the median of the per-round ratios):

  - ``base``: the model without adapters (the reference);
  - ``merged``: our LoRA merged in place (``strategy.merge``: the layers stay wrapped, and skip the
    adapter); ``unwrapped``: merged and unwrapped (``merge_and_unwrap``: the base model's own layers);
  - ``unmerged``: our LoRA, unmerged (the adapter runs on every call);
  - ``peft-unmerged`` and ``peft-merged`` (``merge_adapter``): peft 0.21 on the same weights.

Run::

    python benchmarks/inference.py --quick            # hidden 512
    python benchmarks/inference.py                    # hidden 2048 (the issue's model)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from step_time import build_model  # noqa: E402

from lightning_peft import LoRA  # noqa: E402
from lightning_peft.formats.merged import merge_and_unwrap  # noqa: E402


def variants(base: torch.nn.Module) -> dict[str, torch.nn.Module]:
    ours = copy.deepcopy(base)
    strategy = LoRA(r=16, lora_alpha=32, init_lora_weights=False)  # a non-zero update, as after training
    strategy.apply(ours)
    merged = copy.deepcopy(ours)
    strategy.merge(merged)
    unwrapped = copy.deepcopy(ours)
    merge_and_unwrap(unwrapped)
    # peft on the same adapter weights
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    ours_state = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                key = name.removeprefix("base_model.model.").replace(".default.weight", "")
                param.copy_(ours_state[key])
    theirs_merged = copy.deepcopy(theirs)
    theirs_merged.merge_adapter()
    models = {
        "base": base,
        "merged": merged,
        "unwrapped": unwrapped,
        "unmerged": ours,
        "peft-unmerged": theirs,
        "peft-merged": theirs_merged,
    }
    return {name: model.eval() for name, model in models.items()}


@torch.inference_mode()
def measure(
    models: dict[str, torch.nn.Module], ids: torch.Tensor, rounds: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Forward times per model over interleaved rounds, and each model's largest logit difference to
    our unmerged model."""
    reference = models["unmerged"](input_ids=ids).logits
    errors = {n: (m(input_ids=ids).logits - reference).abs().max().item() for n, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_index in range(warmup + rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model(input_ids=ids)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times, errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="hidden 512, intermediate 1376")
    parser.add_argument("--tiny", action="store_true", help="hidden 64, vocab 128, 16 tokens (tests)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    hidden, intermediate = (64, 128) if args.tiny else (512, 1376) if args.quick else (2048, 5504)
    shape = argparse.Namespace(
        hidden=hidden,
        intermediate=intermediate,
        layers=2,
        vocab=128 if args.tiny else 8000,
        seq=16 if args.tiny else 128,
        dtype=torch.float32,
    )
    torch.set_num_threads(args.threads)
    models = variants(build_model(shape))
    ids = torch.randint(0, shape.vocab, (2, shape.seq), generator=torch.Generator().manual_seed(0))
    times, errors = measure(models, ids, args.rounds, args.warmup)
    median = {name: statistics.median(t) for name, t in times.items()}

    def ratio(name: str, reference: str) -> float:
        """Median of the per-round ratios: each round runs both within a second, under the same load."""
        return statistics.median(a / b for a, b in zip(times[name], times[reference], strict=True))

    rows = []
    print(
        f"\nLlama hidden {shape.hidden}, batch 2x{shape.seq}, fp32, {args.threads} threads, eval forward; "
        f"median of {args.rounds} interleaved rounds\n"
    )
    print("| model | forward s | x base | x peft unmerged | max abs diff to unmerged |")
    print("|---|---:|---:|---:|---:|")
    for name in models:
        row = {
            "model": name,
            "median_s": median[name],
            "x_base": ratio(name, "base"),
            "x_peft_unmerged": ratio(name, "peft-unmerged"),
            "max_abs_diff": errors[name],
            "times_s": times[name],
        }
        rows.append(row)
        print(
            f"| {name} | {row['median_s']:.4f} | {row['x_base']:.3f} | {row['x_peft_unmerged']:.3f} | "
            f"{row['max_abs_diff']:.1e} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"settings": vars(args) | {"hidden": shape.hidden}, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
