"""Crash safety, tested for real: kill -9 a replay that writes a disk store, reopen the store
and replay again with every check on.

Each point starts ``kvtrie replay`` on the store in a child process and kills it (SIGKILL, no
chance to clean up) after a random time within one run's length. Right after the kill, the
snapshot files left in the store must fit the disk budget (their sizes are read from the
files themselves). Then a second replay opens the store, adopts what verifies, and serves the
whole trace with every invariant and the fresh-prefill oracle checked after every request: a
state adopted wrong fails it. Once it has closed the store, every file in it must be one its
manifest lists, and every file listed must be there.
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvtrie.core.store import MANIFEST

__all__ = ["CrashPoint", "crash_points"]


@dataclass
class CrashPoint:
    """One kill and the check after it."""

    killed_after_seconds: float
    killed_running: bool  # the replay was still running when killed (not already done)
    killed_with_store_open: bool  # ...and had opened the store (its PID in the lock file)
    bytes_after_kill: int  # snapshot bytes in the store's files right after the kill
    over_budget_bytes: int  # how far those went over the disk budget (0: within it)
    check_exit: int  # the checking replay's exit code (0: every check held)
    violations: int
    adopted_files: int
    deleted: dict[str, int]  # what opening deleted, by why (orphaned, half-written, ...)
    leaked_files: int  # files in the store its manifest does not list, after a clean close
    missing_files: int  # files the manifest lists that are not there


def _file_bytes(path: Path) -> int:
    """The snapshot bytes a store file stands for, from its own header (0 if unreadable)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        return int(header.get("__metadata__", {}).get("nbytes", 0))
    except (OSError, ValueError, struct.error):
        return 0


def _store_bytes(store: Path) -> int:
    folder = store / "snapshots"
    if not folder.is_dir():
        return 0
    return sum(_file_bytes(p) for p in folder.iterdir() if p.suffix == ".safetensors")


def _lock_holder(store: Path) -> int | None:
    """The PID a store's lock file names (the process that opened it last), if any."""
    try:
        return int((store / "lock").read_text().strip())
    except (OSError, ValueError):
        return None


def _listed_and_present(store: Path) -> tuple[set[str], set[str]]:
    manifest = json.loads((store / MANIFEST).read_text())["body"]
    present = {p.name for p in (store / "snapshots").iterdir()}
    return set(manifest["files"]), present


def crash_points(
    trace: str,
    store: Path,
    points: int,
    budget: str = "256MiB",
    disk_budget: int = 2 << 30,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Kill a replay of ``trace`` writing ``store`` at ``points`` random moments, checking
    the store after each (see the module's docstring); the results and their totals."""
    rng = random.Random(seed)
    replay = [
        sys.executable, "-m", "kvtrie.sim.cli", "replay", trace, "--budget", budget,
        "--disk-budget", str(disk_budget), "--disk-dir", str(store), "-q",
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run([*replay, "--check", "off"], check=True)  # a first run, timed
    length = time.perf_counter() - started
    report = store.parent / f"{store.name}-check.json"
    results = []
    for index in range(points):
        child = subprocess.Popen([*replay, "--check", "off"])
        wait = rng.uniform(0.05, length)
        time.sleep(wait)
        running = child.poll() is None
        opened = _lock_holder(store) == child.pid
        child.kill()
        child.wait()
        after = _store_bytes(store)
        checked = subprocess.run([*replay, "--check", "every", "--report", str(report)])
        outcome = json.loads(report.read_text()) if report.exists() else {}
        adopted = (outcome.get("disk_tier") or {}).get("opened") or {}
        listed, present = _listed_and_present(store)
        results.append(
            CrashPoint(
                killed_after_seconds=round(wait, 3),
                killed_running=running,
                killed_with_store_open=running and opened,
                bytes_after_kill=after,
                over_budget_bytes=max(0, after - disk_budget),
                check_exit=checked.returncode,
                violations=len(outcome.get("violations", [])),
                adopted_files=adopted.get("adopted_files", 0),
                deleted=adopted.get("deleted", {}),
                leaked_files=len(present - listed),
                missing_files=len(listed - present),
            )
        )
        report.unlink(missing_ok=True)
        if progress:
            point = results[-1]
            print(
                f"point {index + 1}/{points}: killed after {wait:.2f} s, "
                f"{'running' if running else 'done'}; adopted {point.adopted_files}, "
                f"deleted {point.deleted}; check exit {point.check_exit}",
                flush=True,
            )
    return {
        "trace": trace,
        "points": len(results),
        "killed_running": sum(p.killed_running for p in results),
        "killed_with_store_open": sum(p.killed_with_store_open for p in results),
        "disk_budget_bytes": disk_budget,
        "run_seconds": round(length, 2),
        "wrong_states": sum(p.violations for p in results),
        "failed_checks": sum(p.check_exit != 0 for p in results),
        "over_budget_points": sum(p.over_budget_bytes > 0 for p in results),
        "leaked_files": sum(p.leaked_files for p in results),
        "missing_files": sum(p.missing_files for p in results),
        "deleted_on_open": {
            why: sum(p.deleted.get(why, 0) for p in results)
            for why in sorted({w for p in results for w in p.deleted})
        },
        "results": [asdict(p) for p in results],
    }
