"""Training-step cost of every method against the frozen-model limit and against Hugging Face peft.

The *limit* is the same model with every weight frozen and the input embeddings' output requiring
grad: one training step is then a forward and a backward to the inputs. An adapter that has to
reach the inputs cannot beat it; one that trains nothing before the first block need not go that
far. LoRA, IA3 and the bottleneck adapter stop their backward at the first trained tensor (as peft
does) unless gradient checkpointing is on, so they can come in under 1.0x: ``lora-input-grads``
is our LoRA made to go on to the inputs, the like-for-like comparison with the limit.
Each method is timed on a Llama-shaped model built from a config (random weights, nothing
downloaded). All variants are built in one process and stepped in turn (interleaved), so a busy
machine slows them alike; the table gives the median over the rounds after a warm-up, and the JSON
keeps every sample. ``--steps-per-round k`` times k consecutive steps of a method per round (the
round's time is their mean): a 70 ms step jitters by several percent on its own.

Columns:
  - ``x limit`` / ``x peft``: step time over the limit's and over peft's same configuration: the
    median of the per-round ratios (each round steps both within seconds, under the same load);
    ``spread`` is the range of the per-round ratios to the limit.
  - ``saved MiB``: bytes of the tensors autograd saves for backward during one training forward,
    each storage counted once, parameters excluded (``torch.autograd.graph.saved_tensors_hooks``).
    Deterministic, so it is measured once.
  - ``trainable``: trainable parameters; ``ckpt KiB``: the trainable state as safetensors bytes.
  - ``apply s``: wall time of ``strategy.apply(model)`` (or ``get_peft_model``).
  - on CUDA also ``peak MiB``: ``torch.cuda.max_memory_allocated`` over one step.

Run::

    python benchmarks/step_time.py                       # the issue's settings (hidden 2048, slow on a CPU)
    python benchmarks/step_time.py --quick               # hidden 512: a few minutes on 2 cores
    python benchmarks/step_time.py --methods lora,lora-dropout,dora --rounds 7
    python benchmarks/step_time.py --device cuda         # bf16 on a GPU
    python benchmarks/step_time.py --quick --compile --methods lora,peft-lora,dora,peft-dora
                                                         # each method eager and torch.compile'd ("+compile")

With ``--compile`` every method also runs as ``torch.compile(model)`` (inductor), named ``<method>+compile``:
its ``x peft`` is over peft's compiled twin, and ``x eager`` over the same method uncompiled. Saved
activations are not counted for compiled variants (the compiled graph saves inside itself).

Timings are only comparable within one run (the same machine and load); the saved bytes,
parameter counts and checkpoint sizes are exact.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402  (the speed baseline; imported here so that its import time is not apply time)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save as safetensors_bytes  # noqa: E402
from torch import nn  # noqa: E402

from lightning_peft import IA3, BottleneckAdapter, LoRA, PromptTuning, QLoRA  # noqa: E402
from lightning_peft.planning import saved_activation_bytes as count_saved_bytes  # noqa: E402
from lightning_peft.strategies import LoRALinear  # noqa: E402
from lightning_peft.strategies.base import count_parameters  # noqa: E402


@dataclass
class Variant:
    name: str
    model: nn.Module
    apply_seconds: float
    optimizer: torch.optim.Optimizer | None
    peft_twin: str | None = None  # the peft variant with the same configuration
    eager_twin: str | None = None  # for a compiled variant: the same method uncompiled
    times: list[float] = field(default_factory=list)
    saved_bytes: int = 0
    peak_bytes: int = 0


def build_model(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=max(256, args.seq + 32),
    )
    return transformers.LlamaForCausalLM(config).to(args.dtype)


def _ours(strategy: Callable[[], object]) -> Callable[[nn.Module], nn.Module]:
    return lambda model: strategy().apply(model)


def _peft(**lora: object) -> Callable[[nn.Module], nn.Module]:
    def apply(model: nn.Module) -> nn.Module:
        config = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", **lora)
        # as ours, peft asks for the inputs' gradient only under gradient checkpointing
        return peft.get_peft_model(model, config)

    return apply


def _with_input_grads(apply: Callable[[nn.Module], nn.Module]) -> Callable[[nn.Module], nn.Module]:
    """The same method doing the limit's work too: its backward goes on to the input embeddings."""

    def forced(model: nn.Module) -> nn.Module:
        model = apply(model)
        model.enable_input_require_grads()
        return model

    return forced


