"""The infinite-cache bound: the longest prefix any earlier request evaluated, less one token."""

from __future__ import annotations

import numpy as np

from kvtrie.core.trie import ByteLedger, Node, as_tokens, insert, match

from .traces import Trace, resolve_prompt

__all__ = ["IdealPrefixes", "ideal_reuse"]


class IdealPrefixes:
    """A bare token trie of everything evaluated so far (no snapshots, nothing evicted)."""

    def __init__(self) -> None:
        self.root = Node(tokens=as_tokens([]), end=0)
        self._ledger = ByteLedger()

    def cached(self, prompt: np.ndarray) -> int:
        """Tokens of ``prompt`` an infinite cache would reuse (at least one is evaluated)."""
        _, matched = match(self.root, prompt)
        return min(matched, len(prompt) - 1)

    def insert(self, tokens: np.ndarray) -> None:
        """Remember an evaluated sequence."""
        insert(self.root, tokens, self._ledger)


def ideal_reuse(trace: Trace, vocab_size: int) -> tuple[int, int]:
    """(cached, prompt) tokens of an infinite cache over a trace whose outputs are explicit."""
    ideal = IdealPrefixes()
    history: dict[str, np.ndarray] = {}
    cached = prompt_tokens = 0
    for request in trace.requests:
        if isinstance(request.outputs, int):
            raise ValueError(
                f"request {request.id} gives only an output length; the bound "
                "depends on the backend's outputs, replay the trace instead"
            )
        prompt = resolve_prompt(request, history, vocab_size)
        outputs = as_tokens(request.outputs)
        cached += ideal.cached(prompt)
        prompt_tokens += len(prompt)
        ideal.insert(np.concatenate([prompt, outputs[:-1]]))
        history[request.id] = np.concatenate([prompt, outputs])
    return cached, prompt_tokens
