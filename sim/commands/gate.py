"""``kvtrie gate``: fail a change that lowers the hit ratio or breaks an invariant."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import EXIT_OK, EXIT_VIOLATION, UsageError, common_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    gate = sub.add_parser(
        "gate",
        parents=[common_options()],
        help="fail when a change lowers the hit ratio or breaks an invariant",
        description="Run the checks of gate.toml (replays and a quick fuzz run), compare each "
        "metric with the committed baseline and fail on a regression beyond the tolerance: a "
        "lower hit ratio, more computed tokens or paged-out bytes, a slower replay (as a ratio "
        "to a reference replay in the same run), or any violation. Exit 0 pass, 1 regression, "
        "2 bad configuration.",
    )
    gate.add_argument(
        "--config",
        type=Path,
        default=Path("gate.toml"),
        help="the gate's TOML file (default gate.toml)",
    )
    gate.add_argument("--quick", action="store_true", help="only the checks marked quick")
    gate.add_argument(
        "--update-baseline",
        action="store_true",
        help="rewrite the baseline with this run's figures (after an intended change)",
    )
    gate.add_argument(
        "--markdown",
        type=Path,
        help="also write the table as Markdown here ($GITHUB_STEP_SUMMARY gets it when set)",
    )
    gate.add_argument("--junit", type=Path, help="write JUnit XML, one test case a check")
    gate.add_argument(
        "--mutant", default=None, help="run the gate against a named mutant (to see it fail)"
    )
    gate.add_argument(
        "--time-tolerance",
        type=float,
        default=None,
        help="override gate.toml's time tolerance (e.g. on a loaded machine)",
    )
    gate.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    gate.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from ..gate import junit, load_config, markdown, run_gate, table
    from ..mutants import MUTANTS, mutated
    from ..outputs import check_output, write_output

    try:
        config = load_config(args.config, needs_baseline=not args.update_baseline)
        if args.mutant is not None and args.mutant not in MUTANTS:
            raise UsageError(f"unknown mutant {args.mutant!r}; choose one of {', '.join(MUTANTS)}")
        if args.time_tolerance is not None and not args.time_tolerance >= 0:
            raise UsageError(f"--time-tolerance must be a number >= 0, got {args.time_tolerance}")
        for option, out in (("--markdown", args.markdown), ("--junit", args.junit)):
            if out is not None:
                check_output(option, out, [args.config, config.baseline])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.time_tolerance is not None:
        config.time_tolerance = args.time_tolerance
    say = None if args.quiet else (lambda name: print(f"gate: {name} ...", file=sys.stderr))
    with mutated(args.mutant):
        rows, results = run_gate(config, args.quick, args.update_baseline, say)
    print(table(rows))
    passed = all(r.ok for r in rows)
    print(
        f"gate {'passed' if passed else 'FAILED'}"
        + (f"; baseline rewritten: {config.baseline}" if args.update_baseline else "")
    )
    summary = markdown(rows)
    if args.markdown:
        write_output(args.markdown, summary)
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as handle:
            handle.write(summary)
    if args.junit:
        seconds = {name: m.get("seconds", 0.0) for name, m in results["checks"].items()}
        write_output(args.junit, junit(rows, seconds))
    return EXIT_OK if passed or args.update_baseline else EXIT_VIOLATION
