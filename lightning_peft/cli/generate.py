"""The ``lightning-peft generate`` command: its arguments and what it runs.

Nothing heavy is imported here: ``lightning-peft --help`` builds this parser, and torch and transformers
(:mod:`lightning_peft.generation.generate`) load only when the command runs with arguments that make sense.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from lightning_peft.cli.common import EXIT_OK, UsageError, progress
from lightning_peft.generation.settings import DEFAULT_SETTINGS_FILE, GenerationSettings

GENERATE_DESCRIPTION = """\
Generate text, offline, with a whole model folder (--model, e.g. `export --merged` output), a base
model plus an adapter folder (--base --adapter; Hugging Face PEFT format or lightning_peft layout), or
a base model plus a checkpoint of the PEFT callback (--base --checkpoint).

Prompts: PROMPT arguments or --prompt (repeatable), or --prompts FILE (one per line; a .jsonl file:
one object per line with a "prompt" field). With --template (the one the model was tuned with:
alpaca, chat, or a YAML file like lightning_peft/conf/template/alpaca.yaml) each prompt is the
instruction, and each .jsonl record fills the template's fields (instruction, input, ...). Settings: --config FILE, a YAML mapping of
GenerationSettings fields (max_new_tokens: 32, stop_strings: ["\\n"], ...), each flag below
overriding it; without it, the shipped lightning_peft/conf/generation.yaml, which lists every field
at its default. --stop understands \\n and \\t.

Completions stream to stdout when it is a terminal (or with --stream); otherwise they are printed
when done, unless --jsonl OUT, which writes one object per completion: prompt, completion,
num_tokens, stop_reason (eos, stop_string or length), stop_string, sequence, settings.

  lightning-peft generate --model merged "Once upon a time"
  lightning-peft generate --base base --adapter my-adapter --prompts prompts.jsonl --jsonl out.jsonl
  lightning-peft generate --base base --checkpoint last.ckpt --do-sample --temperature 0.7 --seed 0 \\
      --stop '\\n' --ban darn --force please "Ask nicely:"
