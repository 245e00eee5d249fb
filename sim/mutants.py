"""Named mutants of the cache: each brings back one bug, so the fuzzer can prove it finds it.

A mutant patches one seam of the core or the fake backend for the duration of a ``with``
block; nothing is edited on disk. Most are the bugs SPEC.md lists for this design family.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

from kvtrie.backends.fake import (
    FakeKVCache,
    FakeRecurrentCache,
    FakeRotatingCache,
    KVSnapshot,
    Segment,
)
from kvtrie.core import evict
from kvtrie.core.evict import EvictionIndex, Evictor, OldestDeepestLargest
from kvtrie.core.policy import PartialEdges
from kvtrie.core.prefix_cache import PrefixCache

__all__ = ["MUTANTS", "Mutant", "mutated"]


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str
    patches: Callable[[], list[tuple[Any, str, Any]]]


def _match_without_one_token_rule(self: PrefixCache, tokens, path, matched):
    return path, matched


def _mark_only_frontier(self: PrefixCache, path):
    now = self.clock()
    path[-1].last_used = now
    self.evictor.used(path[-1:])


def _evictable_even_if_active(self: EvictionIndex, node, active):
    return not node.is_root and node.has_snapshots()


def _fall_back_keeping_layers(self: PrefixCache):
    self.active_path = [self.root]


def _rewind_inside_unchecked(self: PrefixCache, node, target):
    if not node.has_all_snapshots():
        self.attach_live_snapshots(node)
    for layer in self.layers:
        layer.restore(None, target)
    return True


def _wrap(original: Callable, after: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        after(result, *args, **kwargs)
        return result

    return wrapper


def _double_count_merge(result, node, caches, ledger):
    ledger.add(node.snapshot_bytes)


def _close_parent_again(result, self, parent, child):
    if parent is not None:
        parent.close()


def _recurrent_can_rewind(self, snapshot, target):
    return target <= self.offset if snapshot is None else target == snapshot.end


def _recurrent_rewind(self, target):
    self._offset = target  # the state still holds every token: stale


def _window_clamps_anywhere(self, snapshot, target):
    if snapshot is None:
        return 0 <= target <= self.offset  # even after positions rotated out
    return 0 <= target <= snapshot.end


def _snapshot_sharing_live_buffer(self, from_offset):
    if self._offset <= from_offset:
        return None
    start = max(0, from_offset)
    before = int(self._values[start - 1]) if start else self.seed
    view = self._tokens[start : self._offset]  # a view: later writes change it
    segment = Segment(before, view, int(self._values[self._offset - 1]))
    return KVSnapshot([segment], start, self.spec, self.ledger)


def _remove_leaf_patch():
    original = evict.remove_leaf

    def remove(node, ledger):
        node.take_snapshots(ledger)  # detached from the node but never closed
        original(node, ledger)

    return [(evict, "remove_leaf", remove)]


def _page_out_then_evict(self: Evictor, nbytes: int, protected: dict) -> bool:
    return True  # no room made first: the evictions after the page-out catch up


MUTANTS: dict[str, Mutant] = {
    m.name: m
    for m in [
        Mutant(
            "one-token-rule-dropped",
            "a full match evaluates no token",
            lambda: [(PrefixCache, "leave_one_token", _match_without_one_token_rule)],
        ),
        Mutant(
            "lru-frontier-only",
            "LRU time refreshed only on the frontier, not every node used",
            lambda: [(PrefixCache, "mark_used", _mark_only_frontier)],
        ),
        Mutant(
            "evict-active-nodes",
            "nodes on the active path are evicted",
            lambda: [(EvictionIndex, "evictable", _evictable_even_if_active)],
        ),
        Mutant(
            "evict-newest-first",
            "eviction order reversed: newest first",
            lambda: [
                (
                    OldestDeepestLargest,
                    "priority",
                    lambda self, node: (-node.last_used, -node.end, -node.snapshot_bytes),
                )
            ],
        ),
        Mutant(
            "evict-shallowest-first",
            "eviction order reversed: shallowest first",
            lambda: [
                (
                    OldestDeepestLargest,
                    "priority",
                    lambda self, node: (node.last_used, node.end, -node.snapshot_bytes),
                )
            ],
        ),
        Mutant(
            "failed-restore-keeps-layers",
            "a failed restore does not free the layers",
            lambda: [(PrefixCache, "fall_back_to_root", _fall_back_keeping_layers)],
        ),
        Mutant(
            "partial-edge-on-recurrent",
            "a partial edge match reused on a recurrent layer",
            lambda: [
                (PrefixCache, "rewind_inside", _rewind_inside_unchecked),
                (PartialEdges, "applies", lambda self, kinds: True),
            ],
        ),
        Mutant(
            "split-shares-recurrent-state",
            "a recurrent state split into both halves",
            lambda: [(FakeRecurrentCache, "split", lambda self, snap, at: (snap, snap))],
        ),
        Mutant(
            "merge-double-counts-bytes",
            "paged-out bytes double-counted on merge",
            lambda: [
                (
                    evict,
                    "merge_with_child",
                    _wrap(evict.merge_with_child, _double_count_merge),
                )
            ],
        ),
        Mutant(
            "remove-leaks-snapshots", "snapshot memory leaked on leaf removal", _remove_leaf_patch
        ),
        Mutant(
            "merge-closes-twice",
            "a merged snapshot unpinned twice",
            lambda: [(FakeKVCache, "merge", _wrap(FakeKVCache.merge, _close_parent_again))],
        ),
        Mutant(
            "recurrent-rewinds",
            "a recurrent layer rewound instead of restored",
            lambda: [
                (FakeRecurrentCache, "can_restore", _recurrent_can_rewind),
                (FakeRecurrentCache, "_rewind", _recurrent_rewind),
            ],
        ),
        Mutant(
            "rotating-restore-beyond-window",
            "a sliding-window layer restored to a point its window no longer covers",
            lambda: [(FakeRotatingCache, "can_restore", _window_clamps_anywhere)],
        ),
        Mutant(
            "page-out-before-evicting",
            "a snapshot paged out before room is made for it: over budget until evictions",
            lambda: [(Evictor, "make_room", _page_out_then_evict)],
        ),
        Mutant(
            "snapshot-shares-live-buffer",
            "a snapshot that is a view of the live buffer, corrupted by later writes",
            lambda: [(FakeKVCache, "snapshot", _snapshot_sharing_live_buffer)],
        ),
    ]
}


@contextlib.contextmanager
def mutated(name: str | None) -> Iterator[None]:
    """Apply the named mutant for the block (None: the real code)."""
    if name is None:
        yield
        return
    if name not in MUTANTS:
        raise ValueError(f"unknown mutant {name!r}; choose one of {', '.join(MUTANTS)}")
    with contextlib.ExitStack() as stack:
        for target, attribute, replacement in MUTANTS[name].patches():
            stack.enter_context(mock.patch.object(target, attribute, replacement))
        yield
