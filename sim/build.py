"""The one place sim/ builds its objects from what a user typed: sizes, trace paths, backends,
policies and caches. The CLI, the gate, the fuzzer and the benchmarks all call these, so a name
or a size means the same thing in every command, and every bad value is a ``ValueError`` that
says what is wrong and what would be right.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvtrie.backends.base import Backend
from kvtrie.core.policy import CachePolicy, parse_policy
from kvtrie.core.prefix_cache import PrefixCache
from kvtrie.core.tiers import SimulatedDisk, SnapshotStore

if TYPE_CHECKING:
    from .costs import CostModel

__all__ = [
    "DiskTier",
    "default_model",
    "make_backend",
    "make_cache",
    "make_policy",
    "parse_duration",
    "parse_size",
    "trace_inputs",
    "trace_path",
]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


MAX_SIZE = (1 << 63) - 1  # 8 EiB: byte counts are 64-bit


def parse_size(text: str, option: str = "") -> int | None:
    """``8GiB``, ``512MiB``, ``1.5GB``, ``4096`` (bytes) or ``inf`` (None: unbounded); errors
    start with ``option`` when given."""
    where = f"{option}: " if option else ""
    if text.strip().lower() in ("inf", "infinite", "none", "unbounded"):
        return None
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not found or found.group(2).lower() not in _UNITS:
        shown = text if len(text) <= 40 else f"{text[:37]}..."
        raise ValueError(
            f"{where}bad size {shown!r}: use a number >= 0 with B, KiB, MiB, GiB, TiB (or "
            "KB, MB, GB, TB), e.g. 8GiB, or inf"
        )
    number, unit = found.group(1), _UNITS[found.group(2).lower()]
    if len(number) > 30 or float(number) * unit > MAX_SIZE:
        raise ValueError(f"{where}{text[:40]!r} is more than 8 EiB; use inf for unbounded")
    return int(float(number) * unit)


_SECONDS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, option: str = "") -> float:
    """``90s``, ``10m``, ``1.5h``, ``1d`` or plain seconds, more than zero; errors start with
    ``option`` when given."""
    where = f"{option}: " if option else ""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not found or found.group(2).lower() not in _SECONDS or len(found.group(1)) > 12:
        shown = text if len(text) <= 40 else f"{text[:37]}..."
        raise ValueError(f"{where}bad duration {shown!r}: use a number with s, m, h or d, e.g. 10m")
    seconds = float(found.group(1)) * _SECONDS[found.group(2).lower()]
    if seconds <= 0:
        raise ValueError(f"{where}the duration must be more than 0 seconds, got {text!r}")
    return seconds


def default_model(backend: str) -> str:
    return "tiny-attention" if backend == "mlx" else "llama-8b"


def make_backend(name: str, model: str) -> Backend:
    """The named backend with ``model`` (a fake profile, or an MLX model name or path)."""
    if name == "fake":
        from kvtrie.backends.fake import FakeBackend
        from kvtrie.backends.profiles import get_profile

        return FakeBackend(get_profile(model))
    if name == "mlx":
        from kvtrie.backends.mlx import MLXBackend

        return MLXBackend.from_name(model)
    raise ValueError(f"unknown backend {name!r}; choose fake or mlx")


def make_policy(spelling: str, snapshot_interval: int | None = None) -> CachePolicy:
    """A policy from its spelling (``kvtrie-improved``, ``improved,-page-in-moves``), with
    ``--snapshot-interval`` applied on top when given."""
    if not isinstance(spelling, str):
        raise ValueError(f"a policy is a string such as kvtrie-improved, got {spelling!r}")
    policy = parse_policy(spelling)
    if snapshot_interval is not None:
        if snapshot_interval < 0:
            raise ValueError(f"--snapshot-interval must be >= 0, got {snapshot_interval}")
        policy = parse_policy(f"{spelling},snapshot-interval={snapshot_interval}")
    return policy


@dataclass(frozen=True)
class DiskTier:
    """A disk tier as a user asked for it: its budget (None: unbounded) and its directory
    (None: simulated, bytes counted and nothing written)."""

    budget: int | None
    directory: Path | None = None


def make_cache(
    backend: Backend,
    budget: int | None,
    policy: CachePolicy,
    disk: DiskTier | None = None,
    budget_counts_live: bool = False,
    cost: CostModel | None = None,
) -> PrefixCache:
    """A cache on ``backend``'s layers; with ``disk``, snapshots evicted from RAM move to a
    disk tier under its budget: files in its directory (reopened, what it kept is adopted),
    or a simulated disk. A directory that can't be used is a ValueError
    (:class:`~kvtrie.core.store.StoreError`) saying why. ``budget_counts_live``: the budget
    holds the live layers too. ``cost``: the time model's figures, for the policy's
    read-or-recompute choice on a disk tier."""
    if disk is None:
        return PrefixCache(
            backend.new_layers(),
            budget_bytes=budget,
            policy=policy,
            budget_counts_live=budget_counts_live,
        )
    if disk.directory is None:
        store: SnapshotStore = SimulatedDisk()
    else:
        from kvtrie.core.store import DirectoryStore

        store = DirectoryStore(disk.directory, backend.snapshot_codec())
    return PrefixCache(
        backend.new_layers(),
        budget_bytes=budget,
        policy=policy,
        store=store,
        disk_budget_bytes=disk.budget,
        budget_counts_live=budget_counts_live,
        estimate_seconds=cost.request_seconds if cost is not None else None,
    )


def trace_path(text: str, root: Path | None = None) -> Path:
    """A trace file or folder path (relative to ``root`` when given and it exists there), or
    a trace name (``chat``, ``agent``, ``mooncake``, ...); a ValueError for a third-party
    name that is not here, naming the command that gets it."""
    from kvtrie.traces import bundled_path

    if root is not None and (root / text).exists():
        return root / text
    path = Path(text)
    if path.exists():
        return path
    return bundled_path(text) or path


def trace_inputs(path: Path) -> list[Path]:
    """The files a trace reads: the file, or every file of a folder of agentic traces (an
    output must not replace any of them)."""
    return sorted(path.glob("*")) if path.is_dir() else [path]
