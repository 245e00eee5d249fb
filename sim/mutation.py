"""The mutation check: does the verifier find each named mutant, for a reason that holds up?

Each mutant faces the killers in turn: the self-tests (:mod:`kvtrie.sim.selfcheck`, a few
seconds; what kills a weakened check or a strategy that only loses reuse), for a backend
mutant its backend's layer contract (:mod:`kvtrie.backends.contract`), and, if it survives
them, the fuzzer. A fuzzer failure counts as a kill only when its shrunk trace, replayed from
the file, fails on the mutated code and passes on the real code; Hypothesis failing itself
(a flaky example, a failed health check) and a trace that does not reproduce are errors, and
an error is a failure of the mutation check, never a kill. The self-tests must pass on the
real code first, or no self-test kill means anything.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

from kvtrie.backends.contract import broken_promises

from . import selfcheck
from .build import DiskTier, make_backend, make_cache, make_policy
from .fuzz import FuzzConfig, run_fuzz
from .mutants import MUTANTS, mutated
from .replay import replay
from .runner import CheckMode
from .traces import load_trace, read_header

__all__ = ["MutantVerdict", "check_mutant", "replay_verdict"]


@dataclass
class MutantVerdict:
    name: str
    area: str
    verdict: str  # killed, survived or error
    killed_by: str | None = None  # "self-test CASE" or "fuzz: INVARIANT"
    seconds: float = 0.0
    detail: str | None = None
    regression_trace: str | None = None
    shrunk_requests: int = 0

    def as_dict(self) -> dict:
        return dict(vars(self))


def replay_verdict(path: Path, mutant: str | None) -> str | None:
    """The first violation (``INVARIANT: detail``) replaying ``path`` with every check on,
    under ``mutant`` (None: the real code); None when it replays clean."""
    header = read_header(path)
    backend = make_backend(header.get("backend", "fake"), header["profile"])
    trace = load_trace(path, vocab_size=backend.vocab_size)
    log = logging.getLogger("kvtrie")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        with mutated(mutant):
            disk = DiskTier(header["disk_budget_bytes"]) if "disk_budget_bytes" in header else None
            policy = make_policy(header["policy"])
            counts_live = header.get("budget_counts_live", False)
            cache = make_cache(backend, header.get("budget_bytes"), policy, disk, counts_live)
            outcome = replay(trace, backend, cache, CheckMode(full=True), progress=False)
    finally:
        log.setLevel(level)
    if not outcome.violations:
        return None
    first = outcome.violations[0]
    return f"{first.invariant}: {first.detail}"


def check_mutant(
    name: str, configs: dict[str, FuzzConfig], selftests: bool = True
) -> MutantVerdict:
    """Run the killers against one mutant; ``configs`` give the fuzzer's budget per backend."""
    mutant = MUTANTS[name]
    started = time.monotonic()
    verdict = MutantVerdict(name, mutant.area, "survived")
    if selftests:
        with mutated(name):
            killer, failing = "self-test", selfcheck.failures()
            if not failing and mutant.area in ("fake", "mlx"):
                killer, failing = "contract", broken_promises(mutant.backend)
        if failing:
            verdict.verdict = "killed"
            verdict.killed_by = f"{killer} {failing[0].split(':', 1)[0]}"
            verdict.detail = failing[0]
            verdict.seconds = round(time.monotonic() - started, 2)
            return verdict
    config = replace(configs[mutant.backend], mutant=name, model=None)
    result = run_fuzz(config)
    verdict.seconds = round(time.monotonic() - started, 2)
    if result.error:
        verdict.verdict, verdict.detail = "error", result.error
        return verdict
    if result.failure is None:
        return verdict
    verdict.regression_trace = result.regression_trace
    verdict.shrunk_requests = result.shrunk_requests
    if result.regression_trace is None:
        verdict.verdict = "error"
        verdict.detail = f"the fuzzer failed but saved no trace: {result.failure[:300]}"
        return verdict
    trace = Path(result.regression_trace)
    mutated_run = replay_verdict(trace, name)
    real_run = replay_verdict(trace, None)
    if mutated_run is None:
        verdict.verdict = "error"
        verdict.detail = f"the shrunk trace does not fail when replayed: {result.failure[:300]}"
    elif real_run is not None:
        verdict.verdict = "error"
        verdict.detail = f"the shrunk trace fails on the real code too: {real_run[:300]}"
    else:
        verdict.verdict = "killed"
        verdict.killed_by = "fuzz: " + mutated_run.split(":", 1)[0]
        verdict.detail = mutated_run[:300]
    verdict.seconds = round(time.monotonic() - started, 2)
    return verdict
