"""mlx-lm's cache objects seen through kvtrie's layer-cache contract.

The live caches are the objects mlx-lm's models write into (``KVCache``, ``RotatingKVCache``,
``ArraysCache`` and its subclasses); the adapters snapshot, restore, split and merge them,
reading and writing them only through mlx-lm's public attributes (``keys``, ``values``,
``offset``, ``state``, ``trim``, ``nbytes``). Snapshots are fresh, evaluated arrays of exactly
their range, with one exception: an attention snapshot from position 0 that fills all but at
most an eighth of the live buffer shares that buffer instead of copying it, and counts the
whole buffer as its bytes (see :meth:`MLXKVLayer.snapshot`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache

from kvtrie.core.protocols import LayerKind, Snapshot

from ..base import CheckedRestore, Faults, RangeSnapshots, WholeStateSnapshots

__all__ = [
    "MLXKVLayer",
    "MLXLayer",
    "MLXRecurrentLayer",
    "MLXRotatingLayer",
    "MLXSnapshot",
    "adapt",
    "arrays_of",
    "state_arrays",
    "state_difference",
]


def _copy(array: mx.array) -> mx.array:
    """A fresh buffer of exactly ``array``'s size: an elementwise op never returns a view, so
    a slice of a live, preallocated cache buffer does not keep that whole buffer alive."""
    return array * 1


def _copy_state(state: Any) -> Any:
    """A copy of an mlx-lm cache's ``state``: every array copied, everything else kept."""
    if isinstance(state, mx.array):
        return _copy(state)
    if isinstance(state, (tuple, list)):
        return type(state)(_copy_state(item) for item in state)
    return state


def _leaves(state: Any) -> list[mx.array]:
    if isinstance(state, mx.array):
        return [state]
    if isinstance(state, (tuple, list)):
        return [a for item in state for a in _leaves(item)]
    return []


@dataclass(eq=False)
class MLXSnapshot:
    """Arrays paged out of one layer: a KV range, a window's state, or a recurrent state."""

    arrays: Any  # a tuple of arrays, or a copied mlx-lm ``state``
    start: int
    end: int
    is_closed: bool = False
    # a shared KV snapshot's whole buffers (keys, values), which its arrays are views into:
    # what it keeps alive, so what it counts, and what a restore hands back to the live layer
    buffers: tuple[mx.array, ...] = ()

    def __post_init__(self) -> None:
        mx.eval(*_leaves(self.arrays))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.buffers or _leaves(self.arrays)))

    @property
    def copied_nbytes(self) -> int:
        return 0 if self.buffers else self.nbytes

    def close(self) -> None:
        self.arrays = self.buffers = ()
        self.is_closed = True


class _Adapter(CheckedRestore):
    """An mlx-lm cache object seen through the layer-cache contract."""

    def __init__(self, cache: Any, faults: Faults) -> None:
        self.cache = cache
        self.faults = faults

    @property
    def offset(self) -> int:
        return self.cache.offset

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    mlx_type: type = object  # the mlx-lm cache class this adapter wraps (each kind sets it)

    def compact(self, snapshot: Snapshot) -> Snapshot:
        """Only an attention snapshot shares the live buffer; every other is its own copy."""
        return snapshot

    # mlx-lm moves this cache's offset itself as the model evaluates tokens
    counts_itself = True

    def advance(self, count: int) -> None:
        """Called after the model evaluated ``count`` tokens (it moved ``cache.offset``)."""

    def adopt(self, cache: Any, offset: int) -> None:
        """Take ``cache``, the same kind of mlx-lm cache evaluated elsewhere over ``offset``
        tokens (mlx_lm.server's batch hands its caches back), as this layer's live state."""
        if not isinstance(cache, self.mlx_type):
            raise ValueError(
                f"adopt(): a {type(cache).__name__} where this layer holds a "
                f"{self.mlx_type.__name__}"
            )
        self.cache = cache
        if self.offset != offset:
            raise ValueError(f"adopt(): the cache holds {self.offset} tokens, not {offset}")


