"""Benchmarks: speed and memory targets, measured and written as JSON (never timed tests)."""

from __future__ import annotations

import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kvtrie.backends.fake import FakeBackend
from kvtrie.backends.profiles import get_profile
from kvtrie.core.prefix_cache import DEFAULT_BUDGET_BYTES, POLICIES, PrefixCache

from .build import make_cache
from .replay import replay
from .runner import CheckMode, RequestRunner
from .traces import Request, Trace, load_trace, resolve_prompt

__all__ = [
    "INTERVAL_PERCENTILES",
    "RESAMPLED_DRAWS",
    "bench_eviction",
    "bench_mlx",
    "bench_replay",
    "peak_rss_bytes",
    "percentile_interval",
    "ratio_interval",
    "resampled_rounds",
]

RESAMPLED_DRAWS = 1000  # rounds drawn again with replacement behind each interval
INTERVAL_PERCENTILES = (5, 95)  # the interval every bench reports: a 90 % one

REPLAY_WALL_TARGET_S = 20.0
REPLAY_RSS_TARGET_BYTES = 2 << 30


HIT_TTFT_TARGET = 1.1


def peak_rss_bytes() -> int:
    """This process's peak resident set size (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def bench_replay(path: Path, quick: bool = False) -> dict[str, Any]:
    """The Mooncake conversation trace (at ``path``), fake llama-8b, infinite budget, improved
    policy, incremental invariants and the oracle after every request."""
    backend = FakeBackend(get_profile("llama-8b"))
    trace = load_trace(path, vocab_size=backend.vocab_size)
    cache = make_cache(backend, None, POLICIES["kvtrie-improved"])
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


EVICTION_GROWTH_TARGET = 2.0  # per-eviction cost may at most double in a 10x larger trie


def _seconds_per_eviction(leaves: int, evictions: int, seed: int = 0) -> dict[str, Any]:
    """A trie of ``leaves`` one-request conversations on the fake backend under a budget that
    never binds, then a budget cut that evicts ``evictions`` of them: seconds per eviction."""
    backend = FakeBackend(get_profile("tiny-attention"))
    cache = PrefixCache(backend.new_layers(), budget_bytes=1 << 60, policy=POLICIES["kvtrie-seed"])
    rng = np.random.default_rng(seed)
    for _ in range(leaves):
        session = cache.begin(rng.integers(1, 1 << 30, size=8))
        backend.evaluate(cache.layers, session.remaining)
        session.close()
    cache.begin(np.array([0, 0])).close()  # leave the last path, so every leaf is evictable
    nodes = sum(1 for _ in cache.nodes())
    per_leaf = cache.paged_out_bytes // leaves
    before = cache.stats.evictions
    started = time.perf_counter()
    cache.set_budget(cache.paged_out_bytes - evictions * per_leaf)
    seconds = time.perf_counter() - started
    done = cache.stats.evictions - before
    return {"nodes": nodes, "evictions": done, "seconds": seconds,
            "seconds_per_eviction": seconds / max(done, 1)}


def bench_eviction(quick: bool = False) -> dict[str, Any]:
    """Eviction cost in two tries 10x apart in size: with the incremental eviction index the
    cost per eviction stays about flat (a walk of the trie per eviction would grow 10x)."""
    small, large = (2_000, 20_000) if quick else (10_000, 100_000)
    rows = [_seconds_per_eviction(n, 1_000) for n in (small, large)]
    growth = rows[1]["seconds_per_eviction"] / rows[0]["seconds_per_eviction"]
    return {
        "benchmark": "eviction",
        "quick": quick,
        "machine": f"{platform.machine()} {platform.system()} python {platform.python_version()}",
        "tries": rows,
        "per_eviction_growth": growth,
        "targets": {"per_eviction_growth": EVICTION_GROWTH_TARGET},
        "targets_met": growth <= EVICTION_GROWTH_TARGET,
    }


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """The median wall seconds of ``repeats`` calls of ``fn`` (benchmarks, calibration)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _warm_and_pagein(model: str, n: int, tail: int, repeats: int) -> dict[str, float]:
    """Cold prefill of n tokens vs a warm one whose first n - tail tokens are cached (paged
    out behind another conversation), and a page-in of all n tokens vs their recompute."""
    from kvtrie.backends.mlx import MLXBackend

    backend = MLXBackend.from_name(model)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, backend.vocab_size, n).astype(np.int32)
    other = rng.integers(0, backend.vocab_size, tail).astype(np.int32)
    warm_prompt = np.concatenate([prompt[: n - tail], rng.integers(0, backend.vocab_size, tail)])

    def evaluate(layers):
        return lambda tokens: backend.evaluate(layers, tokens)

    def cold() -> None:
        layers = backend.new_layers()
        PrefixCache(layers, budget_bytes=None).begin(prompt).prefill(evaluate(layers))

    cache = make_cache(backend, None, POLICIES["kvtrie-improved"])
    run = evaluate(cache.layers)
    session = cache.begin(prompt)
    session.prefill(run, user_marks=[n - tail])
    session.close()

    def leave() -> None:
        s = cache.begin(other)
        s.prefill(run)
        s.close()

    def warm() -> None:
        s = cache.begin(warm_prompt)
        s.prefill(run)
        s.close()

    def page_in() -> None:
        import mlx.core as mx

        from kvtrie.backends.mlx.adapters import arrays_of

        cache.begin(np.concatenate([prompt, other[:1]])).close()
        # an attention restore is left lazy until the next model call: make it happen here
        mx.eval(*[a for layer in cache.layers for a in arrays_of(layer.cache)])

    cold()  # compile and allocate once before timing
    t_cold = median_seconds(cold, repeats)
    t_warm = t_pagein = 0.0
    warm_times, pagein_times = [], []
    for _ in range(repeats):
        leave()
        warm_times.append(median_seconds(warm, 1))
        leave()
        pagein_times.append(median_seconds(page_in, 1))
    t_warm, t_pagein = statistics.median(warm_times), statistics.median(pagein_times)
    return {
        "cold_prefill_seconds": t_cold,
        "warm_prefill_seconds": t_warm,
        "warm_cold_ratio": t_cold / t_warm,
        "warm_cold_ideal": n / tail,
        "pagein_seconds": t_pagein,
        "pagein_vs_recompute": t_cold / t_pagein,
    }


