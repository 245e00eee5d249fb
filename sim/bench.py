"""Benchmarks: speed and memory targets, measured and written as JSON (never timed tests)."""

from __future__ import annotations

import platform
import resource
import sys
from typing import Any

from kvtrie.backends.fake import FakeBackend
from kvtrie.backends.profiles import get_profile
from kvtrie.core.prefix_cache import POLICIES, PrefixCache
from kvtrie.traces import bundled_path

from .replay import replay
from .runner import CheckMode
from .traces import load_trace

__all__ = ["bench_replay", "peak_rss_bytes"]

REPLAY_WALL_TARGET_S = 20.0
REPLAY_RSS_TARGET_BYTES = 2 << 30


def peak_rss_bytes() -> int:
    """This process's peak resident set size (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def bench_replay(quick: bool = False) -> dict[str, Any]:
    """The Mooncake conversation trace, fake llama-8b, infinite budget, improved policy,
    incremental invariants and the oracle after every request."""
    path = bundled_path("mooncake")
    assert path is not None
    backend = FakeBackend(get_profile("llama-8b"))
    trace = load_trace(path, vocab_size=backend.vocab_size)
    cache = PrefixCache(backend.new_layers(), budget_bytes=None, policy=POLICIES["kvtrie-improved"])
    outcome = replay(trace, backend, cache, CheckMode(), limit=1000 if quick else None)
    stats = cache.stats
    peak = peak_rss_bytes()
    return {
        "benchmark": "replay",
        "quick": quick,
        "machine": f"{platform.machine()} {platform.system()} python {platform.python_version()}",
        "trace": str(path),
        "requests": outcome.requests,
        "prompt_tokens": stats.prompt_tokens,
        "hit_ratio": stats.cached_tokens / stats.prompt_tokens,
        "ideal_hit_ratio": outcome.ideal_cached_tokens / stats.prompt_tokens,
        "wall_seconds": outcome.wall_seconds,
        "tokens_per_second": stats.prompt_tokens / outcome.wall_seconds,
        "peak_rss_bytes": peak,
        "targets": {
            "wall_seconds": REPLAY_WALL_TARGET_S,
            "peak_rss_bytes": REPLAY_RSS_TARGET_BYTES,
        },
        "targets_met": outcome.wall_seconds <= REPLAY_WALL_TARGET_S
        and peak <= REPLAY_RSS_TARGET_BYTES,
        "clean": not outcome.violations,
    }
