"""The fuzzer: a quick profile on both backends, mutants it must kill, and the regression
traces it wrote, replayed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from child import fuzz_report

from kvtrie.sim.cli import main
from kvtrie.sim.fuzz import DEFAULT_MODELS, FuzzConfig, run_fuzz
from kvtrie.sim.mutants import MUTANTS
from kvtrie.sim.traces import read_header

REGRESSIONS = sorted((Path(__file__).parent / "regressions").glob("*.jsonl"))


def test_quick_profile_on_the_fake_backend_finds_nothing(tmp_path):
    result = fuzz_report(tmp_path, "--profile", "quick")
    assert result["failures"] == 0 and result["examples"] >= 300 and result["steps"] > 1000
    # the run reached the machinery it is meant to exercise
    reached = result["reached"]
    assert reached["splits"] and reached["merges"] and reached["evictions"]
    assert reached["restore_failures"] and reached["max_depth"] >= 3
    assert reached["trie_shapes"] > 100
    assert reached["disk_reads_skipped"]  # read-or-recompute cut matches, the oracle on each
    assert set(reached["examples_per_model"]) == set(DEFAULT_MODELS["fake"])


def test_quick_profile_on_the_mlx_backend_finds_nothing(tmp_path):
    result = fuzz_report(tmp_path, "--backend", "mlx", "--profile", "quick")
    assert result["failures"] == 0 and result["examples"] >= 24
    assert result["reached"]["splits"] and result["reached"]["evictions"]
    assert set(result["reached"]["examples_per_model"]) == set(DEFAULT_MODELS["mlx"])


def test_in_process_fuzz_run_counts_what_it_did(tmp_path):
    result = run_fuzz(FuzzConfig(examples=15, steps=8, out_dir=tmp_path))
    assert result.failure is None and result.examples >= 15 and result.steps > 0


# The whole table is `kvtrie fuzz --mutants all` (every mutant against the self-tests, then
# the fuzzer: minutes); here a few quick ones show the fuzz-shrink-replay loop, and every
# mutant's committed regression trace below must still catch it.
@pytest.mark.parametrize("name", ["lru-frontier-only", "evict-active-nodes", "recurrent-rewinds"])
def test_mutants_are_killed_and_shrunk_to_a_replayable_trace(tmp_path, name):
    # bounded by the example count, not a clock, so a busy machine can't make it flaky
    (row,) = fuzz_report(tmp_path, "--mutant", name, "--time-limit", "100000")["mutants"]
    assert row["verdict"] == "killed", f"mutant {name}: {row}"
    assert row["killed_by"].startswith("fuzz: ")
    trace = Path(row["regression_trace"])
    assert read_header(trace)["mutant"] == name
    assert 1 <= row["shrunk_requests"] <= 8
    assert main(["replay", str(trace), "-q"]) == 1  # with its mutant: fails again
    assert main(["replay", str(trace), "-q", "--mutant", "none"]) == 0  # real code: clean


@pytest.mark.parametrize("trace", REGRESSIONS, ids=[p.stem for p in REGRESSIONS])
def test_regression_traces_replay_clean(trace):
    assert main(["replay", str(trace), "-q", "--mutant", "none"]) == 0
    if read_header(trace).get("mutant"):
        assert main(["replay", str(trace), "-q"]) == 1, "the mutant it caught is no longer caught"


CAUGHT_BY_TRACES = {read_header(path).get("mutant") for path in REGRESSIONS}


def test_every_core_mutant_has_a_regression_trace():
    """What the fuzzer kills keeps being killed: its shrunk trace is replayed above."""
    core = {name for name, m in MUTANTS.items() if m.area == "core"}
    assert core <= CAUGHT_BY_TRACES, sorted(core - CAUGHT_BY_TRACES)


UNCAUGHT = """
import json, sys
from kvtrie.backends.contract import broken_promises
from kvtrie.sim import selfcheck
from kvtrie.sim.mutants import MUTANTS, mutated
missed = []
for name in sys.argv[1:]:
    with mutated(name):
        if not (selfcheck.failures() or broken_promises(MUTANTS[name].backend)):
            missed.append(name)
print(json.dumps(missed))
"""


def test_every_other_mutant_is_caught_by_a_self_test_or_the_contract():
    """The rest (weakened checks, strategies that only lose reuse, backend layers) fail a
    self-test or their backend's layer contract, which the suite runs on the real code. In a
    child process, like the fuzzer above: typeguard makes the self-tests several times slower."""
    others = sorted(set(MUTANTS) - CAUGHT_BY_TRACES)
    assert others
    run = subprocess.run(
        [sys.executable, "-c", UNCAUGHT, *others], capture_output=True, text=True, check=True
    )
    assert json.loads(run.stdout.splitlines()[-1]) == []


def test_fuzz_command_rejects_an_unknown_mutant(capsys):
    assert main(["fuzz", "--mutant", "no-such-bug"]) == 2
    assert "unknown mutant 'no-such-bug'" in capsys.readouterr().err