class MLXKVLayer(RangeSnapshots, _Adapter):
    """Attention (``KVCache``): a snapshot holds keys and values of its own range only."""

    kind = LayerKind.KV
    mlx_type = KVCache

    def snapshot(self, from_offset: int) -> Snapshot | None:
        """A copy of ``[from_offset, offset)``, or, from position 0, a view of the live buffer
        itself, counted whole, when the buffer holds at most one of mlx-lm's growth steps
        (``KVCache.step``, 256 positions) or an eighth beyond the range, whichever is more.

        Sharing skips the copy a switch makes of the conversation it leaves (mlx-lm's own
        cache stores the finished request's buffer the same way, and counts it whole too),
        and a restore hands the buffer back whole (see :meth:`_load`). MLX arrays are values:
        a later write to the live layer, while the snapshot shares its buffer, copies the
        buffer first (copy on write), so the snapshot never changes. The bound keeps a
        buffer that a rewind left far larger than its range (a restore of 2,000 positions cut
        back to 100) from being held for a few positions; it is copied instead."""
        cache = self.cache
        if cache.keys is None or cache.offset <= from_offset:
            return None
        start, end = max(0, from_offset), cache.offset
        capacity = cache.keys.shape[2]
        if start == 0 and capacity - end <= max(end // 8, cache.step):
            # new array objects over the same data: mlx-lm updates its own in place
            buffers = (cache.keys[..., :capacity, :], cache.values[..., :capacity, :])
            views = (cache.keys[..., :end, :], cache.values[..., :end, :])
            return MLXSnapshot(views, 0, end, buffers=buffers)
        keys = _copy(cache.keys[..., start:end, :])
        values = _copy(cache.values[..., start:end, :])
        return MLXSnapshot((keys, values), start, end)

    def compact(self, snapshot: Snapshot) -> Snapshot:
        """A shared snapshot's range copied out of the buffer it shares, which it lets go."""
        assert isinstance(snapshot, MLXSnapshot) and not snapshot.is_closed
        if not snapshot.buffers:
            return snapshot
        keys, values = snapshot.arrays
        compacted = MLXSnapshot((_copy(keys), _copy(values)), snapshot.start, snapshot.end)
        snapshot.close()
        return compacted

    def can_restore(self, snapshot: Snapshot | None, target: int) -> bool:
        if snapshot is None:
            return 0 <= target <= self.cache.offset
        assert isinstance(snapshot, MLXSnapshot) and not snapshot.is_closed
        return 0 <= target <= snapshot.end and self.cache.offset >= snapshot.start

    def _rewind(self, target: int) -> None:
        if target == 0:
            self.free()  # a snapshot may share the buffer: a fresh one is written, not a copy
        else:
            self.cache.offset = target

    def _load(self, snapshot: Snapshot, target: int) -> bool:
        assert isinstance(snapshot, MLXSnapshot)
        if snapshot.start == 0:
            # the whole state: the live layer takes the snapshot's arrays (its whole buffers
            # when shared), no copy. If the snapshot stays, the model's next write copies
            # them first; if it moves (is closed after the page-in), the write lands in place.
            keys, values = snapshot.buffers or snapshot.arrays
            self.cache.keys = keys[..., : keys.shape[2], :]  # new objects: mlx-lm writes
            self.cache.values = values[..., : values.shape[2], :]  # into its own in place
            self.cache.offset = min(snapshot.end, target)
            return True
        self.cache.offset = snapshot.start
        keys, values = snapshot.arrays
        # left lazy: the copy joins the next model call's graph instead of a sync of its own
        # (a hit's time to first token: 9.1 ms against mlx-lm's 7.6 with the sync, 6.2 against
        # 6.6 without; kvtrie bench mlx)
        self.cache.update_and_fetch(keys, values)
        self.cache.offset = min(self.cache.offset, target)
        return True

    def _cut(self, snapshot: Snapshot, cut: int, at: int) -> tuple[Snapshot, Snapshot]:
        assert isinstance(snapshot, MLXSnapshot)
        keys, values = snapshot.arrays
        head = MLXSnapshot(
            (_copy(keys[..., :cut, :]), _copy(values[..., :cut, :])), snapshot.start, at
        )
        tail = MLXSnapshot(
            (_copy(keys[..., cut:, :]), _copy(values[..., cut:, :])), at, snapshot.end
        )
        return head, tail

    def _join(self, parent: Snapshot, child: Snapshot) -> Snapshot:
        assert isinstance(parent, MLXSnapshot) and isinstance(child, MLXSnapshot)
        arrays = tuple(mx.concatenate([a, b], axis=2) for a, b in zip(parent.arrays, child.arrays))
        return MLXSnapshot(arrays, parent.start, child.end)

    def free(self) -> None:
        self.cache.keys = self.cache.values = None
        self.cache.offset = 0


class MLXRotatingLayer(WholeStateSnapshots, _Adapter):
    """Sliding-window attention (``RotatingKVCache``): a snapshot holds the cache's whole
    public ``state`` (the ring buffer and its position), copied; a restore assigns it back."""

    kind = LayerKind.ROTATING
    mlx_type = RotatingKVCache

    def snapshot(self, from_offset: int) -> Snapshot | None:
        cache = self.cache
        if cache.keys is None or cache.offset <= from_offset:
            return None
        kept = min(cache.offset, cache.max_size)
        return MLXSnapshot(_copy_state(cache.state), cache.offset - kept, cache.offset)

    def can_restore(self, snapshot: Snapshot | None, target: int) -> bool:
        # Rewinding is only safe while nothing has rotated out of the window.
        cache = self.cache
        if snapshot is None:
            return target == cache.offset or (0 <= target < cache.offset and cache.is_trimmable())
        assert isinstance(snapshot, MLXSnapshot) and not snapshot.is_closed
        return 0 <= target <= snapshot.end and (
            target == snapshot.end or snapshot.end < cache.max_size
        )

    def _rewind(self, target: int) -> None:
        if target < self.cache.offset:
            self.cache.trim(self.cache.offset - target)

    def _load(self, snapshot: Snapshot, target: int) -> bool:
        assert isinstance(snapshot, MLXSnapshot)
        self.cache.state = _copy_state(snapshot.arrays)
        mx.eval(self.cache.keys, self.cache.values)
        self._rewind(target)
        return True

    def free(self) -> None:
        self.cache = RotatingKVCache(max_size=self.cache.max_size, keep=self.cache.keep)


class MLXRecurrentLayer(WholeStateSnapshots, _Adapter):
    """Recurrent state (``ArraysCache``: conv and SSM / gated-delta state): never rewinds.

    mlx-lm keeps no offset for these caches, so the adapter counts the tokens evaluated.
    """

    kind = LayerKind.RECURRENT
    mlx_type = ArraysCache
    counts_itself = False  # the adapter counts, from what it is told was evaluated

    def __init__(self, cache: ArraysCache, faults: Faults) -> None:
        super().__init__(cache, faults)
        self._offset = 0

    @property
    def offset(self) -> int:
        return self._offset

    def advance(self, count: int) -> None:
        self._offset += count

    def adopt(self, cache: Any, offset: int) -> None:
        """A recurrent cache can't say how many tokens it holds: the caller's count is it."""
        self._offset = offset
        super().adopt(cache, offset)

    def snapshot(self, from_offset: int) -> Snapshot | None:
        if self._offset == 0 or all(a is None for a in self.cache.cache):
            return None
        arrays = tuple(_copy(a) if a is not None else None for a in self.cache.cache)
        return MLXSnapshot(arrays, self._offset, self._offset)

    def can_restore(self, snapshot: Snapshot | None, target: int) -> bool:
        if snapshot is None:
            return target == self._offset
        assert isinstance(snapshot, MLXSnapshot) and not snapshot.is_closed
        return target == snapshot.end

    def _rewind(self, target: int) -> None:
        """Nothing to do: ``can_restore`` allows only the current offset."""

    def _load(self, snapshot: Snapshot, target: int) -> bool:
        assert isinstance(snapshot, MLXSnapshot)
        self.cache.cache = [_copy(a) if a is not None else None for a in snapshot.arrays]
        self._offset = snapshot.end
        return True

    def free(self) -> None:
        self.cache.cache = [None] * len(self.cache.cache)
        self._offset = 0


MLXLayer = MLXKVLayer | MLXRotatingLayer | MLXRecurrentLayer


def adapt(cache: Any, faults: Faults) -> MLXLayer:
    if isinstance(cache, RotatingKVCache):
        return MLXRotatingLayer(cache, faults)
    if isinstance(cache, KVCache):
        return MLXKVLayer(cache, faults)
    if isinstance(cache, ArraysCache):
        return MLXRecurrentLayer(cache, faults)
    raise ValueError(
        f"mlx-lm cache {type(cache).__name__} is not supported; kvtrie handles KVCache, "
        "RotatingKVCache and ArraysCache (recurrent) layers"
    )


def arrays_of(cache: Any) -> list[mx.array]:
    """The arrays an mlx-lm cache holds now, to evaluate them together."""
    if isinstance(cache, ArraysCache):
        return [a for a in cache.cache if a is not None]
    return [a for a in (cache.keys, cache.values) if a is not None]


def _window_in_time_order(cache: RotatingKVCache) -> list[mx.array]:
    """The kept keys and values in time order: mlx-lm stores the window as a ring whose write
    position is the last field of its public ``state`` (keys, values, offset, keep, max_size,
    write index) in the mlx-lm versions pyproject.toml admits."""
    keys, values, offset, keep, max_size, idx = cache.state
    out = []
    for array in (keys, values):
        if idx < offset and idx != array.shape[2]:
            array = mx.concatenate(
                [array[..., :keep, :], array[..., idx:, :], array[..., keep:idx, :]], axis=2
            )
        elif idx != array.shape[2]:
            array = array[..., :idx, :]
        out.append(array[..., -min(offset, max_size) :, :])
    return out


def state_arrays(layer: MLXLayer) -> list[mx.array | None]:
    """What the layer's live state means, position by position: a KV layer's keys and values
    up to its offset, a window's in time order, a recurrent layer's state arrays."""
    cache = layer.cache
    if isinstance(layer, MLXRecurrentLayer):
        return list(cache.cache)
    if layer.offset == 0:
        return []
    if isinstance(layer, MLXRotatingLayer):
        return _window_in_time_order(cache)
    n = layer.offset
    return [cache.keys[..., :n, :], cache.values[..., :n, :]]


def state_difference(live: MLXLayer, ref: MLXLayer) -> float:
    """The largest absolute difference between two layers' states (inf when they differ in
    shape or in which arrays they hold)."""
    mine, theirs = state_arrays(live), state_arrays(ref)
    if len(mine) != len(theirs):
        return float("inf")
    pairs = list(zip(mine, theirs))
    worst = 0.0
    for a, b in pairs:
        if (a is None) != (b is None):
            return float("inf")
        if a is not None:
            if a.shape != b.shape:
                return float("inf")
            worst = max(worst, float(mx.abs(a - b).max()))
    return worst


