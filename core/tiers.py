"""The disk tier: where snapshots evicted from RAM go, instead of being dropped.

A node's snapshots live in one tier at a time. In RAM they are the backend's own objects; in
the disk tier each is a :class:`StoredSnapshot`, the handle a :class:`SnapshotStore` gave back
for it. The core never reads a stored snapshot's data itself: it opens a readable copy to
restore from (:meth:`StoredSnapshot.opened`), or takes the data back to split or merge it
(:meth:`StoredSnapshot.take`) and stores the pieces again, so a store decides alone how its
bytes are kept and verified, and a copy it can't verify is never handed out.

:class:`TieredLayers` is what the trie's split and merge run on: the live layers, with stored
snapshots taken out before a layer cuts or joins them and stored again after.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .protocols import LayerCache, LayerKind, Snapshot, SnapshotBounds

if TYPE_CHECKING:
    from .prefix_cache import PrefixCache
    from .trie import Node

__all__ = [
    "SavedNode",
    "SimulatedDisk",
    "SnapshotStore",
    "StoredSnapshot",
    "TieredLayers",
    "is_stored",
    "saved_trie",
]


class StoredSnapshot(SnapshotBounds, ABC):
    """A snapshot held by a store: its bounds and size, and the ways to get its data back.

    ``keeps_backend_snapshot`` says whether the backend's own snapshot object stays open while
    stored (a simulated disk keeps it; a file store closes it once written), so the oracle's
    count of open snapshots knows what to expect.
    """

    keeps_backend_snapshot = False

    @abstractmethod
    def opened(self) -> AbstractContextManager[Snapshot | None]:
        """A readable copy for the duration of a ``with`` block, or None when the stored data
        can't be verified (missing, truncated, checksum mismatch): the caller treats it as a
        miss."""

    @abstractmethod
    def take(self) -> Snapshot | None:
        """The data back as a backend snapshot the caller owns (None when unverifiable); the
        store forgets it."""

    @abstractmethod
    def close(self) -> None:
        """Drop the stored data."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}([{self._start}, {self._end}), {self._nbytes} B)"


def is_stored(snapshot: object) -> bool:
    return isinstance(snapshot, StoredSnapshot)


@dataclass
class SavedNode:
    """A trie node a store kept from an earlier run: its edge, its parent (an index into the
    same list, parents first; -1 for the root), its place in LRU order, whether it is a user
    restore point, and its verified snapshots (None: a bare node on the way to others)."""

    tokens: np.ndarray
    parent: int
    last_used: int
    user: bool
    snapshots: list[StoredSnapshot | None] | None


def saved_trie(
    cache: PrefixCache, keep: Callable[[StoredSnapshot], bool] = lambda snapshot: True
) -> list[SavedNode]:
    """What a store keeps of ``cache``'s trie across a restart: every node whose snapshots are
    all in the disk tier and ``keep`` (a file store keeps only those written), with the nodes
    above it, parents first, in the form :meth:`~kvtrie.core.prefix_cache.PrefixCache`
    adopts."""
    from .trie import walk

    def kept(node: Node) -> list[StoredSnapshot | None] | None:
        snapshots = node.snapshots
        if not node.on_disk or snapshots is None:
            return None
        if not all(s is None or (isinstance(s, StoredSnapshot) and keep(s)) for s in snapshots):
            return None
        return [s if isinstance(s, StoredSnapshot) else None for s in snapshots]

    listed = {id(n): kept(n) for n in walk(cache.root)}
    wanted = {id(a) for n in walk(cache.root) if listed[id(n)] is not None for a in n.path()}
    index: dict[int, int] = {}
    saved = []
    for node in walk(cache.root):
        if node.is_root or id(node) not in wanted:
            continue
        assert node.parent is not None
        index[id(node)] = len(saved)
        saved.append(
            SavedNode(
                tokens=node.tokens,
                parent=index.get(id(node.parent), -1),
                last_used=node.last_used,
                user=node.user,
                snapshots=listed[id(node)],
            )
        )
    return saved


class SnapshotStore(Protocol):
    """Where the disk tier keeps snapshots."""

    name: str

    def put(self, layer: int, snapshot: Snapshot) -> StoredSnapshot | None:
        """Keep ``snapshot`` (layer ``layer``'s), taking ownership of it; None, with the
        snapshot closed, when it could not be written (a full disk, a failed write)."""
        ...

    def saved(self) -> list[SavedNode]:
        """The trie kept from an earlier run, verified (empty for a store that does not
        persist); the cache adopts it when built."""
        ...

    def after_request(self, cache: PrefixCache) -> None:
        """A request closed: a persistent store may write down the trie's shape now."""
        ...

    def close(self, cache: PrefixCache | None = None) -> None:
        """Finish writing, keep ``cache``'s trie shape (when given) and let go of the store."""
        ...

    def reopen(self) -> None:
        """Open the store again after :meth:`close`, as a new process would."""
        ...

    def opening(self) -> dict[str, Any] | None:
        """What opening the store found (adopted and deleted files), None for a store that
        keeps nothing across processes."""
        ...


