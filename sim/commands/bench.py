"""``kvtrie bench``: speed and memory, measured and written as JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvtrie.core.render import format_bytes

from . import EXIT_OK, EXIT_VIOLATION, UsageError, common_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench",
        parents=[common_options()],
        help="measure speed and memory, written as JSON",
        description="replay: the whole Mooncake conversation trace on the fake backend at an "
        "infinite budget with every check on; reports wall time, peak RSS and tokens/s. "
        "eviction: seconds per eviction in two tries 10x apart in size (flat with the "
        "eviction index). "
        "mlx: on real MLX models, warm vs cold prefill, page-in vs recompute, the cache's "
        "overhead with no shared prefixes, tokens computed by kvtrie vs mlx-lm's own "
        "prompt cache, and time to first token on a hit against mlx-lm's (target at most "
        "1.1x), all as ratios measured in one run. "
        "crash: kill -9 a replay writing a disk store at random points, reopen the store and "
        "replay with every check on after each; counts wrong states, points over the disk "
        "budget and leaked files (all must be 0). "
        "time-model: calibrate small-attention and small-hybrid, replay a different "
        "workload on MLX and compare every request's estimated seconds with the measured "
        "(targets: total within 5 %, median 10 %, p90 25 %); then Mooncake's prefill hours "
        "and TTFT with llama-8b-m4's figures, no cache, 8 GiB, 8 GiB + 1 TiB disk.",
    )
    bench.add_argument(
        "suite",
        choices=["replay", "eviction", "mlx", "crash", "time-model"],
        help="what to measure",
    )
    bench.add_argument(
        "--points",
        type=int,
        default=None,
        metavar="N",
        help="crash: how many kill points (default 50; 5 with --quick)",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="a short run: replay the first 1000 requests; mlx with tiny models, "
        "512-token prompts and 3 rounds of 256-token hits; crash on the agent trace, "
        "5 points; time-model on tiny models, the quick grid and 500 Mooncake requests",
    )
    bench.add_argument("--report", type=Path, help="write the JSON results here")
    bench.set_defaults(func=run)


def _print_mlx_bench(results: dict) -> None:
    print(
        f"mlx bench ({results['attention_model']}, {results['prompt_tokens']} tokens): "
        f"warm_cold_ratio {results['warm_cold_ratio']:.1f} (ideal "
        f"{results['warm_cold_ideal']:.0f}), pagein_vs_recompute "
        f"{results['pagein_vs_recompute']:.1f}, overhead_zero_hit "
        "{:.3f} (90 % interval under this machine's noise {:.3f}-{:.3f})".format(
            results["overhead_zero_hit"], *results["overhead_zero_hit_interval"]
        )
    )
    for hit in (results, results["hit_shared_prefix"]):
        shared = f", {hit['hit_shared_tokens']:,} shared" if hit["hit_shared_tokens"] else ""
        print(
            f"  hit time to first token ({hit['hit_model']}, "
            f"{hit['hit_cached_tokens']['mlxlm']:,} cached{shared}, median of "
            f"{hit['hit_turns']} turns): kvtrie {hit['hit_ttft_kvtrie_seconds'] * 1000:.1f} "
            f"ms, mlx-lm {hit['hit_ttft_mlxlm_seconds'] * 1000:.1f} ms (ratio "
            f"{hit['hit_ttft_ratio']:.2f}, 90 % interval under this machine's noise "
            "{:.2f}-{:.2f}); kvtrie unbounded {:.1f} ms (ratio {:.2f})".format(
                *hit["hit_ttft_ratio_interval"],
                hit["hit_ttft_kvtrie_unbounded_seconds"] * 1000,
                hit["hit_ttft_ratio_unbounded"],
            )
        )
    print(
        f"  page-in from the disk tier ({results['disk_pagein_bytes']:,} B in files): "
        f"{results['disk_pagein_seconds'] * 1000:.1f} ms, "
        f"{results['disk_pagein_vs_recompute']:.1f}x faster than recomputing"
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


def _crash(args: argparse.Namespace) -> dict:
    import tempfile

    from ..crash import crash_points

    points = args.points if args.points is not None else 5 if args.quick else 50
    if points < 1:
        raise UsageError(f"--points must be >= 1, got {points}")
    trace, budget, disk = ("agent", "256MiB", 2 << 30) if args.quick else ("chat", "1GiB", 8 << 30)
    with tempfile.TemporaryDirectory(prefix="kvtrie-crash-") as folder:
        results = crash_points(trace, Path(folder) / "store", points, budget, disk, progress=True)
    print(
        f"crash bench ({trace}, {results['points']} kill -9 points, "
        f"{results['killed_running']} mid-run, {results['killed_with_store_open']} with the "
        f"store open): {results['wrong_states']} wrong states, "
        f"{results['failed_checks']} failed checks, {results['over_budget_points']} points over "
        f"the disk budget, {results['leaked_files']} leaked files; deleted on reopening: "
        f"{results['deleted_on_open']}"
    )
    return results


def _print_time_model(results: dict) -> None:
    from ..report import format_duration

    for row in results["validation"]:
        met = all(row["targets_met"].values())
        within = all(row["target_within_noise"].values())
        noise = row["noise_interval"]
        print(
            f"time model on {row['model']}: estimated {row['estimated_seconds']:.2f} s, "
            f"measured {row['measured_seconds']:.2f} s; total error {row['total_error']:.1%}, "
            f"per request median {row['median_error']:.1%}, p90 {row['p90_error']:.1%} "
            f"(calibration fit median {row['fit_median_error']:.1%}); "
            f"targets {'met' if met else 'MISSED'}"
        )
        print(
            "  90 % interval under this machine's noise: "
            + ", ".join(f"{key} {low:.1%}-{high:.1%}" for key, (low, high) in noise.items())
            + ("" if met else f"; {'every' if within else 'not every'} target within it")
        )
    for row in results["mooncake_llama_8b_m4"]:
        ttft = row["ttft_seconds"]
        print(
            f"  mooncake, llama-8b-m4, {row['setup']}: hit ratio {row['hit_ratio']:.4f}, "
            f"prefill {row['prefill_hours']:,.1f} h, TTFT p50 {format_duration(ttft['p50'])}, "
            f"p99 {format_duration(ttft['p99'])}"
        )


def run(args: argparse.Namespace) -> int:
    from ..bench import bench_eviction, bench_mlx, bench_replay
    from ..build import trace_path
    from ..outputs import check_output, write_output
    from ..report import report_json

    try:
        if args.report is not None:
            check_output("--report", args.report)
        mooncake = trace_path("mooncake") if args.suite in ("replay", "time-model") else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    clean = True
    if args.suite == "time-model":
        from ..timebench import bench_time_model

        results = bench_time_model(quick=args.quick)
        _print_time_model(results)
        clean = results["targets_met"]
    elif mooncake is not None:
        results = bench_replay(mooncake, quick=args.quick)
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
    elif args.suite == "crash":
        results = _crash(args)
        clean = not any(
            results[k]
            for k in ("wrong_states", "failed_checks", "over_budget_points", "leaked_files")
        )
    else:
        results = bench_mlx(quick=args.quick)
        _print_mlx_bench(results)
        clean = all(results["targets_met"].values())
    if args.report:
        write_output(args.report, report_json(results))
    return EXIT_OK if clean else EXIT_VIOLATION
