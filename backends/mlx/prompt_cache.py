"""kvtrie as the prompt cache of mlx-lm generation, shared across conversations."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvtrie.core.prefix_cache import (
    DEFAULT_BUDGET_BYTES,
    POLICIES,
    CachePolicy,
    PrefixCache,
    Session,
)
from kvtrie.core.store import DirectoryStore

from .backend import MLXBackend
from .models import vocab_of

__all__ = ["MLXPromptCache"]


class MLXPromptCache:
    """kvtrie as the prompt cache of mlx-lm generation, shared across conversations.

    ``fetch`` restores the longest cached prefix and evaluates the prompt only as far as a
    scheduled snapshot needs (a restore point, ``snapshot-interval``, the last-token point);
    hand its caches and the remaining tokens to ``mlx_lm.generate_step`` / ``stream_generate``
    as ``prompt_cache`` and ``prompt``, so the rest of the prompt and the first token are one
    model call, as without kvtrie; then ``store`` the generated tokens. mlx-lm feeds every
    token it yields back into the model, so the live state covers prompt + generated tokens.
    """

    def __init__(
        self,
        model: Any,
        budget_bytes: int | None = DEFAULT_BUDGET_BYTES,
        policy: CachePolicy | None = None,
        name: str = "model",
        disk_dir: str | Path | None = None,
        disk_budget: int | None = None,
        budget_counts_live: bool = False,
    ) -> None:
        """``disk_dir`` adds a disk tier there under ``disk_budget`` bytes (None: unbounded):
        snapshots evicted from RAM are written to it, and a new process on the same directory
        adopts what it verifies (another model's directory, or one in use, is a
        :class:`~kvtrie.core.store.StoreError`). Call :meth:`close` to keep everything.
        ``budget_counts_live``: ``budget_bytes`` holds the live caches too (on unified memory
        both come out of one pool), so long contexts leave less room for paged-out ones."""
        self.backend = MLXBackend(model, name, vocab_of(model))
        # kvtrie-improved unless told otherwise: on a 3-conversation, 4-turn chat sharing a
        # 200-token system prompt (tiny-attention) it prefilled 344 tokens against the seed's
        # 544 unbounded, and 344 against 1,244 at a 128 KiB budget
        policy = POLICIES["kvtrie-improved"] if policy is None else policy
        store = None
        if disk_dir is not None:
            store = DirectoryStore(disk_dir, self.backend.snapshot_codec())
        self.cache = PrefixCache(
            self.backend.new_layers(),
            budget_bytes,
            policy,
            store=store,
            disk_budget_bytes=disk_budget,
            budget_counts_live=budget_counts_live,
        )
        self._session: Session | None = None
        self._fetched_at = 0  # the live offset fetch() left: mlx-lm evaluates from there

    def close(self) -> None:
        """Keep what is cached: the live path and RAM's snapshots go to the disk tier (when
        there is one), whose store writes down the trie for the next process."""
        self._session = None
        self.cache.close()

    def fetch(self, prompt: Sequence[int] | np.ndarray) -> tuple[list[Any], list[int]]:
        """The live mlx-lm caches and the prompt tokens mlx-lm still has to evaluate (at least
        one)."""
        if self._session is not None:
            previous, self._session = self._session, None
            previous.cache.fall_back_to_root()  # its generated tokens are unknown: recompute
            previous.close()
            raise ValueError(
                f"fetch() again without store(): the previous fetch() of "
                f"{len(previous.prompt)} prompt tokens was never stored; call "
                "store(generated_tokens) after each generation (that state was dropped)"
            )
        layers = self.cache.layers
        self._session = session = self.cache.begin(prompt)
        until = session.last_stop(len(session.prompt) - 1)
        session.prefill(lambda t: self.backend.evaluate(layers, t), until=until)
        self._fetched_at = until
        return [layer.cache for layer in layers], [int(t) for t in session.prompt[until:]]

    def store(self, generated: Sequence[int]) -> None:
        """Record every token mlx-lm yielded after ``fetch`` (the EOS token too): mlx-lm fed
        them all back into the model.

        The count is checked against what the attention layers evaluated (mlx-lm counts those
        itself); a recurrent layer can't count, so a wrong count would otherwise leave it at
        the wrong offset and a later request would restore a wrong state. On a mismatch the
        live state is dropped and ``ValueError`` names both counts.
        """
        session, self._session = self._session, None
        if session is None:
            raise RuntimeError("store() without a fetch()")
        generated = list(generated)
        start = self._fetched_at
        left = len(session.prompt) - start  # the prompt tokens fetch() handed to mlx-lm
        evaluated = left + len(generated)  # those, and every yielded token
        counted = [layer.offset - start for layer in self.cache.layers if layer.counts_itself]
        if any(count != evaluated for count in counted):
            self.cache.fall_back_to_root()
            session.close()
            raise ValueError(
                f"store() was given {len(generated)} generated tokens ({evaluated} evaluated "
                f"after fetch() with its {left} prompt tokens), but the model evaluated "
                f"{counted[0]}: pass every token mlx-lm yielded, the EOS token too (the "
                "live state was dropped; the next request recomputes)"
            )
        for layer in self.cache.layers:
            layer.advance(evaluated)
        session.close(generated)
