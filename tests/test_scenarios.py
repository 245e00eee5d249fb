"""The seed design's scenarios on the fake backend: offsets, trie shape, bytes and the oracle.

Every ``rig.run`` also asserts all structural invariants, the I9 oracle (the restored state
equals a fresh prefill) and that no snapshot leaked.
"""

from __future__ import annotations

import numpy as np
import pytest

S = list(range(1, 21))  # a 20-token system prompt, longer than the rotating window (8)

# tiny-mixed: KV 2 x 64 B/token, rotating 64 B/token (window 8), recurrent 1024 B
KV_BYTES, WINDOW_BYTES, STATE_BYTES = 128, 8 * 64, 1024


def test_shared_system_prompt_is_split_snapshotted_and_reused(rig):
    r = rig("mixed")
    assert r.run(S + [100, 101, 102, 103, 104], [500, 501, 502]).cached_tokens == 0
    assert r.node_ranges() == [(0, 27)]

    second = r.run(S + [200, 201, 202, 203], [600, 601])
    assert (second.cached_tokens, second.matched_tokens) == (0, 20)  # seed: back to the parent
    assert r.node_ranges() == [(0, 20), (20, 25), (20, 27)]
    assert r.cache.stats.splits == 1
    system = r.node_at(0, 20)
    assert system.has_all_snapshots()
    assert system.snapshot_bytes == 20 * KV_BYTES + WINDOW_BYTES + STATE_BYTES
    assert (
        r.cache.paged_out_bytes == system.snapshot_bytes + 7 * KV_BYTES + WINDOW_BYTES + STATE_BYTES
    )

    third = r.run(S + [300, 301], [700])
    assert (third.cached_tokens, third.computed_tokens) == (20, 2)


def test_divergence_inside_an_edge_splits_at_the_branch_point(rig):
    r = rig("mixed")
    r.run(list(range(1, 31)))
    account = r.run(list(range(1, 13)) + [99, 98, 97])
    assert account.cached_tokens == 0
    assert r.node_ranges() == [(0, 12), (12, 15), (12, 30)]
    assert r.node_at(0, 12).has_all_snapshots()
    # the old edge's KV half moved below the split; its window and state could not be split
    tail = r.node_at(12, 30)
    assert tail.snapshots[0].start == 12 and tail.snapshots[0].end == 30
    assert r.run(list(range(1, 13)) + [55]).cached_tokens == 12


@pytest.mark.parametrize(
    ("policy", "expected"), [("kvtrie-seed", [0, 0, 9]), ("kvtrie-improved", [0, 9, 9])]
)
def test_full_prompt_match_evaluates_exactly_one_token(rig, policy, expected):
    r = rig("kv", policy=policy)
    prompt = list(range(1, 11))
    cached = [r.run(prompt).cached_tokens for _ in range(3)]
    assert cached == expected
    assert all(r.run(prompt).computed_tokens == 1 for _ in range(2))


def test_switching_between_three_conversations(rig):
    r = rig("mixed")
    conversations = {name: S + [1000 + i] for i, name in enumerate("abc")}
    history = {}
    for turn in range(4):
        for i, name in enumerate("abc"):
            prompt = conversations[name]
            account = r.run(prompt, [800 + 10 * turn + i, 900])
            if turn > 0:
                # everything up to the previous turn's evaluated tokens is restored
                assert account.cached_tokens == history[name], (turn, name)
            history[name] = len(prompt) + 1
            conversations[name] = prompt + [800 + 10 * turn + i, 900, 2000 + turn]
    assert r.cache.stats.restore_failures == 0


def test_eviction_takes_the_oldest_first(rig):
    r = rig("kv", budget=100)  # 16 B per token
    r.run([1, 2, 3, 4])
    r.run([5, 6, 7, 8, 9, 10])
    r.run([11, 12])  # pages out [5..10] (96 B): 160 B > 100, the older [1..4] goes
    assert sorted(r.cache.root.children) == [5, 11]
    r.run([13, 14])  # pages out [11, 12]: 128 B > 100, [5..10] is now the oldest
    assert sorted(r.cache.root.children) == [11, 13]
    assert r.cache.stats.evictions == 2


