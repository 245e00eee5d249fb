"""The replay report: a JSON contract other tools read, a terminal summary, a Markdown table."""

from __future__ import annotations

import json
from typing import Any

from kvtrie import __version__
from kvtrie.core.prefix_cache import PrefixCache
from kvtrie.core.render import format_bytes

from .replay import ReplayOutcome
from .traces import Trace

__all__ = ["build_report", "format_duration", "markdown_summary", "text_summary", "report_json"]


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def build_report(
    trace: Trace,
    outcome: ReplayOutcome,
    cache: PrefixCache,
    backend: str,
    model: str,
    check: str,
    oracle: dict[str, Any],
) -> dict[str, Any]:
    """The report's fields; names are a contract (see README), add but never rename."""
    stats = cache.stats
    evaluated = stats.computed_tokens + outcome.output_tokens
    return {
        "kvtrie_version": __version__,
        "trace": {
            "path": trace.path,
            "sha256": trace.sha256,
            "format": trace.format,
            "reading": trace.reading,
        },
        "backend": backend,
        "model": model,
        "policy": cache.policy.name,
        "check": check,
        "requests": outcome.requests,
        "prompt_tokens": stats.prompt_tokens,
        "cached_tokens": stats.cached_tokens,
        "computed_tokens": stats.computed_tokens,
        "output_tokens": outcome.output_tokens,
        "hit_ratio": _ratio(stats.cached_tokens, stats.prompt_tokens),
        "ideal_cached_tokens": outcome.ideal_cached_tokens,
        "ideal_hit_ratio": _ratio(outcome.ideal_cached_tokens, stats.prompt_tokens),
        # what the budget and the policy cost against an infinite cache
        "reuse_lost": outcome.ideal_cached_tokens - stats.cached_tokens,
        "violations": [v.as_dict() for v in outcome.violations],
        "stopped_early": outcome.stopped_early,
        "budget_bytes": cache.budget_bytes,
        "peak_paged_out_bytes": cache.ledger.peak,
        "final_paged_out_bytes": cache.paged_out_bytes,
        "over_budget_active_only_requests": outcome.over_budget_requests,
        # the budget holds the live layers too (--budget-counts-live); the most RAM held
        # after a request, paged out and live together; requests whose live layers alone
        # went over a budget that counts them
        "budget_counts_live": cache.budget_counts_live,
        "peak_ram_bytes": outcome.peak_ram_bytes,
        "live_over_budget_requests": stats.live_over_budget,
        "evictions": stats.evictions,
        "page_ins": stats.page_ins,
        "page_outs": stats.page_outs,
        # snapshot bytes copied into and out of the live layers (from RAM or the disk tier)
        "page_in_bytes": stats.page_in_bytes,
        "page_out_bytes": stats.page_out_bytes,
        "splits": stats.splits,
        "merges": stats.merges,
        "restore_failures": stats.restore_failures,
        "snapshots_skipped": stats.snapshots_skipped,
        "disk_tier": _disk_tier(cache),
        "oracle": oracle,
        "wall_seconds": outcome.wall_seconds,
        "tokens_per_second": _ratio(
            stats.prompt_tokens + outcome.output_tokens, outcome.wall_seconds
        ),
        "evaluated_tokens_per_second": _ratio(evaluated, outcome.wall_seconds),
        # estimated seconds (null without cost figures for the model): see sim/timing.py
        "time_model": outcome.clock.summary() if outcome.clock else None,
    }


def _disk_tier(cache: PrefixCache) -> dict[str, Any] | None:
    """The disk tier's figures (null without one); hits are tokens a request got from it,
    the rest of ``cached_tokens`` came from RAM or the live path."""
    if cache.store is None:
        return None
    stats = cache.stats
    return {
        "store": cache.store.name,
        "budget_bytes": cache.disk_budget_bytes,
        "peak_bytes": cache.ledger.disk_peak,
        "final_bytes": cache.disk_bytes,
        "hit_tokens": stats.disk_hit_tokens,
        "ram_hit_tokens": stats.cached_tokens - stats.disk_hit_tokens,
        "moves_to_disk": stats.moves_to_disk,
        "written_bytes": stats.disk_write_bytes,
        "write_failures": stats.disk_write_failures,
        "page_ins": stats.disk_page_ins,
        "read_bytes": stats.disk_read_bytes,
        "read_failures": stats.disk_read_failures,
        # requests that recomputed instead of reading, the read estimated slower (a cost model)
        "reads_skipped": stats.disk_reads_skipped,
        "evictions": stats.disk_evictions,
        # a directory store's opening: what it adopted from an earlier run, what it deleted
        "opened": cache.store.opening(),
    }


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2) + "\n"


def _reading(reading: dict[str, Any]) -> str:
    """How a hashed trace was read, for the summary: ``, 64-token blocks (floor), ...``."""
    parts = []
    if "block_size" in reading:
        parts.append(f"{reading['block_size']}-token blocks")
    if "block_convention" in reading:
        parts.append(reading["block_convention"])
    arrival = reading.get("arrival")
    if arrival:
        parts.append("arrivals " + ", ".join(f"{k}={v}" for k, v in arrival.items()))
    return "".join(f", {part}" for part in parts)


