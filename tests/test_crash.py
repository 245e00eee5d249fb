"""Crash safety for real: a replay writing a disk store is killed with SIGKILL at random
points; the store it leaves is reopened and the trace replayed with every check on (the full
run is ``kvtrie bench crash``, 50 points)."""

from __future__ import annotations

import json

from kvtrie.sim.cli import main
from kvtrie.sim.crash import crash_points


def test_kill_9_leaves_nothing_wrong_over_budget_or_leaked(tmp_path):
    results = crash_points("agent", tmp_path / "store", points=3, seed=7)
    assert results["points"] == 3
    assert results["wrong_states"] == 0 and results["failed_checks"] == 0
    assert results["over_budget_points"] == 0
    assert results["leaked_files"] == 0 and results["missing_files"] == 0
    for point in results["results"]:
        assert point["bytes_after_kill"] <= results["disk_budget_bytes"]


def test_the_crash_bench_reports_as_json(tmp_path):
    report = tmp_path / "crash.json"
    assert main(["bench", "crash", "--quick", "--points", "1", "--report", str(report)]) == 0
    results = json.loads(report.read_text())
    assert results["points"] == 1 and results["trace"] == "agent"
    assert main(["bench", "crash", "--points", "0"]) == 2
