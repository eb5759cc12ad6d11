"""``lightning-peft plan``: training memory of full fine-tuning, LoRA and QLoRA, from a model config."""

from __future__ import annotations

import argparse

from lightning_peft.cli.common import EXIT_OK, UsageError

PLAN_DESCRIPTION = """\
Estimate the memory of one training step for full fine-tuning, LoRA and QLoRA from a model config,
without allocating the model: it is built on PyTorch's meta device and one forward is traced there
(see lightning_peft.plan). Prints weights, gradients, optimizer states, activations and the total.

  lightning-peft plan path/to/model                     a folder with config.json (or the file)
  lightning-peft plan llama-7b                          a preset: llama-7b, llama-13b, llama-3-8b
  lightning-peft plan config.json --dtype bfloat16 --batch-size 4 --seq-len 1024 --gradient-checkpointing
"""


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", metavar="CONFIG", help="a model folder with config.json, the file itself, or a preset name"
    )
    parser.add_argument("--method", default="full,lora,qlora", help="comma-separated: full, lora, qlora")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", help="weights and activations (QLoRA: compute dtype)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank, on all linear layers")
    parser.add_argument("--optimizer", default="adamw", help="adamw, adam, sgd-momentum or sgd")
    parser.add_argument("--quant-type", default="nf4", choices=("nf4", "fp4", "int8"))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--auto-class", default="AutoModelForCausalLM", help="the transformers class to build"
    )
    parser.add_argument("--json", metavar="OUT", help="also write the plans as JSON")


def run_plan(args: argparse.Namespace) -> int:
    import json

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ("full", "lora", "qlora")]
    if unknown or not methods:
        raise UsageError(f"--method {args.method!r}: choose from full, lora, qlora (comma-separated)")
    from lightning_peft.planning import plan, plan_table

    plans = [
        plan(
            args.config,
            method,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            dtype=args.dtype,
            optimizer=args.optimizer,
            r=args.r,
            quant_type=args.quant_type,
            gradient_checkpointing=args.gradient_checkpointing,
            auto_class=args.auto_class,
        )
        for method in methods
    ]
    print(
        f"{args.config}: batch {args.batch_size} x {args.seq_len}, {args.dtype}, {args.optimizer}, LoRA r={args.r}"
        f"{', gradient checkpointing' if args.gradient_checkpointing else ''}\n"
    )
    print(plan_table(plans))
    print("\nNot counted: single operations' temporary buffers, the CUDA context, allocator fragmentation.")
    if args.json:
        from lightning_peft.formats.files import write_text_staged

        write_text_staged(args.json, json.dumps([p.as_dict() for p in plans], indent=2) + "\n")
    return EXIT_OK
