"""kvtrie as the prompt cache of mlx-lm generation, shared across conversations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kvtrie.core.prefix_cache import DEFAULT_BUDGET_BYTES, CachePolicy, PrefixCache, Session

from .backend import MLXBackend
from .models import vocab_of

__all__ = ["MLXPromptCache"]


class MLXPromptCache:
    """kvtrie as the prompt cache of mlx-lm generation, shared across conversations.

    ``fetch`` restores the longest cached prefix and evaluates all but the prompt's last token
    (taking kvtrie's snapshots on the way); hand its caches and remaining token to
    ``mlx_lm.generate_step`` / ``stream_generate`` as ``prompt_cache`` and ``prompt``; then
    ``store`` the generated tokens. mlx-lm feeds every token it yields back into the model, so
    the live state covers prompt + generated tokens.
    """

    def __init__(
        self,
        model: Any,
        budget_bytes: int | None = DEFAULT_BUDGET_BYTES,
        policy: CachePolicy | None = None,
        name: str = "model",
    ) -> None:
        self.backend = MLXBackend(model, name, vocab_of(model))
        self.cache = PrefixCache(self.backend.new_layers(), budget_bytes, policy)
        self._session: Session | None = None

    def fetch(self, prompt: Sequence[int] | np.ndarray) -> tuple[list[Any], list[int]]:
        """The live mlx-lm caches and the prompt tokens mlx-lm still has to evaluate (one)."""
        layers = self.cache.layers
        self._session = session = self.cache.begin(prompt)
        session.prefill(lambda t: self.backend.evaluate(layers, t), until=len(session.prompt) - 1)
        return [layer.cache for layer in layers], [int(session.prompt[-1])]

    def store(self, generated: Sequence[int]) -> None:
        """Record what mlx-lm generated (and fed back) after ``fetch``."""
        session, self._session = self._session, None
        if session is None:
            raise RuntimeError("store() without a fetch()")
        evaluated = 1 + len(generated)  # the last prompt token and every yielded token
        for layer in self.cache.layers:
            layer.advance(evaluated)
        session.close(list(generated))


