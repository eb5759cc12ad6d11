"""``lightning-peft export``: a checkpoint's adapter in the PEFT format, or a merged model."""

from __future__ import annotations

import argparse

from lightning_peft.cli.common import EXIT_OK, UsageError, progress

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


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
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


def run_export(args: argparse.Namespace) -> int:
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
            progress=progress,
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
            progress=progress,
            allow_non_finite=args.allow_non_finite,
        )
    print(f"wrote {result.format} export to {result.path} ({result.tensors} tensors)")
    if result.note:
        progress(f"note: {result.note}")
    return EXIT_OK
