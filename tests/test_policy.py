"""Policies as bundles of strategies: spelling, layer-kind resolution, and the eviction index."""

from __future__ import annotations

import random

import numpy as np
import pytest


def test_named_bundles_round_trip_through_their_spelling():
    from kvtrie.core.policy import POLICIES, parse_policy

    for name, policy in POLICIES.items():
        assert parse_policy(name) == policy
    assert parse_policy("improved") == POLICIES["kvtrie-improved"]


def test_a_spelled_out_ablation_changes_one_strategy():
    from kvtrie.core.policy import POLICIES, parse_policy

    ablated = parse_policy("improved,-page-in-moves")
    improved = POLICIES["kvtrie-improved"]
    assert not ablated.page_in_moves.on and improved.page_in_moves.on
    assert ablated.partial_edges == improved.partial_edges
    assert ablated.name == "kvtrie-improved,-page-in-moves"
    assert parse_policy(ablated.name) == ablated
    seeded = parse_policy("seed,+partial-edges,snapshot-interval=64")
    assert seeded.partial_edges.on and seeded.schedule.interval == 64


@pytest.mark.parametrize(
    "spelling, message",
    [
        ("greedy", "unknown policy 'greedy'"),
        ("improved,-page-in-move", "unknown strategy 'page-in-move'"),
        ("seed,snapshot-interval=x", "takes an integer"),
        ("seed,partial-edges=3", "only snapshot-interval=K takes a value"),
    ],
)
def test_bad_spellings_say_what_is_valid(spelling, message):
    from kvtrie.core.policy import parse_policy

    with pytest.raises(ValueError, match=message):
        parse_policy(spelling)


@pytest.mark.parametrize(
    "profile, partial, moves, trims",
    [("tiny-attention", True, True, True), ("tiny-mixed", False, False, False)],
)
def test_choices_the_layers_cannot_support_are_dropped_once(profile, partial, moves, trims):
    from kvtrie.backends.fake import FakeBackend
    from kvtrie.backends.profiles import get_profile
    from kvtrie.core import PrefixCache
    from kvtrie.core.policy import POLICIES

    cache = PrefixCache(
        FakeBackend(get_profile(profile)).new_layers(), policy=POLICIES["kvtrie-improved"]
    )
    assert cache.policy.partial_edges.on is partial
    assert cache.policy.page_in_moves.on is moves
    assert cache.policy.trim_tail_pages.on is trims
    assert cache.policy.keep_restore_points.on  # every layer kind supports it


def test_the_index_picks_the_brute_force_victim_through_random_churn():
    """Random requests under a tight budget; every eviction's victim is compared with the
    minimum over a walk of the trie (the audit), and none may differ."""
    from kvtrie.backends.fake import FakeBackend
    from kvtrie.backends.profiles import get_profile
    from kvtrie.core.invariants import Checker
    from kvtrie.sim.build import make_cache, make_policy

    for policy in ("kvtrie-seed", "kvtrie-improved"):
        backend = FakeBackend(get_profile("tiny-attention"))
        cache = make_cache(backend, 600, make_policy(policy))
        checker = Checker(cache, audit_every_eviction=True)
        rng = random.Random(7)
        for _ in range(150):
            prompt = np.array([rng.randint(1, 3) for _ in range(rng.randint(1, 12))])
            session = cache.begin(prompt)
            backend.evaluate(cache.layers, session.remaining)
            session.close()
            assert checker.check(session) == []
        assert checker.audit.audited == cache.stats.evictions > 20