def test_eviction_ties_go_deepest_then_largest(rig):
    r = rig("kv")
    r.cache.clock = lambda: 0  # every node equally old
    r.run([1, 2, 3, 4, 5, 6, 7, 8])
    r.run([1, 2, 3, 4, 9, 9, 9, 9])
    r.run(list(range(20, 28)))
    r.run([30])
    assert r.cache.paged_out_bytes == 4 * 16 + 4 * 16 + 4 * 16 + 8 * 16
    r.cache.set_budget(250)  # one eviction: among the deepest (end 8), the largest
    assert 20 not in r.cache.root.children
    assert r.cache.paged_out_bytes == 192
    r.cache.set_budget(130)  # a 4-token leaf goes and its parent merges with the other
    assert r.node_ranges() == [(0, 1), (0, 8)]
    assert r.cache.stats.merges == 1
    merged = r.node_at(0, 8)
    assert merged.snapshot_bytes == 128 and merged.snapshots[0].start == 0
    assert r.run([1, 2, 3, 4, 5, 6, 7, 7]).cached_tokens == 0  # partial edge: seed backs up


@pytest.mark.parametrize("user", [False, True])
def test_leaf_eviction_merges_parent_unless_it_is_a_user_restore_point(rig, user):
    r = rig("kv")
    r.run([1, 2, 3, 4, 5, 6, 7, 8], user_marks=[4] if user else [])
    r.run([1, 2, 3, 4, 9, 9])  # without the mark: a partial match, split at 4
    r.run([40])
    assert r.node_ranges() == [(0, 1), (0, 4), (4, 6), (4, 8)]
    assert r.node_at(0, 4).user is user
    r.cache.set_budget(r.cache.paged_out_bytes - 1)  # evicts the oldest leaf, [4, 8)
    assert r.cache.stats.evictions == 1
    if user:
        assert r.node_ranges() == [(0, 1), (0, 4), (4, 6)]
    else:
        assert r.node_ranges() == [(0, 1), (0, 6)]
        assert r.cache.stats.merges == 1
    assert r.run([1, 2, 3, 4, 9, 9, 1]).cached_tokens == 6


def test_branch_point_keeps_its_place_and_drops_snapshots(rig):
    r = rig("kv")
    r.run([1, 2, 3, 4, 5, 6])
    r.run([1, 2, 3, 4, 7, 7])
    r.run([1, 2, 3, 4, 8, 8])
    r.run([50])
    branch = r.node_at(0, 4)
    assert branch.has_all_snapshots() and len(branch.children) == 3
    branch.last_used = -1  # make it the oldest
    r.cache.set_budget(r.cache.paged_out_bytes - 1)
    assert r.node_at(0, 4) is branch and len(branch.children) == 3
    assert not branch.has_snapshots()
    assert r.cache.stats.evictions == 1


def test_user_restore_point_is_marked_and_restorable(rig):
    r = rig("mixed")
    r.run(S + [1, 2, 3], user_marks=[20])
    node = r.node_at(0, 20)
    assert node.user and node.has_all_snapshots()
    assert r.run(S + [7]).cached_tokens == 20


def test_recurrent_layers_restore_from_snapshots_and_never_rewind(rig):
    r = rig("recurrent", policy="kvtrie-improved")
    r.run(S + [1, 2])
    # no rewind is possible, so even the improved policy can't reuse the partial edge
    assert r.run(S + [3, 4]).cached_tokens == 0
    layer = r.layers[0]
    before = layer.state()
    assert not layer.restore(None, layer.offset - 1)
    assert layer.state() == before
    account = r.run(S + [5, 6])
    assert account.cached_tokens == 20  # from the snapshot taken at the branch point
    assert r.cache.stats.restore_failures == 0


def test_rotating_window_is_restored_exactly_past_its_edge(rig):
    r = rig("mixed")
    r.run(S + [1])
    r.run(S + [2])
    rotating = r.layers[1]
    assert rotating.window == 8 and rotating.offset > rotating.window
    # S (20 tokens) is longer than the window: restore must bring back its last 8 positions
    assert r.run(S + [3]).cached_tokens == 20