def disk_pagein(model: str, n: int, repeats: int) -> dict[str, float]:
    """A page-in of an ``n``-token prefix from the disk tier (a directory store; the files
    are in the OS page cache, as on a machine with RAM to spare) against its recompute."""
    import tempfile

    import mlx.core as mx

    from kvtrie.backends.mlx import MLXBackend
    from kvtrie.backends.mlx.adapters import arrays_of
    from kvtrie.core.store import DirectoryStore

    backend = MLXBackend.from_name(model)
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, backend.vocab_size, n).astype(np.int32)
    other = rng.integers(0, backend.vocab_size, 8).astype(np.int32)

    def cold() -> None:
        layers = backend.new_layers()
        backend.evaluate(layers, prompt)

    with tempfile.TemporaryDirectory(prefix="kvtrie-bench-") as folder:
        store = DirectoryStore(folder, backend.snapshot_codec(), background=False)
        # RAM budget 0: every page-out is written to the store, every page-in read from it
        cache = PrefixCache(
            backend.new_layers(), 0, POLICIES["kvtrie-seed"], store=store, disk_budget_bytes=None
        )
        run = lambda tokens: backend.evaluate(cache.layers, tokens)  # noqa: E731
        for tokens in (prompt, other):  # the second pages the first out, to disk
            session = cache.begin(tokens)
            session.prefill(run)
            session.close()

        def page_in() -> None:
            cache.begin(np.concatenate([prompt, other[:1]])).close()
            mx.eval(*[a for layer in cache.layers for a in arrays_of(layer.cache)])

        def leave() -> None:
            cache.begin(other[:4]).close()

        cold()  # compile and allocate once before timing
        t_cold = median_seconds(cold, repeats)
        times = []
        for _ in range(repeats):
            leave()
            times.append(median_seconds(page_in, 1))
        disk_bytes = cache.disk_bytes
        store.close()
    t_disk = statistics.median(times)
    return {
        "disk_pagein_seconds": t_disk,
        "disk_pagein_bytes": disk_bytes,
        "disk_pagein_vs_recompute": t_cold / t_disk,
    }


