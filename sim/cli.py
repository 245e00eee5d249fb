"""The ``kvtrie`` command line: one entry point, one subcommand a job (see ``commands/``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from kvtrie import __version__

from .commands import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_OK,
    UsageError,
    bench,
    calibrate,
    convert,
    fuzz,
    gate,
    gen,
    record,
    replay,
    serve,
    sweep,
    traces,
)

__all__ = ["build_parser", "main"]

COMMANDS = (replay, gen, convert, sweep, gate, fuzz, bench, calibrate, traces, record, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvtrie",
        description="A prefix-trie KV cache shared across LLM conversations: replay traces "
        "through it, fuzz it, sweep budgets and gate regressions.",
    )
    parser.add_argument("--version", action="version", version=f"kvtrie {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log cache events (-v: hits and misses, -vv: every page in/out)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
    """The command, with bad input as one line and exit 2, and anything unexpected as exit 3
    (never 1, which means the tool found a problem)."""
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"kvtrie {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"kvtrie {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (| head): not an error of ours; point stdout at
        # /dev/null so the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        if args.verbose:
            traceback.print_exc()
        where = "" if args.verbose else " (run with -v for the traceback)"
        print(
            f"kvtrie {args.command}: internal error, please report{where}: "
            f"{type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # only kvtrie serve passes options on (to mlx_lm.server)
        if not getattr(args, "passthrough", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.extra = extra
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
