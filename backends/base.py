"""What the replayer, the fuzzer and the tests need from a backend beyond the layer caches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from kvtrie.core.protocols import LayerCache
from kvtrie.core.store import SnapshotCodec

__all__ = ["Backend", "Faults"]


class Backend(Protocol):
    """A model: builds layer caches, evaluates tokens on them, and checks them against a fresh
    prefill (the I9 oracle)."""

    name: str
    vocab_size: int
    faults: Faults
    # its evaluation takes a real model's seconds (a time model's estimate is checked against
    # them); the fake backend's take microseconds that mean nothing
    measures_time: bool

    def new_layers(self) -> list[LayerCache]:
        """Empty live caches, one per layer (group)."""
        ...

    def evaluate(self, layers: Sequence[LayerCache], tokens: np.ndarray) -> Any:
        """Advance every layer by ``tokens``; returns the last position's logits (or None)."""
        ...

    def generate(self, layers: Sequence[LayerCache], logits: Any, count: int) -> np.ndarray:
        """Produce ``count`` tokens from ``logits``, evaluating all but the last, as decoding does."""
        ...

    def mismatch(self, layers: Sequence[LayerCache], prefix: np.ndarray) -> str | None:
        """I9 after begin: None when the live layers equal a fresh prefill of ``prefix``."""
        ...

    def logits_mismatch(self, prompt: np.ndarray, logits: Any) -> str | None:
        """I9 after prefill: None when ``logits`` equal a fresh full prefill's of ``prompt``."""
        ...

    def oracle(self) -> dict[str, Any]:
        """What the I9 oracle compares and within what (for the report): exact, or a
        tolerance with its basis."""
        ...

    def unaccounted(self, held: int) -> str | None:
        """I5: None when the ``held`` snapshots are all this backend has open (none leaked,
        none closed twice), or when the backend does not track them."""
        ...

    def snapshot_codec(self) -> SnapshotCodec:
        """How this model's snapshots are written to a directory store and read back."""
        ...


@dataclass
class Faults:
    """Fault injection shared by a backend's layers: restores that fail, as a lost or unreadable
    copy would, and snapshots damaged in place. Counted, so a restore failure nobody injected
    shows up as a bug (I11)."""

    failing_restores: int = 0
    injected: int = 0
    corruptions: int = 0

    def fail_next_restores(self, count: int = 1) -> None:
        self.failing_restores += count
        self.injected += count

    def corrupt(self, snapshot: Any) -> bool:
        """Damage ``snapshot``'s data (not its checksum); False if the backend can't."""
        damage = getattr(snapshot, "corrupt", None)
        if damage is None:
            return False
        damage()
        self.corruptions += 1
        return True

    def take_restore_failure(self) -> bool:
        if self.failing_restores > 0:
            self.failing_restores -= 1
            return True
        return False


class CheckedRestore:
    """``restore`` as the contract states it, shared by every backend's layers: refuse what
    ``can_restore`` refuses, fail when a fault is injected, else rewind or load. Layers give
    ``can_restore``, ``_rewind`` and ``_load``."""

    faults: Faults

    def can_restore(self, snapshot: Any, target: int) -> bool:
        raise NotImplementedError

    def _rewind(self, target: int) -> None:
        raise NotImplementedError

    def _load(self, snapshot: Any, target: int) -> bool:
        raise NotImplementedError

    def restore(self, snapshot: Any, target: int) -> bool:
        if not self.can_restore(snapshot, target):
            return False
        if snapshot is not None and self.faults.take_restore_failure():
            return False
        if snapshot is None:
            self._rewind(target)
            return True
        return self._load(snapshot, target)


class WholeStateSnapshots:
    """split and merge for layers whose snapshot is their whole state at one offset (recurrent
    state, a sliding window): it can't be cut, so the parent half is left for a fresh snapshot
    at the split point, and the later state supersedes the earlier one."""

    def split(self, snapshot: Any, at: int) -> tuple[Any, Any]:
        return None, snapshot

    def merge(self, parent: Any, child: Any) -> Any:
        if parent is not None:
            parent.close()
        return child


class RangeSnapshots:
    """split and merge for attention layers, whose snapshot holds the positions of
    ``[start, end)``: bounds and ownership here, the cutting and joining of data in
    ``_cut`` and ``_join``. Both take ownership of their inputs."""

    def _cut(self, snapshot: Any, cut: int, at: int) -> tuple[Any, Any]:
        raise NotImplementedError

    def _join(self, parent: Any, child: Any) -> Any:
        raise NotImplementedError

    def split(self, snapshot: Any, at: int) -> tuple[Any, Any]:
        cut = at - snapshot.start
        if cut <= 0:
            return None, snapshot
        if cut >= snapshot.end - snapshot.start:
            return snapshot, None
        halves = self._cut(snapshot, cut, at)
        snapshot.close()
        return halves

    def merge(self, parent: Any, child: Any) -> Any:
        if parent is None or child is None:  # a gap: the data can't be stitched, drop both
            for snap in (parent, child):
                if snap is not None:
                    snap.close()
            return None
        assert parent.end == child.start, (
            f"merge of [{parent.start}, {parent.end}) and [{child.start}, {child.end})"
        )
        merged = self._join(parent, child)
        parent.close()
        child.close()
        return merged
