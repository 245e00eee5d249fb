"""mlx-lm's own server prompt cache (``LRUPromptCache``) as a peer: the real class, driven over
a real MLX backend or over a simulated workload where entries only carry sizes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from mlx_lm.models.cache import (
    LRUPromptCache,
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)

from kvtrie.backends.mlx.adapters import adapt

from .peers import Costs, Peer, PeerUnavailable, Workload

__all__ = ["LRUPromptCachePeer", "mlxlm_prompt_cache_replay"]


def mlxlm_prompt_cache_replay(
    backend: Any, requests: Sequence[tuple[np.ndarray, np.ndarray]], max_bytes: int | None
) -> dict[str, int]:
    """Serve ``(prompt, outputs)`` requests through mlx-lm's own ``LRUPromptCache`` (the
    server's prompt cache) at ``max_bytes``, counting what it reuses and recomputes. As in
    kvtrie, the sequence just served is live and does not count against ``max_bytes``, and at
    least one prompt token is evaluated: an exact hit on a trimmable cache gives its last token
    back; on a cache that can't trim it is recomputed from scratch.
    """
    store = LRUPromptCache(
        max_size=1 << 30, max_bytes=(1 << 62) if max_bytes is None else max_bytes
    )
    counts = {"prompt_tokens": 0, "cached_tokens": 0, "computed_tokens": 0}
    for prompt, outputs in requests:
        caches, rest = store.fetch_nearest_cache(backend.model_name, [int(t) for t in prompt])
        if caches is not None and not rest:
            if can_trim_prompt_cache(caches):
                trim_prompt_cache(caches, 1)
                rest = [int(prompt[-1])]
            else:
                caches, rest = None, list(prompt)
        if caches is None:
            caches, rest = make_prompt_cache(backend.model), [int(t) for t in prompt]
        layers = [adapt(cache, backend.faults) for cache in caches]
        backend.evaluate(layers, np.asarray(rest, dtype=np.int32))
        if len(outputs) > 1:
            backend.evaluate(layers, outputs[:-1])
        evaluated = np.concatenate([prompt, outputs[:-1]])
        if max_bytes is not None:
            store.max_bytes = max_bytes + sum(cache.nbytes for cache in caches)
        store.insert_cache(backend.model_name, [int(t) for t in evaluated], caches)
        counts["prompt_tokens"] += len(prompt)
        counts["computed_tokens"] += len(rest)
        counts["cached_tokens"] += len(prompt) - len(rest)
    return counts


class _CountedEntry:
    """Stands in for one layer's mlx-lm cache inside LRUPromptCache when only its size and
    trimming matter (the workload is simulated): nbytes, is_trimmable, trim."""

    def __init__(self, tokens: int, per_token: int, fixed: int, trimmable: bool) -> None:
        self.offset, self.per_token, self.fixed, self.trimmable = (
            tokens,
            per_token,
            fixed,
            trimmable,
        )

    @property
    def nbytes(self) -> int:
        return self.offset * self.per_token + self.fixed

    def is_trimmable(self) -> bool:
        return self.trimmable

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n


REAL_MLXLM_TOKEN_LIMIT = 5_000_000  # its token-per-dict-level trie outgrows memory beyond this


class LRUPromptCachePeer(Peer):
    """mlx-lm's own LRUPromptCache class over a simulated workload: the real class decides
    what it keeps and reuses; entries only carry sizes. As for every peer, the sequence just
    served is live and does not count against the budget."""

    name = "mlx-lm-real"

    def __init__(self, budget: int | None, costs: Costs, workload: Workload) -> None:
        super().__init__(budget, costs)
        tokens = sum(len(prompt) for prompt, _ in workload)
        if tokens > REAL_MLXLM_TOKEN_LIMIT:
            raise PeerUnavailable(f"skipped: over {REAL_MLXLM_TOKEN_LIMIT:,} prompt tokens")
        self.store = LRUPromptCache(
            max_size=1 << 30, max_bytes=(1 << 62) if budget is None else budget
        )

    def serve(self, prompt: np.ndarray, evaluated: np.ndarray) -> int:
        tokens = prompt.tolist()
        entry, rest = self.store.fetch_nearest_cache("model", tokens)
        reuse = 0 if entry is None else len(tokens) - len(rest)
        if entry is not None and not rest and self.costs.recurrent:
            reuse = 0  # an exact hit can't give its last token back
        costs = self.costs
        live = _CountedEntry(len(evaluated), costs.per_token, costs.per_sequence, not costs.recurrent)
        if self.budget is not None:
            self.store.max_bytes = self.budget + live.nbytes
        self.store.insert_cache("model", evaluated.tolist(), [live])
        self.account(self.store.nbytes - live.nbytes)
        return min(reuse, len(tokens) - 1)
