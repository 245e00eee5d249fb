"""Eviction: which paged-out node goes first, the index that finds it, and what evicting does.

The order is a strategy (:class:`EvictionOrder`); :class:`EvictionIndex` keeps the evictable
nodes in a lazy heap keyed by it, updated wherever the trie touches a node, so finding a victim
costs O(log n) instead of a walk of the whole trie. :class:`Evictor` enforces the budget with
it: leaves are removed (or trimmed, with :class:`~kvtrie.core.policy.TrimTailPages`), lone
children merged, branch points keep their place and drop their snapshots.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections.abc import Container
from typing import TYPE_CHECKING, Protocol

from .trie import Node, merge_with_child, remove_leaf, split_node, walk

if TYPE_CHECKING:  # the cache builds its evictor; the evictor only reads it
    from .prefix_cache import PrefixCache

__all__ = [
    "EvictionIndex",
    "EvictionOrder",
    "Evictor",
    "OldestDeepestLargest",
    "TRIM_PAGE",
    "page_floor",
]

log = logging.getLogger(__name__)

TRIM_PAGE = 16  # tokens: leaves are trimmed, and paged out under pressure, in pages of this size


def page_floor(offset: int) -> int:
    """The page boundary at or below ``offset``: pages are absolute positions, as a block
    cache's are, so a leaf that starts mid-page loses its partial last page first."""
    return offset // TRIM_PAGE * TRIM_PAGE


class EvictionOrder(Protocol):
    """Ranks eviction candidates: the node with the smallest ``priority`` is evicted first."""

    name: str

    def priority(self, node: Node) -> tuple[int, ...]: ...


class OldestDeepestLargest:
    """The seed's order: least recently used, then deepest (largest end), then most bytes."""

    name = "oldest-deepest-largest"

    def priority(self, node: Node) -> tuple[int, ...]:
        return (node.last_used, -node.end, -node.snapshot_bytes)


class EvictionIndex:
    """The nodes holding snapshots, in a heap by eviction priority, kept up to date lazily.

    Every node the trie touches is pushed with its priority at that moment, unless an entry
    with that priority is already queued for it; an entry whose node has since left the trie,
    dropped its snapshots or changed priority is stale and skipped when it reaches the top (a
    changed one is pushed again with its new priority). Protected nodes (the active path) are
    set aside while a victim is found and put back after. The heap is rebuilt from the trie
    when stale entries outnumber live ones, so it stays O(nodes).
    """

    def __init__(self, order: EvictionOrder) -> None:
        self.order = order
        self.enabled = False
        self._heap: list[tuple[tuple[int, ...], int, Node]] = []
        self._seq = itertools.count()
        self._rebuild_at = 4096
        self._root: Node | None = None
        self._queued: dict[Node, tuple[int, ...]] = {}  # the newest entry's priority, per node

    def touched(self, node: Node) -> None:
        """The trie changed ``node`` (its snapshots, edge, place or last use)."""
        if self.enabled and node.parent is not None and node.snapshots is not None:
            self._push(node, self.order.priority(node))
            if len(self._heap) > self._rebuild_at:
                self.rebuild()  # O(nodes), after at least 3x as many pushes: amortized O(1)

    def _push(self, node: Node, priority: tuple[int, ...]) -> None:
        if self._queued.get(node) != priority:
            self._queued[node] = priority
            heapq.heappush(self._heap, (priority, next(self._seq), node))

    def enable(self, root: Node) -> None:
        """Start indexing (the cache got a budget): index every node holding snapshots."""
        if not self.enabled:
            self.enabled = True
            self._root = root
            self.rebuild()

    def disable(self) -> None:
        """Stop indexing (the budget is unbounded): nothing will be evicted."""
        self.enabled = False
        self._heap = []
        self._queued = {}

    def rebuild(self) -> None:
        """Index the trie afresh, dropping every stale entry."""
        assert self._root is not None
        self._queued = {
            n: self.order.priority(n)
            for n in walk(self._root)
            if n.parent is not None and n.snapshots is not None
        }
        self._heap = [(p, next(self._seq), n) for n, p in self._queued.items()]
        heapq.heapify(self._heap)
        self._rebuild_at = max(4096, 4 * len(self._heap))

    def evictable(self, node: Node, active: Container[int]) -> bool:
        """A node may be evicted when it is in the trie, off the active path and holds
        snapshots."""
        return id(node) not in active and not node.is_root and node.has_snapshots()

    def pop_victim(self, active: Container[int]) -> Node | None:
        """Remove and return the first node in eviction order that may be evicted, or None."""
        heap = self._heap
        held = []
        victim = None
        while heap:
            priority, seq, node = heapq.heappop(heap)
            if self._queued.get(node) != priority:
                continue  # an older entry of a node queued again since
            del self._queued[node]
            if node.parent is None or not node.has_snapshots():
                continue  # left the trie or dropped its snapshots: stale
            current = self.order.priority(node)
            if current != priority:
                self._push(node, current)
                continue
            if not self.evictable(node, active):
                held.append((priority, seq, node))
                continue
            victim = node
            break
        for priority, seq, node in held:
            self._queued[node] = priority
            heapq.heappush(heap, (priority, seq, node))
        return victim


