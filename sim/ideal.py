"""The infinite-cache bound: the longest prefix any earlier request evaluated, less one token."""

from __future__ import annotations

import numpy as np
from kvtrie.core.trie import ByteLedger, Node, append_tokens, as_tokens, match, split_node

__all__ = ["IdealPrefixes"]


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
        path, matched = match(self.root, tokens)
        if matched == len(tokens):
            return
        last = path[-1]
        if matched < last.end:  # diverges inside an edge
            last = split_node(last, matched - last.start, [], self._ledger)
        append_tokens(last, tokens[matched:], self._ledger)