def test_failed_restore_recomputes_and_state_stays_exact(rig):
    r = rig("mixed")
    r.run(S + [1])
    r.run(S + [2])
    r.backend.faults.fail_next_restores(1)
    account = r.run(S + [3])
    assert account.cached_tokens == 0 and r.cache.stats.restore_failures == 1
    assert r.run(S + [4]).cached_tokens == 20  # the branch point was snapshotted afresh


def test_corrupt_snapshot_is_refused_and_recomputed(rig):
    r = rig("mixed")
    r.run(S + [1])
    r.run(S + [2])
    for snap in r.node_at(0, 20).snapshots:
        assert r.backend.faults.corrupt(snap)
    r.run([500])  # move away so every layer must be restored from the corrupt node
    assert r.run(S + [3]).cached_tokens == 0
    assert r.cache.stats.restore_failures == 1
    assert r.run(S + [4]).cached_tokens == 20


def test_budget_zero_keeps_only_the_active_path(rig):
    r = rig("mixed", budget=0)
    for tail in range(4):
        account = r.run(S + [tail])
        assert account.cached_tokens == 0
    active = {id(n) for n in r.cache.active_path}
    assert all(id(n) in active for n in r.cache.nodes() if n.has_snapshots())


def test_eviction_makes_room_before_the_page_out(rig):
    r = rig("kv", budget=100)  # 16 B per token
    r.run([1, 2, 3, 4])  # 64 B when paged out
    r.run([5, 6, 7, 8, 9, 10])  # pages out [1..4]
    assert r.cache.paged_out_bytes == 64
    r.run([11, 12])  # [5..10] needs 96 B: [1..4] goes first, so 100 B is never passed
    assert r.cache.ledger.peak == 96 and sorted(r.cache.root.children) == [5, 11]


@pytest.mark.parametrize("policy", ["kvtrie-seed", "kvtrie-improved"])
def test_a_snapshot_larger_than_the_budget_is_not_taken(rig, policy):
    r = rig("kv", budget=40, policy=policy)  # 2.5 tokens of 16 B
    r.run([1, 2])  # 32 B: fits
    r.run([3, 4, 5, 6])  # pages out [1, 2]
    r.run([7])  # [3..6] would be 64 B > 40 B even with everything else evicted
    assert r.cache.stats.snapshots_skipped >= 1
    assert r.cache.ledger.peak <= 40
    assert 3 not in r.cache.root.children  # a leaf that could not be paged out leaves the trie
    assert 1 in r.cache.root.children  # and nothing was evicted for a snapshot that can't fit
    assert r.run([3, 4, 5, 6, 8]).cached_tokens == 0  # recomputed, never served wrong


def test_empty_prompt_is_rejected(rig):
    r = rig("kv")
    with pytest.raises(ValueError, match="at least one token"):
        r.cache.begin([])


def test_negative_budget_is_rejected(rig):
    r = rig("kv")
    with pytest.raises(ValueError, match="budget_bytes"):
        r.cache.set_budget(-1)


def test_partial_reuse_of_the_live_frontier_keeps_its_tail(rig):
    # Found by comparing with mlx-lm's prompt cache: rewinding inside the live frontier, which
    # has no snapshots yet, used to discard the tail, so the conversation could not resume.
    r = rig("kv", policy="kvtrie-improved")
    first = S + [1, 2, 3]
    r.run(first, [7, 8])
    assert r.run(S + [4, 5]).cached_tokens == 20  # diverges inside the live edge
    tail = r.node_at(20, 24)
    assert tail.has_all_snapshots()
    assert r.run(first + [7, 8, 9]).cached_tokens == 24  # the first conversation resumes


