"""Shared fixtures: caches on the fake backend, with a counter clock and checks after each step.

kvtrie is imported inside the fixtures, not here: pytest loads this file before typeguard's
plugin installs its import hook, and a module imported now would go unchecked.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest


def fake_profile(name: str):
    """``kv`` (16 B/token), ``recurrent`` (100 B state) or ``mixed`` (all three kinds)."""
    from kvtrie.backends.profiles import LayerSpec, ModelProfile, get_profile
    from kvtrie.core import LayerKind

    if name == "mixed":
        return get_profile("tiny-mixed")
    spec = {
        "kv": LayerSpec(LayerKind.KV, bytes_per_token=16),
        "recurrent": LayerSpec(LayerKind.RECURRENT, state_bytes=100),
    }[name]
    return ModelProfile(name=name, layers=(spec,), vocab_size=1000)


class Rig:
    """A cache on the fake backend, driven request by request with every check on."""

    def __init__(
        self,
        profile: str,
        budget: int | None,
        policy: str,
        store=None,
        disk_budget=None,
        counts_live: bool = False,
        estimate_seconds=None,
    ) -> None:
        from kvtrie.backends.fake import FakeBackend
        from kvtrie.core import PrefixCache
        from kvtrie.core.policy import parse_policy
        from kvtrie.sim.runner import CheckMode, RequestRunner

        self.backend = FakeBackend(fake_profile(profile))
        self.layers = self.backend.new_layers()
        if callable(store):  # a factory of a store for this backend (a directory store's codec)
            store = store(self.backend)
        self.cache = PrefixCache(
            self.layers,
            budget_bytes=budget,
            policy=parse_policy(policy),
            clock=itertools.count(1).__next__,
            store=store,
            disk_budget_bytes=disk_budget,
            budget_counts_live=counts_live,
            estimate_seconds=estimate_seconds,
        )
        self.runner = RequestRunner(self.backend, self.cache, CheckMode(full=True))

    def run(self, prompt, outputs=(), user_marks=()):
        """Serve a request; assert every invariant and the oracle held; return its account."""
        from kvtrie.core import check

        result = self.runner.run(np.asarray(prompt), list(outputs), user_marks)
        assert result.violations == [], [str(v) for v in result.violations]
        assert not check(self.cache)
        self.assert_no_leaks()
        return result.account

    def assert_no_leaks(self) -> None:
        from kvtrie.core.tiers import is_stored

        def backend_object(snap):
            """The backend snapshot a trie snapshot keeps open (a stored one may keep none)."""
            if not is_stored(snap):
                return snap
            return snap.snapshot if snap.keeps_backend_snapshot else None

        held = {
            id(backend_object(s))
            for n in self.cache.nodes()
            for s in (n.snapshots or [])
            if s is not None and backend_object(s) is not None
        }
        assert held == set(self.backend.ledger.open), "snapshots leaked or lost"
        assert self.backend.ledger.closed_twice == 0

    def node_ranges(self) -> list[tuple[int, int]]:
        return sorted((n.start, n.end) for n in self.cache.nodes() if not n.is_root)

    def node_at(self, start: int, end: int):
        (node,) = [n for n in self.cache.nodes() if (n.start, n.end) == (start, end)]
        return node


@pytest.fixture
def rig():
    """Factory: ``rig(profile="mixed", budget=None, policy="kvtrie-seed", store=None,
    disk_budget=None, counts_live=False, estimate_seconds=None)``; a store (or a function of
    the rig's backend that makes one) adds a disk tier; ``counts_live``: the budget holds the
    live layers too; the policy is spelled as ``--policy`` takes it."""

    def make(
        profile: str = "mixed",
        budget: int | None = None,
        policy: str = "kvtrie-seed",
        store=None,
        disk_budget: int | None = None,
        counts_live: bool = False,
        estimate_seconds=None,
    ):
        return Rig(profile, budget, policy, store, disk_budget, counts_live, estimate_seconds)

    return make
