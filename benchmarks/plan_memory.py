"""Planning large models without memory: LoRA applied to a Llama-7B on the ``meta`` device, and
``plan()``'s estimate for full fine-tuning, LoRA and QLoRA checked against a measured step.

1. Build a Llama-7B-shaped model on ``meta`` (no storage), time ``LoRA(...).apply`` on it, and check
   that no parameter was given memory (the process's peak RSS is printed before and after).
2. ``plan()`` of that model for full / LoRA / QLoRA in bf16 (batch 1 x 512, with and without
   gradient checkpointing): a table in GiB.
3. ``plan()`` against ``measure_step()`` (a real step on the CPU, fp32) on the hidden-512 Llama of
   ``step_time.py --quick`` (batch 2 x 128): each part and the total, and their ratio.

Run::

    python benchmarks/plan_memory.py [--json results/plan_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from lightning_peft import LoRA, QLoRA, plan  # noqa: E402
from lightning_peft.planning import measure_step, model_config, plan_table  # noqa: E402

SMALL = dict(
    model_type="llama",
    vocab_size=8000,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=256,
)


def meta_apply() -> dict[str, float]:
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(model_config("llama-7b"))
    start = time.perf_counter()
    LoRA(r=16, lora_alpha=32, target_modules="all-linear").apply(model)
    seconds = time.perf_counter() - start
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    on_meta = all(p.is_meta for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "apply_s": seconds,
        "all_parameters_on_meta": on_meta,
        "parameters": total,
        "trainable": trainable,
        "peak_rss_mib_before": rss_before,
        "peak_rss_mib_after": rss_after,
    }


def against_measured() -> list[dict[str, object]]:
    rows = []
    ids = torch.randint(0, SMALL["vocab_size"], (2, 128), generator=torch.Generator().manual_seed(0))
    for method in ("full", "lora", "qlora"):
        planned = plan(SMALL, method, batch_size=2, seq_len=128, r=16)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(model_config(SMALL))
        if method == "full":
            model.requires_grad_(True)
        elif method == "lora":
            LoRA(r=16, lora_alpha=32, target_modules="all-linear").apply(model)
        else:
            QLoRA(r=16, lora_alpha=32, compute_dtype="float32").apply(model)
        measured = measure_step(model, ids, method)
        rows.append(
            {
                "method": method,
                "planned": planned.as_dict(),
                "measured": measured.as_dict(),
                "ratio": planned.total_bytes / measured.total_bytes,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    applied = meta_apply()
    print(
        f"\nLoRA r=16 all-linear on a meta Llama-7B: {applied['apply_s']:.3f} s, "
        f"{applied['trainable']:,} trainable of {applied['parameters']:,}, every parameter on meta: "
        f"{applied['all_parameters_on_meta']}, peak RSS {applied['peak_rss_mib_before']:.0f} -> "
        f"{applied['peak_rss_mib_after']:.0f} MiB"
    )
    start = time.perf_counter()
    plans = [
        plan("llama-7b", m, batch_size=1, seq_len=512, dtype="bfloat16") for m in ("full", "lora", "qlora")
    ]
    checkpointed = plan(
        "llama-7b", "qlora", batch_size=1, seq_len=512, dtype="bfloat16", gradient_checkpointing=True
    )
    seconds = time.perf_counter() - start
    print(f"\nplan() of Llama-7B, bf16, batch 1 x 512 ({seconds:.1f} s for four plans):\n")
    print(plan_table([*plans, checkpointed]))
    print("(the last row: QLoRA with gradient checkpointing)")
    rows = against_measured()
    print("\nplan() against a measured step, Llama hidden 512, 2 layers, batch 2 x 128, fp32 (MiB):\n")
    print("| method | planned total | measured total | ratio | planned activations | measured activations |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        p, m = r["planned"], r["measured"]
        print(
            f"| {r['method']} | {p['total_bytes'] / 2**20:.1f} | {m['total_bytes'] / 2**20:.1f} | "
            f"{r['ratio']:.3f} | {p['activation_bytes'] / 2**20:.1f} | {m['activation_bytes'] / 2**20:.1f} |"
        )
    if args.json:
        record = {
            "meta_apply": applied,
            "plans_7b": [p.as_dict() for p in [*plans, checkpointed]],
            "against_measured": rows,
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
