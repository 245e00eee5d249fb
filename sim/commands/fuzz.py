"""``kvtrie fuzz``: stateful fuzzing against the oracle, and the mutation check."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from . import EXIT_OK, EXIT_VIOLATION, MUTATION_KILL_TARGET, UsageError, common_options, positive


def add_parser(sub: argparse._SubParsersAction) -> None:
    fuzz = sub.add_parser(
        "fuzz",
        parents=[common_options()],
        help="stateful fuzzing of the cache against an oracle; mutation check",
        description="Drive the cache with Hypothesis through conversations that share and "
        "branch prefixes, budget changes down to zero, injected restore failures and corrupt "
        "snapshots, checking every invariant and the fresh-prefill oracle after every step. A "
        "failure is shrunk and written as a kvtrie trace that kvtrie replay reproduces. "
        "--mutants all runs the same fuzzer against each named mutant of the cache and "
        "prints which it kills. Exit 1 on a failure (or a kill rate under 90%), 2 on bad input.",
    )
    fuzz.add_argument("--backend", choices=["fake", "mlx"], default="fake")
    fuzz.add_argument(
        "--model",
        default=None,
        help="fake profile or MLX model (default: each example draws one of tiny-attention, "
        "tiny-swa and, for all three layer kinds, tiny-mixed on fake or tiny-hybrid on MLX)",
    )
    fuzz.add_argument(
        "--profile",
        choices=["quick", "nightly"],
        default="quick",
        help="quick: 300 examples on fake, 24 on MLX; nightly: 10,000 and 500",
    )
    fuzz.add_argument("--examples", type=int, default=None, help="override the profile's count")
    fuzz.add_argument("--steps", type=int, default=None, help="steps per example")
    fuzz.add_argument(
        "--seed",
        type=int,
        default=None,
        help="random seed (default: derandomized, the same run every time)",
    )
    group = fuzz.add_mutually_exclusive_group()
    group.add_argument("--mutant", default=None, help="fuzz one named mutant of the cache")
    group.add_argument("--mutants", choices=["all"], default=None, help="fuzz every mutant")
    fuzz.add_argument(
        "--time-limit",
        type=float,
        default=60.0,
        help="seconds each mutant gets to be killed (default 60)",
    )
    fuzz.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where shrunk failures go (default tests/regressions, or "
        "fuzz-mutants for mutation runs)",
    )
    fuzz.add_argument("--report", type=Path, help="write the JSON results here")
    fuzz.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    fuzz.set_defaults(func=run)


def _fuzz_summary(result) -> str:
    return (
        f"{result.examples} state machines run (the generated examples, plus those "
        f"Hypothesis replays and shrinks), {result.steps} steps, {len(result.shapes)} distinct trie "
        f"shapes, max depth {result.max_depth}, {result.totals.splits} splits, "
        f"{result.totals.merges} merges, {result.totals.evictions} evictions, "
        f"{result.totals.restore_failures} restore failures, "
        f"{result.seconds:.1f} s"
    )


def run(args: argparse.Namespace) -> int:
    from ..build import make_backend
    from ..fuzz import PROFILES, FuzzConfig, run_fuzz
    from ..mutants import MUTANTS
    from ..outputs import check_output, check_output_dir, write_output
    from ..report import report_json

    fake_examples, mlx_examples, steps = PROFILES[args.profile]
    names = list(MUTANTS) if args.mutants == "all" else [args.mutant]
    mutation = names != [None]
    out = args.out or Path("fuzz-mutants" if mutation else "tests/regressions")
    try:
        if args.mutant is not None and args.mutant not in MUTANTS:
            raise UsageError(f"unknown mutant {args.mutant!r}; choose one of {', '.join(MUTANTS)}")
        positive("--examples", args.examples)
        positive("--steps", args.steps)
        if not args.time_limit > 0:
            raise UsageError(f"--time-limit must be > 0 seconds, got {args.time_limit}")
        if args.model is not None:
            make_backend(args.backend, args.model)  # a bad name fails here, before any work
        check_output_dir("--out", out)
        if args.report is not None:
            check_output("--report", args.report)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    out.mkdir(parents=True, exist_ok=True)
    base = FuzzConfig(
        backend=args.backend,
        model=args.model,
        examples=args.examples or (fake_examples if args.backend == "fake" else mlx_examples),
        steps=args.steps or steps,
        seed=args.seed,
        out_dir=out,
        time_limit=args.time_limit if mutation else None,
        progress=not args.quiet,
    )
    report: dict = {"backend": args.backend, "models": list(base.models), "profile": args.profile}
    if not mutation:
        result = run_fuzz(base)
        print(f"fuzz {args.backend}/{','.join(base.models)}: {_fuzz_summary(result)}")
        if result.failure:
            print(
                f"FAILED: {result.failure}\nshrunk to {result.shrunk_requests} requests: "
                f"{result.regression_trace} (kvtrie replay reproduces it)"
            )
        report["reached"] = {
            "examples_per_model": dict(result.models),
            "trie_shapes": len(result.shapes),
            "max_depth": result.max_depth,
            "splits": result.totals.splits,
            "merges": result.totals.merges,
            "evictions": result.totals.evictions,
            "restore_failures": result.totals.restore_failures,
        }
        report.update(
            examples=result.examples,
            steps=result.steps,
            failures=1 if result.failure else 0,
            regression_traces=[result.regression_trace] if result.regression_trace else [],
        )
        code = EXIT_VIOLATION if result.failure else EXIT_OK
    else:
        rows = []
        print(f"{'mutant':32} {'result':9} {'seconds':>8} {'shrunk requests':>16}")
        for name in names:
            result = run_fuzz(replace(base, mutant=name))
            killed = result.failure is not None
            rows.append(
                {
                    "name": name,
                    "killed": killed,
                    "seconds": round(result.seconds, 2),
                    "shrunk_requests": result.shrunk_requests,
                    "failure": result.failure,
                    "regression_trace": result.regression_trace,
                }
            )
            print(
                f"{name:32} {'killed' if killed else 'SURVIVED':9} {result.seconds:8.1f} "
                f"{result.shrunk_requests if killed else '-':>16}"
            )
        kill_rate = sum(r["killed"] for r in rows) / len(rows)
        print(f"kill rate {kill_rate:.0%} ({sum(r['killed'] for r in rows)}/{len(rows)})")
        report.update(
            examples=base.examples,
            steps=base.steps,
            failures=0,
            mutants=rows,
            kill_rate=kill_rate,
            regression_traces=[r["regression_trace"] for r in rows if r["regression_trace"]],
        )
        code = EXIT_OK if kill_rate >= MUTATION_KILL_TARGET else EXIT_VIOLATION
    if args.report:
        write_output(args.report, report_json(report))
    return code
