"""One module a subcommand: each holds its argparse setup (``add_parser``) beside its
handler (``run``), which returns the exit code."""

from __future__ import annotations

import argparse

EXIT_OK, EXIT_VIOLATION, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
MUTATION_KILL_TARGET = 0.9


class UsageError(ValueError):
    """Bad input or usage, found before any work started: one line, exit 2."""


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand also takes after its name (``kvtrie replay agent -v``)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="log cache events (-v: hits and misses, -vv: every page in/out); with an "
        "internal error, print its traceback",
    )
    return parent


def positive(option: str, value: int | None) -> None:
    """``option`` must be an integer >= 1 when given."""
    if value is not None and value < 1:
        raise UsageError(f"{option} must be >= 1, got {value}")
