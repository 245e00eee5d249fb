"""A deterministic fake tensor backend whose state is an exact function of the prefix.

Each layer's value at position i is a salted polynomial hash of tokens ``[0, i]``: it depends
on the whole prefix, as a real K/V entry does. A restore to the wrong offset, from the wrong
node, or with a stale recurrent state gives values that differ from a fresh prefill, and the
oracle compares them exactly. Byte sizes come from a :class:`ModelProfile`, so a replay accounts
a real model's memory while the fake data stays small.

Snapshots are real copies: a KV snapshot keeps the tokens of its range and the hash value it
started from (enough to regenerate the values exactly), a rotating snapshot keeps its window,
a recurrent one its state. Each carries a checksum that ``restore`` verifies, so a corrupt
snapshot is refused and the cache recomputes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvtrie.core.hashing import mix64
from kvtrie.core.protocols import LayerKind, Snapshot, SnapshotBounds
from kvtrie.core.trie import as_tokens

from .base import CheckedRestore, Faults, RangeSnapshots, WholeStateSnapshots
from .profiles import LayerSpec, ModelProfile

__all__ = ["FakeBackend", "FakeCodec", "Faults", "SnapshotLedger", "prefix_hashes"]

_U64 = np.uint64
_BASE = 0x9E3779B97F4A7C15  # odd, so it has an inverse mod 2**64
_BASE_INV = pow(_BASE, -1, 1 << 64)


class _Powers:
    """Tables of BASE**k and BASE**-k mod 2**64, grown on demand."""

    def __init__(self) -> None:
        self.up = np.ones(1, dtype=_U64)
        self.down = np.ones(1, dtype=_U64)

    def ensure(self, n: int) -> None:
        if len(self.up) > n:
            return
        size = max(n + 1, 2 * len(self.up))
        self.up = self._table(_BASE, size)
        self.down = self._table(_BASE_INV, size)

    @staticmethod
    def _table(base: int, size: int) -> np.ndarray:
        table = np.empty(size, dtype=_U64)
        table[0] = 1
        filled = 1
        while filled < size:  # doubling: base**(filled + i) = base**i * base**filled
            count = min(filled, size - filled)
            table[filled : filled + count] = table[:count] * _U64(pow(base, filled, 1 << 64))
            filled += count
        return table


_POWERS = _Powers()


def prefix_hashes(start: int, tokens: np.ndarray, salt: int) -> np.ndarray:
    """Hash values after each token, continuing from ``start``: ``h = h * BASE + mix(token)``.

    Vectorised as ``h_k = BASE**k * (start + sum_{i<=k} mix(t_i) * BASE**-i)`` mod 2**64.
    """
    n = len(tokens)
    if n == 0:
        return np.empty(0, dtype=_U64)
    _POWERS.ensure(n)
    terms = mix64(tokens, salt) * _POWERS.down[1 : n + 1]
    sums = np.cumsum(terms, dtype=_U64) + _U64(start)
    return _POWERS.up[1 : n + 1] * sums


def _seed(salt: int) -> int:
    """The hash value of the empty prefix for a layer."""
    return int(mix64(np.array([salt], dtype=np.int64), 0x5EED)[0])


@dataclass
class SnapshotLedger:
    """Every snapshot a backend made and has not closed: what the trie must account for."""

    open: dict[int, Snapshot] = field(default_factory=dict)
    closed_twice: int = 0

    def opened(self, snap: Snapshot) -> None:
        self.open[id(snap)] = snap

    def closed(self, snap: Snapshot) -> None:
        if self.open.pop(id(snap), None) is None:
            self.closed_twice += 1


class _FakeSnapshot(SnapshotBounds):
    """Base of the fake snapshots: byte size, close-once bookkeeping."""

    def __init__(self, start: int, end: int, nbytes: int, ledger: SnapshotLedger) -> None:
        super().__init__(start, end, nbytes)
        self._ledger = ledger
        self.is_closed = False
        ledger.opened(self)

    def close(self) -> None:
        self._ledger.closed(self)
        self.is_closed = True

    def corrupt(self) -> None:
        """Damage the data (not the checksum), as a bad copy or a bit flip would."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}([{self._start}, {self._end}), {self._nbytes} B)"