def _zero_hit_overhead(
    model: str, requests: int, prompt_tokens: int, outputs: int, repeats: int
) -> dict[str, float]:
    """Throughput with the cache on vs off when nothing is shared (its pure cost), with the
    ratio's 90 % interval over the ``repeats`` rounds: on this project's 2-core machine one
    round's ratio moves by about 2 %, as much as the target's margin."""
    from kvtrie.backends.mlx import MLXBackend

    backend = MLXBackend.from_name(model)
    rng = np.random.default_rng(1)
    prompts = [
        rng.integers(0, backend.vocab_size, prompt_tokens).astype(np.int32) for _ in range(requests)
    ]

    def off() -> None:
        for prompt in prompts:
            layers = backend.new_layers()
            backend.generate(layers, backend.evaluate(layers, prompt), outputs)

    def on() -> None:
        cache = PrefixCache(backend.new_layers(), budget_bytes=DEFAULT_BUDGET_BYTES)
        runner = RequestRunner(backend, cache, CheckMode(every=0))
        for prompt in prompts:
            runner.run(prompt, outputs)

    off()
    t_off, t_on = [], []
    for _ in range(repeats):  # interleaved, so drift on a busy machine hits both alike
        t_off.append(median_seconds(off, 1))
        t_on.append(median_seconds(on, 1))
    return {
        "cache_off_seconds": statistics.median(t_off),
        "cache_on_seconds": statistics.median(t_on),
        "overhead_zero_hit": statistics.median(t_off) / statistics.median(t_on),
        "overhead_zero_hit_interval": ratio_interval(t_off, t_on),
    }


