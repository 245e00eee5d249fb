"""The ``kvtrie`` command line: one entry point, one subcommand a job."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from kvtrie import __version__
from kvtrie.core.policy import STRATEGIES
from kvtrie.core.prefix_cache import DEFAULT_BUDGET_BYTES, POLICIES
from kvtrie.core.render import format_bytes

from .build import default_model, make_backend, make_cache, make_policy, parse_size, trace_path

__all__ = ["main"]

EXIT_OK, EXIT_VIOLATION, EXIT_BAD_INPUT = 0, 1, 2
MUTATION_KILL_TARGET = 0.9


def _add_cache_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        choices=["fake", "mlx"],
        default=None,
        help="fake: deterministic tensors sized by a model profile (default); "
        "mlx: real mlx-lm models. Options left out come from the trace's header when it has "
        "them (backend, profile, budget_bytes, policy), else from these defaults",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="fake: a profile name or a profiles TOML file (default llama-8b); "
        "mlx: tiny-attention, tiny-swa, tiny-hybrid or a local model directory",
    )
    parser.add_argument(
        "--budget",
        default=None,
        help="most paged-out snapshot bytes, e.g. 8GiB, 512MiB, inf (default 8GiB)",
    )
    parser.add_argument(
        "--policy",
        default=None,
        metavar="POLICY",
        help=f"{' or '.join(POLICIES)} (default kvtrie-seed: the seed's exact semantics; "
        "kvtrie-improved: every strategy below that the model's layers allow), optionally "
        "followed by strategy changes, e.g. improved,-page-in-moves or "
        f"seed,+partial-edges. Strategies: {', '.join(STRATEGIES)}=K",
    )
    parser.add_argument(
        "--snapshot-interval",
        type=int,
        default=None,
        metavar="K",
        help="also snapshot every K tokens of a long prefill (0: off)",
    )


def _cmd_replay(args: argparse.Namespace) -> int:
    from .replay import replay
    from .report import build_report, markdown_summary, report_json, text_summary
    from .runner import CheckMode
    from .traces import TraceError, load_trace, read_header, write_atomic

    path = trace_path(args.trace)
    header = read_header(path)  # a trace may carry its own backend, model, budget and policy
    backend_name = args.backend or header.get("backend", "fake")
    model = args.model or header.get("profile") or default_model(backend_name)
    try:
        if args.budget is not None:
            budget = parse_size(args.budget)
        else:
            budget = header.get("budget_bytes", DEFAULT_BUDGET_BYTES)
            if budget is not None and (
                isinstance(budget, bool) or not isinstance(budget, int) or budget < 0
            ):
                raise ValueError(
                    f"{path}:1: budget_bytes must be an integer >= 0 or null, got {budget!r}"
                )
        policy = make_policy(
            args.policy or header.get("policy", "kvtrie-seed"), args.snapshot_interval
        )
        mode = CheckMode.parse(args.check)
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        backend = make_backend(backend_name, model)
        trace = load_trace(path, vocab_size=backend.vocab_size)
    except (ValueError, TraceError, OSError) as exc:
        print(f"kvtrie replay: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from .mutants import MUTANTS, mutated

    mutant = None if args.mutant == "none" else args.mutant or header.get("mutant")
    if mutant is not None and mutant not in MUTANTS:
        print(
            f"kvtrie replay: unknown mutant {mutant!r}; choose one of {', '.join(MUTANTS)}",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    with mutated(mutant):  # built under the mutant: some patch choices made at construction
        cache = make_cache(backend, budget, policy)
        progress = False if args.quiet else None
        outcome = replay(trace, backend, cache, mode, args.limit, args.keep_going, progress)
    report = build_report(trace, outcome, cache, backend_name, model, args.check)
    if not args.quiet:
        print(text_summary(report))
    if outcome.violations:
        print(f"\ntrie at the violation:\n{outcome.trie_dump}", file=sys.stderr)
    if args.report:
        write_atomic(args.report, report_json(report))
    if args.markdown:
        write_atomic(args.markdown, markdown_summary(report))
    return EXIT_VIOLATION if outcome.violations else EXIT_OK


def _cmd_gen(args: argparse.Namespace) -> int:
    from .generators import generate
    from .ideal import ideal_reuse
    from .traces import load_trace, write_trace

    sizes: dict[str, int] = {}
    try:
        for item in args.set:
            name, sep, value = item.partition("=")
            if not sep or not value.strip().lstrip("-").isdigit():
                raise ValueError(f"--set takes NAME=INTEGER, got {item!r}")
            sizes[name.strip().replace("-", "_")] = int(value)
        header, lines = generate(args.kind, args.seed, args.vocab_size, **sizes)
    except ValueError as exc:
        print(f"kvtrie gen: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    write_trace(args.out, header, lines)
    cached, prompt = ideal_reuse(load_trace(args.out), args.vocab_size)
    print(
        f"wrote {args.out}: {len(lines)} requests, {prompt:,} prompt tokens, "
        f"ideal reuse {cached / prompt:.1%} ({cached:,} tokens)"
    )
    return EXIT_OK


def _fuzz_summary(result) -> str:
    return (
        f"{result.examples} examples, {result.steps} steps, {len(result.shapes)} distinct trie "
        f"shapes, max depth {result.max_depth}, {result.totals.splits} splits, "
        f"{result.totals.merges} merges, {result.totals.evictions} evictions, "
        f"{result.totals.restore_failures} restore failures, "
        f"{result.seconds:.1f} s"
    )


def _cmd_fuzz(args: argparse.Namespace) -> int:
    from .fuzz import PROFILES, FuzzConfig, run_fuzz
    from .mutants import MUTANTS
    from .report import report_json
    from .traces import write_atomic

    fake_examples, mlx_examples, steps = PROFILES[args.profile]
    names = list(MUTANTS) if args.mutants == "all" else [args.mutant]
    if args.mutant is not None and args.mutant not in MUTANTS:
        print(
            f"kvtrie fuzz: unknown mutant {args.mutant!r}; choose one of {', '.join(MUTANTS)}",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    mutation = names != [None]
    out = args.out or Path("fuzz-mutants" if mutation else "tests/regressions")
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
        write_atomic(args.report, report_json(report))
    return code


def _cmd_sweep(args: argparse.Namespace) -> int:
    from kvtrie.backends.profiles import get_profile

    from .sweep import ALL_POLICIES, materialize, run_sweep, write_sweep
    from .traces import TraceError, load_trace

    try:
        budgets = [parse_size(b) for b in args.budgets.split(",") if b.strip()]
        policies = list(ALL_POLICIES) if args.policies == "all" else args.policies.split(",")
        unknown = [p for p in policies if p not in ALL_POLICIES]
        if unknown:
            raise ValueError(f"unknown policies {unknown}; choose from {', '.join(ALL_POLICIES)}")
        profile = get_profile(args.model)
        trace = load_trace(trace_path(args.trace), vocab_size=profile.vocab_size)
        if args.limit is not None:
            trace.requests = trace.requests[: args.limit]
    except (ValueError, TraceError, OSError) as exc:
        print(f"kvtrie sweep: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    started = time.perf_counter()
    workload = materialize(trace, profile)
    marks = [request.user_snapshots for request in trace.requests]
    rows, timelines = run_sweep(
        workload,
        profile,
        budgets,
        policies,
        args.processes,
        progress=False if args.quiet else None,
        marks=marks,
    )
    meta = {
        "trace": trace.path,
        "sha256": trace.sha256,
        "model": profile.name,
        "requests": len(workload),
        "wall_seconds": time.perf_counter() - started,
    }
    files = write_sweep(args.out, meta, rows, budgets, timelines)
    if not args.quiet:
        print((args.out / "sweep.md").read_text())
    print(f"wrote {', '.join(str(args.out / f) for f in files)} in {meta['wall_seconds']:.1f} s")
    return EXIT_OK


def _cmd_gate(args: argparse.Namespace) -> int:
    import os

    from .gate import GateError, junit, load_config, markdown, run_gate, table
    from .mutants import MUTANTS, mutated
    from .traces import write_atomic

    try:
        config = load_config(args.config)
        if args.mutant is not None and args.mutant not in MUTANTS:
            raise GateError(f"unknown mutant {args.mutant!r}; choose one of {', '.join(MUTANTS)}")
    except GateError as exc:
        print(f"kvtrie gate: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
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
        write_atomic(args.markdown, summary)
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as handle:
            handle.write(summary)
    if args.junit:
        seconds = {name: m.get("seconds", 0.0) for name, m in results["checks"].items()}
        write_atomic(args.junit, junit(rows, seconds))
    return EXIT_OK if passed or args.update_baseline else EXIT_VIOLATION


def _print_mlx_bench(results: dict) -> None:
    print(
        f"mlx bench ({results['attention_model']}, {results['prompt_tokens']} tokens): "
        f"warm_cold_ratio {results['warm_cold_ratio']:.1f} (ideal "
        f"{results['warm_cold_ideal']:.0f}), pagein_vs_recompute "
        f"{results['pagein_vs_recompute']:.1f}, overhead_zero_hit "
        f"{results['overhead_zero_hit']:.3f}"
    )
    for row in results["computed_tokens"]:
        print(
            f"  {row['model']} budget "
            f"{'inf' if row['budget_bytes'] is None else format_bytes(row['budget_bytes'])}: "
            f"computed tokens kvtrie {row['kvtrie_computed_tokens']:,} vs "
            f"mlx-lm {row['mlxlm_computed_tokens']:,} of {row['prompt_tokens']:,} prompt "
            f"tokens; live {row['kvtrie_live_bytes']:,} B, paged out "
            f"{row['kvtrie_paged_out_bytes']:,} B"
        )
    met = results["targets_met"]
    print("  targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in met.items()))


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_eviction, bench_mlx, bench_replay
    from .report import report_json
    from .traces import write_atomic

    clean = True
    if args.suite == "replay":
        results = bench_replay(quick=args.quick)
        print(
            f"replay bench: {results['requests']} requests, {results['prompt_tokens']:,} prompt "
            f"tokens in {results['wall_seconds']:.2f} s ({results['tokens_per_second']:,.0f} "
            f"tokens/s), peak RSS {results['peak_rss_bytes'] / 2**20:,.0f} MiB, hit ratio "
            f"{results['hit_ratio']:.4f}; targets {'met' if results['targets_met'] else 'MISSED'}"
        )
        clean = results["clean"]
    elif args.suite == "eviction":
        results = bench_eviction(quick=args.quick)
        for row in results["tries"]:
            print(
                f"eviction bench: {row['nodes']:,} nodes, {row['evictions']:,} evictions, "
                f"{row['seconds_per_eviction'] * 1e6:.1f} us each"
            )
        print(
            f"  per-eviction cost grew {results['per_eviction_growth']:.2f}x for a 10x larger "
            f"trie; target {'met' if results['targets_met'] else 'MISSED'}"
        )
        clean = results["targets_met"]
    else:
        results = bench_mlx(quick=args.quick)
        _print_mlx_bench(results)
    if args.report:
        write_atomic(args.report, report_json(results))
    return EXIT_OK if clean else EXIT_VIOLATION


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

    replay = sub.add_parser(
        "replay",
        help="replay a trace through the cache and report what was cached",
        description="Replay a recorded multi-conversation trace (kvtrie JSONL or Mooncake) "
        "through the cache, serially in arrival order, checking every invariant after every "
        "request. Exit 0 when clean, 1 on a violation, 2 on bad input.",
    )
    replay.add_argument(
        "trace",
        help="a kvtrie JSONL or Mooncake JSONL file, or a bundled "
        "trace: mooncake, system-prompt, agent, rag, branching, shared-prefix",
    )
    _add_cache_options(replay)
    replay.add_argument(
        "--check",
        default="every",
        help="every (default: incremental checks and the oracle after every "
        "request), full (walk the whole trie each time), sample:N, off",
    )
    replay.add_argument(
        "--limit", type=int, default=None, metavar="N", help="replay only the first N requests"
    )
    replay.add_argument(
        "--keep-going",
        action="store_true",
        help="record violations and go on instead of stopping at the first",
    )
    replay.add_argument(
        "--mutant",
        default=None,
        help="run with a named mutant of the cache (a regression trace the fuzzer wrote for "
        "a mutant names it in its header and replays with it; 'none' replays the real code)",
    )
    replay.add_argument("--report", type=Path, help="write the JSON report here")
    replay.add_argument("--markdown", type=Path, help="write a Markdown summary here")
    replay.add_argument("-q", "--quiet", action="store_true", help="no summary, no progress bar")
    replay.set_defaults(func=_cmd_replay)

    from .generators import GENERATORS

    gen = sub.add_parser(
        "gen",
        help="write a generated workload trace",
        description="Write a deterministic kvtrie trace of a common prefix-sharing workload and "
        "print its ideal (infinite-cache) reuse. Sizes are the generator's keyword arguments.",
    )
    gen.add_argument("kind", choices=sorted(GENERATORS))
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument("--out", type=Path, required=True, help="the trace file to write")
    gen.add_argument("--vocab-size", type=int, default=32000, help="token ids are below this")
    gen.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=N",
        help="a size, e.g. --set users=32 --set turns=8 (see each generator's "
        "defaults in kvtrie/sim/generators.py)",
    )
    gen.set_defaults(func=_cmd_gen)

    sweep = sub.add_parser(
        "sweep",
        help="every policy at every budget over one trace, with plots",
        description="Replay one trace through kvtrie's policies and simulated peers (no cache, "
        "the single-entry cache, mlx-lm's prompt cache simulated and real, SGLang's radix "
        "cache, vLLM's block cache, llama.cpp's slots, the infinite ideal and an offline "
        "Belady bound) at each budget, with the same byte accounting, on all cores. Writes "
        "sweep.json, sweep.csv, sweep.md and PNG plots to --out.",
    )
    sweep.add_argument("trace", help="a trace file or a bundled trace name")
    sweep.add_argument(
        "--budgets",
        default="1GiB,2GiB,4GiB,8GiB,16GiB,32GiB,inf",
        help="comma-separated budgets (default 1GiB,...,32GiB,inf)",
    )
    sweep.add_argument("--policies", default="all", help="'all' or a comma-separated list")
    sweep.add_argument("--model", default="llama-8b", help="fake model profile (default llama-8b)")
    sweep.add_argument(
        "--limit", type=int, default=None, metavar="N", help="only the first N requests"
    )
    sweep.add_argument("--processes", type=int, default=None, help="default: every core")
    sweep.add_argument("--out", type=Path, default=Path("sweep-out"), help="output folder")
    sweep.add_argument("-q", "--quiet", action="store_true", help="no table, no progress bar")
    sweep.set_defaults(func=_cmd_sweep)

    gate = sub.add_parser(
        "gate",
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
    gate.set_defaults(func=_cmd_gate)

    fuzz = sub.add_parser(
        "fuzz",
        help="stateful fuzzing of the cache against an oracle; mutation check",
        description="Drive the cache with Hypothesis through conversations that share and "
        "branch prefixes, budget changes down to zero, injected restore failures and corrupt "
        "snapshots, checking every invariant and the fresh-prefill oracle after every step. A "
        "failure is shrunk and written as a kvtrie trace that kvtrie replay reproduces. "
        "--mutants all runs the same fuzzer against each named mutant of the cache and "
        "prints which it kills. Exit 1 on a failure (or a kill rate under 90%%).",
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
    fuzz.set_defaults(func=_cmd_fuzz)

    bench = sub.add_parser(
        "bench",
        help="measure speed and memory, written as JSON",
        description="replay: the whole Mooncake conversation trace on the fake backend at an "
        "infinite budget with every check on; reports wall time, peak RSS and tokens/s. "
        "eviction: seconds per eviction in two tries 10x apart in size (flat with the "
        "eviction index). "
        "mlx: on real MLX models, warm vs cold prefill, page-in vs recompute, the cache's "
        "overhead with no shared prefixes, and tokens computed by kvtrie vs mlx-lm's own "
        "prompt cache, all as ratios measured in one run.",
    )
    bench.add_argument("suite", choices=["replay", "eviction", "mlx"], help="what to measure")
    bench.add_argument(
        "--quick",
        action="store_true",
        help="a short run: replay the first 1000 requests; mlx with tiny models "
        "and 512-token prompts",
    )
    bench.add_argument("--report", type=Path, help="write the JSON results here")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
