"""Where a method's training step spends its time, operator by operator, against another method's.

Builds the ``step_time.py`` model and methods, steps each a few times under torch's profiler (interleaved: one step of each method in turn) and
prints, per operator, the self CPU time per step of each method and the difference: the operators
that make one method slower than the other. Profiling slows every operator alike, so the absolute
times are above ``step_time.py``'s; compare the columns, and read the share of the step.

    python benchmarks/breakdown.py --methods lora,qlora               # hidden 2048, the issue's model
    python benchmarks/breakdown.py --quick --methods lora,lora-dropout --steps 5
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
from collections import defaultdict

import torch
from step_time import build_model, build_variants, parse, step
from torch.profiler import ProfilerActivity, profile

# bitsandbytes registers its CPU kernels as torch operators in these namespaces
_GROUPS = {
    "bitsandbytes::": "bitsandbytes (dequantize, 4-bit matmul)",
    "aten::mm": "matmul",
    "aten::addmm": "matmul",
    "aten::bmm": "matmul",
    "aten::_scaled_dot_product": "attention",
}


def group(op: str) -> str:
    for prefix, name in _GROUPS.items():
        if op.startswith(prefix):
            return name
    return "other" if op.startswith("aten::") else op


def profile_step(variant, ids: torch.Tensor) -> dict[str, float]:
    """Self CPU milliseconds of each operator in one profiled step."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(variant, ids)
    per_op: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        per_op[event.key] += event.self_cpu_time_total / 1000
    return dict(per_op)


def profile_rounds(variants: list, ids: torch.Tensor, steps: int) -> dict[str, dict[str, float]]:
    """Per method and operator, the median over ``steps`` interleaved profiled steps (one of each method in
    turn, after a warm-up step of each), so that a busy moment does not land on one method alone."""
    for variant in variants:
        step(variant, ids)
    samples: dict[str, list[dict[str, float]]] = {v.name: [] for v in variants}
    for _ in range(steps):
        for variant in variants:
            samples[variant.name].append(profile_step(variant, ids))
    medians = {}
    for name, runs in samples.items():
        ops = set().union(*runs)
        medians[name] = {op: statistics.median(run.get(op, 0.0) for run in runs) for op in ops}
    return medians


def table(profiles: dict[str, dict[str, float]], top: int) -> str:
    names = list(profiles)
    first, last = names[0], names[-1]
    ops = set().union(*profiles.values())
    diff = {op: profiles[last].get(op, 0.0) - profiles[first].get(op, 0.0) for op in ops}
    order = sorted(ops, key=lambda op: -abs(diff[op]))[:top]
    totals = {n: sum(p.values()) for n, p in profiles.items()}
    head = "| operator | " + " | ".join(f"{n} ms" for n in names) + f" | {last} - {first} ms |"
    lines = [head, "|---|" + "---:|" * (len(names) + 1)]
    for op in order:
        cells = " | ".join(f"{profiles[n].get(op, 0.0):.2f}" for n in names)
        lines.append(f"| {op} | {cells} | {diff[op]:+.2f} |")
    cells = " | ".join(f"{totals[n]:.2f}" for n in names)
    lines.append(f"| **all operators** | {cells} | {totals[last] - totals[first]:+.2f} |")
    grouped = defaultdict(lambda: defaultdict(float))
    for n, p in profiles.items():
        for op, ms in p.items():
            grouped[group(op)][n] += ms
    lines += ["", "| group | " + " | ".join(f"{n} ms" for n in names) + " |", "|---|" + "---:|" * len(names)]
    for g in sorted(grouped, key=lambda g: -grouped[g][last])[:top]:
        lines.append(f"| {g} | " + " | ".join(f"{grouped[g][n]:.2f}" for n in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--steps", type=int, default=5)
    extra.add_argument("--top", type=int, default=15)
    known, rest = extra.parse_known_args(argv)
    args = parse(rest + ([] if "--methods" in rest else ["--methods", "lora,qlora"]))
    torch.set_num_threads(args.threads)
    base = build_model(args)
    names = args.methods.split(",")
    variants = build_variants(base, names, args)
    del base
    gc.collect()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    profiles = profile_rounds(variants, ids, known.steps)
    print(
        f"hidden {args.hidden}, {args.layers} layers, batch {args.batch}x{args.seq}, {args.dtype}, "
        f"{args.threads} threads; self CPU time per step under the profiler, median of {known.steps} interleaved steps\n"
    )
    print(table(profiles, known.top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "settings": {"steps": known.steps, **vars(args) | {"dtype": str(args.dtype)}},
                    "profiles": profiles,
                },
                f,
                indent=1,
            )
    return profiles


if __name__ == "__main__":
    main()
