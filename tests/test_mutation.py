"""The mutation check tells kills from errors: a kill is a shrunk trace that fails on the
mutant and replays clean on the real code; Hypothesis failing itself, or a trace that does
not reproduce, is an error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis.errors import FlakyStrategyDefinition

from kvtrie.sim import fuzz as fuzz_module
from kvtrie.sim import mutation
from kvtrie.sim.fuzz import FuzzConfig, FuzzResult
from kvtrie.sim.mutants import AREAS, MUTANTS
from kvtrie.sim.traces import load_trace

REGRESSIONS = Path(__file__).parent / "regressions"


def configs(tmp_path: Path, examples: int = 30) -> dict[str, FuzzConfig]:
    fake = FuzzConfig(examples=examples, steps=12, out_dir=tmp_path)
    return {"fake": fake, "mlx": FuzzConfig(backend="mlx", examples=4, steps=6, out_dir=tmp_path)}


def test_every_area_has_mutants_and_every_mutant_an_area():
    assert {m.area for m in MUTANTS.values()} == set(AREAS)
    assert all(m.bug for m in MUTANTS.values())


@pytest.fixture
def fuzzed(tmp_path):
    """What a fuzz run sends back when it kills ``lru-frontier-only``: the failure and the
    shrunk trace it saved (here the one committed for that mutant, copied as a run writes its
    own). The tests below differ only in what the replay of that trace says; the loop that
    finds and shrinks it is tests/test_fuzz.py's, run in a child process, where typeguard
    does not slow it tenfold."""
    (committed,) = REGRESSIONS.glob("lru-frontier-only-*.jsonl")
    trace = tmp_path / committed.name
    shutil.copy(committed, trace)
    failure = mutation.replay_verdict(trace, "lru-frontier-only")
    assert failure is not None
    return FuzzResult(
        FuzzConfig(mutant="lru-frontier-only", out_dir=tmp_path),
        failure=failure,
        regression_trace=str(trace),
        shrunk_requests=len(load_trace(trace).requests),
    )


def test_a_fuzzer_kill_is_confirmed_by_replaying_its_trace(tmp_path, fuzzed, monkeypatch):
    monkeypatch.setattr(mutation, "run_fuzz", lambda config: fuzzed)
    verdict = mutation.check_mutant("lru-frontier-only", configs(tmp_path), selftests=False)
    assert verdict.verdict == "killed", verdict
    assert verdict.killed_by.startswith("fuzz: ")
    trace = Path(verdict.regression_trace)
    assert mutation.replay_verdict(trace, "lru-frontier-only") is not None
    assert mutation.replay_verdict(trace, None) is None


def test_a_hypothesis_error_is_an_error_not_a_kill(tmp_path, monkeypatch):
    def flaky(*args, **kwargs):
        def test():
            raise FlakyStrategyDefinition("Inconsistent data generation! (as after a time-out)")

        return test

    monkeypatch.setattr(fuzz_module, "get_state_machine_test", flaky)
    verdict = mutation.check_mutant("lru-frontier-only", configs(tmp_path), selftests=False)
    assert verdict.verdict == "error"
    assert "FlakyStrategyDefinition" in verdict.detail
    assert verdict.regression_trace is None


def test_a_trace_that_does_not_reproduce_is_an_error(tmp_path, fuzzed, monkeypatch):
    monkeypatch.setattr(mutation, "run_fuzz", lambda config: fuzzed)
    monkeypatch.setattr(mutation, "replay_verdict", lambda path, mutant: None)
    verdict = mutation.check_mutant("lru-frontier-only", configs(tmp_path), selftests=False)
    assert verdict.verdict == "error" and "does not fail when replayed" in verdict.detail


def test_a_trace_that_fails_on_the_real_code_too_is_an_error(tmp_path, fuzzed, monkeypatch):
    monkeypatch.setattr(mutation, "run_fuzz", lambda config: fuzzed)
    monkeypatch.setattr(mutation, "replay_verdict", lambda path, mutant: "I9: always")
    verdict = mutation.check_mutant("lru-frontier-only", configs(tmp_path), selftests=False)
    assert verdict.verdict == "error" and "real code too" in verdict.detail


@pytest.mark.parametrize("name", ["weak-budget-check", "page-floor-one-page-low"])
def test_self_tests_kill_what_the_fuzzer_cannot_see(tmp_path, name):
    """A weakened check and a strategy that only loses reuse: killed by a self-test."""
    verdict = mutation.check_mutant(name, configs(tmp_path))
    assert verdict.verdict == "killed" and verdict.killed_by.startswith("self-test ")