def _hit_latency(model: str, n: int, rounds: int, shared: int = 0) -> dict[str, Any]:
    """Time to first token on a cache hit, kvtrie's drop-in against mlx-lm's own
    ``LRUPromptCache``: each cache serves two conversations of ``n`` tokens (the first
    ``shared`` of them the same, a system prompt), then ``rounds``
    rounds of one turn of each (4 new tokens, its first token generated with
    ``generate_step``), so every turn is a hit that leaves the other conversation. Three
    caches take each turn in turn, kvtrie with its defaults (the 8 GiB budget: a restore
    moves the snapshot into the live layers), kvtrie unbounded (the snapshot stays), and
    mlx-lm's: the same prefilled tokens, timed back to back, so a busy machine slows all
    three alike."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import LRUPromptCache, make_prompt_cache

    from kvtrie.backends.mlx import MLXBackend, MLXPromptCache

    backend = MLXBackend.from_name(model)
    rng = np.random.default_rng(2)

    def tokens(count: int) -> list[int]:
        return [int(t) for t in rng.integers(5, backend.vocab_size, count)]

    def generate(prompt: list[int], cache: list[Any]) -> list[int]:
        steps = generate_step(mx.array(prompt), backend.model, prompt_cache=cache, max_tokens=1)
        return [int(token) for token, _ in steps]

    cached: dict[str, list[int]] = {"default": [], "unbounded": [], "mlxlm": []}

    def kvtrie_turn(cache: MLXPromptCache, name: str) -> Callable[[list[int]], list[int]]:
        def turn(prompt: list[int]) -> list[int]:
            before = cache.cache.stats.computed_tokens
            caches, rest = cache.fetch(prompt)
            token = generate(rest, caches)
            cache.store(token)
            cached[name].append(len(prompt) - (cache.cache.stats.computed_tokens - before))
            return token

        return turn

    lru = LRUPromptCache(10)

    def mlxlm_turn(prompt: list[int]) -> list[int]:
        caches, rest = lru.fetch_nearest_cache("m", prompt)
        cached["mlxlm"].append(len(prompt) - len(rest))
        caches = caches or make_prompt_cache(backend.model)
        token = generate(rest, caches)
        lru.insert_cache("m", prompt + token, caches)
        return token

    turns = {
        "default": kvtrie_turn(MLXPromptCache(backend.model), "default"),
        "unbounded": kvtrie_turn(MLXPromptCache(backend.model, budget_bytes=None), "unbounded"),
        "mlxlm": mlxlm_turn,
    }
    system = tokens(shared)
    first = [system + tokens(n - shared), system + tokens(n - shared)]
    histories = {name: [list(c) for c in first] for name in turns}
    for name, turn in turns.items():  # the first turns prefill (and compile): not timed
        for history in histories[name]:
            history += turn(history)
    seconds: dict[str, list[float]] = {name: [] for name in turns}
    for _ in range(rounds):
        for conversation in (0, 1):
            extra = tokens(4)
            for name, turn in turns.items():
                history = histories[name][conversation]
                history += extra
                started = time.perf_counter()
                history += turn(list(history))
                seconds[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    timed = slice(2, None)  # the turns timed: after each conversation's first
    return {
        "hit_model": model,
        "hit_shared_tokens": shared,
        "hit_turns": len(seconds["mlxlm"]),
        # each cache's reused prompt tokens, median over the timed turns
        "hit_cached_tokens": {
            name: int(statistics.median(counts[timed])) for name, counts in cached.items()
        },
        "hit_ttft_kvtrie_seconds": medians["default"],
        "hit_ttft_kvtrie_unbounded_seconds": medians["unbounded"],
        "hit_ttft_mlxlm_seconds": medians["mlxlm"],
        "hit_ttft_ratio": medians["default"] / medians["mlxlm"],
        "hit_ttft_ratio_interval": ratio_interval(seconds["default"], seconds["mlxlm"]),
        "hit_ttft_ratio_unbounded": medians["unbounded"] / medians["mlxlm"],
    }


def resampled_rounds(rounds: int) -> Iterator[np.ndarray]:
    """The indices of ``rounds`` rounds drawn again with replacement, :data:`RESAMPLED_DRAWS`
    times, from a fixed seed so that a report's intervals come out the same from the same
    timings."""
    rng = np.random.default_rng(0)
    for _ in range(RESAMPLED_DRAWS):
        yield rng.integers(0, rounds, rounds)


def percentile_interval(values: list[float]) -> list[float]:
    """The :data:`INTERVAL_PERCENTILES` of ``values``: the interval every bench reports."""
    return [float(np.percentile(values, q)) for q in INTERVAL_PERCENTILES]


def ratio_interval(numerators: list[float], denominators: list[float]) -> list[float]:
    """The 90 % interval of ``median(numerators) / median(denominators)`` under the rounds' own
    spread (:func:`resampled_rounds`, a pair of timings a round). On a shared machine the ratio
    of two medians moves from run to run by as much as the difference it is meant to show; the
    interval says by how much."""
    top, bottom = np.array(numerators), np.array(denominators)
    return percentile_interval(
        [
            float(np.median(top[drawn]) / np.median(bottom[drawn]))
            for drawn in resampled_rounds(len(top))
        ]
    )


def _shared_prefix_workload(vocab_size: int) -> Trace:
    """A system prompt with interleaved users, plus branching chats, as one trace."""
    from .generators import generate

    requests: list[Request] = []
    for kind, sizes in (
        (
            "system-prompt",
            {
                "users": 4,
                "turns": 3,
                "system_tokens": 96,
                "question_tokens": 12,
                "output_tokens": 6,
            },
        ),
        (
            "branching",
            {"chats": 3, "turns": 4, "system_tokens": 64, "message_tokens": 10, "output_tokens": 6},
        ),
    ):
        _, lines = generate(kind, seed=3, vocab_size=vocab_size, **sizes)
        for line in lines:
            parent = line.get("prefix_of")
            requests.append(
                Request(
                    id=f"{kind}-{line['id']}",
                    conversation=line["conversation"],
                    arrival_ms=0,
                    line=len(requests) + 1,
                    tokens=np.asarray(line["prompt"], dtype=np.int32),
                    prefix_of=f"{kind}-{parent}" if parent else None,
                    prefix_length=line.get("prefix_length", 0),
                    outputs=line["output"],
                )
            )
    referenced = {r.prefix_of for r in requests if r.prefix_of}
    return Trace("generated:system-prompt+branching", "", "kvtrie", {}, requests, referenced)


def _computed_vs_mlxlm(model: str) -> list[dict[str, Any]]:
    """Tokens computed by kvtrie and by mlx-lm's LRUPromptCache on one shared-prefix workload,
    unbounded, then at half the most kvtrie paged out unbounded: both must evict. (Unbounded,
    kvtrie's snapshots from position 0 share the live buffers and count them whole, as
    mlx-lm's entries do, so at that peak itself both would hold everything.)"""
    from kvtrie.backends.mlx import MLXBackend

    from .mlxlm import mlxlm_prompt_cache_replay

    backend = MLXBackend.from_name(model)
    trace = _shared_prefix_workload(backend.vocab_size)
    history: dict[str, np.ndarray] = {}
    pairs = []
    for request in trace.requests:
        prompt = resolve_prompt(request, history, backend.vocab_size)
        outputs = np.asarray(request.outputs, dtype=np.int32)
        history[request.id] = np.concatenate([prompt, outputs])
        pairs.append((prompt, outputs))
    rows: list[dict[str, Any]] = []
    budget: int | None = None
    for _ in range(2):
        cache = make_cache(backend, budget, POLICIES["kvtrie-improved"])
        outcome = replay(trace, backend, cache, CheckMode(every=0), progress=False)
        theirs = mlxlm_prompt_cache_replay(backend, pairs, budget)
        rows.append(
            {
                "model": model,
                "budget_bytes": budget,
                "requests": outcome.requests,
                "prompt_tokens": cache.stats.prompt_tokens,
                "kvtrie_computed_tokens": cache.stats.computed_tokens,
                "mlxlm_computed_tokens": theirs["computed_tokens"],
                "kvtrie_live_bytes": cache.live_bytes,
                "kvtrie_paged_out_bytes": cache.paged_out_bytes,
                "kvtrie_peak_paged_out_bytes": cache.ledger.peak,
            }
        )
        budget = cache.ledger.peak // 2
    return rows


def bench_mlx(quick: bool = False) -> dict[str, Any]:
    """The MLX figures, each a ratio measured within this one run."""
    n, tail, repeats = (512, 32, 2) if quick else (2048, 32, 3)
    attention = "tiny-attention" if quick else "small-attention"
    hybrid = "tiny-hybrid" if quick else "small-hybrid"
    warm = _warm_and_pagein(attention, n, tail, repeats)
    overhead = _zero_hit_overhead(
        attention, 4 if quick else 8, 128 if quick else 512, 4 if quick else 16, 3 if quick else 5
    )
    comparisons = [row for m in (attention, hybrid) for row in _computed_vs_mlxlm(m)]
    hit_n, hit_rounds = (256, 3) if quick else (2048, 30)
    hit = _hit_latency("wide-attention", hit_n, hit_rounds)
    # the same behind a shared system prompt: a switch then copies each conversation's own
    # range out and in, where mlx-lm's cache takes the stored request's buffers
    hit_shared = _hit_latency("wide-attention", hit_n, hit_rounds, shared=hit_n * 3 // 4)
    disk = disk_pagein(attention, n, repeats)
    return {
        "benchmark": "mlx",
        "quick": quick,
        "machine": f"{platform.machine()} {platform.system()} python {platform.python_version()}",
        "prompt_tokens": n,
        "cached_tokens_warm": n - tail,
        "attention_model": attention,
        **warm,
        **overhead,
        **hit,
        "hit_shared_prefix": hit_shared,
        **disk,
        "computed_tokens": comparisons,
        "targets": {
            "warm_cold_ratio": 0.8 * n / tail,
            "pagein_vs_recompute": 20.0,
            "overhead_zero_hit": 0.99,
            # at or below mlx-lm's, with a stated 10 % for this CPU's run-to-run noise
            "hit_ttft_ratio": HIT_TTFT_TARGET,
            "hit_ttft_ratio_shared_prefix": HIT_TTFT_TARGET,
        },
        "targets_met": {
            "warm_cold_ratio": warm["warm_cold_ratio"] >= 0.8 * n / tail,
            "pagein_vs_recompute": warm["pagein_vs_recompute"] >= 20.0,
            "overhead_zero_hit": overhead["overhead_zero_hit"] >= 0.99,
            "hit_ttft_ratio": hit["hit_ttft_ratio"] <= HIT_TTFT_TARGET,
            "hit_ttft_ratio_shared_prefix": hit_shared["hit_ttft_ratio"] <= HIT_TTFT_TARGET,
            "kvtrie_computes_no_more": all(
                c["kvtrie_computed_tokens"] <= c["mlxlm_computed_tokens"] for c in comparisons
            ),
            "kvtrie_computes_fewer_under_budget": all(
                c["kvtrie_computed_tokens"] < c["mlxlm_computed_tokens"]
                for c in comparisons
                if c["budget_bytes"] is not None
            ),
        },
    }
