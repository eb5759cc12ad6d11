"""The ``lightning-peft`` command: one subcommand per task (``fit``, ``export``, ``generate``).

Each subcommand is a :class:`Command`: a name, a help line, a function that adds its arguments to an
``argparse`` parser, and a function that runs it and returns an exit code. A command that composes a
Hydra config (``fit``) can take its overrides as ``argparse.REMAINDER`` and hand them to Hydra's
compose API, so every subcommand shares the same entry point, ``--help`` and exit codes.

Exit codes: 0 success, 1 error (one line on stderr; ``--debug`` shows the traceback), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lightning_peft.generate_cli import GENERATE_DESCRIPTION, add_generate_arguments, run_generate

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
EXIT_CODES = (
    "exit codes: 0 success, 1 error (a one-line message on stderr; --debug for the traceback), 2 usage error"
)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


class UsageError(Exception):
    """Arguments that parse but do not make sense together: exit code 2."""


def _progress(line: str) -> None:
    print(f"lightning-peft: {line}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ export

EXPORT_DESCRIPTION = """\
Export the adapter of an adapter-only checkpoint written with the PEFT callback.

Without --merged: a folder in the Hugging Face PEFT format (adapter_config.json +
adapter_model.safetensors) that peft.PeftModel.from_pretrained loads, or, for methods the PEFT
format cannot carry (bottleneck adapters, Compose, ...), the lightning_peft layout
(lightning_peft_config.json + adapter_model.safetensors). The command says which it wrote.
No base model weights are needed.

With --merged --base MODEL_DIR: a full transformers model folder (save_pretrained) with LoRA, DoRA
and IA3 folded into the weights of the model in MODEL_DIR; its tokenizer files are copied along. For a
checkpoint of a whole adapted LightningModule (PEFT(module=None)) add --root ATTRIBUTE, the attribute
holding the transformers model; what trained beside it (a classifier head) is written to
OUT/module_weights.safetensors, keyed as in the LightningModule.

OUT is written next to its final place and renamed when complete; an existing OUT is refused
unless --overwrite, which replaces only an earlier export. A second export to the same OUT while
one runs fails at once. Tensors holding NaN or infinity are refused unless --allow-non-finite.
"""


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint written with the PEFT callback")
    parser.add_argument("out", metavar="OUT", help="output folder (must not exist, unless --overwrite)")
    parser.add_argument(
        "--merged", action="store_true", help="write a full model with the adapters merged in"
    )
    parser.add_argument("--base", metavar="MODEL_DIR", help="with --merged: the base model folder")
    parser.add_argument(
        "--adapter-name", metavar="NAME", help="the adapter to export (default: the only one)"
    )
    parser.add_argument(
        "--format",
        choices=("auto", "peft", "lightning_peft"),
        default="auto",
        help="adapter layout; auto: the PEFT format when it can carry the adapter (default)",
    )
    parser.add_argument(
        "--base-model-name-or-path", metavar="NAME", help="recorded in adapter_config.json (hub id or folder)"
    )
    parser.add_argument(
        "--task-type",
        help="peft task type, e.g. CAUSAL_LM or SEQ_CLS (prompt and prefix tuning need it unless "
        "--base-model-name-or-path is a folder)",
    )
    parser.add_argument(
        "--root",
        metavar="PATH",
        help="attribute path of the Hugging Face model inside a whole adapted LightningModule "
        "(PEFT(module=None)); also with --merged",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it is an earlier export (a folder holding other files is refused)",
    )
    parser.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="export tensors that hold NaN or infinity (refused by default, for forensics only)",
    )


def _run_export(args: argparse.Namespace) -> int:
    if args.base and not args.merged:
        raise UsageError("--base is used only with --merged")
    if args.merged and not args.base:
        raise UsageError("--merged needs --base MODEL_DIR, the model the checkpoint was trained on")
    if args.merged and (args.format != "auto" or args.task_type or args.base_model_name_or_path):
        raise UsageError("--format, --task-type and --base-model-name-or-path apply to adapter exports")
    if args.merged and args.adapter_name not in (None, "default"):
        raise UsageError("a checkpoint holds one adapter, named 'default'")
    from lightning_peft.formats import export_adapter, export_merged
    from lightning_peft.formats.peft_layout import TASK_TYPES

    if args.task_type is not None and args.task_type not in TASK_TYPES:
        raise UsageError(f"--task-type {args.task_type!r}: choose one of {', '.join(TASK_TYPES)}")

    if args.merged:
        result = export_merged(
            args.checkpoint,
            args.out,
            base=args.base,
            root=args.root,
            overwrite=args.overwrite,
            progress=_progress,
            allow_non_finite=args.allow_non_finite,
        )
    else:
        result = export_adapter(
            args.checkpoint,
            args.out,
            adapter_name=args.adapter_name,
            base_model_name_or_path=args.base_model_name_or_path,
            format=args.format,
            task_type=args.task_type,
            root=args.root,
            overwrite=args.overwrite,
            progress=_progress,
            allow_non_finite=args.allow_non_finite,
        )
    print(f"wrote {result.format} export to {result.path} ({result.tensors} tensors)")
    if result.note:
        _progress(f"note: {result.note}")
    return EXIT_OK


# -------------------------------------------------------------------------------------------------- plan

PLAN_DESCRIPTION = """\
Estimate the memory of one training step for full fine-tuning, LoRA and QLoRA from a model config,
without allocating the model: it is built on PyTorch's meta device and one forward is traced there
(see lightning_peft.plan). Prints weights, gradients, optimizer states, activations and the total.

  lightning-peft plan path/to/model                     a folder with config.json (or the file)
  lightning-peft plan llama-7b                          a preset: llama-7b, llama-13b, llama-3-8b
  lightning-peft plan config.json --dtype bfloat16 --batch-size 4 --seq-len 1024 --gradient-checkpointing
