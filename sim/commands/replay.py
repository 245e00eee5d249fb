"""``kvtrie replay``: a trace through the cache, every invariant checked after every request."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kvtrie.core.policy import STRATEGIES
from kvtrie.core.prefix_cache import DEFAULT_BUDGET_BYTES, POLICIES, PrefixCache
from kvtrie.core.store import StoreError

from ..build import (
    DiskTier,
    default_model,
    make_backend,
    make_cache,
    make_policy,
    parse_size,
    trace_inputs,
    trace_path,
)
from ..traces import DISK_EVENTS
from . import (
    EXIT_OK,
    EXIT_VIOLATION,
    UsageError,
    add_time_options,
    common_options,
    positive,
    read_options,
    read_time_options,
    trace_options,
)

if TYPE_CHECKING:  # imported when a replay runs, not when the CLI starts
    from ..replay import ReplayOutcome
    from ..traces import Trace


def add_parser(sub: argparse._SubParsersAction) -> None:
    replay = sub.add_parser(
        "replay",
        parents=[common_options(), trace_options()],
        help="replay a trace through the cache and report what was cached",
        description="Replay a recorded multi-conversation trace (kvtrie JSONL, Mooncake, "
        "Bailian, or kv-cache-tester agentic files) "
        "through the cache, serially in arrival order, checking every invariant after every "
        "request. Exit 0 when clean, 1 on a violation, 2 on bad input.",
    )
    replay.add_argument(
        "trace",
        help="a trace file or directory of agentic files, or a trace name: chat (the "
        "default shipped), system-prompt, agent, rag, branching, shared-prefix, or mooncake "
        "and agentic (third-party: kvtrie traces get NAME)",
    )
    _add_cache_options(replay)
    replay.add_argument(
        "--check",
        default="every",
        help="every (default: incremental checks and the oracle after every "
        "request), full (walk the whole trie each time), sample:N, off",
    )
    replay.add_argument(
        "--limit", type=int, default=None, metavar="N", help="replay only N requests"
    )
    replay.add_argument(
        "--start",
        type=int,
        default=0,
        metavar="N",
        help="skip the first N requests (their events too): resume a replay stopped after N "
        "requests on the disk tier it left in --disk-dir",
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
    add_time_options(replay)
    replay.add_argument("--report", type=Path, help="write the JSON report here")
    replay.add_argument("--markdown", type=Path, help="write a Markdown summary here")
    replay.add_argument("-q", "--quiet", action="store_true", help="no summary, no progress bar")
    replay.set_defaults(func=run)


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
        "mlx: tiny-attention (default), tiny-swa, tiny-hybrid, small-attention, "
        "small-hybrid or a local model directory",
    )
    parser.add_argument(
        "--budget",
        default=None,
        help="most paged-out snapshot bytes, e.g. 8GiB, 512MiB, inf (default 8GiB)",
    )
    parser.add_argument(
        "--budget-counts-live",
        action="store_true",
        help="the budget holds the live layers too, not only paged-out snapshots (unified "
        "memory: one pool for both); requests whose live context alone exceeds it are counted",
    )
    parser.add_argument(
        "--disk-budget",
        default=None,
        metavar="SIZE",
        help="add a disk tier of SIZE (e.g. 1TiB, inf): snapshots evicted from RAM move "
        "there instead of being dropped, and are evicted from it in the same LRU order "
        "(default: no disk tier). A replay simulates the disk: it counts the bytes a real "
        "model's snapshots would take there without writing them",
    )
    parser.add_argument(
        "--disk-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep the disk tier in DIR, for real: one safetensors file per snapshot and a "
        "manifest, written in the background; reopened, DIR's verified snapshots are adopted "
        "(another model's store, or one in use, is refused). Default budget with it: inf",
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


def _settings(args: argparse.Namespace, path: Path, header: dict) -> tuple:
    """Backend, model, budget and policy: options first, then the trace's header, then the
    defaults."""
    backend_name = args.backend or header.get("backend", "fake")
    if backend_name not in ("fake", "mlx"):
        raise UsageError(f"{path}:1: header backend: choose fake or mlx, got {backend_name!r}")
    model = args.model or header.get("profile") or default_model(backend_name)
    if args.budget is not None:
        budget = parse_size(args.budget, "--budget")
    else:
        budget = header.get("budget_bytes", DEFAULT_BUDGET_BYTES)
        if budget is not None and budget < 0:
            raise UsageError(f"{path}:1: header budget_bytes: must be >= 0 or null, got {budget}")
    policy = make_policy(args.policy or header.get("policy", "kvtrie-seed"), args.snapshot_interval)
    return backend_name, model, budget, policy


def disk_tier(args: argparse.Namespace, path: Path, header: dict) -> DiskTier | None:
    """The disk tier ``--disk-budget`` and ``--disk-dir`` ask for, else the trace header's,
    else None."""
    if args.disk_budget is not None:
        return DiskTier(parse_size(args.disk_budget, "--disk-budget"), args.disk_dir)
    if args.disk_dir is not None:
        return DiskTier(header.get("disk_budget_bytes"), args.disk_dir)
    if "disk_budget_bytes" not in header:
        return None
    budget = header["disk_budget_bytes"]
    if budget is not None and budget < 0:
        raise UsageError(f"{path}:1: header disk_budget_bytes: must be >= 0 or null, got {budget}")
    return DiskTier(budget)


def _close_store(cache: PrefixCache, outcome: ReplayOutcome | None) -> None:
    """A directory store keeps the trie for the next run, but not from a run that found a
    violation or failed: its states are not to be trusted, so the store's earlier manifest
    stands (what this run wrote is deleted as orphaned when the store is next opened)."""
    if cache.store is None:
        return
    if outcome is not None and not outcome.violations:
        cache.close()
    else:
        cache.store.close()


def _check_disk_events(trace: Trace, disk: DiskTier | None) -> None:
    """Disk-tier events need a disk tier: found before the replay starts, not in it."""
    if disk is not None:
        return
    events = [*(e for r in trace.requests for e in r.events), *trace.trailing_events]
    for event in events:
        if event.kind in DISK_EVENTS:
            raise UsageError(
                f"{trace.path}:{event.line}: a {event.kind} event needs a disk tier: give "
                "--disk-budget SIZE, or disk_budget_bytes in the trace's header"
            )


def run(args: argparse.Namespace) -> int:
    from ..mutants import MUTANTS, mutated
    from ..outputs import check_output, write_output
    from ..replay import replay, skipped_history
    from ..report import build_report, markdown_summary, report_json, text_summary
    from ..runner import CheckMode
    from ..timing import ServerClock
    from ..traces import load_trace, read_header

    try:
        path = trace_path(args.trace)
        header = read_header(path)  # a trace may carry its own backend, model, budget, policy
        backend_name, model, budget, policy = _settings(args, path, header)
        disk = disk_tier(args, path, header)
        mode = CheckMode.parse(args.check)
        positive("--limit", args.limit)
        if args.start < 0:
            raise UsageError(f"--start must be >= 0, got {args.start}")
        for option, out in (("--report", args.report), ("--markdown", args.markdown)):
            if out is not None:
                check_output(option, out, trace_inputs(path))
        mutant = None if args.mutant == "none" else args.mutant or header.get("mutant")
        if mutant is not None and mutant not in MUTANTS:
            raise UsageError(f"unknown mutant {mutant!r}; choose one of {', '.join(MUTANTS)}")
        cost = read_time_options(args, model, header, path)
        backend = make_backend(backend_name, model)
        trace = load_trace(path, vocab_size=backend.vocab_size, options=read_options(args))
        _check_disk_events(trace, disk)
        if args.start > len(trace.requests):
            raise UsageError(f"--start {args.start}: the trace has {len(trace.requests)} requests")
        skipped_history(trace, args.start, backend.vocab_size)  # a bad start found now
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    with mutated(mutant):  # built under the mutant: some patch choices made at construction
        try:
            counts_live = args.budget_counts_live or header.get("budget_counts_live", False)
            cache = make_cache(backend, budget, policy, disk, counts_live, cost)
        except StoreError as exc:
            raise UsageError(str(exc)) from None
        progress = False if args.quiet else None
        clock = None if cost is None else ServerClock(cost, args.time_scale)
        outcome = None
        try:
            outcome = replay(
                trace,
                backend,
                cache,
                mode,
                args.limit,
                args.keep_going,
                progress,
                clock,
                args.start,
            )
            report = build_report(
                trace, outcome, cache, backend_name, model, args.check, backend.oracle()
            )
        finally:
            _close_store(cache, outcome)
    if not args.quiet:
        print(text_summary(report))
    if outcome.violations:
        print(f"\ntrie at the violation:\n{outcome.trie_dump}", file=sys.stderr)
    if args.report:
        write_output(args.report, report_json(report))
    if args.markdown:
        write_output(args.markdown, markdown_summary(report))
    return EXIT_VIOLATION if outcome.violations else EXIT_OK
