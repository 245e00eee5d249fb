"""Replays a trace through the cache, serially in arrival order, checking after every request."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
from tqdm import tqdm

from kvtrie.backends.base import Backend
from kvtrie.core.invariants import Violation
from kvtrie.core.prefix_cache import PrefixCache
from kvtrie.core.render import render_trie

from .runner import CheckMode, RequestRunner
from .timing import ServerClock, moved_bytes
from .traces import Event, Trace, resolve_prompt

__all__ = ["ReplayOutcome", "RequestViolation", "replay", "skipped_history"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestViolation:
    request: str
    line: int
    invariant: str
    detail: str

    def as_dict(self) -> dict[str, object]:
        return {
            "request": self.request,
            "line": self.line,
            "invariant": self.invariant,
            "detail": self.detail,
        }


@dataclass
class ReplayOutcome:
    """What a replay measured; the cache's own counters live on ``cache.stats``."""

    requests: int = 0
    output_tokens: int = 0
    ideal_cached_tokens: int = 0
    over_budget_requests: int = 0
    peak_ram_bytes: int = 0  # paged-out and live bytes together, after a request, at most
    wall_seconds: float = 0.0
    violations: list[RequestViolation] = field(default_factory=list)
    trie_dump: str = ""
    stopped_early: bool = False
    clock: ServerClock | None = None  # the time model's estimate of every request's seconds


def skipped_history(trace: Trace, start: int, vocab_size: int) -> dict[str, np.ndarray]:
    """The evaluated sequences of the first ``start`` requests that later ones continue, for
    a replay that resumes at ``start``; a ValueError when one of them has generated outputs
    (only serving it would say what they are)."""
    history: dict[str, np.ndarray] = {}
    for request in trace.requests[:start]:
        if request.id not in trace.referenced:
            continue
        if isinstance(request.outputs, int):
            raise ValueError(
                f"{trace.path}:{request.line}: --start {start} skips request {request.id!r}, "
                "which a later request continues, and its outputs are generated (a count): "
                "start at or before it, or give its outputs as tokens"
            )
        prompt = resolve_prompt(request, history, vocab_size)
        history[request.id] = np.concatenate([prompt, np.asarray(request.outputs, np.int32)])
    return history


def replay(
    trace: Trace,
    backend: Backend,
    cache: PrefixCache,
    mode: CheckMode,
    limit: int | None = None,
    keep_going: bool = False,
    progress: bool | None = None,
    clock: ServerClock | None = None,
    start: int = 0,
) -> ReplayOutcome:
    """Serve every request of ``trace`` from index ``start`` (``limit`` of them), applying
    their events, and check as ``mode`` says. A violation stops the replay with a dump of the
    trie, unless ``keep_going``. A ``clock`` estimates each request's seconds from what it
    reused. ``start`` resumes a replay stopped there, on the disk tier it left."""
    end = None if limit is None else start + limit
    requests = trace.requests[start:end]
    runner = RequestRunner(backend, cache, mode)
    history = skipped_history(trace, start, backend.vocab_size)
    outcome = ReplayOutcome(clock=clock)
    started = time.perf_counter()

    def stop_at(where: str, line: int, violations: list[Violation]) -> bool:
        """Keep the violations; True when the replay must stop here."""
        for v in violations:
            outcome.violations.append(RequestViolation(where, line, v.invariant, v.detail))
        if violations and not keep_going:
            outcome.trie_dump = render_trie(cache)
            outcome.stopped_early = True
            log.error("violation at %s (line %d): %s", where, line, violations[0])
            return True
        return False

    def apply_events(events: tuple[Event, ...]) -> bool:
        return any(stop_at(f"event:{e.kind}", e.line, runner.apply(e)) for e in events)

    # progress None: a bar only on a terminal (tqdm's own test)
    bar = tqdm(
        requests, desc="replay", unit="req", disable=None if progress is None else not progress
    )
    stopped = False
    for request in bar:
        if apply_events(request.events):
            stopped = True
            break
        prompt = resolve_prompt(request, history, backend.vocab_size)
        before = replace(cache.stats) if clock is not None else None  # the time model's bytes
        try:
            result = runner.run(prompt, request.outputs, request.user_snapshots)
        except (AssertionError, ValueError) as exc:
            # the cache caught itself inconsistent mid-operation; the runner drives it with the
            # right counts, so a refused close is the cache's fault too
            stop_at(request.id, request.line, [Violation("ASSERT", str(exc))])
            outcome.stopped_early = stopped = True
            break
        outcome.requests += 1
        outcome.output_tokens += len(result.outputs)
        outcome.ideal_cached_tokens += result.ideal_cached
        if clock is not None:
            account = result.account
            clock.serve(
                request.id,
                request.arrival_ms,
                account.prompt_tokens,
                account.cached_tokens,
                generated=len(result.outputs),
                measured=(result.restore_seconds, result.prefill_seconds)
                if backend.measures_time
                else None,
                **moved_bytes(before, cache.stats),
            )
        if request.id in trace.referenced:
            history[request.id] = np.concatenate([prompt, result.outputs])
        budget = cache.budget_bytes
        if budget is not None and cache.paged_out_bytes > budget:
            outcome.over_budget_requests += 1
        ram = cache.paged_out_bytes + cache.live_bytes
        outcome.peak_ram_bytes = max(outcome.peak_ram_bytes, ram)
        if outcome.requests % 64 == 0 and not bar.disable:
            stats = cache.stats
            bar.set_postfix(hit=f"{stats.cached_tokens / max(stats.prompt_tokens, 1):.3f}")
        if stop_at(request.id, request.line, result.violations):
            stopped = True
            break
    if not stopped and start + len(requests) == len(trace.requests):
        apply_events(trace.trailing_events)
    bar.close()
    outcome.stopped_early = stopped and outcome.requests < len(requests)
    outcome.wall_seconds = time.perf_counter() - started
    return outcome