class _HeldSnapshot(StoredSnapshot):
    """A simulated disk's entry: the backend snapshot itself, counted as disk bytes."""

    keeps_backend_snapshot = True

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__(snapshot.start, snapshot.end, snapshot.nbytes)
        self.snapshot: Snapshot | None = snapshot
        self.lost = False  # cut short behind the cache's back: it no longer verifies

    @contextmanager
    def opened(self) -> Iterator[Snapshot | None]:
        yield None if self.lost else self.snapshot

    def take(self) -> Snapshot | None:
        if self.lost:
            self.close()
            return None
        snapshot, self.snapshot = self.snapshot, None
        return snapshot

    def close(self) -> None:
        if self.snapshot is not None:
            self.snapshot.close()
            self.snapshot = None

    @property
    def corrupt(self) -> Callable[[], None] | None:
        """The held snapshot's own way to damage its data, as a flipped bit on a disk would
        (fault injection), or None when its backend has none."""
        return getattr(self.snapshot, "corrupt", None)

    def truncate(self) -> None:
        """Lose the data's tail, as a file cut short would: a store's length and checksum
        checks fail on it, so it reads as unverifiable (fault injection)."""
        self.lost = True


class SimulatedDisk:
    """A disk tier that keeps snapshots in memory and counts their bytes as disk bytes.

    A replay's snapshot sizes are a real model's (terabytes for a production trace) while the
    fake backend's data is a few integers, so a replay measures what a disk tier of any size
    would hit without writing it; :class:`~kvtrie.core.store.DirectoryStore` is the real one.
    """

    name = "simulated"

    def __init__(self) -> None:
        self.failing_writes = 0
        self._kept: list[SavedNode] = []  # what a restart finds: the trie close() kept

    def fail_next_writes(self, count: int) -> None:
        """Make the next ``count`` writes fail, as a full disk would (fault injection)."""
        self.failing_writes += count

    def put(self, layer: int, snapshot: Snapshot) -> StoredSnapshot | None:
        if self.failing_writes:
            self.failing_writes -= 1
            snapshot.close()
            return None
        return _HeldSnapshot(snapshot)

    def saved(self) -> list[SavedNode]:
        kept, self._kept = self._kept, []
        return kept

    def after_request(self, cache: PrefixCache) -> None:
        pass

    def close(self, cache: PrefixCache | None = None) -> None:
        """Keep ``cache``'s disk tier for a restart in this process (nothing outlives it)."""
        self._kept = saved_trie(cache) if cache is not None else []

    def reopen(self) -> None:
        pass

    def opening(self) -> dict[str, Any] | None:
        return None


class TieredLayers:
    """The live layers as the trie's split and merge see them: a stored snapshot is taken out
    of its store before the layer cuts or joins it, and what comes out is stored again, so the
    pieces of a disk-tier node stay in the disk tier."""

    def __init__(self, layers: Sequence[LayerCache], store: SnapshotStore | None) -> None:
        self.tiered = [_TieredLayer(i, layer, store) for i, layer in enumerate(layers)]

    def __len__(self) -> int:
        return len(self.tiered)

    def __iter__(self) -> Iterator[_TieredLayer]:
        return iter(self.tiered)


class _TieredLayer:
    def __init__(self, index: int, layer: LayerCache, store: SnapshotStore | None) -> None:
        self.index = index
        self.layer = layer
        self.store = store
        self.kind: LayerKind = layer.kind

    def _stored_again(self, snapshot: Snapshot | None) -> Snapshot | None:
        if snapshot is None:
            return None
        assert self.store is not None, "a stored snapshot with no store"
        return self.store.put(self.index, snapshot)

    def split(self, snapshot: Snapshot, at: int) -> tuple[Snapshot | None, Snapshot | None]:
        if not isinstance(snapshot, StoredSnapshot):
            return self.layer.split(snapshot, at)
        data = snapshot.take()
        if data is None:
            return None, None
        head, tail = self.layer.split(data, at)
        return self._stored_again(head), self._stored_again(tail)

    def merge(self, parent: Snapshot | None, child: Snapshot | None) -> Snapshot | None:
        stored = [s for s in (parent, child) if isinstance(s, StoredSnapshot)]
        if not stored:
            return self.layer.merge(parent, child)
        assert len(stored) == 2 or None in (parent, child), "a merge across tiers"
        a = parent.take() if isinstance(parent, StoredSnapshot) else parent
        b = child.take() if isinstance(child, StoredSnapshot) else child
        return self._stored_again(self.layer.merge(a, b))
