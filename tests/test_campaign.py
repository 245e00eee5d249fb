"""Fuzzing campaigns: shards with seeds of their own side by side, locally or on Ray; a
failure shrunk where it ran comes back as a replayable trace with its seed, and that seed
alone draws it again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from child import fuzz_report

from kvtrie.sim.campaign import run_campaign, shard_seed
from kvtrie.sim.cli import main
from kvtrie.sim.executors import LocalExecutor
from kvtrie.sim.fuzz import FuzzConfig
from kvtrie.sim.traces import read_header

# In child processes, as in test_fuzz.py: typeguard's instrumentation in this one makes the
# fuzzer several times slower.
CAMPAIGN = """
import json, sys
from pathlib import Path
from kvtrie.sim.campaign import run_campaign
from kvtrie.sim.executors import make_executor
from kvtrie.sim.fuzz import FuzzConfig, run_fuzz
kind, mutant, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
config = FuzzConfig(examples=300, steps=25, mutant=mutant, out_dir=out)
executor = make_executor(kind, 2, fork=False)  # as kvtrie fuzz makes it
result = run_campaign(config, executor, duration=None, campaign_seed=3)
executor.close()
failed = result.failures[0]
(out / "alone").mkdir()
alone = run_fuzz(FuzzConfig(examples=300, steps=25, mutant=mutant, seed=failed.seed,
                            out_dir=out / "alone"))
print(json.dumps({**result.as_dict(), "alone": Path(alone.regression_trace).name}))
"""


def test_a_local_campaign_runs_one_shard_a_worker_each_drawing_its_own(tmp_path):
    report = fuzz_report(tmp_path, "--workers", "2", "--examples", "30", "--steps", "10")
    assert report["executor"] == "local" and report["failures"] == report["errors"] == 0
    shards = report["shards"]
    assert [s["seed"] for s in shards] == [shard_seed(0, 0), shard_seed(0, 1)]
    assert len(report["workers"]) == 2  # two processes, side by side
    assert report["examples"] == sum(s["examples"] for s in shards) >= 60
    # the same count of examples with different seeds: different draws, different step counts
    assert shards[0]["steps"] != shards[1]["steps"]


def test_a_ray_campaign_with_a_duration_runs_consecutive_seeds(tmp_path):
    pytest.importorskip("ray", reason="the test extra installs Ray")
    argv = ["--executor", "ray", "--workers", "2", "--examples", "20", "--steps", "8"]
    report = fuzz_report(tmp_path, *argv, "--duration", "2s", "--seed", "5")
    assert report["executor"] == "ray" and report["at_a_time"] == 2
    assert report["failures"] == report["errors"] == 0
    seeds = [s["seed"] for s in report["shards"]]
    # at least a worker's worth start at once; how many more fit in 2 s is the machine's
    assert len(seeds) >= 2 and seeds == [shard_seed(5, i) for i in range(len(seeds))]


class Clock:
    """A monotonic clock that moves one second each time it is read."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_a_campaign_starts_shards_until_its_duration_is_spent(tmp_path):
    """Read at 1 s (the deadline set at 1 + 3.5), then before each shard at 2, 3, 4 (drawn)
    and 5 (past it): three shards, on a clock that can't be slow."""
    config = FuzzConfig(examples=2, steps=2, out_dir=tmp_path)
    result = run_campaign(config, LocalExecutor(1), duration=3.5, clock=Clock())
    assert [s.seed for s in result.shards] == [shard_seed(0, i) for i in range(3)]


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_a_failing_shard_sends_back_its_shrunk_trace_with_its_seed(tmp_path, kind):
    if kind == "ray":
        pytest.importorskip("ray", reason="the test extra installs Ray")
    mutant = "lru-frontier-only"
    run = subprocess.run(
        [sys.executable, "-c", CAMPAIGN, kind, mutant, str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["failures"] >= 1 and len(result["regression_traces"]) == result["failures"]
    failed = next(s for s in result["shards"] if s["failure"])
    trace = Path(result["regression_traces"][0])
    assert trace.parent == tmp_path  # written here, from the text the worker sent back
    header = read_header(trace)
    assert header["mutant"] == mutant and header["seed"] in [s["seed"] for s in result["shards"]]
    assert main(["replay", str(trace), "-q"]) == 1  # with its mutant: fails again
    assert main(["replay", str(trace), "-q", "--mutant", "none"]) == 0  # real code: clean
    # that shard's seed alone, in one process, finds and shrinks the same failure
    assert result["alone"] == failed["trace_name"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--duration", "0s"], "--duration: the duration must be more than 0 seconds"),
        (["--duration", "soon"], "--duration: bad duration 'soon'"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--workers", "2", "--mutants", "all"], "not with --mutant or --mutants"),
        (["--address", "127.0.0.1:1"], "--address needs --executor ray"),
    ],
)
def test_bad_campaign_options_are_exit_2(tmp_path, capsys, argv, message):
    assert main(["fuzz", "-q", "--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err