def _limit(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    model.enable_input_require_grads()
    return model


def _full(model: nn.Module) -> nn.Module:
    model.requires_grad_(True)
    return model


def methods(args: argparse.Namespace) -> dict[str, tuple[Callable[[nn.Module], nn.Module], str | None]]:
    """name -> (apply function, name of the peft twin or None)."""
    qlora_dtype = "bfloat16" if args.dtype == torch.bfloat16 else "float32"
    p = getattr(args, "dropout", 0.1)
    return {
        "limit": (_limit, None),
        "lora": (_ours(lambda: LoRA(r=16, lora_alpha=32)), "peft-lora"),
        "peft-lora": (_peft(), None),
        "lora-input-grads": (_with_input_grads(_ours(lambda: LoRA(r=16, lora_alpha=32))), None),
        "lora-dropout": (_ours(lambda: LoRA(r=16, lora_alpha=32, lora_dropout=p)), "peft-lora-dropout"),
        "peft-lora-dropout": (_peft(lora_dropout=p), None),
        "lora-dropout-shared": (
            _ours(lambda: LoRA(r=16, lora_alpha=32, lora_dropout=p, share_dropout_mask=True)),
            "peft-lora-dropout",
        ),
        "dora": (_ours(lambda: LoRA(r=16, lora_alpha=32, use_dora=True)), "peft-dora"),
        "peft-dora": (_peft(use_dora=True), None),
        "qlora": (_ours(lambda: QLoRA(r=16, lora_alpha=32, compute_dtype=qlora_dtype)), None),
        # QLoRA's default compute dtype: the 4-bit weights dequantize to bfloat16 and multiply in it
        "qlora-bf16": (_ours(lambda: QLoRA(r=16, lora_alpha=32, compute_dtype="bfloat16")), None),
        "ia3": (_ours(lambda: IA3()), None),
        "adapter": (_ours(lambda: BottleneckAdapter()), None),
        "prompt": (_ours(lambda: PromptTuning(num_virtual_tokens=20)), None),
        "full": (_full, None),
    }


def build_variants(base: nn.Module, names: list[str], args: argparse.Namespace) -> list[Variant]:
    table = methods(args)
    variants = []
    for name in names:
        apply, twin = table[name]
        model = copy.deepcopy(base)
        start = time.perf_counter()
        model = apply(model)
        seconds = time.perf_counter() - start
        model.to(args.device).train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5) if trainable else None
        variants.append(Variant(name, model, seconds, optimizer, twin if twin in names else None))
        if args.compile:  # the same model compiled: it shares the weights and the optimizer
            compiled_twin = f"{twin}+compile" if twin in names else None
            variants.append(
                Variant(f"{name}+compile", torch.compile(model), seconds, optimizer, compiled_twin, name)
            )
    return variants


def training_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, as a causal LM trains (the loss saves its logits: they count)."""
    logits = model(input_ids=ids).logits[:, -ids.shape[1] :]  # prompt tuning prepends virtual tokens
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def step(variant: Variant, ids: torch.Tensor) -> None:
    loss = training_loss(variant.model, ids)
    loss.backward()
    if variant.optimizer is not None:
        variant.optimizer.step()
        variant.optimizer.zero_grad(set_to_none=True)


def saved_activation_bytes(variant: Variant, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for backward during one training forward: each storage once, no parameters,
    only what the graph still holds at the end (peft's DoRA builds and drops a graph for its norm)."""
    model = variant.model
    return count_saved_bytes(lambda: training_loss(model, ids), [*model.parameters(), *model.buffers()])