@dataclass
class Segment:
    """A run of KV positions: the hash value before it, its tokens, and its last value."""

    before: int
    tokens: np.ndarray
    checksum: int


class KVSnapshot(_FakeSnapshot):
    def __init__(
        self, segments: list[Segment], start: int, spec: LayerSpec, ledger: SnapshotLedger
    ):
        length = sum(len(s.tokens) for s in segments)
        super().__init__(start, start + length, length * spec.bytes_per_token * spec.count, ledger)
        self.segments = segments

    def corrupt(self) -> None:
        self.segments[0].tokens[0] ^= 1


class WindowSnapshot(_FakeSnapshot):
    def __init__(self, window: np.ndarray, end: int, spec: LayerSpec, ledger: SnapshotLedger):
        super().__init__(
            end - len(window), end, len(window) * spec.bytes_per_token * spec.count, ledger
        )
        self.window = window
        self.checksum = int(np.bitwise_xor.reduce(window)) if len(window) else 0

    def corrupt(self) -> None:
        self.window[-1] ^= _U64(1)


class StateSnapshot(_FakeSnapshot):
    def __init__(self, state: int, end: int, spec: LayerSpec, ledger: SnapshotLedger):
        super().__init__(end, end, spec.state_bytes * spec.count, ledger)
        self.state = state
        self.checksum = state

    def corrupt(self) -> None:
        self.state ^= 1


class _FakeLayer(CheckedRestore):
    """What every fake layer shares: its spec, salt, fault hooks and snapshot ledger."""

    kind: LayerKind

    def __init__(self, spec: LayerSpec, salt: int, faults: Faults, ledger: SnapshotLedger):
        self.spec = spec
        self.salt = salt
        self.seed = _seed(salt)
        self.faults = faults
        self.ledger = ledger

    def compact(self, snapshot: Snapshot) -> Snapshot:
        """A fake snapshot holds its own data only: already compact."""
        return snapshot


