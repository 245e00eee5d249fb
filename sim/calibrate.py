"""Cost figures measured on this machine and model: the prefill grid, decode and page-in.

Prefill seconds are timed over a grid of (cached context, new tokens) and fitted to the cost
model's ``a + b*n + c*(context attended)`` by least squares; decode is the median seconds of
one token at a mid-grid context; page-in and page-out are the bytes of a snapshot set over
the seconds its restore, and its copy out of the live layers, take; disk write and read are
the same set's bytes over the seconds a :class:`~kvtrie.core.store.DirectoryStore` in the
given directory takes to write its files (encoded, checksummed, fsynced) and to read them back
(verified, decoded): the disk tier's own path, not a raw file copy. The files are read just
after they are written, so the operating system's page cache may serve them: a read after a
restart is slower. The coefficients go in a ``[costs.NAME]`` table that ``--cost`` reads; the
grid, the measured and fitted seconds and their relative error in ``[calibration.NAME]``.
"""

from __future__ import annotations

import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from .bench import median_seconds
from .costs import CostModel, attended

__all__ = ["Calibration", "GRIDS", "calibrate", "calibration_toml"]

# (cached context, new tokens) grids: the quick one for CI, the full one for a real fit
GRIDS = {
    "quick": ([0, 64, 256], [8, 32, 128]),
    "full": ([0, 256, 1024, 2048], [16, 64, 256, 1024]),
}
REPEATS = {"quick": 2, "full": 3}


