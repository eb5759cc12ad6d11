"""What every ``lightning-peft`` subcommand shares: the :class:`Command` record, exit codes, usage
errors and the progress line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

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


def progress(line: str) -> None:
    print(f"lightning-peft: {line}", file=sys.stderr, flush=True)