"""


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser.add_argument_group("model"))
    _add_prompt_arguments(parser.add_argument_group("prompts"))
    _add_settings_arguments(parser.add_argument_group("settings (override --config)"))
    output = parser.add_argument_group("output")
    output.add_argument(
        "--stream", action=argparse.BooleanOptionalAction, help="stream completions to stdout"
    )
    output.add_argument("--jsonl", metavar="OUT", help="write one JSON object per completion to OUT")
    output.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def _add_model_arguments(source: argparse._ArgumentGroup) -> None:
    source.add_argument("--model", metavar="DIR", help="a whole transformers model folder")
    source.add_argument("--base", metavar="DIR", help="the base model folder, with --adapter or --checkpoint")
    source.add_argument(
        "--adapter", metavar="DIR", help="an adapter folder (PEFT format or lightning_peft layout)"
    )
    source.add_argument(
        "--checkpoint", metavar="CKPT", help="an adapter-only checkpoint of the PEFT callback"
    )
    source.add_argument(
        "--tokenizer", metavar="DIR", help="tokenizer folder (default: adapter, then model folder)"
    )
    source.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def _add_prompt_arguments(text: argparse._ArgumentGroup) -> None:
    text.add_argument("prompt_args", nargs="*", metavar="PROMPT", help="prompts to complete")
    text.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    text.add_argument("--prompts", metavar="FILE", help="prompts, one per line, or a .jsonl file")
    text.add_argument(
        "--template",
        metavar="NAME|FILE",
        help="format prompts with a prompt template (alpaca, chat, or a YAML file): a .jsonl record's "
        "fields fill it, a plain prompt is the instruction",
    )


def _add_settings_arguments(controls: argparse._ArgumentGroup) -> None:
    controls.add_argument(
        "--config",
        metavar="FILE",
        help="YAML file of generation settings (default: the shipped conf/generation.yaml)",
    )
    controls.add_argument("--max-new-tokens", type=int, metavar="N")
    controls.add_argument(
        "--do-sample", action=argparse.BooleanOptionalAction, help="sample instead of greedy"
    )
    controls.add_argument("--temperature", type=float, metavar="T")
    controls.add_argument("--top-p", type=float, metavar="P")
    controls.add_argument("--top-k", type=int, metavar="K")
    controls.add_argument("--repetition-penalty", type=float, metavar="R")
    for flag, dest, metavar, what in (
        ("--stop", "stop_strings", "TEXT", "stop string"),
        ("--ban", "bad_words", "WORD", "banned word"),
        ("--force", "force_words", "WORD", "forced word"),
    ):
        controls.add_argument(
            flag,
            dest=dest,
            action="append",
            metavar=metavar,
            help=f"{what} (repeatable; replaces the list in --config)",
        )
    controls.add_argument("--seed", type=int, metavar="N")
    controls.add_argument("--num-return-sequences", type=int, metavar="N")
    controls.add_argument("--batch-size", type=int, metavar="N")


def run_generate(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _check_sources(args)
    settings = _settings(args)
    single = settings.batch_size == 1 and settings.num_return_sequences == 1
    if args.stream and not single:
        raise UsageError(
            "--stream shows one completion at a time: it needs --batch-size 1 and --num-return-sequences 1"
        )
    stream = args.stream if args.stream is not None else single and sys.stdout.isatty()
    if args.jsonl and Path(args.jsonl).exists() and not args.overwrite:
        raise FileExistsError(f"{args.jsonl} exists already; pass --overwrite to replace it")
    if args.prompts and not Path(args.prompts).is_file():
        raise FileNotFoundError(f"no prompt file at {args.prompts}")
    # torch and transformers load only now, once the arguments make sense
    from lightning_peft.generation.generate import generate, load_for_generation, write_jsonl
    from lightning_peft.generation.templates import load_template

    try:
        template = load_template(args.template) if args.template else None
    except ValueError as err:
        raise UsageError(str(err)) from err
    if not settings.do_sample and any(
        getattr(args, k) is not None for k in ("temperature", "top_p", "top_k")
    ):
        progress("note: --temperature, --top-p and --top-k apply only with --do-sample")
    model, tokenizer = load_for_generation(
        args.model,
        base=args.base,
        adapter=args.adapter,
        checkpoint=args.checkpoint,
        tokenizer=args.tokenizer,
        device=args.device,
        progress=progress,
    )
    prompts = _prompts(args, template, tokenizer)
    progress(f"generating {len(prompts)} prompt{'s' * (len(prompts) != 1)}")
    records = generate(model, tokenizer, prompts, settings, stream=sys.stdout if stream else None)
    if not stream and not args.jsonl:
        for record in records:
            print(record["completion"])
    if args.jsonl:
        write_jsonl(records, args.jsonl, overwrite=args.overwrite)
        progress(f"wrote {len(records)} completions to {args.jsonl}")
    return EXIT_OK


def _check_sources(args: argparse.Namespace) -> None:
    """One model source and one prompt source, or a usage error saying what to pass."""
    if args.model and (args.base or args.adapter or args.checkpoint):
        raise UsageError("--model is a whole model folder; --adapter and --checkpoint go with --base")
    if not args.model and not args.base:
        raise UsageError("pass --model DIR, or --base DIR with --adapter DIR or --checkpoint CKPT")
    if args.base and (args.adapter is None) == (args.checkpoint is None):
        raise UsageError("--base needs one of --adapter DIR or --checkpoint CKPT")
    inline = [*args.prompt_args, *args.prompt]
    if args.prompts and inline:
        raise UsageError("give prompts on the command line or with --prompts FILE, not both")
    if not args.prompts and not inline:
        raise UsageError("no prompt: pass PROMPT, --prompt TEXT or --prompts FILE")


def _settings(args: argparse.Namespace) -> GenerationSettings:
    """The --config file (or the shipped defaults) with the flags given replacing its values."""
    overrides = {f.name: getattr(args, f.name) for f in fields(GenerationSettings)}
    if args.stop_strings:
        overrides["stop_strings"] = [_unescape(stop) for stop in args.stop_strings]
    try:
        return GenerationSettings.from_file(args.config or DEFAULT_SETTINGS_FILE, **overrides)
    except ValueError as err:
        raise UsageError(str(err)) from err


def _prompts(args: argparse.Namespace, template: Any, tokenizer: Any) -> list[str]:
    """The prompts, formatted by ``template`` once the tokenizer is loaded (a chat template lives in it)."""
    from lightning_peft.generation.generate import read_prompts

    inline = [*args.prompt_args, *args.prompt]
    if template is None:
        return read_prompts(args.prompts) if args.prompts else inline

    def fill(record: dict) -> str:
        return template.prompt_text(record, tokenizer)

    if args.prompts and Path(args.prompts).suffix == ".jsonl":
        return read_prompts(args.prompts, format_record=fill)
    lines = read_prompts(args.prompts) if args.prompts else inline
    return [fill({"instruction": line, "input": ""}) for line in lines]


def _unescape(text: str) -> str:
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)