class FakeKVCache(RangeSnapshots, _FakeLayer):
    """Attention: one value per position; rewinds by trimming."""

    kind = LayerKind.KV

    def __init__(self, spec: LayerSpec, salt: int, faults: Faults, ledger: SnapshotLedger):
        super().__init__(spec, salt, faults, ledger)
        self._values = np.empty(0, dtype=_U64)
        self._tokens = np.empty(0, dtype=np.int32)
        self._offset = 0

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def nbytes(self) -> int:
        return self._offset * self.spec.bytes_per_token * self.spec.count

    def _last(self) -> int:
        return int(self._values[self._offset - 1]) if self._offset else self.seed

    def _write(self, values: np.ndarray, tokens: np.ndarray) -> None:
        end = self._offset + len(values)
        if end > len(self._values):  # grow geometrically: appends stay amortised O(1)
            capacity = max(end, 2 * len(self._values), 256)
            self._values = np.resize(self._values, capacity)
            self._tokens = np.resize(self._tokens, capacity)
        self._values[self._offset : end] = values
        self._tokens[self._offset : end] = tokens
        self._offset = end

    def evaluate(self, tokens: np.ndarray) -> None:
        self._write(prefix_hashes(self._last(), tokens, self.salt), tokens)

    def state(self) -> np.ndarray:
        return self._values[: self._offset].copy()

    def digest(self) -> int:
        return self._last()

    def snapshot(self, from_offset: int) -> Snapshot | None:
        if self._offset <= from_offset:
            return None
        start = max(0, from_offset)
        before = int(self._values[start - 1]) if start else self.seed
        segment = Segment(
            before, self._tokens[start : self._offset].copy(), int(self._values[self._offset - 1])
        )
        return KVSnapshot([segment], start, self.spec, self.ledger)

    def can_restore(self, snapshot: Snapshot | None, target: int) -> bool:
        if snapshot is None:
            return 0 <= target <= self._offset
        assert isinstance(snapshot, KVSnapshot) and not snapshot.is_closed
        return 0 <= target <= snapshot.end and self._offset >= snapshot.start

    def _rewind(self, target: int) -> None:
        self._offset = target

    def _load(self, snapshot: Snapshot, target: int) -> bool:
        assert isinstance(snapshot, KVSnapshot)
        regenerated = []
        for segment in snapshot.segments:
            values = prefix_hashes(segment.before, segment.tokens, self.salt)
            if int(values[-1]) != segment.checksum:
                return False  # corrupt: refuse, the cache recomputes
            regenerated.append(values)
        self._offset = snapshot.start
        for segment, values in zip(snapshot.segments, regenerated):
            self._write(values, segment.tokens)
        self._offset = min(self._offset, target)
        return True

    def _cut(self, snapshot: Snapshot, cut: int, at: int) -> tuple[Snapshot, Snapshot]:
        assert isinstance(snapshot, KVSnapshot)
        head: list[Segment] = []
        tail: list[Segment] = []
        pos = 0
        for segment in snapshot.segments:
            n = len(segment.tokens)
            if pos + n <= cut:
                head.append(Segment(segment.before, segment.tokens.copy(), segment.checksum))
            elif pos >= cut:
                tail.append(Segment(segment.before, segment.tokens.copy(), segment.checksum))
            else:
                k = cut - pos
                values = prefix_hashes(segment.before, segment.tokens, self.salt)
                middle = int(values[k - 1])
                # A corrupt segment must stay detectably corrupt in both halves: the head's
                # checksum would otherwise be recomputed from the damaged tokens and pass.
                intact = int(values[-1]) == segment.checksum
                head.append(
                    Segment(
                        segment.before, segment.tokens[:k].copy(), middle if intact else middle ^ 1
                    )
                )
                tail.append(Segment(middle, segment.tokens[k:].copy(), segment.checksum))
            pos += n
        return (
            KVSnapshot(head, snapshot.start, self.spec, self.ledger),
            KVSnapshot(tail, at, self.spec, self.ledger),
        )

    def _join(self, parent: Snapshot, child: Snapshot) -> Snapshot:
        assert isinstance(parent, KVSnapshot) and isinstance(child, KVSnapshot)
        return KVSnapshot(parent.segments + child.segments, parent.start, self.spec, self.ledger)

    def free(self) -> None:
        self._values = np.empty(0, dtype=_U64)
        self._tokens = np.empty(0, dtype=np.int32)
        self._offset = 0


class FakeRotatingCache(WholeStateSnapshots, _FakeLayer):
    """Sliding-window attention: keeps the values of the last ``window`` positions."""

    kind = LayerKind.ROTATING

    def __init__(self, spec: LayerSpec, salt: int, faults: Faults, ledger: SnapshotLedger):
        super().__init__(spec, salt, faults, ledger)
        self.window = spec.window
        self._kept = np.empty(0, dtype=_U64)
        self._offset = 0

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def nbytes(self) -> int:
        return len(self._kept) * self.spec.bytes_per_token * self.spec.count

    def evaluate(self, tokens: np.ndarray) -> None:
        values = prefix_hashes(self.digest(), tokens, self.salt)
        self._kept = np.concatenate([self._kept, values[-self.window :]])[-self.window :]
        self._offset += len(tokens)

    def state(self) -> tuple[int, np.ndarray]:
        return self._offset, self._kept.copy()

    def digest(self) -> int:
        return int(self._kept[-1]) if self._offset else self.seed

    def snapshot(self, from_offset: int) -> Snapshot | None:
        if self._offset <= from_offset:
            return None
        return WindowSnapshot(self._kept.copy(), self._offset, self.spec, self.ledger)

    def can_restore(self, snapshot: Snapshot | None, target: int) -> bool:
        # Rewinding is only safe while nothing has rotated out of the window.
        if snapshot is None:
            return target == self._offset or (0 <= target < self._offset <= self.window)
        assert isinstance(snapshot, WindowSnapshot) and not snapshot.is_closed
        return 0 <= target <= snapshot.end and (
            target == snapshot.end or snapshot.end <= self.window
        )

    def _rewind(self, target: int) -> None:
        self._kept = self._kept[:target]
        self._offset = target

    def _load(self, snapshot: Snapshot, target: int) -> bool:
        assert isinstance(snapshot, WindowSnapshot)
        window = snapshot.window
        if (int(np.bitwise_xor.reduce(window)) if len(window) else 0) != snapshot.checksum:
            return False
        self._kept = window.copy()
        self._offset = snapshot.end
        if target < self._offset:
            self._rewind(target)
        return True

    def free(self) -> None:
        self._kept = np.empty(0, dtype=_U64)
        self._offset = 0


