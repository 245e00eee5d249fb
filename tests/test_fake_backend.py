"""The fake backend is a real implementation of the layer-cache contract: these pin it down."""

from __future__ import annotations

import numpy as np
import pytest

from kvtrie.backends.contract import FakeContract
from kvtrie.backends.fake import FakeBackend, prefix_hashes
from kvtrie.backends.profiles import get_profile
from kvtrie.core.protocols import LayerKind

MASK = (1 << 64) - 1


@pytest.fixture
def backend():
    return FakeBackend(get_profile("tiny-mixed"))


class TestFakeLayerContract(FakeContract):
    """The shared layer contract on tiny-mixed (attention, sliding window 8, recurrent)."""

    def test_snapshots_are_counted_in_the_ledger(self):
        backend, _, kv = self.layers_with(LayerKind.KV)
        backend.evaluate([kv], np.arange(1, 11))
        head, tail = kv.split(kv.snapshot(0), 4)
        merged = kv.merge(head, tail)
        assert set(backend.ledger.open) == {id(merged)}


def test_vectorised_prefix_hash_equals_the_sequential_fold():
    tokens = np.array([5, 0, 7, 7, 123456, 3], dtype=np.int32)
    fast = prefix_hashes(42, tokens, salt=3)
    # h_k = h_{k-1} * BASE + mix(t_k); a one-token hash from 0 is mix(t_k) itself
    base = 0x9E3779B97F4A7C15
    one_step = [int(prefix_hashes(0, tokens[k : k + 1], salt=3)[0]) for k in range(len(tokens))]
    h = 42
    for k in range(len(tokens)):
        h = (h * base + one_step[k]) & MASK
        assert int(fast[k]) == h


def test_state_depends_on_the_whole_prefix(backend):
    a, b = backend.new_layers(), backend.new_layers()
    backend.evaluate(a, np.array([1, 2, 3, 4]))
    backend.evaluate(b, np.array([9, 2, 3, 4]))
    for la, lb in zip(a, b):
        assert la.digest() != lb.digest()


def test_a_snapshot_stitched_onto_another_prefix_is_caught_by_the_oracle(backend):
    layers = backend.new_layers()
    kv = layers[0]
    kv.evaluate(np.array([1, 2, 3, 4]))
    tail = kv.snapshot(2)  # [2, 4) computed after the prefix [1, 2]
    other = backend.new_layers()[0]
    other.evaluate(np.array([9, 9]))
    assert other.restore(tail, 4)  # the contract can't tell, the data is wrong
    fresh = backend.new_layers()[0]
    fresh.evaluate(np.array([9, 9, 3, 4]))
    assert not np.array_equal(other.state(), fresh.state())


def test_rotating_snapshot_holds_exactly_the_window(backend):
    rotating = backend.new_layers()[1]
    rotating.evaluate(np.arange(1, 14))  # 13 > window 8
    snap = rotating.snapshot(0)
    assert snap.nbytes == 8 * 64 and (snap.start, snap.end) == (5, 13)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_corrupt_snapshots_are_refused(backend, index):
    layer = backend.new_layers()[index]
    layer.evaluate(np.arange(1, 6))
    snap = layer.snapshot(0)
    snap.corrupt()
    layer.free()
    assert not layer.restore(snap, 5)
    assert layer.offset == 0


def test_snapshot_ledger_counts_double_close(backend):
    layer = backend.new_layers()[0]
    layer.evaluate(np.arange(1, 4))
    snap = layer.snapshot(0)
    snap.close()
    snap.close()
    assert backend.ledger.closed_twice == 1 and not backend.ledger.open


def test_generate_depends_on_the_prefix_and_advances_all_but_the_last(backend):
    layers = backend.new_layers()
    logits = backend.evaluate(layers, np.arange(1, 6))
    out = backend.generate(layers, logits, 4)
    assert len(out) == 4 and all(0 <= t < 1000 for t in out)
    assert all(layer.offset == 5 + 3 for layer in layers)
    other = backend.new_layers()
    assert list(backend.generate(other, backend.evaluate(other, np.arange(2, 7)), 4)) != list(out)


def test_splitting_a_corrupt_kv_snapshot_keeps_both_halves_refused(backend):
    # Found by the nightly fuzz run: the head's checksum was recomputed from the damaged
    # tokens, so a corrupt snapshot split at a branch point restored a wrong state.
    layer = backend.new_layers()[0]
    layer.evaluate(np.arange(1, 11))
    snap = layer.snapshot(0)
    assert backend.faults.corrupt(snap)
    head, tail = layer.split(snap, 4)
    layer.free()
    assert not layer.restore(head, 4)
