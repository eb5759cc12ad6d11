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
from collections.abc import Sequence

from lightning_peft.cli.common import EXIT_CODES, EXIT_ERROR, EXIT_OK, EXIT_USAGE, Command, UsageError
from lightning_peft.cli.export import EXPORT_DESCRIPTION, add_export_arguments, run_export
from lightning_peft.cli.generate import GENERATE_DESCRIPTION, add_generate_arguments, run_generate
from lightning_peft.cli.plan import PLAN_DESCRIPTION, add_plan_arguments, run_plan

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
    from lightning_peft.cli import fit, sweep

    saved_argv, saved_spec = sys.argv, getattr(__main__, "__spec__", None)
    sys.argv = ["lightning-peft fit", *overrides]
    # Lightning's ddp launcher starts the other ranks with `python -m <__main__.__spec__.name> *sys.argv[1:]`
    # (or `python <sys.argv[0]> ...` without a spec). Naming lightning_peft.cli.fit as the main module makes that
    # command the same job: `python -m lightning_peft.cli.fit <overrides>`, which runs fit's Hydra main.
    __main__.__spec__ = importlib.util.find_spec("lightning_peft.cli.fit")
    sweep.SWEEP_FAILURES.clear()
    try:
        fit.main()
    except SystemExit as exit_:  # Hydra exits 1 on errors (after printing them) and 0 after --help
        return int(exit_.code or 0)
    finally:
        sys.argv = saved_argv
        __main__.__spec__ = saved_spec
    return min(len(sweep.SWEEP_FAILURES), 125)


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
        add_export_arguments,
        run_export,
        EXPORT_DESCRIPTION,
    ),
    Command(
        "plan",
        "estimate training memory (full / LoRA / QLoRA) from a model config, allocating nothing",
        add_plan_arguments,
        run_plan,
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