class FakeRecurrentCache(WholeStateSnapshots, _FakeLayer):
    """A recurrent layer: one fixed-size state folded over every token; it never rewinds."""

    kind = LayerKind.RECURRENT

    def __init__(self, spec: LayerSpec, salt: int, faults: Faults, ledger: SnapshotLedger):
        super().__init__(spec, salt, faults, ledger)
        self._state = self.seed
        self._offset = 0

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def nbytes(self) -> int:
        return self.spec.state_bytes * self.spec.count if self._offset else 0

    def evaluate(self, tokens: np.ndarray) -> None:
        if len(tokens):
            self._state = int(prefix_hashes(self._state, tokens, self.salt)[-1])
            self._offset += len(tokens)

    def state(self) -> tuple[int, int]:
        return self._offset, self._state

    def digest(self) -> int:
        return self._state

    def snapshot(self, from_offset: int) -> Snapshot | None:
        if self._offset == 0:
            return None
        return StateSnapshot(self._state, self._offset, self.spec, self.ledger)

    def can_restore(self, snapshot: Snapshot | None, target: int) -> bool:
        if snapshot is None:
            return target == self._offset
        assert isinstance(snapshot, StateSnapshot) and not snapshot.is_closed
        return target == snapshot.end

    def _rewind(self, target: int) -> None:
        assert target == self._offset, "a recurrent layer can't rewind"

    def _load(self, snapshot: Snapshot, target: int) -> bool:
        assert isinstance(snapshot, StateSnapshot)
        if snapshot.state != snapshot.checksum:
            return False
        self._state = snapshot.state
        self._offset = snapshot.end
        return True

    def free(self) -> None:
        self._state = self.seed
        self._offset = 0


_LAYER_CLASSES = {
    LayerKind.KV: FakeKVCache,
    LayerKind.ROTATING: FakeRotatingCache,
    LayerKind.RECURRENT: FakeRecurrentCache,
}

FakeLayer = FakeKVCache | FakeRotatingCache | FakeRecurrentCache


