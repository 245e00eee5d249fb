"""``kvtrie sweep``: every policy at every budget over one trace, with plots."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..build import parse_size, trace_inputs, trace_path
from . import (
    EXIT_OK,
    UsageError,
    add_time_options,
    common_options,
    executor_options,
    open_executor,
    positive,
    read_options,
    read_time_options,
    trace_options,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    sweep = sub.add_parser(
        "sweep",
        parents=[common_options(), trace_options()],
        help="every policy at every budget over one trace, with plots",
        description="Replay one trace through kvtrie's policies and simulated peers (no cache, "
        "the single-entry cache, mlx-lm's prompt cache simulated and real, SGLang's radix "
        "cache, vLLM's block cache, llama.cpp's slots, the infinite ideal and an offline "
        "Belady bound) at each budget, with the same byte accounting, on all cores (or a Ray "
        "cluster's, with --executor ray). Writes sweep.json, sweep.csv, sweep.md and PNG plots "
        "to --out.",
    )
    sweep.add_argument("trace", help="a trace file or a bundled trace name")
    sweep.add_argument(
        "--budgets",
        default="1GiB,2GiB,4GiB,8GiB,16GiB,32GiB,inf",
        help="comma-separated budgets (default 1GiB,...,32GiB,inf)",
    )
    sweep.add_argument(
        "--disk-budgets",
        default=None,
        metavar="SIZES",
        help="also run kvtrie's policies with a disk tier of each of these sizes (e.g. "
        "256GiB,1TiB,4TiB,inf) at every RAM budget: a simulated disk, bytes counted; the hit "
        "ratios go in a RAM x disk table and a heat map per policy (disk_POLICY.png)",
    )
    sweep.add_argument("--policies", default="all", help="'all' or a comma-separated list")
    sweep.add_argument("--model", default="llama-8b", help="fake model profile (default llama-8b)")
    sweep.add_argument(
        "--limit", type=int, default=None, metavar="N", help="only the first N requests"
    )
    sweep.add_argument(
        "--processes",
        type=int,
        default=None,
        help="cells at a time (default: every core of this machine, or of the Ray cluster)",
    )
    executor_options(sweep)
    sweep.add_argument("--out", type=Path, default=Path("sweep-out"), help="output folder")
    add_time_options(sweep)
    sweep.add_argument("-q", "--quiet", action="store_true", help="no table, no progress bar")
    sweep.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvtrie.backends.profiles import get_profile

    from ..outputs import check_output_dir
    from ..sweep import ALL_POLICIES, SWEEP_FILES, materialize, run_sweep, write_sweep
    from ..traces import load_trace

    try:
        budgets = [parse_size(b, "--budgets") for b in args.budgets.split(",") if b.strip()]
        if not budgets:
            raise UsageError("--budgets: give at least one budget, e.g. 1GiB,8GiB,inf")
        disk_budgets = None
        if args.disk_budgets is not None:
            disk_budgets = [
                parse_size(b, "--disk-budgets") for b in args.disk_budgets.split(",") if b.strip()
            ]
            if not disk_budgets:
                raise UsageError("--disk-budgets: give at least one size, e.g. 1TiB,inf")
        policies = list(ALL_POLICIES) if args.policies == "all" else args.policies.split(",")
        unknown = [p for p in policies if p not in ALL_POLICIES]
        if unknown:
            raise UsageError(
                f"--policies: unknown {', '.join(unknown)}; choose from {', '.join(ALL_POLICIES)}"
            )
        positive("--limit", args.limit)
        positive("--processes", args.processes)
        path = trace_path(args.trace)
        check_output_dir("--out", args.out, SWEEP_FILES, trace_inputs(path))
        profile = get_profile(args.model)
        cost = read_time_options(args, profile.name)
        trace = load_trace(path, vocab_size=profile.vocab_size, options=read_options(args))
        if args.limit is not None:
            trace.requests = trace.requests[: args.limit]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    started = time.perf_counter()
    # the executor first: one that can't start (a cluster not there) is bad input, found
    # before the workload is built
    with open_executor(args, args.processes) as executor:
        workload = materialize(trace, profile)
        marks = [request.user_snapshots for request in trace.requests]
        rows, timelines = run_sweep(
            workload,
            profile,
            budgets,
            policies,
            executor,
            progress=False if args.quiet else None,
            marks=marks,
            disk_budgets=disk_budgets,
            arrivals_ms=[r.arrival_ms / args.time_scale for r in trace.requests],
            cost=cost,
        )
    meta = {
        "trace": trace.path,
        "sha256": trace.sha256,
        "reading": trace.reading,
        "model": profile.name,
        "requests": len(workload),
        "executor": args.executor,
        "cost": cost.name if cost is not None else None,
        "time_scale": args.time_scale,
        "wall_seconds": time.perf_counter() - started,
    }
    files = write_sweep(args.out, meta, rows, budgets, timelines)
    if not args.quiet:
        print((args.out / "sweep.md").read_text())
    print(f"wrote {', '.join(str(args.out / f) for f in files)} in {meta['wall_seconds']:.1f} s")
    return EXIT_OK
