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
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from .bench import median_seconds
from .costs import CostModel, attended

__all__ = ["Calibration", "GRIDS", "calibrate", "calibration_toml", "fit_prefill", "grid_steps"]

# (cached context, new tokens) grids: the quick one for CI, the full one for a real fit
GRIDS = {
    "quick": ([0, 64, 256], [8, 32, 128]),
    "full": ([0, 256, 1024, 2048], [16, 64, 256, 1024]),
}
REPEATS = {"quick": 2, "full": 5}  # rounds over the grid


@dataclass
class Calibration:
    cost: CostModel
    points: list[tuple[int, int, float, float]]  # cached, new, measured s, fitted s
    timings: list[list[float]] = field(default_factory=list)  # each point's, round by round

    @property
    def errors(self) -> list[float]:
        return [abs(fit - measured) / measured for _, _, measured, fit in self.points]

    @property
    def fit_error(self) -> tuple[float, float]:
        """The fit's relative error over the grid: its median (the upper one of an even
        count) and its largest."""
        errors = sorted(self.errors)
        return errors[len(errors) // 2], errors[-1]


def fit_prefill(rows: list[tuple[int, int, float]]) -> tuple[float, float, float]:
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


def grid_steps(grid: str) -> int:
    """How many timings a grid takes: every point, once a round."""
    contexts, news = GRIDS[grid]
    return len(contexts) * len(news) * REPEATS[grid]


def calibrate(
    model: str,
    grid: str = "quick",
    tick: Callable[[], Any] | None = None,
    disk_dir: Path | None = None,
    between_rounds: Callable[[], Any] | None = None,
) -> Calibration:
    """Time ``model`` (an MLX model name or directory) on this machine; the disk tier's
    bandwidth in ``disk_dir`` (default: the system's temporary folder).

    The grid is timed in rounds, every point once a round, and each point's seconds are the
    median over the rounds: a slow spell of a shared machine then lands on one round of every
    point, not on every timing of a few (on this project's 2-core machine one point's
    timings spread by up to 1.9x, and consecutive timings of one point are slow together).
    ``between_rounds`` runs after each round (the bench times its validation replays there,
    so that they and the grid see the same spells). Each context is evaluated once and
    restored from its snapshots before each timing: the state a cache hit prefills from."""
    import mlx.core as mx

    from kvtrie.backends.mlx import MLXBackend
    from kvtrie.backends.mlx.adapters import arrays_of

    backend = MLXBackend.from_name(model)
    rng = np.random.default_rng(0)
    contexts, news = GRIDS[grid]
    repeats = REPEATS[grid]

    def tokens(count: int) -> np.ndarray:
        return rng.integers(5, backend.vocab_size, count).astype(np.int32)

    def evaluated(layers: list[Any]) -> None:
        """The live layers' pending copies done, so that a timing holds them."""
        mx.eval(*[a for layer in layers for a in arrays_of(layer.cache)])

    def restored(layers: list[Any], snapshots: list[Any], end: int) -> None:
        """``layers`` freed and given ``snapshots`` of ``end`` tokens back, evaluated."""
        for layer, snapshot in zip(layers, snapshots):
            layer.free()
            if snapshot is not None:
                layer.restore(snapshot, end)
        evaluated(layers)

    backend.evaluate(backend.new_layers(), tokens(8))  # the first call compiles
    prefixes = {}  # context -> its snapshots, evaluated once
    for cached in contexts:
        layers = backend.new_layers()
        if cached:
            backend.evaluate(layers, tokens(cached))
        prefixes[cached] = [layer.snapshot(0) for layer in layers]
    points = [(cached, n, tokens(n)) for cached in contexts for n in news]
    timings: list[list[float]] = [[] for _ in points]
    layers = backend.new_layers()
    for _ in range(repeats):
        for (cached, _n, new), seconds in zip(points, timings):
            restored(layers, prefixes[cached], cached)
            started = time.perf_counter()
            backend.evaluate(layers, new)
            seconds.append(time.perf_counter() - started)
            if tick:
                tick()
        if between_rounds:
            between_rounds()
    rows = [
        (cached, n, statistics.median(seconds)) for (cached, n, _), seconds in zip(points, timings)
    ]
    a, b, c = fit_prefill(rows)

    layers = backend.new_layers()
    backend.evaluate(layers, tokens(contexts[len(contexts) // 2] or 64))
    one = tokens(1)
    decode = median_seconds(lambda: backend.evaluate(layers, one), 8 * repeats)

    # Page-out, page-in and the disk timed on the largest context's positions from 1 on: an
    # attention snapshot from position 0 may share the live buffer and a restore of one hands
    # the buffer back, which copy nothing; these figures are for the copies a switch makes.
    end = max(contexts)
    restored(layers, prefixes[end], end)

    def copies() -> list[Any]:
        return [layer.snapshot(1) for layer in layers]  # a snapshot evaluates its copy

    tails = copies()
    nbytes = sum(s.nbytes for s in tails if s is not None)

    def page_out() -> None:
        for snapshot in copies():
            if snapshot is not None:
                snapshot.close()

    def page_in() -> None:
        for layer, snapshot in zip(layers, tails):
            if snapshot is not None:
                layer.restore(None, 1)  # attention rewinds; other kinds load a whole state
                assert layer.restore(snapshot, end), "calibrate: a page-in was refused"
        evaluated(layers)

    page_out_seconds = median_seconds(page_out, 4 * repeats)
    page_in_seconds = median_seconds(page_in, 4 * repeats)
    write_seconds, read_seconds = _disk_seconds(backend, copies, disk_dir, 2 * repeats)
    for snapshot in tails:
        if snapshot is not None:
            snapshot.close()
    for taken in prefixes.values():
        for snapshot in taken:
            if snapshot is not None:
                snapshot.close()
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
    return Calibration(cost, points, timings)


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
