"""The fake backend is a real implementation of the layer-cache contract: these pin it down."""

from __future__ import annotations

import numpy as np
import pytest
from kvtrie.backends.fake import FakeBackend, prefix_hashes
from kvtrie.backends.profiles import get_profile

MASK = (1 << 64) - 1


@pytest.fixture
def backend():
    return FakeBackend(get_profile("tiny-mixed"))


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


def test_kv_snapshot_is_a_copy_not_a_view(backend):
    layer = backend.new_layers()[0]
    layer.evaluate(np.arange(10))
    expected = layer.state()
    snap = layer.snapshot(0)
    layer.restore(None, 5)
    layer.evaluate(np.arange(100, 120))  # overwrites the positions the snapshot covers
    assert layer.restore(snap, 10)
    assert np.array_equal(layer.state(), expected)


def test_kv_split_then_merge_round_trips_bytes_and_state(backend):
    layer = backend.new_layers()[0]
    layer.evaluate(np.arange(1, 11))
    expected = layer.state()
    snap = layer.snapshot(0)
    head, tail = layer.split(snap, 4)
    assert (head.start, head.end, tail.start, tail.end) == (0, 4, 4, 10)
    assert head.nbytes + tail.nbytes == snap.nbytes
    layer.free()
    assert layer.restore(head, 4) and layer.restore(tail, 10)
    assert np.array_equal(layer.state(), expected)
    merged = layer.merge(head, tail)
    layer.free()
    assert layer.restore(merged, 10)
    assert np.array_equal(layer.state(), expected)
    assert set(backend.ledger.open) == {id(merged)}


def test_kv_restore_needs_the_live_state_to_reach_the_snapshot_start(backend):
    layer = backend.new_layers()[0]
    layer.evaluate(np.arange(1, 11))
    tail = layer.snapshot(6)
    layer.free()
    assert not layer.can_restore(tail, 10)
    assert not layer.restore(tail, 10)
    assert layer.offset == 0


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


def test_rotating_layer_rewinds_only_before_anything_rotated_out(backend):
    rotating = backend.new_layers()[1]
    rotating.evaluate(np.arange(1, 7))  # 6 <= window 8
    assert rotating.restore(None, 3) and rotating.offset == 3
    rotating.evaluate(np.arange(10, 20))  # 13 > window
    assert not rotating.can_restore(None, 12)
    assert not rotating.restore(None, 12) and rotating.offset == 13
    snap = rotating.snapshot(0)
    assert snap.nbytes == 8 * 64 and (snap.start, snap.end) == (5, 13)
    assert not rotating.can_restore(snap, 12)  # clamping would leave a short window
    assert rotating.split(snap, 10) == (None, snap)


def test_recurrent_layer_never_rewinds_and_restores_only_at_its_end(backend):
    recurrent = backend.new_layers()[2]
    recurrent.evaluate(np.arange(1, 6))
    snap = recurrent.snapshot(0)
    assert not recurrent.restore(None, 4)
    assert not recurrent.restore(snap, 4)
    recurrent.free()
    assert recurrent.restore(snap, 5) and recurrent.offset == 5
    assert recurrent.split(snap, 3) == (None, snap)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_corrupt_snapshots_are_refused(backend, index):
    layer = backend.new_layers()[index]
    layer.evaluate(np.arange(1, 6))
    snap = layer.snapshot(0)
    snap.corrupt()
    layer.free()
    assert not layer.restore(snap, 5)
    assert layer.offset == 0


def test_injected_restore_failure_fails_once(backend):
    layer = backend.new_layers()[0]
    layer.evaluate(np.arange(1, 6))
    snap = layer.snapshot(0)
    layer.free()
    backend.faults.fail_next_restores(1)
    assert not layer.restore(snap, 5)
    assert layer.restore(snap, 5)


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