def checkpoint_bytes(model: nn.Module) -> int:
    state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return len(safetensors_bytes(state)) if state else 0


def run(args: argparse.Namespace) -> tuple[list[Variant], dict[str, object], torch.Tensor]:
    torch.set_num_threads(args.threads)
    base = build_model(args)
    names = args.methods.split(",")
    if "limit" not in names:
        names.insert(0, "limit")
    variants = build_variants(base, names, args)
    del base
    gc.collect()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    cuda = args.device.startswith("cuda")
    for variant in variants:
        if variant.eager_twin is None:  # a compiled graph saves inside itself: not counted
            variant.saved_bytes = saved_activation_bytes(variant, ids)
        gc.collect()
    for round_index in range(args.warmup + args.rounds):
        for variant in variants:  # interleaved: one step of each in turn
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for _ in range(args.steps_per_round):
                step(variant, ids)
            if cuda:
                torch.cuda.synchronize()
                variant.peak_bytes = max(variant.peak_bytes, torch.cuda.max_memory_allocated())
            if round_index >= args.warmup:
                variant.times.append((time.perf_counter() - start) / args.steps_per_round)
        print(f"round {round_index + 1}/{args.warmup + args.rounds} done", flush=True)
    machine = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    return variants, machine, ids


def rows(variants: list[Variant]) -> list[dict[str, object]]:
    by_name = {v.name: v for v in variants}
    limit = by_name["limit"]
    out = []
    for v in variants:
        ratios = [t / lt for t, lt in zip(v.times, limit.times, strict=True)]
        twin = by_name.get(v.peft_twin or "")
        trainable, total = count_parameters(v.model)
        out.append(
            {
                "method": v.name,
                "median_s": statistics.median(v.times),
                "x_limit": statistics.median(ratios),
                "x_limit_min": min(ratios),
                "x_limit_max": max(ratios),
                "x_peft": (
                    statistics.median(t / pt for t, pt in zip(v.times, twin.times, strict=True))
                    if twin
                    else None
                ),
                "x_eager": (
                    statistics.median(
                        t / e for t, e in zip(v.times, by_name[v.eager_twin].times, strict=True)
                    )
                    if v.eager_twin
                    else None
                ),
                "saved_mib": v.saved_bytes / 2**20,
                "saved_vs_limit": v.saved_bytes / limit.saved_bytes,
                "trainable": trainable,
                "total": total,
                "ckpt_kib": checkpoint_bytes(v.model) / 2**10,
                "apply_s": v.apply_seconds,
                "peak_mib": v.peak_bytes / 2**20 if v.peak_bytes else None,
                "times_s": v.times,
            }
        )
    return out


