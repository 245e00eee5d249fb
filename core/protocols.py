"""The layer-cache contract the core runs on; the fake and the MLX backend both implement it.

Offsets are token positions: a layer cache at offset n holds the state after n tokens.
Ranges are half-open, ``[start, end)``.
"""

from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

__all__ = ["LayerKind", "LayerCache", "Snapshot", "SnapshotBounds"]


class LayerKind(str, enum.Enum):
    """How a layer's state relates to its prefix, which decides what it can rewind."""

    KV = "kv"  # attention: one entry per position, rewinds by trimming
    ROTATING = "rotating"  # sliding-window attention: keeps the last W positions only
    RECURRENT = "recurrent"  # SSM / linear attention / conv: fixed-size state, never rewinds


@runtime_checkable
class Snapshot(Protocol):
    """Layer state paged out of the live cache, owned by exactly one trie node.

    A KV snapshot holds the data of ``[start, end)`` only, so a path of snapshots stitches a
    whole prefix with no duplication; a recurrent snapshot holds the full state at ``end``; a
    rotating one holds the window needed to resume at ``end``.
    """

    @property
    def start(self) -> int:
        """First position whose data the snapshot holds (for a full-state snapshot: its end)."""
        ...

    @property
    def end(self) -> int:
        """Offset the snapshot restores the layer to."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes this snapshot keeps paged out; the budget counts these."""
        ...

    @property
    def copied_nbytes(self) -> int:
        """Bytes copied out of the live cache to take it: ``nbytes``, or 0 for one that shares
        the live buffer (the time model charges a page-out these)."""
        ...

    def close(self) -> None:
        """Release the data. Using a closed snapshot is a bug."""
        ...


class SnapshotBounds:
    """A snapshot's fixed ``start``, ``end`` and ``nbytes`` (what the protocol above asks
    for), for the snapshot classes to share."""

    def __init__(self, start: int, end: int, nbytes: int) -> None:
        self._start = start
        self._end = end
        self._nbytes = nbytes

    @property
    def start(self) -> int:
        return self._start

    @property
    def end(self) -> int:
        return self._end

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def copied_nbytes(self) -> int:
        return self._nbytes


@runtime_checkable
class LayerCache(Protocol):
    """One model layer's live cache."""

    kind: LayerKind

    @property
    def offset(self) -> int:
        """Tokens the live state covers."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes of live state."""
        ...

    def snapshot(self, from_offset: int) -> Snapshot | None:
        """Copy the data of ``[from_offset, offset)`` out of the live cache (None when empty).

        The live cache is unchanged, and later writes to it never change the snapshot.
        """
        ...

    def can_restore(self, snapshot: Snapshot | None, target: int) -> bool:
        """Whether :meth:`restore` with these arguments would succeed; changes nothing."""
        ...

    def restore(self, snapshot: Snapshot | None, target: int) -> bool:
        """Bring the live cache to ``target``: rewind it (``snapshot`` None) or load ``snapshot``.

        Returns False, leaving the layer unchanged, when it can't: a recurrent layer asked to
        rewind, a rotating layer asked to rewind past what it keeps, a KV snapshot that does
        not start at or below the live offset, a target past the snapshot, a corrupt snapshot.
        """
        ...

    def split(self, snapshot: Snapshot, at: int) -> tuple[Snapshot | None, Snapshot | None]:
        """Cut ``[a, c)`` at ``at`` into ``[a, at)`` and ``[at, c)``; takes ownership of the input.

        Layers whose state can't be cut (recurrent, rotating) return ``(None, snapshot)``: the
        parent half must be filled by a fresh snapshot at the split point.
        """
        ...

    def merge(self, parent: Snapshot | None, child: Snapshot | None) -> Snapshot | None:
        """Join ``[a, b)`` and ``[b, c)`` into ``[a, c)``; takes ownership of both inputs."""
        ...

    def compact(self, snapshot: Snapshot) -> Snapshot:
        """The same state in the bytes its own data needs; takes ownership of the input. A
        snapshot that shares the live buffer counts all of it, so under a tight budget the
        core asks for its data copied out; every other snapshot comes back as it is."""
        ...

    def free(self) -> None:
        """Drop the live state; the offset becomes 0."""
        ...
