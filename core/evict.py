"""Eviction orders: which paged-out node goes first when the budget is exceeded."""

from __future__ import annotations

from typing import Protocol

from .trie import Node

__all__ = ["EvictionOrder", "OldestDeepestLargest"]


class EvictionOrder(Protocol):
    """Ranks eviction candidates: the node with the smallest ``priority`` is evicted first."""

    name: str

    def priority(self, node: Node) -> tuple[int, ...]: ...


class OldestDeepestLargest:
    """The seed's order: least recently used, then deepest (largest end), then most bytes."""

    name = "oldest-deepest-largest"

    def priority(self, node: Node) -> tuple[int, ...]:
        return (node.last_used, -node.end, -node.snapshot_bytes)
