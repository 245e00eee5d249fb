"""One module a subcommand: each holds its argparse setup (``add_parser``) beside its
handler (``run``), which returns the exit code."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..traces import ReadOptions

if TYPE_CHECKING:
    from ..costs import CostModel
    from ..executors import Executor

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


def trace_options() -> argparse.ArgumentParser:
    """How to read a trace file whose format leaves it open (every command that reads one)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("reading the trace")
    group.add_argument(
        "--format",
        default="auto",
        choices=["auto", "kvtrie", "mooncake", "bailian", "agentic"],
        help="the trace's format (default auto: detected from its first line; a directory "
        "is a set of agentic conversation files)",
    )
    group.add_argument(
        "--block-size",
        type=int,
        default=None,
        metavar="N",
        help="tokens one hash id stands for (default: mooncake 512, bailian 16, agentic "
        "the file's block_size)",
    )
    group.add_argument(
        "--block-convention",
        choices=["ceil", "floor"],
        default=None,
        help="ceil: the partial last block has an id (Mooncake, Bailian); floor: it is not "
        "hashed (agentic traces, some tools)",
    )
    group.add_argument(
        "--sessions-per-hour",
        type=float,
        default=None,
        metavar="R",
        help="agentic traces: start conversations by a Poisson process of R an hour "
        "(default: all at once)",
    )
    group.add_argument(
        "--concurrency",
        type=int,
        default=None,
        metavar="N",
        help="agentic traces: N conversations at a time, the next when one ends",
    )
    group.add_argument(
        "--arrival-seed", type=int, default=0, metavar="S", help="seed of --sessions-per-hour"
    )
    return parent


def read_options(args: argparse.Namespace) -> ReadOptions:
    """The :class:`~kvtrie.sim.traces.ReadOptions` of ``trace_options()``; a ValueError names
    the bad option."""
    return ReadOptions(
        format=args.format,
        block_size=args.block_size,
        block_convention=args.block_convention,
        sessions_per_hour=args.sessions_per_hour,
        concurrency=args.concurrency,
        arrival_seed=args.arrival_seed,
    )


def add_time_options(parser: argparse.ArgumentParser) -> None:
    """--cost and --time-scale: the time model's figures and the arrivals' pace."""
    from ..costs import shipped_costs

    timing = parser.add_argument_group("seconds: the time model")
    timing.add_argument(
        "--cost",
        default=None,
        metavar="NAME|FILE",
        help=f"cost figures: a shipped entry ({', '.join(shipped_costs())}) or a TOML file with one "
        "[costs.NAME] table (see backends/costs.toml for the form; kvtrie calibrate writes "
        "one); default: the shipped entry for the model, if there is one. Estimated prefill "
        "seconds with and without the cache and TTFT under the trace's arrival times go in "
        "the report",
    )
    timing.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        metavar="S",
        help="replay the trace's arrivals S times faster (0.5: twice as slow; default 1)",
    )


def read_time_options(
    args: argparse.Namespace, model: str, header: dict | None = None, path: Path | None = None
) -> CostModel | None:
    """The cost figures ``--cost`` names for ``model``, else the trace header's ``cost``
    table (a fuzzer's regression trace carries the figures its caches weighed disk reads
    with), else the shipped ones (None: no time model); a bad ``--time-scale`` or cost file
    is a UsageError, a bad header table a ValueError naming the file and key."""
    from ..costs import cost_for, cost_from_table

    if not (args.time_scale > 0 and args.time_scale < float("inf")):
        raise UsageError(f"--time-scale must be a number > 0, got {args.time_scale}")
    if args.cost is None and header and "cost" in header:
        return cost_from_table("from-trace", header["cost"], f"{path}:1: header cost")
    return cost_for(model, args.cost)


def positive(option: str, value: int | None) -> None:
    """``option`` must be an integer >= 1 when given."""
    if value is not None and value < 1:
        raise UsageError(f"{option} must be >= 1, got {value}")


def executor_options(parser: argparse.ArgumentParser) -> None:
    """Where the work runs (``kvtrie sweep``, ``kvtrie fuzz``)."""
    group = parser.add_argument_group("where the work runs")
    group.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="local: this machine's processes (default); ray: a Ray cluster (pip install "
        "'kvtrie[ray]'), the same results",
    )
    group.add_argument(
        "--address",
        default=None,
        metavar="ADDR",
        help="the Ray cluster to join (host:port, or auto); default: start a Ray instance on "
        "this machine. Each node needs this version of kvtrie installed",
    )


@contextlib.contextmanager
def open_executor(
    args: argparse.Namespace, workers: int | None, fork: bool = True
) -> Iterator[Executor]:
    """The executor of ``executor_options()`` (local workers forked unless ``fork`` is
    False), closed after the work; one that cannot start is bad usage (exit 2)."""
    from ..executors import ExecutorUnavailable, make_executor

    try:
        executor = make_executor(args.executor, workers, args.address, fork)
    except ExecutorUnavailable as why:
        raise UsageError(str(why)) from None
    try:
        yield executor
    finally:
        executor.close()