class FakeBackend:
    """Builds fake layers for a profile, evaluates tokens on them, and checks them (I9)."""

    name = "fake"
    measures_time = False

    def __init__(self, profile: ModelProfile) -> None:
        self.profile = profile
        self.vocab_size = profile.vocab_size
        self.faults = Faults()
        self.ledger = SnapshotLedger()

    def new_layers(self) -> list[FakeLayer]:
        return [
            _LAYER_CLASSES[spec.kind](spec, salt=index + 1, faults=self.faults, ledger=self.ledger)
            for index, spec in enumerate(self.profile.layers)
        ]

    def evaluate(self, layers: Sequence[FakeLayer], tokens: np.ndarray) -> int:
        """Advance every layer; the "logits" are a digest of the state every layer reached."""
        digest = 0
        for layer in layers:
            layer.evaluate(tokens)
            digest = hash((digest, layer.offset, layer.digest()))
        return digest

    def generate(self, layers: Sequence[FakeLayer], logits: int | None, count: int) -> np.ndarray:
        """Tokens drawn from the state digest (a function of the prefix, as greedy decoding is),
        all but the last evaluated in one batch."""
        seed = 0 if logits is None else logits & ((1 << 63) - 1)
        draws = mix64(np.arange(max(count, 0), dtype=np.int64), seed)
        tokens = (draws % _U64(self.vocab_size)).astype(np.int32)
        if count > 1:
            self.evaluate(layers, tokens[:-1])
        return tokens

    def mismatch(
        self, layers: Sequence[FakeLayer], prefix: Sequence[int] | np.ndarray
    ) -> str | None:
        """I9: None when every live layer equals a fresh prefill of ``prefix``, else why not."""
        fresh = self.new_layers()
        self.evaluate(fresh, as_tokens(prefix))
        for index, (live, ref) in enumerate(zip(layers, fresh)):
            if not _same_state(live.state(), ref.state()):
                return (
                    f"layer {index} ({live.kind.value}) at offset {live.offset} differs from a "
                    f"fresh prefill of {len(prefix)} tokens"
                )
        return None

    def oracle(self) -> dict[str, Any]:
        """What the oracle compares and within what, for the report."""
        return {"comparison": "exact"}

    def unaccounted(self, held: int) -> str | None:
        """I5: every snapshot this backend made is held by the trie or closed, once."""
        if self.ledger.closed_twice:
            return f"{self.ledger.closed_twice} snapshots were closed twice"
        if len(self.ledger.open) != held:
            return f"{len(self.ledger.open)} snapshots are open but the trie holds {held}"
        return None

    def snapshot_codec(self) -> FakeCodec:
        return FakeCodec(self)

    def logits_mismatch(self, prompt: np.ndarray, logits: int | None) -> str | None:
        """I9 after prefill: the digest of the live state equals a fresh prefill's, exactly."""
        fresh = self.evaluate(self.new_layers(), prompt)
        if fresh != logits:
            return f"state digest after {len(prompt)} prompt tokens differs from a fresh prefill"
        return None


class FakeCodec:
    """The fake backend's snapshots as tensors and back, for a directory store: a KV
    snapshot's segments (the hash before each, its tokens, its checksum), a window, a state."""

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        specs = json.dumps([dataclasses.astuple(spec) for spec in backend.profile.layers])
        digest = hashlib.sha256(specs.encode()).hexdigest()[:16]
        self.fingerprint = f"fake:{backend.profile.name}:{digest}"

    def encode(
        self, layer: int, snapshot: Snapshot
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        if isinstance(snapshot, KVSnapshot):
            segments = snapshot.segments
            tensors = {
                "before": np.array([s.before for s in segments], dtype=_U64),
                "checksum": np.array([s.checksum for s in segments], dtype=_U64),
                "lengths": np.array([len(s.tokens) for s in segments], dtype=np.int64),
                "tokens": np.concatenate([s.tokens for s in segments]).astype(np.int32),
            }
            return tensors, {"kind": "kv"}
        if isinstance(snapshot, WindowSnapshot):
            return {"window": snapshot.window}, {"kind": "window"}
        assert isinstance(snapshot, StateSnapshot)
        return {"state": np.array([snapshot.state], dtype=_U64)}, {"kind": "state"}

    def decode(self, layer: int, tensors: dict[str, np.ndarray], meta: dict[str, str]) -> Snapshot:
        spec = self.backend.profile.layers[layer]
        ledger = self.backend.ledger
        end = int(meta["end"])
        if meta["kind"] == "kv":
            cuts = np.cumsum(tensors["lengths"])[:-1]
            segments = [
                Segment(int(before), tokens.copy(), int(checksum))
                for before, tokens, checksum in zip(
                    tensors["before"], np.split(tensors["tokens"], cuts), tensors["checksum"]
                )
            ]
            return KVSnapshot(segments, int(meta["start"]), spec, ledger)
        if meta["kind"] == "window":
            return WindowSnapshot(tensors["window"].copy(), end, spec, ledger)
        return StateSnapshot(int(tensors["state"][0]), end, spec, ledger)


def _same_state(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(map(_same_state, a, b))
    return a == b