"""


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
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


def _run_plan(args: argparse.Namespace) -> int:
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


# --------------------------------------------------------------------------------------------------- fit

FIT_DESCRIPTION = """\
Train with the PEFT callback, composed by Hydra from lightning_peft's conf/ (model, data, peft,
trainer, callbacks, schedule, experiment, hparams_search). Everything after `fit` goes to Hydra:

  lightning-peft fit                                   LoRA on the shipped MiniLM and intent set
  lightning-peft fit peft=ia3 trainer.max_epochs=1     override groups and keys
  lightning-peft fit -m peft=lora,dora peft.r=4,8      a sweep, with summary.csv at the end
  lightning-peft fit trainer=ddp                       2 processes with Lightning's DDP
  lightning-peft fit --help                            Hydra's help: every group and option

A sweep (-m) runs every job even when some fail; summary.csv has a status column and each failure's
error line, and the command exits with the number of jobs that failed (0: all succeeded).
"""


def run_fit(overrides: Sequence[str]) -> int:
    """Hand the overrides to Hydra's ``main`` (it parses -m, --help, --cfg, ... itself).

    Returns 0, 1 on an error, or after a ``-m`` sweep the number of jobs that failed."""
    import importlib.util

    import __main__
    from lightning_peft import fit

    saved_argv, saved_spec = sys.argv, getattr(__main__, "__spec__", None)
    sys.argv = ["lightning-peft fit", *overrides]
    # Lightning's ddp launcher starts the other ranks with `python -m <__main__.__spec__.name> *sys.argv[1:]`
    # (or `python <sys.argv[0]> ...` without a spec). Naming lightning_peft.fit as the main module makes that
    # command the same job: `python -m lightning_peft.fit <overrides>`, which runs fit's Hydra main.
    __main__.__spec__ = importlib.util.find_spec("lightning_peft.fit")
    fit.SWEEP_FAILURES.clear()
    try:
        fit.main()
    except SystemExit as exit_:  # Hydra exits 1 on errors (after printing them) and 0 after --help
        return int(exit_.code or 0)
    finally:
        sys.argv = saved_argv
        __main__.__spec__ = saved_spec
    return min(len(fit.SWEEP_FAILURES), 125)


COMMANDS: tuple[Command, ...] = (
    Command(
        "fit",
        "train with Hydra configs (single run or -m sweep); `fit --help` lists the options",
        lambda parser: None,
        lambda args: EXIT_OK,  # never reached: main() hands `fit` to Hydra before argparse
        FIT_DESCRIPTION,
    ),
    Command(
        "export",
        "export a checkpoint's adapter (PEFT format) or a merged model",
        _add_export_arguments,
        _run_export,
        EXPORT_DESCRIPTION,
    ),
    Command(
        "plan",
        "estimate training memory (full / LoRA / QLoRA) from a model config, allocating nothing",
        _add_plan_arguments,
        _run_plan,
        PLAN_DESCRIPTION,
    ),
    Command(
        "generate",
        "generate text with a model, a base + adapter, or a base + checkpoint (stop strings, banned/forced words)",
        add_generate_arguments,
        run_generate,
        GENERATE_DESCRIPTION,
    ),
)


# ---------------------------------------------------------------------------------------------- dispatch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-peft",
        description="Parameter-efficient fine-tuning for PyTorch Lightning.",
        epilog=EXIT_CODES,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sub = commands.add_parser(
            command.name,
            help=command.help,
            description=command.description or command.help,
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        command.add_arguments(sub)
        sub.set_defaults(command_spec=command, subparser=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fit"]:
        return run_fit(argv[1:])
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # reported by the subcommand, whose usage line is the helpful one
            args.subparser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exit_:  # argparse exits 2 on bad usage and 0 after --help
        return int(exit_.code or 0)
    command: Command = args.command_spec
    try:
        return command.run(args)
    except UsageError as err:
        args.subparser.print_usage(sys.stderr)
        print(f"lightning-peft {command.name}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"lightning-peft {command.name}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
