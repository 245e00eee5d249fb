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
from collections.abc import Collection, Container
from typing import TYPE_CHECKING, Protocol

from .protocols import Snapshot
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

    def __init__(self, order: EvictionOrder, disk: bool = False) -> None:
        self.order = order
        self.disk = disk  # which tier's nodes it indexes: RAM's, or the disk tier's
        self.enabled = False
        self._heap: list[tuple[tuple[int, ...], int, Node]] = []
        self._seq = itertools.count()
        self._rebuild_at = 4096
        self._root: Node | None = None
        self._queued: dict[Node, tuple[int, ...]] = {}  # the newest entry's priority, per node

    def touched(self, node: Node) -> None:
        """The trie changed ``node`` (its snapshots, edge, place or last use)."""
        if self._indexes(node):
            self._push(node, self.order.priority(node))
            if len(self._heap) > self._rebuild_at:
                self.rebuild()  # O(nodes), after at least 3x as many pushes: amortized O(1)

    def _indexes(self, node: Node) -> bool:
        return (
            self.enabled
            and node.parent is not None
            and node.snapshots is not None
            and node.on_disk == self.disk
        )

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

    def rebuild_if_enabled(self) -> None:
        """After the trie was replaced wholesale (a restart): index it afresh."""
        if self.enabled:
            self.rebuild()

    def rebuild(self) -> None:
        """Index the trie afresh, dropping every stale entry."""
        assert self._root is not None
        self._queued = {n: self.order.priority(n) for n in walk(self._root) if self._indexes(n)}
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
            if node.parent is None or not node.has_snapshots() or node.on_disk != self.disk:
                continue  # left the trie, dropped its snapshots or changed tier: stale
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
    """Told of every eviction before it happens, and of every page-out and every move to the
    disk tier after it (the invariant checker's audit is one)."""

    def evicting(self, cache: PrefixCache, victim: Node, protected: Container[int]) -> None: ...

    def paged_out(self, cache: PrefixCache, node: Node) -> None: ...

    def moved_to_disk(self, cache: PrefixCache, node: Node) -> None: ...


