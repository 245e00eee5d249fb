"""The layer-cache contract as tests: subclass :class:`LayerContract` once per backend.

kvtrie's own fake and MLX backends both run these (``tests/test_fake_backend.py``,
``tests/test_mlx_backend.py``), and a new backend gets the same checks by subclassing it with
a ``Test`` name and filling in the three hooks. Plain asserts, no test framework needed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvtrie.core.protocols import LayerCache, LayerKind

__all__ = ["FakeContract", "LayerContract", "broken_promises"]


class LayerContract:
    """Behaviour every backend's layers must show; ``window`` is the sliding window's size."""

    window = 8

    def layers_with(self, kind: LayerKind) -> tuple[Any, list[LayerCache], LayerCache]:
        """A backend, fresh live layers of a model that has a layer of ``kind``, and that layer."""
        raise NotImplementedError

    def state(self, layer: LayerCache) -> Any:
        """The layer's live state as numpy values, comparable with ``==``."""
        raise NotImplementedError

    def equal(self, a: Any, b: Any) -> bool:
        if isinstance(a, tuple):
            return len(a) == len(b) and all(self.equal(x, y) for x, y in zip(a, b))
        return bool(np.array_equal(a, b))

    def failures(self) -> list[str]:
        """Every contract test that fails on this backend, one line each: what the mutation
        check runs against a backend mutant."""
        found = []
        for name in sorted(n for n in dir(self) if n.startswith("test_")):
            try:
                getattr(self, name)()
            except Exception as exc:  # an assert, or a layer crashing on a valid call
                found.append(f"{type(self).__name__}.{name}: {type(exc).__name__} {exc}")
        return found

    def _evaluated(self, kind: LayerKind, tokens: np.ndarray) -> tuple[Any, list, LayerCache]:
        backend, layers, layer = self.layers_with(kind)
        backend.evaluate(layers, tokens)
        return backend, layers, layer

    def test_kv_snapshot_is_a_copy_not_a_view(self) -> None:
        backend, layers, kv = self._evaluated(LayerKind.KV, np.arange(1, 11))
        expected = self.state(kv)
        snap = kv.snapshot(0)
        assert snap is not None and (snap.start, snap.end) == (0, 10)
        for layer in layers:
            assert layer.restore(None, 5) or layer.kind is not LayerKind.KV
        backend.evaluate(layers, np.arange(100, 110))  # writes over positions 5..9
        assert kv.restore(snap, 10)
        assert self.equal(self.state(kv), expected)

    def test_kv_snapshot_never_changes_whatever_the_live_layer_writes(self) -> None:
        # 250 positions: long enough that a backend sharing a nearly full live buffer with
        # its snapshot does (MLX: 250 of 256), so its copy on write is what is tested
        backend, layers, kv = self._evaluated(LayerKind.KV, np.arange(1, 251))
        expected = self.state(kv)
        snap = kv.snapshot(0)
        for layer in layers:
            assert layer.restore(None, 200) or layer.kind is not LayerKind.KV
        backend.evaluate(layers, np.arange(300, 340))  # writes over positions 200..239
        assert kv.restore(snap, 250) and self.equal(self.state(kv), expected)
        backend.evaluate(layers, np.arange(400, 403))  # after the restored positions
        for layer in layers:  # the snapshot restored in part, then written inside its range
            restored = layer.restore(snap if layer is kv else None, 200)
            assert restored or layer.kind is not LayerKind.KV
        backend.evaluate(layers, np.arange(500, 510))
        assert kv.restore(snap, 250) and self.equal(self.state(kv), expected)

    def test_kv_split_then_merge_round_trips_bytes_and_state(self) -> None:
        _, _, kv = self._evaluated(LayerKind.KV, np.arange(1, 11))
        expected = self.state(kv)
        snap = kv.snapshot(0)
        held = snap.nbytes
        head, tail = kv.split(snap, 4)
        assert (head.start, head.end, tail.start, tail.end) == (0, 4, 4, 10)
        # the halves hold the range: no more than the snapshot, which may count a live
        # buffer it shares whole
        total = head.nbytes + tail.nbytes
        assert 0 < total <= held
        kv.free()
        assert kv.offset == 0
        assert kv.restore(head, 4) and kv.restore(tail, 10)
        assert self.equal(self.state(kv), expected)
        merged = kv.merge(head, tail)
        assert (merged.start, merged.end, merged.nbytes) == (0, 10, total)
        kv.free()
        assert kv.restore(merged, 10) and self.equal(self.state(kv), expected)

    def test_kv_restore_needs_the_live_state_to_reach_the_snapshot_start(self) -> None:
        _, _, kv = self._evaluated(LayerKind.KV, np.arange(1, 11))
        tail = kv.snapshot(6)
        kv.free()
        assert not kv.can_restore(tail, 10)
        assert not kv.restore(tail, 10) and kv.offset == 0

    def test_rotating_layer_rewinds_only_before_anything_rotated_out(self) -> None:
        backend, layers, rotating = self._evaluated(
            LayerKind.ROTATING, np.arange(1, self.window - 1)
        )
        assert rotating.can_restore(None, 3)
        backend.evaluate(layers, np.arange(10, 20))  # past the window
        offset = rotating.offset
        assert offset > self.window
        assert not rotating.can_restore(None, offset - 1)
        assert not rotating.restore(None, offset - 1) and rotating.offset == offset
        snap = rotating.snapshot(0)
        assert (snap.start, snap.end) == (offset - self.window, offset)
        assert not rotating.can_restore(snap, offset - 1)  # clamping would leave a short window
        assert rotating.split(snap, offset - 3) == (None, snap)
        expected = self.state(rotating)
        rotating.free()
        assert rotating.offset == 0
        assert rotating.restore(snap, offset) and self.equal(self.state(rotating), expected)

    def test_recurrent_layer_never_rewinds_and_restores_only_at_its_end(self) -> None:
        _, _, recurrent = self._evaluated(LayerKind.RECURRENT, np.arange(1, 6))
        snap = recurrent.snapshot(0)
        assert (snap.start, snap.end) == (5, 5)
        assert not recurrent.restore(None, 4)
        assert not recurrent.restore(snap, 4)
        expected = self.state(recurrent)
        recurrent.free()
        assert recurrent.offset == 0
        assert recurrent.restore(snap, 5) and recurrent.offset == 5
        assert self.equal(self.state(recurrent), expected)
        assert recurrent.split(snap, 3) == (None, snap)

    def test_a_compacted_snapshot_restores_the_same_state_in_no_more_bytes(self) -> None:
        for kind, tokens in (
            (LayerKind.KV, np.arange(1, 11)),
            (LayerKind.ROTATING, np.arange(1, 20)),
            (LayerKind.RECURRENT, np.arange(1, 6)),
        ):
            backend, layers, layer = self._evaluated(kind, tokens)
            expected = self.state(layer)
            snap = layer.snapshot(0)
            held, bounds = snap.nbytes, (snap.start, snap.end)
            assert 0 <= snap.copied_nbytes <= held
            compact = layer.compact(snap)
            assert (compact.start, compact.end) == bounds
            assert 0 < compact.nbytes <= held and compact.copied_nbytes == compact.nbytes
            backend.evaluate(layers, np.arange(100, 104))  # the live layer moves on
            layer.free()
            assert layer.restore(compact, bounds[1]) and self.equal(self.state(layer), expected)

    def test_injected_restore_failure_fails_once(self) -> None:
        backend, _, kv = self._evaluated(LayerKind.KV, np.arange(1, 6))
        snap = kv.snapshot(0)
        kv.free()
        backend.faults.fail_next_restores(1)
        assert not kv.restore(snap, 5) and kv.offset == 0
        assert kv.restore(snap, 5)


class FakeContract(LayerContract):
    """The contract on the fake backend's tiny-mixed model (attention, window 8, recurrent)."""

    def layers_with(self, kind: LayerKind) -> tuple[Any, list[LayerCache], LayerCache]:
        from .fake import FakeBackend
        from .profiles import get_profile

        backend = FakeBackend(get_profile("tiny-mixed"))
        layers = backend.new_layers()
        return backend, layers, next(layer for layer in layers if layer.kind is kind)

    def state(self, layer: Any) -> Any:
        return layer.state()


def broken_promises(backend: str) -> list[str]:
    """The contract tests that fail on ``backend`` (fake or mlx)."""
    if backend == "mlx":
        from .mlx.contract import MLXContract

        return MLXContract().failures()
    return FakeContract().failures()
