"""Time to first token under a trace's own arrival times, from a cost model.

One server serves the requests in arrival order, one at a time (kvtrie keeps one active path
live): a request waits until the server is free, then pages out and restores what the switch
needs (reading first what it restores from the disk tier), prefills what it computes (its first
token comes out of that), and decodes the rest of its output before the next one starts. Moves
to the disk tier are written by the store's background writer, off the request's path: their
seconds are the disk's busy time, reported beside the server's. The same queue without a cache
prefills every prompt whole, so the two TTFTs differ by the seconds the cache saves, including
the waits those seconds shorten.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .costs import CostModel

__all__ = ["RequestTime", "ServerClock", "moved_bytes", "validation_errors"]

PERCENTILES = (50, 95, 99)


@dataclass(frozen=True)
class RequestTime:
    request: str
    arrival_s: float
    queue_s: float
    snapshot_s: float  # page-outs of the switch and the prompt's stops, page-ins, disk reads
    prefill_s: float
    decode_s: float
    ttft_s: float
    ttft_no_cache_s: float
    # on a real backend, what the replay took: the switch (page-outs, page-ins) and the
    # prefill (with the page-outs at its stops)
    measured_switch_s: float | None = None
    measured_prefill_s: float | None = None
    disk_read_s: float = 0.0  # of snapshot_s, reading the disk tier's files
    disk_write_s: float = 0.0  # moves to disk this request made, written in the background
    cached_tokens: int = 0  # the prompt's tokens the cache served
    computed_tokens: int = 0  # the prompt's tokens prefilled


def moved_bytes(before: Any, after: Any) -> dict[str, int]:
    """The snapshot bytes one request moved, from the cache's counters (its ``CacheStats``)
    before and after it: :meth:`ServerClock.serve`'s keyword arguments."""
    return {
        "paged_in_bytes": after.page_in_bytes - before.page_in_bytes,
        "paged_out_bytes": after.page_out_bytes - before.page_out_bytes,
        "disk_read_bytes": after.disk_read_bytes - before.disk_read_bytes,
        "disk_write_bytes": after.disk_write_bytes - before.disk_write_bytes,
    }


@dataclass
class _Queue:
    free_at: float = 0.0

    def serve(self, arrival: float, first_token: float, rest: float) -> tuple[float, float]:
        """The wait and the time to first token of a request arriving at ``arrival``."""
        start = max(arrival, self.free_at)
        self.free_at = start + first_token + rest
        return start - arrival, start - arrival + first_token


@dataclass
class ServerClock:
    """The estimated seconds of every request of a replay, with and without the cache.
    ``time_scale`` > 1 replays the trace's arrivals that many times faster."""

    cost: CostModel
    time_scale: float = 1.0
    times: list[RequestTime] = field(default_factory=list)
    prefill_no_cache_s: float = 0.0
    _cached: _Queue = field(default_factory=_Queue)
    _uncached: _Queue = field(default_factory=_Queue)

    def serve(
        self,
        request: str,
        arrival_ms: float,
        prompt: int,
        cached: int,
        generated: int,
        measured: tuple[float, float] | None = None,
        paged_in_bytes: int = 0,
        paged_out_bytes: int = 0,
        disk_read_bytes: int = 0,
        disk_write_bytes: int = 0,
    ) -> RequestTime:
        """One request's estimate; ``measured`` is its real (switch, prefill) seconds on a
        real backend, kept beside the estimate."""
        cost = self.cost
        arrival = arrival_ms / 1000.0 / self.time_scale
        disk_read = cost.disk_read_seconds(disk_read_bytes)
        snapshots = (
            cost.restore_seconds(paged_in_bytes)
            + cost.page_out_seconds(paged_out_bytes)
            + disk_read
        )
        prefill = cost.prefill_seconds(cached, prompt - cached)
        decode = cost.decode_seconds(generated)
        queue, ttft = self._cached.serve(arrival, snapshots + prefill, decode)
        whole = cost.prefill_seconds(0, prompt)
        self.prefill_no_cache_s += whole
        _, ttft_no_cache = self._uncached.serve(arrival, whole, decode)
        time = RequestTime(
            request,
            arrival,
            queue,
            snapshots,
            prefill,
            decode,
            ttft,
            ttft_no_cache,
            *(measured or (None, None)),
            disk_read_s=disk_read,
            disk_write_s=cost.disk_write_seconds(disk_write_bytes),
            cached_tokens=cached,
            computed_tokens=prompt - cached,
        )
        self.times.append(time)
        return time

    def summary(self) -> dict[str, Any]:
        """Totals and TTFT percentiles, with and without the cache, and every request's."""
        times = self.times
        ttft = np.array([t.ttft_s for t in times]) if times else np.zeros(1)
        ttft_no_cache = np.array([t.ttft_no_cache_s for t in times]) if times else np.zeros(1)
        prefill = sum(t.prefill_s for t in times)
        snapshots = sum(t.snapshot_s for t in times)
        span = times[-1].arrival_s - times[0].arrival_s if times else 0.0
        return {
            "cost": self.cost.describe(),
            "time_scale": self.time_scale,
            # the server's work against the arrivals' span: above it, requests queue
            "busy_seconds": prefill + snapshots + sum(t.decode_s for t in times),
            "arrival_span_seconds": span,
            "prefill_seconds": prefill,
            "snapshot_seconds": snapshots,
            "disk_read_seconds": sum(t.disk_read_s for t in times),
            # the background writer's work: above the arrivals' span, moves to disk back up
            "disk_write_seconds": sum(t.disk_write_s for t in times),
            "prefill_seconds_no_cache": self.prefill_no_cache_s,
            "seconds_saved": self.prefill_no_cache_s - prefill - snapshots,
            "ttft_seconds": {f"p{p}": float(np.percentile(ttft, p)) for p in PERCENTILES},
            "ttft_seconds_no_cache": {
                f"p{p}": float(np.percentile(ttft_no_cache, p)) for p in PERCENTILES
            },
            "validation": _validation(times),
            "requests": [asdict(t) for t in times],
        }


def _validation(times: list[RequestTime]) -> dict[str, float] | None:
    """The estimate against measured seconds (a real backend's replay)."""
    measured = [t for t in times if t.measured_prefill_s is not None]
    if not measured:
        return None
    return validation_errors(
        [t.prefill_s + t.snapshot_s for t in measured],
        [t.measured_prefill_s + t.measured_switch_s for t in measured],
    )


def validation_errors(estimated: list[float], measured: list[float]) -> dict[str, float]:
    """Estimated against measured seconds of the same requests: the totals, the total's
    relative error, and each request's relative error, median and 90th percentile."""
    guess, real = np.array(estimated), np.array(measured)
    errors = np.abs(guess - real) / real
    return {
        "estimated_seconds": float(guess.sum()),
        "measured_seconds": float(real.sum()),
        "total_error": float(abs(guess.sum() - real.sum()) / real.sum()),
        "median_error": float(np.median(errors)),
        "p90_error": float(np.percentile(errors, 90)),
    }