def format_duration(seconds: float) -> str:
    """``0.42 s``, ``12.3 min``, ``4.56 h``."""
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def text_summary(report: dict[str, Any]) -> str:
    budget = report["budget_bytes"]
    lines = [
        f"trace     {report['trace']['path']} ({report['trace']['format']}, "
        f"{report['requests']} requests{_reading(report['trace'].get('reading', {}))})",
        f"cache     backend={report['backend']} model={report['model']} "
        f"policy={report['policy']} budget={'inf' if budget is None else format_bytes(budget)}",
        f"tokens    prompt={report['prompt_tokens']:,} cached={report['cached_tokens']:,} "
        f"computed={report['computed_tokens']:,}",
        f"hit ratio {report['hit_ratio']:.4f} (ideal {report['ideal_hit_ratio']:.4f}, "
        f"{report['reuse_lost']:,} tokens of reuse lost)",
        f"memory    peak paged out {format_bytes(report['peak_paged_out_bytes'])}; "
        f"evictions={report['evictions']} page_ins={report['page_ins']} "
        f"page_outs={report['page_outs']} splits={report['splits']} merges={report['merges']} "
        f"snapshots_skipped={report['snapshots_skipped']}",
        f"time      {report['wall_seconds']:.2f} s, {report['tokens_per_second']:,.0f} tokens/s",
    ]
    disk = report["disk_tier"]
    if disk:
        limit = disk["budget_bytes"]
        lines.insert(
            5,
            f"disk tier {disk['store']} budget={'inf' if limit is None else format_bytes(limit)} "
            f"peak {format_bytes(disk['peak_bytes'])}; hit tokens from disk "
            f"{disk['hit_tokens']:,}, from RAM {disk['ram_hit_tokens']:,}; "
            f"moves_to_disk={disk['moves_to_disk']} page_ins={disk['page_ins']} "
            f"evictions={disk['evictions']} written {format_bytes(disk['written_bytes'])} "
            f"read {format_bytes(disk['read_bytes'])}",
        )
    model = report["time_model"]
    if model:
        ttft, bare = model["ttft_seconds"], model["ttft_seconds_no_cache"]
        span = format_duration
        lines.append(
            f"seconds   estimated ({model['cost']['name']}): prefill "
            f"{span(model['prefill_seconds_no_cache'])} without the cache, "
            f"{span(model['prefill_seconds'] + model['snapshot_seconds'])} with it "
            f"(page-ins, page-outs and disk reads included); TTFT p50/p95/p99 "
            f"{span(ttft['p50'])} / {span(ttft['p95'])} / {span(ttft['p99'])} (without: "
            f"{span(bare['p50'])} / {span(bare['p95'])} / {span(bare['p99'])}); "
            f"busy {span(model['busy_seconds'])} for arrivals over "
            f"{span(model['arrival_span_seconds'])}"
        )
    if report["live_over_budget_requests"]:
        lines.append(
            f"note      {report['live_over_budget_requests']} requests held more live state "
            "than the whole budget (it counts the live layers); nothing was paged out for them"
        )
    if report["over_budget_active_only_requests"]:
        lines.append(
            f"note      {report['over_budget_active_only_requests']} requests ended over budget "
            "with only active-path snapshots left (allowed: those can't be evicted)"
        )
    violations = report["violations"]
    oracle = report["oracle"]
    if oracle["comparison"] != "exact" and report["check"] != "off":
        lines.append(
            f"oracle    logits within {oracle['logits']:.3g}, state within {oracle['state']:.3g} "
            f"({oracle['basis']})"
        )
    lines.append(
        f"checks    {report['check']}: "
        + (
            "clean"
            if not violations
            else f"{len(violations)} violation(s), first: "
            f"request {violations[0]['request']} (line {violations[0]['line']}) "
            f"{violations[0]['invariant']}: {violations[0]['detail']}"
        )
    )
    return "\n".join(lines)


def markdown_summary(report: dict[str, Any]) -> str:
    budget = report["budget_bytes"]
    rows = [
        ("trace", f"`{report['trace']['path']}` ({report['requests']} requests)"),
        (
            "backend / model / policy",
            f"{report['backend']} / {report['model']} / {report['policy']}",
        ),
        ("budget", "inf" if budget is None else format_bytes(budget)),
        ("hit ratio", f"{report['hit_ratio']:.4f} (ideal {report['ideal_hit_ratio']:.4f})"),
        (
            "prompt / cached / computed tokens",
            f"{report['prompt_tokens']:,} / {report['cached_tokens']:,} / {report['computed_tokens']:,}",
        ),
        ("peak paged-out", format_bytes(report["peak_paged_out_bytes"])),
        (
            "evictions / splits / merges",
            f"{report['evictions']} / {report['splits']} / {report['merges']}",
        ),
        ("violations", str(len(report["violations"]))),
        ("wall", f"{report['wall_seconds']:.2f} s"),
    ]
    body = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"### kvtrie replay\n\n| metric | value |\n|---|---|\n{body}\n"