class CacheObserver(Protocol):
    """Told of every eviction before it happens and of every page-out after it (the invariant
    checker's audit is one)."""

    def evicting(self, cache: PrefixCache, victim: Node, protected: Container[int]) -> None: ...

    def paged_out(self, cache: PrefixCache, node: Node) -> None: ...


class Evictor:
    """Keeps a cache's paged-out bytes within its budget, in the policy's eviction order."""

    def __init__(self, cache: PrefixCache) -> None:
        self.cache = cache
        self.index = EvictionIndex(cache.policy.eviction)
        self.observers: list[CacheObserver] = []
        self.limit = 0  # what the eviction under way brings paged-out bytes down to
        cache.ledger.listeners.append(self.index.touched)

    def budget_changed(self) -> None:
        if self.cache.budget_bytes is None:
            self.index.disable()
        else:
            self.index.enable(self.cache.root)

    def used(self, nodes: list[Node]) -> None:
        """The nodes' last use changed: their priorities did."""
        for node in nodes:
            self.index.touched(node)

    def enforce(self) -> None:
        """Evict until paged-out bytes fit the budget or only active snapshots are left (a
        lowered budget; page-outs make room first, so they never leave the cache over it)."""
        budget = self.cache.budget_bytes
        if budget is not None:
            self._evict_until(budget, {id(node) for node in self.cache.active_path})

    def make_room(self, nbytes: int, protected: dict[int, Node]) -> bool:
        """Before ``nbytes`` more are paged out: evict, in order and never a ``protected``
        node, until they fit the budget. False, evicting nothing, when they can't fit even
        with every other node evicted: then the snapshot must not be taken."""
        cache = self.cache
        budget = cache.budget_bytes
        if budget is None or nbytes <= 0:
            return True
        if sum(node.snapshot_bytes for node in protected.values()) + nbytes > budget:
            return False
        self._evict_until(budget - nbytes, protected)
        return cache.ledger.total + nbytes <= budget

    def _evict_until(self, limit: int, protected: Container[int]) -> None:
        cache = self.cache
        self.limit = limit
        while cache.ledger.total > limit:
            victim = self.index.pop_victim(protected)
            if victim is None:
                break
            for observer in self.observers:
                observer.evicting(cache, victim, protected)
            self.evict(victim, protected)

    def evict(self, node: Node, active: Container[int]) -> None:
        cache = self.cache
        cache.stats.evictions += 1
        log.debug(
            "evict start=%d end=%d children=%d bytes=%d user=%s",
            node.start,
            node.end,
            len(node.children),
            node.snapshot_bytes,
            node.user,
        )
        if not node.children and self.trim_leaf(node):
            return
        if not node.children:
            parent = node.parent
            assert parent is not None
            remove_leaf(node, cache.ledger)
            # A parent left with one child folds into it, unless it is a user restore point or
            # live (merging an active node would move the frontier under the live layers).
            if (
                cache.policy.merge_lone_children.on
                and not parent.is_root
                and not parent.user
                and len(parent.children) == 1
                and id(parent) not in active
            ):
                merge_with_child(parent, cache.layers, cache.ledger)
                cache.stats.merges += 1
        elif len(node.children) == 1:
            merge_with_child(node, cache.layers, cache.ledger)
            cache.stats.merges += 1
        else:
            node.set_snapshots(None, cache.ledger)  # a branch point keeps its place

    def trim_leaf(self, node: Node) -> bool:
        """With :class:`~kvtrie.core.policy.TrimTailPages`, drop just enough whole pages from
        the end of a leaf to bring paged-out bytes to the eviction's limit, keeping its prefix
        restorable; False when the whole leaf has to go."""
        cache = self.cache
        if not cache.policy.trim_tail_pages.on or cache.budget_bytes is None:
            return False
        if not node.has_all_snapshots():
            return False
        per_token = node.snapshot_bytes / len(node.tokens)
        tokens = math.ceil((cache.ledger.total - self.limit) / per_token)
        keep = page_floor(node.end - tokens) - node.start
        if keep < 1:
            return False
        split_node(node, keep, cache.layers, cache.ledger)
        cache.stats.splits += 1
        remove_leaf(node, cache.ledger)
        return True