def _inputs_needing_grad(model: nn.Module, ids: torch.Tensor) -> dict[nn.Module, bool]:
    """For each LoRA layer: whether its input requires grad in a training forward."""
    needs: dict[nn.Module, bool] = {}

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        needs.setdefault(module, args[0].requires_grad)

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, LoRALinear)]
    try:
        with torch.enable_grad():
            training_loss(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    return needs


def lora_flop_floor(variants: list[Variant], ids: torch.Tensor) -> dict[str, float] | None:
    """The least LoRA's step can cost over the limit, counting matmul FLOPs only.

    Per token and linear layer ``in -> out``, the limit does ``2 in out`` FLOPs forward and as many
    backward to the layer's input (the head included; attention's own products add about 1% here).
    LoRA of rank ``r`` adds ``2 r (in + out)`` forward and ``2 r (in + 2 out)`` backward for its
    weight gradients, plus ``2 r in`` for the input gradient through ``A``. ``with_input_grads``
    counts every input gradient, as the limit does; ``as_run`` leaves out the input gradients of the
    layers whose input does not require grad in LoRA's own step (the first block's q, k, v here).
    """
    by_name = {v.name: v for v in variants}
    if "lora" not in by_name:
        return None
    limit = sum(4 * m.weight.numel() for m in by_name["limit"].model.modules() if isinstance(m, nn.Linear))
    needs = _inputs_needing_grad(by_name["lora"].model, ids)
    forced = run_ = float(limit)
    for layer, need in needs.items():
        (r, inputs), outputs = layer.lora_A.shape, layer.lora_B.shape[0]
        adapter = 2 * r * (inputs + outputs) + 2 * r * (inputs + 2 * outputs)
        forced += adapter + 2 * r * inputs
        run_ += adapter + (2 * r * inputs if need else -2 * inputs * outputs)
    return {"with_input_grads": forced / limit, "as_run": run_ / limit}


def markdown(table: list[dict[str, object]]) -> str:
    peak = any(r["peak_mib"] for r in table)
    head = "| method | step s | x limit (spread) | x peft | x eager | saved MiB | trainable | ckpt KiB | apply s |"
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if peak:
        head, rule = head + " peak MiB |", rule + "---:|"
    lines = [head, rule]
    for r in table:
        x_peft = f"{r['x_peft']:.3f}" if r["x_peft"] is not None else ""
        x_eager = f"{r['x_eager']:.3f}" if r["x_eager"] is not None else ""
        saved = f"{r['saved_mib']:.1f}" if r["saved_mib"] else ""
        line = (
            f"| {r['method']} | {r['median_s']:.3f} | {r['x_limit']:.3f} "
            f"({r['x_limit_min']:.3f}-{r['x_limit_max']:.3f}) | {x_peft} | {x_eager} | {saved} | "
            f"{r['trainable']:,} | {r['ckpt_kib']:,.0f} | {r['apply_s']:.3f} |"
        )
        if peak:
            line += f" {r['peak_mib']:.0f} |"
        lines.append(line)
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--steps-per-round",
        type=int,
        default=1,
        help="consecutive steps of each method per round, timed together (their mean is the round's time): "
        "steps of tens of milliseconds need several to rise above the timer's and the scheduler's noise",
    )
    parser.add_argument("--methods", default=",".join(n for n in methods(argparse.Namespace(dtype=None))))
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    parser.add_argument("--quick", action="store_true", help="hidden 512, intermediate 1376")
    parser.add_argument("--dropout", type=float, default=0.1, help="lora_dropout of the dropout variants")
    parser.add_argument("--compile", action="store_true", help="also run each method torch.compile'd")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate = 512, 1376
    if args.compile and args.warmup < 2:
        args.warmup = 2  # the first compiled steps compile (forward, then backward): not timed
    # the settings: fp32 on the CPU, bf16 on a GPU
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    args.dtype = getattr(torch, args.dtype)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    variants, machine, ids = run(args)
    table = rows(variants)
    settings = {k: v for k, v in vars(args).items() if k != "dtype"} | {"dtype": str(args.dtype)}
    print(
        f"\nLlama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"vocab {args.vocab}, batch {args.batch}x{args.seq}, {args.dtype}, {args.threads} threads, "
        f"{args.device}; LoRA r=16 alpha=32 all-linear (dropout variants p={args.dropout}), AdamW; median of {args.rounds} interleaved "
        f"rounds ({args.steps_per_round} step(s) each) after {args.warmup} warm-up\n{machine}\n"
    )
    print(markdown(table))
    floor = lora_flop_floor(variants, ids)
    if floor is not None:
        print(
            f"\nLoRA's arithmetic floor (matmul FLOPs over the limit's): {floor['with_input_grads']:.4f}x "
            f"with the input gradients the limit computes, {floor['as_run']:.4f}x as LoRA runs"
        )
    if args.json:
        with open(args.json, "w") as f:
            record = {"settings": settings, "machine": machine, "rows": table, "lora_flop_floor": floor}
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
