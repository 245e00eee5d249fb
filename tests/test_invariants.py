"""The checker finds each broken invariant: sabotage a sound cache and read the verdict."""

from __future__ import annotations

import numpy as np
import pytest

from kvtrie.core import Checker, check
from kvtrie.core.invariants import check_request
from kvtrie.core.prefix_cache import RequestAccount

S = list(range(1, 21))


@pytest.fixture
def built(rig):
    r = rig("mixed")
    r.run(S + [1, 2])
    r.run(S + [3, 4, 5])
    r.run([99])
    assert check(r.cache) == []
    return r


def names(violations):
    return {v.invariant for v in violations}


def test_sound_cache_has_no_violations(built):
    assert Checker(built.cache).check() == []


def test_sibling_keyed_by_the_wrong_token_is_I1(built):
    node = built.node_at(0, 20)
    child = next(iter(node.children.values()))
    child.tokens = child.tokens.copy()
    child.tokens[0] = 777
    assert "I1" in names(check(built.cache))


def test_child_not_starting_at_parent_end_is_I2(built):
    built.node_at(0, 20).end = 19
    assert "I2" in names(check(built.cache))


def test_byte_counter_drift_is_I5_for_both_checkers(built):
    checker = Checker(built.cache)
    built.cache.ledger.total += 1
    assert "I5" in names(check(built.cache))
    assert "I5" in names(checker.check())


def test_snapshot_held_by_two_nodes_is_I5(built):
    a, b = built.node_at(0, 20), built.node_at(20, 23)
    b.snapshots[0] = a.snapshots[0]
    assert "I5" in names(check(built.cache))


def test_layers_at_different_offsets_is_I4(built):
    built.layers[0].restore(None, 0)
    assert "I4" in names(check(built.cache))


def test_active_node_detached_from_trie_is_I7(built):
    frontier = built.cache.active_path[-1]
    del frontier.parent.children[int(frontier.tokens[0])]
    assert "I7" in names(check(built.cache))


def test_over_budget_with_evictable_nodes_is_I6(built):
    built.cache.budget_bytes = 0  # set directly, so nothing was evicted
    assert "I6" in names(check(built.cache))


def test_recurrent_snapshot_at_the_wrong_offset_is_I10(built):
    node = built.node_at(0, 20)
    other = built.node_at(20, 23)
    node.snapshots[2], other.snapshots[2] = other.snapshots[2], node.snapshots[2]
    assert "I10" in names(check(built.cache))


def test_accounting_that_does_not_add_up_is_I12(built):
    built.cache.stats.cached_tokens += 1
    assert "I12" in names(check(built.cache))


def test_request_that_evaluates_nothing_is_I8():
    assert "I8" in names(check_request(RequestAccount(5, 5, 5)))
    assert check_request(RequestAccount(5, 5, 4)) == []


def test_incremental_checker_sees_structural_damage_done_through_the_trie(built):
    checker = Checker(built.cache)
    node = built.node_at(0, 20)
    node.end = 18  # damage, then report the node touched as any trie operation would
    built.cache.ledger.touch(node)
    assert "I2" in names(checker.check())


def test_live_path_must_spell_the_prompt(built):
    session = built.cache.begin(np.array(S + [5]))
    assert check(built.cache, session) == []
    session.prompt = np.array([0] * 30)
    assert "I4" in names(check(built.cache, session))
