"""Running kvtrie in a child process, for the tests that time-consuming loops make slow here:
typeguard's instrumentation in the test process makes the fuzzer several times slower, and
the loop under test is the CLI's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def kvtrie(*argv: str) -> int:
    """``kvtrie ARGV`` in a child process; its exit code."""
    return subprocess.run([sys.executable, "-m", "kvtrie.sim.cli", *argv]).returncode


def fuzz_report(tmp_path: Path, *argv: str) -> dict:
    """Run ``kvtrie fuzz`` quietly with its output in tmp_path; its JSON report."""
    report = tmp_path / "fuzz.json"
    code = kvtrie("fuzz", *argv, "-q", "--out", str(tmp_path), "--report", str(report))
    assert code == 0
    return json.loads(report.read_text())
