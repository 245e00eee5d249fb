"""The verifier's self-tests (kvtrie.sim.selfcheck), one test per case and layer kind: each
check fires on its bad state and passes the sound one beside it; the replayer's counters agree
with brute force; each strategy gives its hand-computed outcome."""

from __future__ import annotations

import pytest

from kvtrie.sim import selfcheck

RUNS = [(case, kind) for case in selfcheck.CASES for kind in case.kinds]


@pytest.mark.parametrize("case, kind", RUNS, ids=[f"{c.area}/{c.name}[{k}]" for c, k in RUNS])
def test_case_holds(case, kind):
    one = selfcheck.SelfCheck(case.name, case.area, (kind,), case.run, case.invariant)
    assert selfcheck.failures([one]) == []


def test_every_invariant_and_oracle_has_a_check_shown_to_fire():
    shown = {
        invariant
        for case in selfcheck.CASES
        for invariant in case.invariant.split(" or ")
        if invariant
    }
    expected = {f"I{n}" for n in range(1, 13)} | {"EVICT", "LRU", "REUSE"}
    assert shown == expected, sorted(expected ^ shown)
    # and on every layer kind, the first and last layer of the mixed model among them
    kinds = {kind for case in selfcheck.CASES if case.area == "checker" for kind in case.kinds}
    assert kinds == set(selfcheck.KINDS)


def test_a_weakened_check_fails_its_case(monkeypatch):
    """The table is not vacuous: with the I12 totals check turned off, its case fails, and
    only the cases that need that check."""
    from kvtrie.core import invariants

    monkeypatch.setattr(invariants, "_check_accounting", lambda cache, out: None)
    failing = selfcheck.failures()
    assert failing and all("totals-do-not-add-up" in line for line in failing), failing
