"""kvtrie in mlx_lm.server's place of its ``LRUPromptCache``: the same duck-typed methods
(``fetch_nearest_cache``, ``insert_cache``, ``trim_to``, ``nbytes``, ``__len__``,
``stats_by_type``) over one prefix trie.

The server batches requests, so several sequences are live at once while kvtrie keeps one
active path: ``fetch_nearest_cache`` restores the longest cached prefix into kvtrie's live
layers and hands the server a copy; ``insert_cache`` takes a state the server computed
(the prompt's segments, a finished answer) as kvtrie's live state over those tokens, where
the trie pages it out when the next request moves the active path. The trie is changed under
one lock. Tested with mlx-lm 0.32.x (the project's pin).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx

from kvtrie.core.prefix_cache import POLICIES, CachePolicy, PrefixCache

from .adapters import arrays_of
from .backend import MLXBackend
from .models import vocab_of

__all__ = ["ServerPromptCache"]


class ServerPromptCache:
    """A prefix trie under a byte budget, shared by every request mlx_lm.server serves.

    ``on_fetch(tokens, cached)`` and ``on_insert(tokens, cache_type)`` are told of each call
    (``kvtrie serve --record`` writes its trace from them)."""

    def __init__(
        self,
        model: Any,
        model_key: Any,
        budget_bytes: int | None,
        policy: CachePolicy | None = None,
        on_fetch: Callable[[list[int], int], None] | None = None,
        on_insert: Callable[[list[int], str], None] | None = None,
    ) -> None:
        self.backend = MLXBackend(model, str(model_key), vocab_of(model))
        self.model_key = model_key
        self.budget_bytes = budget_bytes
        self.cache = PrefixCache(
            self.backend.new_layers(), budget_bytes, policy or POLICIES["kvtrie-improved"]
        )
        self.lock = threading.Lock()
        self.on_fetch = on_fetch
        self.on_insert = on_insert

    def fetch_nearest_cache(self, model_key: Any, tokens: Sequence[int]) -> tuple[Any, list[int]]:
        """A copy of the caches of the longest cached prefix (None when nothing is cached) and
        the tokens the server still evaluates: never none, so generation has logits."""
        tokens = [int(t) for t in tokens]
        if model_key != self.model_key or not tokens:
            return None, tokens
        with self.lock:
            session = self.cache.begin(tokens)
            cached = session.cached_tokens
            live = [a for layer in self.cache.layers for a in arrays_of(layer.cache)]
            mx.eval(*live)  # a restore is left lazy; the copies must not share its graph
            caches = [copy.deepcopy(layer.cache) for layer in self.cache.layers] if cached else None
            session.close()
            if self.on_fetch is not None:
                self.on_fetch(tokens, cached)
        return caches, tokens[cached:]

    def insert_cache(
        self,
        model_key: Any,
        tokens: Sequence[int],
        prompt_cache: list[Any],
        *,
        cache_type: str = "assistant",
    ) -> None:
        """The server's state over ``tokens`` becomes kvtrie's live state there; the server
        hands the caches over and does not use them again."""
        tokens = [int(t) for t in tokens]
        if model_key != self.model_key or not tokens:
            return
        with self.lock:
            session = self.cache.begin(tokens, counted=False)
            try:
                for layer, state in zip(self.cache.layers, prompt_cache):
                    layer.adopt(state, len(tokens))
            except ValueError:
                self.cache.fall_back_to_root()  # a state kvtrie can't take: not cached
                session.close()
                raise
            session.close()
            if self.on_insert is not None:
                self.on_insert(tokens, cache_type)

    def trim_to(self, *, n_sequences: int | None = None, n_bytes: int | None = None) -> None:
        """Evict until at most ``n_bytes`` are paged out (the server's budget less what its
        live batch holds); kvtrie's own budget stays as set. kvtrie counts bytes, not
        sequences: ``n_sequences`` is accepted and has no effect."""
        if n_bytes is None:
            return
        with self.lock:
            self.cache.set_budget(max(0, n_bytes) if self.budget_bytes is None
                                  else min(self.budget_bytes, max(0, n_bytes)))
            self.cache.set_budget(self.budget_bytes)

    @property
    def nbytes(self) -> int:
        return self.cache.paged_out_bytes

    def __len__(self) -> int:
        """Nodes that hold paged-out snapshots (the server logs it as sequences)."""
        with self.lock:
            return sum(1 for node in self.cache.nodes() if node.has_snapshots())

    def stats_by_type(self) -> dict[str, dict[str, int]]:
        return {"kvtrie": {"n_sequences": len(self), "n_bytes": self.nbytes}}

    def summary(self) -> dict[str, Any]:
        """What ``kvtrie serve`` says when it stops: requests, cached and prompt tokens, the
        peak paged-out bytes against the budget, and a full check of the trie's invariants."""
        from kvtrie.core.invariants import check

        with self.lock:
            stats = self.cache.stats
            return {
                "requests": stats.requests,
                "prompt_tokens": stats.prompt_tokens,
                "cached_tokens": stats.cached_tokens,
                "peak_paged_out_bytes": self.cache.ledger.peak,
                "budget_bytes": self.budget_bytes,
                "violations": [str(v) for v in check(self.cache)],
            }
