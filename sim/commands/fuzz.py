"""``kvtrie fuzz``: stateful fuzzing against the oracle, and the mutation check."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from ..mutants import AREAS
from . import (
    EXIT_OK,
    EXIT_VIOLATION,
    MUTATION_KILL_TARGET,
    UsageError,
    common_options,
    executor_options,
    open_executor,
    positive,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    fuzz = sub.add_parser(
        "fuzz",
        parents=[common_options()],
        help="stateful fuzzing of the cache against an oracle; mutation check",
        description="Drive the cache with Hypothesis through conversations that share and "
        "branch prefixes, budget changes down to zero, injected restore failures and corrupt "
        "snapshots, checking every invariant and the fresh-prefill oracle after every step. A "
        "failure is shrunk and written as a kvtrie trace that kvtrie replay reproduces. "
        "--mutants all is the mutation check: each named mutant (of the core, the strategies, "
        "both backends, the checker and the replayer) faces the self-tests, then the fuzzer; "
        "a fuzzer kill counts only if its shrunk trace fails on the mutant and replays clean on "
        "the real code, and a Hypothesis error is an error, not a kill. Exit 1 on a failure, an "
        "error, or an area's kill rate under 90%; 2 on bad input. --workers, --duration or "
        "--executor ray make it a campaign: independent shards with seeds of their own, "
        "side by side on this machine or a Ray cluster, each failure shrunk where it ran and "
        "written here with its seed.",
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
    group.add_argument(
        "--mutant",
        default=None,
        help="fuzz one named mutant; a kill is confirmed by replaying the shrunk trace",
    )
    group.add_argument(
        "--mutants",
        choices=["all", *AREAS],
        default=None,
        help="the mutation check: every mutant (all) or one area's",
    )
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
    campaign = fuzz.add_argument_group("a campaign of shards")
    campaign.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="shards at a time (default: every core of this machine, or of the Ray cluster); "
        "shard k draws with seed S*1000000+k, S being --seed (default 0)",
    )
    campaign.add_argument(
        "--duration",
        default=None,
        metavar="TIME",
        help="start shards until TIME is spent (90s, 10m, 1h), those running then finish; "
        "default: one shard a worker. A shard is --examples (or the profile's) examples",
    )
    executor_options(fuzz)
    fuzz.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    fuzz.set_defaults(func=run)


def _fuzz_summary(result) -> str:
    return (
        f"{result.examples} state machines run (the generated examples, plus those "
        f"Hypothesis replays and shrinks), {result.steps} steps, {len(result.shapes)} distinct trie "
        f"shapes, max depth {result.max_depth}, {result.totals.splits} splits, "
        f"{result.totals.merges} merges, {result.totals.evictions} evictions, "
        f"{result.totals.restore_failures} restore failures, "
        f"{result.totals.moves_to_disk} moves to disk, {result.totals.disk_page_ins} page-ins "
        f"from disk, {result.totals.disk_reads_skipped} disk reads skipped for recompute, "
        f"{result.totals.disk_evictions} disk evictions, {result.totals.restarts} "
        f"restarts adopting {result.totals.adopted_nodes} nodes, {result.seconds:.1f} s"
    )


def run(args: argparse.Namespace) -> int:
    from ..build import make_backend, parse_duration
    from ..fuzz import PROFILES, FuzzConfig, run_fuzz
    from ..mutants import MUTANTS
    from ..outputs import check_output, check_output_dir, write_output
    from ..report import report_json

    fake_examples, mlx_examples, steps = PROFILES[args.profile]
    if args.mutants is None:
        names = [args.mutant]
    else:
        names = [n for n, m in MUTANTS.items() if args.mutants in ("all", m.area)]
    mutation = names != [None]
    campaign = args.workers is not None or args.duration is not None or args.executor != "local"
    out = args.out or Path("fuzz-mutants" if mutation else "tests/regressions")
    try:
        if args.mutant is not None and args.mutant not in MUTANTS:
            raise UsageError(f"unknown mutant {args.mutant!r}; choose one of {', '.join(MUTANTS)}")
        positive("--examples", args.examples)
        positive("--steps", args.steps)
        positive("--workers", args.workers)
        duration = None if args.duration is None else parse_duration(args.duration, "--duration")
        if campaign and mutation:
            raise UsageError(
                "--workers, --duration and --executor ray run a campaign of the "
                "real code; not with --mutant or --mutants"
            )
        if args.address is not None and args.executor != "ray":
            raise UsageError("--address needs --executor ray")
        if not args.time_limit > 0:
            raise UsageError(f"--time-limit must be > 0 seconds, got {args.time_limit}")
        if args.model is not None:
            make_backend(args.backend, args.model)  # a bad name fails here, before any work
        check_output_dir("--out", out)
        if args.report is not None:
            check_output("--report", args.report)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not campaign:  # a campaign makes it once its executor is up (it may not start)
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
    if campaign:
        code = _campaign(args, base, duration, report)
    elif not mutation:
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
            "moves_to_disk": result.totals.moves_to_disk,
            "disk_page_ins": result.totals.disk_page_ins,
            "disk_reads_skipped": result.totals.disk_reads_skipped,
            "disk_read_failures": result.totals.disk_read_failures,
            "disk_evictions": result.totals.disk_evictions,
            "disk_write_failures": result.totals.disk_write_failures,
            "restarts": result.totals.restarts,
            "adopted_nodes": result.totals.adopted_nodes,
        }
        report.update(
            examples=result.examples,
            steps=result.steps,
            failures=1 if result.failure else 0,
            regression_traces=[result.regression_trace] if result.regression_trace else [],
        )
        if result.error:
            print(f"ERROR: Hypothesis could not run the fuzzer: {result.error}")
        report["error"] = result.error
        code = EXIT_VIOLATION if result.failure or result.error else EXIT_OK
    else:
        configs = {
            "fake": replace(base, backend="fake", examples=args.examples or fake_examples),
            "mlx": replace(base, backend="mlx", examples=args.examples or mlx_examples),
        }
        # --mutant NAME fuzzes that mutant; --mutants runs the whole mutation check
        code = _mutation_check(names, configs, report, selftests=args.mutants is not None)
    if args.report:
        write_output(args.report, report_json(report))
    return code


def _campaign(args: argparse.Namespace, base, duration: float | None, report: dict) -> int:
    """Shards of the fuzzer side by side; a line a worker, and exit 1 on any failure or error."""
    from ..campaign import run_campaign

    # spawned, not forked: a shard builds MLX models, and Metal's state does not survive a fork
    with open_executor(args, args.workers, fork=False) as executor:
        base.out_dir.mkdir(parents=True, exist_ok=True)
        result = run_campaign(
            base,
            executor,
            duration,
            campaign_seed=args.seed or 0,
            progress=not args.quiet,
        )
    models = ",".join(base.models)
    print(
        f"fuzz campaign {args.backend}/{models} on {args.executor} ({executor.workers} at a "
        f"time): {len(result.shards)} shards, {sum(s.examples for s in result.shards)} state "
        f"machines, {sum(s.steps for s in result.shards)} steps, {len(result.failures)} "
        f"failures, {len(result.errors)} errors, {result.seconds:.1f} s"
    )
    print(
        f"{'worker':28} {'shards':>6} {'examples':>9} {'steps':>8} {'failures':>8} {'seconds':>8}"
    )
    for worker, row in result.per_worker().items():
        print(
            f"{worker:28} {row['shards']:6} {row['examples']:9} {row['steps']:8} "
            f"{row['failures']:8} {row['seconds']:8.1f}"
        )
    for shard in result.failures:
        path = next((p for p in result.regression_traces if p.endswith(str(shard.trace_name))), "")
        print(
            f"FAILED (shard {shard.index}, seed {shard.seed}): {shard.failure}\nshrunk to "
            f"{shard.shrunk_requests} requests: {path} (kvtrie replay reproduces it)"
        )
    for shard in result.errors:
        print(
            f"ERROR (shard {shard.index}, seed {shard.seed}): Hypothesis could not run: {shard.error}"
        )
    report.update(executor=args.executor, at_a_time=executor.workers, **result.as_dict())
    return EXIT_VIOLATION if result.failures or result.errors else EXIT_OK


def _mutation_check(names: list[str], configs: dict, report: dict, selftests: bool) -> int:
    """Every mutant against the self-tests (``selftests``), then the fuzzer; a table by area,
    and the exit code: 1 when any area's kill rate is under the target or any mutant ended in
    an error."""
    from .. import selfcheck
    from ..mutation import check_mutant

    unsound = selfcheck.failures() if selftests else []
    if unsound:  # a self-test failing on the real code would "kill" every mutant
        print(f"ERROR: the self-tests fail on the real code: {unsound[0]}")
        report.update(mutants=[], errors=len(names), self_tests_failing=unsound)
        return EXIT_VIOLATION
    rows = []
    print(f"{'mutant':38} {'area':10} {'verdict':8} {'seconds':>8}  killed by")
    for name in names:
        verdict = check_mutant(name, configs, selftests)
        rows.append(verdict.as_dict())
        why = verdict.killed_by or verdict.detail or "-"
        print(f"{name:38} {verdict.area:10} {verdict.verdict:8} {verdict.seconds:8.1f}  {why[:70]}")
    areas = {}
    for area in AREAS:
        mine = [r for r in rows if r["area"] == area]
        if mine:
            killed = sum(r["verdict"] == "killed" for r in mine)
            errors = sum(r["verdict"] == "error" for r in mine)
            areas[area] = {
                "mutants": len(mine),
                "killed": killed,
                "errors": errors,
                "survived": len(mine) - killed - errors,
                "kill_rate": killed / len(mine),
            }
            print(
                f"{area:10} {killed}/{len(mine)} killed ({killed / len(mine):.0%}), "
                f"{errors} errors, {len(mine) - killed - errors} survived"
            )
    killed = sum(r["verdict"] == "killed" for r in rows)
    errors = sum(r["verdict"] == "error" for r in rows)
    kill_rate = killed / len(rows)
    print(f"kill rate {kill_rate:.0%} ({killed}/{len(rows)}), {errors} errors")
    report.update(
        examples={backend: config.examples for backend, config in configs.items()},
        steps=configs["fake"].steps,
        failures=0,
        mutants=rows,
        areas=areas,
        kill_rate=kill_rate,
        errors=errors,
        regression_traces=[r["regression_trace"] for r in rows if r["regression_trace"]],
    )
    low = [a for a, stats in areas.items() if stats["kill_rate"] < MUTATION_KILL_TARGET]
    return EXIT_VIOLATION if errors or low else EXIT_OK