@dataclass
class Calibration:
    cost: CostModel
    points: list[tuple[int, int, float, float]]  # cached, new, measured s, fitted s

    @property
    def errors(self) -> list[float]:
        return [abs(fit - measured) / measured for _, _, measured, fit in self.points]

    @property
    def fit_error(self) -> tuple[float, float]:
        """The fit's relative error over the grid: its median (the upper one of an even
        count) and its largest."""
        errors = sorted(self.errors)
        return errors[len(errors) // 2], errors[-1]


def _fit(rows: list[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Least-squares ``a, b, c`` of ``seconds = a + b*n + c*attended`` in relative error (each
    row divided by its seconds, so a 16-token prefill counts as much as a 1,024-token one: the
    time model is judged per request), none below zero (a negative one is dropped and the
    others fitted again)."""
    seconds = np.array([s for _, _, s in rows])
    design = (
        np.array([[1.0, n, attended(cached, n)] for cached, n, _ in rows], dtype=np.float64)
        / seconds[:, None]
    )
    ones = np.ones(len(rows))
    kept = [0, 1, 2]
    while True:
        solution, *_ = np.linalg.lstsq(design[:, kept], ones, rcond=None)
        if (solution >= 0).all() or len(kept) == 1:
            break
        kept.pop(int(np.argmin(solution)))
    coefficients = [0.0, 0.0, 0.0]
    for index, value in zip(kept, solution):
        coefficients[index] = max(0.0, float(value))
    return coefficients[0], coefficients[1], coefficients[2]


def _disk_seconds(
    backend: Any, take: Callable[[], list[Any]], directory: Path | None, repeats: int
) -> tuple[float, float]:
    """Median seconds to write a snapshot set (``take`` makes one) to a fresh store in
    ``directory`` (default: the system's temporary folder) and to read it back; the store is
    removed after."""
    from kvtrie.core.store import DirectoryStore

    folder = Path(tempfile.mkdtemp(prefix="kvtrie-calibrate-", dir=directory))
    try:
        store = DirectoryStore(folder / "store", backend.snapshot_codec(), background=False)
        writes, reads = [], []
        for _ in range(repeats):
            copies = take()
            started = time.perf_counter()
            stored = [store.put(i, c) if c is not None else None for i, c in enumerate(copies)]
            writes.append(time.perf_counter() - started)
            started = time.perf_counter()
            for item in stored:
                if item is not None:
                    with item.opened() as read:
                        assert read is not None, f"calibrate: {folder} lost a file it just wrote"
            reads.append(time.perf_counter() - started)
            for item in stored:
                if item is not None:
                    item.close()
        store.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return statistics.median(writes), statistics.median(reads)


def calibrate(
    model: str,
    grid: str = "quick",
    tick: Callable[[], Any] | None = None,
    disk_dir: Path | None = None,
) -> Calibration:
    """Time ``model`` (an MLX model name or directory) on this machine; the disk tier's
    bandwidth in ``disk_dir`` (default: the system's temporary folder)."""
    import mlx.core as mx

    from kvtrie.backends.mlx import MLXBackend
    from kvtrie.backends.mlx.adapters import arrays_of

    backend = MLXBackend.from_name(model)
    rng = np.random.default_rng(0)
    contexts, news = GRIDS[grid]
    repeats = REPEATS[grid]

    def tokens(count: int) -> np.ndarray:
        return rng.integers(5, backend.vocab_size, count).astype(np.int32)

    def prefill_seconds(prefix: np.ndarray, new: np.ndarray) -> float:
        """Seconds to evaluate ``new`` after ``prefix`` (untimed) on fresh caches."""
        layers = backend.new_layers()
        if len(prefix):
            backend.evaluate(layers, prefix)
        started = time.perf_counter()
        backend.evaluate(layers, new)
        return time.perf_counter() - started

    backend.evaluate(backend.new_layers(), tokens(8))  # the first call compiles
    rows = []
    for cached in contexts:
        for n in news:
            prefix, new = tokens(cached), tokens(n)
            measured = [prefill_seconds(prefix, new) for _ in range(repeats)]
            rows.append((cached, n, statistics.median(measured)))
            if tick:
                tick()
    a, b, c = _fit(rows)

    layers = backend.new_layers()
    backend.evaluate(layers, tokens(contexts[len(contexts) // 2] or 64))
    one = tokens(1)
    decode = median_seconds(lambda: backend.evaluate(layers, one), 8 * repeats)

    layers = backend.new_layers()
    end = max(contexts) or 256
    backend.evaluate(layers, tokens(end))
    snapshots = [layer.snapshot(0) for layer in layers]
    nbytes = sum(s.nbytes for s in snapshots if s is not None)

    def page_out() -> None:
        taken = [layer.snapshot(0) for layer in layers]  # a snapshot evaluates its copy
        for snapshot in taken:
            if snapshot is not None:
                snapshot.close()

    page_out_seconds = median_seconds(page_out, 4 * repeats)

    def page_in() -> None:
        for layer, snapshot in zip(layers, snapshots):
            layer.free()
            if snapshot is not None:
                layer.restore(snapshot, end)
        mx.eval(*[a for layer in layers for a in arrays_of(layer.cache)])

    page_in_seconds = median_seconds(page_in, 4 * repeats)
    write_seconds, read_seconds = _disk_seconds(
        backend, lambda: [layer.snapshot(0) for layer in layers], disk_dir, 2 * repeats
    )
    cost = CostModel(
        name=f"{Path(model).name}-{platform.node() or 'this-machine'}",
        model=model,
        machine=f"{platform.system()} {platform.machine()} {platform.processor()}".strip(),
        source=f"kvtrie calibrate{' --quick' if grid == 'quick' else ''}, {date.today()}, disk in "
        f"{disk_dir or tempfile.gettempdir()}",
        prefill_fixed_seconds=a,
        prefill_seconds_per_token=b,
        prefill_seconds_per_token_context=c,
        decode_seconds_per_token=decode,
        page_in_bytes_per_second=nbytes / page_in_seconds,
        page_out_bytes_per_second=nbytes / page_out_seconds,
        disk_read_bytes_per_second=nbytes / read_seconds,
        disk_write_bytes_per_second=nbytes / write_seconds,
    )
    points = [(cached, n, s, cost.prefill_seconds(cached, n)) for cached, n, s in rows]
    return Calibration(cost, points)


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def calibration_toml(calibration: Calibration) -> str:
    """The cost table ``--cost`` reads, and the measurements it was fitted to."""
    cost = calibration.cost
    name = cost.name
    lines = [
        "# written by kvtrie calibrate: the cost figures of this machine and model (--cost FILE)",
        f"[costs.{_toml_string(name)}]",
    ]
    for key, value in cost.describe().items():
        if key != "name":
            lines.append(
                f"{key} = {_toml_string(value) if isinstance(value, str) else repr(value)}"
            )
    lines += [
        "",
        "# the prefill grid: cached context, new tokens, measured and fitted seconds",
        f"[calibration.{_toml_string(name)}]",
        f"cached = {[p[0] for p in calibration.points]}",
        f"new = {[p[1] for p in calibration.points]}",
        f"measured_seconds = {[round(p[2], 6) for p in calibration.points]}",
        f"fitted_seconds = {[round(p[3], 6) for p in calibration.points]}",
        f"relative_error = {[round(e, 4) for e in calibration.errors]}",
    ]
    return "\n".join(lines) + "\n"