def test_improved_policy_evicts_only_the_tail_pages_of_a_long_leaf(rig):
    r = rig("kv", policy="kvtrie-improved")  # 16 B a token, pages of 16 tokens
    long = list(range(1, 101))
    r.run(long)
    r.run([500])
    assert r.cache.paged_out_bytes == 100 * 16
    # 20 tokens too many: the partial page [96, 100) and the page [80, 96) go (pages are
    # absolute positions)
    r.cache.set_budget(100 * 16 - 20 * 16)
    assert r.node_ranges() == [(0, 1), (0, 80)]
    assert r.cache.paged_out_bytes == 80 * 16
    assert r.run(long[:68] + [7]).cached_tokens == 68  # the kept prefix still restores


@pytest.mark.parametrize(("budget_tokens", "kept"), [(100, (0, 100)), (98, (0, 96))])
def test_improved_policy_pages_out_whole_pages_only_over_budget(rig, budget_tokens, kept):
    # The 4-token tail past the last page boundary stays while it fits; over budget it goes
    # first, and nothing is evicted (a trim from the leaf's end would have kept only 84).
    r = rig("kv", budget=budget_tokens * 16, policy="kvtrie-improved")
    long = list(range(1, 101))
    r.run(long)
    r.run([500])
    assert r.node_ranges() == [(0, 1), kept]
    assert r.cache.stats.evictions == 0
    assert r.run(long + [7]).cached_tokens == kept[1]


def test_improved_policy_keeps_a_parent_after_its_leaf_is_evicted(rig):
    # A fold would give the surviving leaf its parent's recency; it keeps its own instead.
    r = rig("kv", budget=1 << 20, policy="kvtrie-improved")
    r.run([1, 2, 3, 4, 5, 6, 7, 8])
    r.run([1, 2, 3, 4, 9, 9])
    r.run([40])
    assert r.node_ranges() == [(0, 1), (0, 4), (4, 6), (4, 8)]
    r.cache.set_budget(r.cache.paged_out_bytes - 1)  # the oldest leaf, [4, 8), goes
    assert r.node_ranges() == [(0, 1), (0, 4), (4, 6)]
    assert r.cache.stats.merges == 0
    assert r.run([1, 2, 3, 4, 9, 9, 1]).cached_tokens == 6


@pytest.mark.parametrize("budget", [None, 1 << 20])
def test_improved_policy_moves_snapshots_into_the_live_path_under_a_budget(rig, budget):
    r = rig("kv", budget=budget, policy="kvtrie-improved")  # 16 B a token
    r.run(S + [1, 2, 3])
    r.run([500])
    assert r.cache.paged_out_bytes == 23 * 16
    assert r.run(S + [1, 2, 3, 4]).cached_tokens == 23
    held = [n.has_snapshots() for n in r.cache.active_path[1:]]
    if budget is None:  # unbounded: the snapshots stay, nothing to gain
        assert held[0] and r.cache.paged_out_bytes == (23 + 1) * 16  # + [500], paged out
    else:  # the live layers hold the path; only what is off it is paged out
        assert not any(held) and r.cache.paged_out_bytes == 1 * 16
    r.run([600])  # leaving pages the whole path out again, every node restorable
    assert r.cache.paged_out_bytes == (24 + 1) * 16
    assert r.run(S + [1, 2, 3, 4, 5]).cached_tokens == 24


@pytest.mark.parametrize("profile", ["kv", "recurrent", "mixed"])
def test_close_with_layers_that_disagree_is_an_error_and_drops_the_live_state(rig, profile):
    from kvtrie.core import check

    r = rig(profile)
    r.run(S + [1, 2])
    r.run([50, 51])  # pages the first conversation out
    session = r.cache.begin(S + [1, 2, 3])
    r.backend.evaluate(r.cache.layers, session.remaining)
    r.backend.evaluate(r.cache.layers[:1], np.array([9]))  # one layer evaluated a token the rest did not
    if profile != "mixed":
        r.backend.evaluate(r.cache.layers, np.array([8]))  # or all did, but the caller won't say
    with pytest.raises(ValueError, match=r"close\(\): prompt \+ outputs hold 23 tokens"):
        session.close()
    assert all(layer.offset == 0 for layer in r.cache.layers) and not check(r.cache)
    assert r.run(S + [1, 2, 3]).cached_tokens == 22  # restored from its snapshots, and right