class Evictor:
    """Keeps a cache's paged-out bytes within its budgets, in the policy's eviction order.

    A node evicted from RAM moves to the disk tier when the cache has one and the node fits
    its budget (room is made there first, the same way); otherwise, and when evicted from the
    disk tier, its snapshots are dropped.
    """

    def __init__(self, cache: PrefixCache) -> None:
        self.cache = cache
        self.index = EvictionIndex(cache.policy.eviction)
        self.disk_index = EvictionIndex(cache.policy.eviction, disk=True)
        self.observers: list[CacheObserver] = []
        self.limit = 0  # what the RAM eviction under way brings paged-out bytes down to
        self.disk_limit = 0  # what the disk-tier eviction under way brings its bytes down to
        cache.ledger.listeners.append(self.index.touched)
        cache.ledger.listeners.append(self.disk_index.touched)

    def budget_changed(self) -> None:
        cache = self.cache
        if cache.budget_bytes is None:
            self.index.disable()
        else:
            self.index.enable(cache.root)
        if cache.store is None or cache.disk_budget_bytes is None:
            self.disk_index.disable()
        else:
            self.disk_index.enable(cache.root)

    def used(self, nodes: list[Node]) -> None:
        """The nodes' last use changed: their priorities did."""
        for node in nodes:
            self.index.touched(node)
            self.disk_index.touched(node)

    def enforce(self) -> None:
        """Evict until paged-out bytes fit the budgets or only active snapshots are left (a
        lowered budget; page-outs make room first, so they never leave the cache over it)."""
        active = {id(node) for node in self.cache.active_path}
        limit = self.cache.ram_limit
        if limit is not None:
            self._evict_until(limit, active)
        if self.cache.disk_budget_bytes is not None:
            self._evict_until(self.cache.disk_budget_bytes, active, disk=True)

    def make_room(self, nbytes: int, protected: dict[int, Node]) -> bool:
        """Before ``nbytes`` more are paged out: evict, in order and never a ``protected``
        node, until they fit the budget. False, evicting nothing, when they can't fit even
        with every other node evicted: then the snapshot must not be taken."""
        cache = self.cache
        budget = cache.ram_limit
        if budget is None or nbytes <= 0:
            return True
        if sum(node.ram_bytes for node in protected.values()) + nbytes > budget:
            return False
        self._evict_until(budget - nbytes, protected)
        return cache.ledger.total + nbytes <= budget

    def _evict_until(self, limit: int, protected: Collection[int], disk: bool = False) -> None:
        """Evict from RAM (moving to the disk tier what fits there), or from the disk tier,
        until that tier's bytes are within ``limit``, in order and never a ``protected``
        node."""
        cache = self.cache
        index = self.disk_index if disk else self.index
        if disk:
            self.disk_limit = limit
        else:
            self.limit = limit
        while (cache.ledger.disk_total if disk else cache.ledger.total) > limit:
            victim = index.pop_victim(protected)
            if victim is None:
                break
            for observer in self.observers:
                observer.evicting(cache, victim, protected)
            if disk:
                cache.stats.disk_evictions += 1
                self.evict(victim, protected)
            elif not self.move_to_disk(victim, protected):
                self.evict(victim, protected)

    def _make_disk_room(self, nbytes: int, protected: Collection[int]) -> bool:
        """The disk tier's :meth:`make_room`: False when ``nbytes`` can't fit it at all."""
        budget = self.cache.disk_budget_bytes
        if budget is None:
            return True
        if nbytes > budget:
            return False
        self._evict_until(budget - nbytes, protected, disk=True)
        return self.cache.ledger.disk_total + nbytes <= budget

    def move_to_disk(self, node: Node, protected: Collection[int]) -> bool:
        """Move an evicted node's snapshots to the disk tier, making room there first; False
        (nothing moved) with no disk tier or when they can't fit it. When the store fails to
        write one, the node's snapshots are dropped: the node is then evicted."""
        cache = self.cache
        # the node is protected while room is made, so no eviction merges it away
        if cache.store is None or not self._make_disk_room(
            node.snapshot_bytes, {*protected, id(node)}
        ):
            return False
        if not self._write(node, node.take_snapshots(cache.ledger) or []):
            self.evict(node, protected)
        return True

    def store_on_disk(
        self, node: Node, snapshots: list[Snapshot | None], protected: Collection[int]
    ) -> bool:
        """Give ``node`` fresh ``snapshots`` in the disk tier, replacing its own: for a
        page-out too big for RAM. False, with the snapshots closed and the node's own kept,
        when there is no disk tier, they can't fit it or the write fails."""
        cache = self.cache
        size = sum(s.nbytes for s in snapshots if s is not None)
        held = node.snapshot_bytes if node.on_disk else 0
        if cache.store is None or not self._make_disk_room(size - held, {*protected, id(node)}):
            for snap in snapshots:
                if snap is not None:
                    snap.close()
            return False
        old = node.take_snapshots(cache.ledger)
        if not self._write(node, snapshots):
            node.give_snapshots(old, cache.ledger)
            return False
        for snap in old or []:
            if snap is not None:
                snap.close()
        return True

    def _write(self, node: Node, snapshots: list[Snapshot | None]) -> bool:
        """Store ``snapshots`` (taking them) and give them to ``node``, which holds none;
        False, with none kept, when a write fails."""
        cache = self.cache
        assert cache.store is not None
        stored = [cache.store.put(i, s) if s is not None else None for i, s in enumerate(snapshots)]
        if any(s is None and p is not None for s, p in zip(stored, snapshots)):
            cache.stats.disk_write_failures += 1
            for kept in stored:
                if kept is not None:
                    kept.close()
            return False
        node.give_snapshots(stored, cache.ledger)
        cache.stats.moves_to_disk += 1
        cache.stats.disk_write_bytes += node.snapshot_bytes
        for observer in self.observers:
            observer.moved_to_disk(cache, node)
        return True

    def evict(self, node: Node, active: Container[int]) -> None:
        cache = self.cache
        cache.stats.evictions += 1
        log.debug(
            "evict start=%d end=%d children=%d bytes=%d user=%s disk=%s",
            node.start,
            node.end,
            len(node.children),
            node.snapshot_bytes,
            node.user,
            node.on_disk,
        )
        layers = cache.tiered_layers
        if not node.children and self.trim_leaf(node):
            return
        if not node.children:
            parent = node.parent
            assert parent is not None
            remove_leaf(node, cache.ledger)
            # A parent left with one child folds into it, unless it is a user restore point or
            # live (merging an active node would move the frontier under the live layers), or
            # the two hold snapshots in different tiers (the join would grow one of them).
            if (
                cache.policy.merge_lone_children.on
                and not parent.is_root
                and not parent.user
                and len(parent.children) == 1
                and id(parent) not in active
                and _one_tier(parent, next(iter(parent.children.values())))
            ):
                merge_with_child(parent, layers, cache.ledger)
                cache.stats.merges += 1
        elif len(node.children) == 1 and _one_tier(node, next(iter(node.children.values()))):
            merge_with_child(node, layers, cache.ledger)
            cache.stats.merges += 1
        else:
            node.set_snapshots(None, cache.ledger)  # a branch point keeps its place

    def trim_leaf(self, node: Node) -> bool:
        """With :class:`~kvtrie.core.policy.TrimTailPages`, drop just enough whole pages from
        the end of a leaf to bring its tier's bytes to the eviction's limit, keeping its prefix
        restorable; False when the whole leaf has to go."""
        cache = self.cache
        if not cache.policy.trim_tail_pages.on or cache.budget_bytes is None:
            return False
        if not node.has_all_snapshots():
            return False
        if node.on_disk:
            over = cache.ledger.disk_total - self.disk_limit
        else:
            over = cache.ledger.total - self.limit
        per_token = node.snapshot_bytes / len(node.tokens)
        tokens = math.ceil(over / per_token)
        keep = page_floor(node.end - tokens) - node.start
        if keep < 1:
            return False
        split_node(node, keep, cache.tiered_layers, cache.ledger)
        cache.stats.splits += 1
        remove_leaf(node, cache.ledger)
        return True


def _one_tier(parent: Node, child: Node) -> bool:
    """Whether merging ``child`` into ``parent`` keeps every snapshot in its tier: at most one
    of them holds snapshots, or both in the same tier."""
    return parent.snapshots is None or child.snapshots is None or parent.on_disk == child.on_disk
