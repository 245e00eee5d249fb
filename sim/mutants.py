"""Named mutants: each brings back one bug, so the mutation check can prove it is found.

A mutant patches one seam for the duration of a ``with`` block; nothing is edited on disk.
They come in areas, each a part of what kvtrie promises: ``core`` (the trie and cache, most
of them the bugs SPEC.md lists for this design family), ``strategies`` (each choice of the
improved policy off, or off by a page or a node: bugs that only lose reuse), ``fake`` and
``mlx`` (each layer kind's snapshot, split, merge, restore and free on each backend),
``checker`` (each check weakened to pass what it must report), ``replayer`` (its counters
and the infinite-cache bound) and ``store`` (the disk tier's promises at a write and across a
restart). MLX mutants are fuzzed on the MLX backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

from kvtrie.backends.fake import (
    FakeBackend,
    FakeKVCache,
    FakeRecurrentCache,
    FakeRotatingCache,
    KVSnapshot,
    Segment,
)
from kvtrie.core import evict, invariants
from kvtrie.core.evict import EvictionIndex, Evictor, OldestDeepestLargest
from kvtrie.core.policy import (
    KeepRestorePoints,
    MergeLoneChildren,
    PageInMoves,
    PartialEdges,
    SnapshotSchedule,
    WholePagesUnderPressure,
)
from kvtrie.core.prefix_cache import PrefixCache
from kvtrie.core.store import DirectoryStore

from . import ideal, peers, report
from .runner import RequestRunner

__all__ = ["AREAS", "MUTANTS", "Mutant", "mutated"]

AREAS = ("core", "strategies", "fake", "mlx", "checker", "replayer", "store")


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str
    patches: Callable[[], list[tuple[Any, str, Any]]]
    area: str = "core"

    @property
    def backend(self) -> str:
        """The backend its fuzzing runs on: its own for a backend mutant, else the fake."""
        return "mlx" if self.area == "mlx" else "fake"


def _room_only_checked(self: Evictor, nbytes, protected):
    """The disk tier's make-room that evicts nothing before a write..."""
    budget = self.cache.disk_budget_bytes
    return budget is None or nbytes <= budget


def _write_then_make_room(real):
    """...and makes room once the write is done: the budget counted too late."""

    def write(self: Evictor, node, snapshots):
        done = real(self, node, snapshots)
        if self.cache.disk_budget_bytes is not None:
            self._evict_until(self.cache.disk_budget_bytes, {id(node)}, disk=True)
        return done

    return write


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


def _never(self, *args: Any) -> bool:
    return False


def _passes(*args: Any, **kwargs: Any) -> None:
    return None


def _no_violations(*args: Any, **kwargs: Any) -> list:
    return []


def _page_floor_one_low(offset: int) -> int:
    return max(0, (offset // evict.TRIM_PAGE - 1) * evict.TRIM_PAGE)


def _last_point_one_early(self: PrefixCache, prompt_length: int) -> int:
    return prompt_length - 2


def _stops_one_late(self: SnapshotSchedule, start: int, end: int) -> range:
    if self.interval <= 0:
        return range(0)
    return range((start // self.interval + 1) * self.interval + 1, end, self.interval)


def _order_ignoring_depth(node):
    return (node.last_used, 0, -node.snapshot_bytes)


def _ideal_cached_uncapped(self: ideal.IdealPrefixes, prompt):
    from kvtrie.core.trie import match

    return match(self.root, prompt)[1]


def _ideal_insert_short(original: Callable) -> Callable:
    def insert(self, tokens):
        original(self, tokens[:-1])

    return insert


def _ideal_peer_counts_itself(self: peers.Ideal, prompt, evaluated):
    self.trie.insert(evaluated)
    return self.trie.cached(prompt)


def _ratio_over_computed(part: float, whole: float) -> float:
    return part / (whole + 1) if whole else 0.0


def _kv_cut_one_late(original: Callable) -> Callable:
    def cut(self, snapshot, cut, at):
        return original(self, snapshot, min(cut + 1, snapshot.end - snapshot.start - 1), at)

    return cut


def _kv_join_drops_child(self, parent, child):
    from kvtrie.backends.fake import KVSnapshot

    return KVSnapshot(list(parent.segments), parent.start, self.spec, self.ledger)


def _kv_load_one_short(original: Callable) -> Callable:
    def load(self, snapshot, target):
        ok = original(self, snapshot, target)
        if ok and self._offset > snapshot.start:
            self._offset -= 1  # the last position of the range is not restored
        return ok

    return load


def _free_keeping(cls: type, field: str) -> Callable:
    """``free`` that clears the layer but leaves ``field`` (its offset, a state) behind."""
    original = cls.free

    def free(self):
        kept = getattr(self, field)
        original(self)
        setattr(self, field, kept)

    return free


def _whole_state_merge_keeps_parent(self, parent, child):
    if child is not None:
        child.close()
    return parent


def _window_load_ignores_checksum(self, snapshot, target):
    self._kept = snapshot.window.copy()
    self._offset = snapshot.end
    if target < self._offset:
        self._rewind(target)
    return True


def _state_load_ignores_checksum(self, snapshot, target):
    self._state = snapshot.state
    self._offset = snapshot.end
    return True


def _mlx_patches(build: Callable[[Any], list[tuple[Any, str, Any]]]) -> Callable[[], list]:
    """Patches of the MLX adapters, imported only when the mutant is applied (mlx is heavy)."""

    def patches() -> list[tuple[Any, str, Any]]:
        from kvtrie.backends.mlx import adapters

        return build(adapters)

    return patches


def _mlx_cut_one_short(adapters: Any) -> list:
    original = adapters.MLXKVLayer._cut

    def cut(self, snapshot, cut, at):
        head, tail = original(self, snapshot, cut, at)
        keys, values = head.arrays
        head.arrays = (keys[..., :-1, :] * 1, values[..., :-1, :] * 1) if cut > 1 else head.arrays
        return head, tail

    return [(adapters.MLXKVLayer, "_cut", cut)]


def _mlx_snapshot_aliases_live_buffer(adapters: Any) -> list:
    original = adapters.MLXKVLayer.snapshot

    def snapshot(self, from_offset):
        taken = original(self, from_offset)
        if taken is not None and taken.buffers:  # the live layer's own objects, not new ones
            taken.buffers = (self.cache.keys, self.cache.values)
        return taken

    return [(adapters.MLXKVLayer, "snapshot", snapshot)]


def _mlx_compact_keeps_buffer(adapters: Any) -> list:
    def compact(self, snapshot):
        return snapshot  # still the shared buffer, counted whole, under any budget

    return [(adapters.MLXKVLayer, "compact", compact)]


def _mlx_restore_aliases_snapshot(adapters: Any) -> list:
    original = adapters.MLXKVLayer._load

    def _load(self, snapshot, target):
        loaded = original(self, snapshot, target)
        if snapshot.start == 0:  # the snapshot's own objects, which mlx-lm then writes into
            self.cache.keys, self.cache.values = snapshot.buffers or snapshot.arrays
        return loaded

    return [(adapters.MLXKVLayer, "_load", _load)]


def _mlx_free_keeps_offset(adapters: Any) -> list:
    def free(self) -> None:
        self.cache.keys = self.cache.values = None  # the offset is left where it was

    return [(adapters.MLXKVLayer, "free", free)]


def _mlx_rotating_trims_anywhere(adapters: Any) -> list:
    def can_restore(self, snapshot, target):
        if snapshot is None:
            return 0 <= target <= self.cache.offset
        return 0 <= target <= snapshot.end

    return [(adapters.MLXRotatingLayer, "can_restore", can_restore)]


def _mlx_recurrent_free_keeps_state(adapters: Any) -> list:
    def free(self):
        self._offset = 0  # the arrays still hold the last state

    return [(adapters.MLXRecurrentLayer, "free", free)]


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
            "budget-ignores-live",
            "a budget that counts the live layers is held against paged-out bytes alone",
            lambda: [(PrefixCache, "ram_limit", property(lambda self: self.budget_bytes))],
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
            lambda: [
                (FakeRecurrentCache, "split", lambda self, snapshot, at: (snapshot, snapshot))
            ],
            area="fake",
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
            area="fake",
        ),
        Mutant(
            "recurrent-rewinds",
            "a recurrent layer rewound instead of restored",
            lambda: [
                (FakeRecurrentCache, "can_restore", _recurrent_can_rewind),
                (FakeRecurrentCache, "_rewind", _recurrent_rewind),
            ],
            area="fake",
        ),
        Mutant(
            "rotating-restore-beyond-window",
            "a sliding-window layer restored to a point its window no longer covers",
            lambda: [(FakeRotatingCache, "can_restore", _window_clamps_anywhere)],
            area="fake",
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
            area="fake",
        ),
        # strategies: each choice off, or off by a page or a node; they only lose reuse
        Mutant(
            "page-floor-one-page-low",
            "trimming and whole-page cuts land one page below the boundary they should",
            lambda: [
                (evict, "page_floor", _page_floor_one_low),
            ],
            area="strategies",
        ),
        Mutant(
            "trim-drops-whole-leaves",
            "a leaf over budget is evicted whole instead of trimmed by pages",
            lambda: [(Evictor, "trim_leaf", _never)],
            area="strategies",
        ),
        Mutant(
            "partial-edges-ignored",
            "a match inside an edge backs up to the edge's start on attention models",
            lambda: [(PartialEdges, "applies", _never)],
            area="strategies",
        ),
        Mutant(
            "restore-points-dropped-on-extend",
            "extending a leaf drops its snapshots in the improved policy too",
            lambda: [(KeepRestorePoints, "applies", _never)],
            area="strategies",
        ),
        Mutant(
            "page-in-copies",
            "page-ins copy snapshots under a budget, holding the live path twice",
            lambda: [(PageInMoves, "applies", _never)],
            area="strategies",
        ),
        Mutant(
            "whole-pages-ignored",
            "a leaf paged out over budget keeps its sub-page tail",
            lambda: [(WholePagesUnderPressure, "applies", _never)],
            area="strategies",
        ),
        Mutant(
            "lone-children-never-merged",
            "the seed's merge of a parent left with one child never happens",
            lambda: [(MergeLoneChildren, "applies", _never)],
            area="strategies",
        ),
        Mutant(
            "last-token-point-one-early",
            "the restore point before the last prompt token is taken a token early",
            lambda: [(PrefixCache, "last_point", _last_point_one_early)],
            area="strategies",
        ),
        Mutant(
            "disk-read-however-slow",
            "the disk tier is read whatever the estimate says, slower than recomputing or not",
            lambda: [
                (
                    PrefixCache,
                    "_cheaper_than_reading",
                    lambda self, prompt, path, matched: (path, matched),
                )
            ],
            area="strategies",
        ),
        Mutant(
            "snapshot-interval-one-late",
            "interval snapshots one token past every K",
            lambda: [(SnapshotSchedule, "stops", _stops_one_late)],
            area="strategies",
        ),
        # fake backend: each layer kind's split, merge, restore and free
        Mutant(
            "kv-split-one-late",
            "an attention snapshot split one position past the node boundary",
            lambda: [(FakeKVCache, "_cut", _kv_cut_one_late(FakeKVCache._cut))],
            area="fake",
        ),
        Mutant(
            "kv-merge-drops-child",
            "an attention merge keeps the parent's range only",
            lambda: [(FakeKVCache, "_join", _kv_join_drops_child)],
            area="fake",
        ),
        Mutant(
            "kv-restore-one-short",
            "an attention restore leaves the range's last position out",
            lambda: [(FakeKVCache, "_load", _kv_load_one_short(FakeKVCache._load))],
            area="fake",
        ),
        Mutant(
            "kv-free-keeps-offset",
            "a freed attention layer keeps its offset",
            lambda: [(FakeKVCache, "free", _free_keeping(FakeKVCache, "_offset"))],
            area="fake",
        ),
        Mutant(
            "window-merge-keeps-parent",
            "a sliding-window merge keeps the earlier state",
            lambda: [(FakeRotatingCache, "merge", _whole_state_merge_keeps_parent)],
            area="fake",
        ),
        Mutant(
            "window-free-keeps-window",
            "a freed sliding-window layer keeps its window",
            lambda: [(FakeRotatingCache, "free", _free_keeping(FakeRotatingCache, "_kept"))],
            area="fake",
        ),
        Mutant(
            "window-restore-ignores-checksum",
            "a corrupt sliding-window snapshot is restored",
            lambda: [(FakeRotatingCache, "_load", _window_load_ignores_checksum)],
            area="fake",
        ),
        Mutant(
            "recurrent-free-keeps-state",
            "a freed recurrent layer keeps its state",
            lambda: [(FakeRecurrentCache, "free", _free_keeping(FakeRecurrentCache, "_state"))],
            area="fake",
        ),
        Mutant(
            "recurrent-restore-ignores-checksum",
            "a corrupt recurrent snapshot is restored",
            lambda: [(FakeRecurrentCache, "_load", _state_load_ignores_checksum)],
            area="fake",
        ),
        # MLX adapters: the same operations on mlx-lm's cache objects
        Mutant(
            "mlx-kv-split-one-short",
            "an mlx attention split's head loses its last position",
            _mlx_patches(_mlx_cut_one_short),
            area="mlx",
        ),
        Mutant(
            "mlx-kv-snapshot-aliases-live",
            "an mlx attention snapshot sharing the live buffer holds the live layer's own "
            "array objects, which mlx-lm writes into in place",
            _mlx_patches(_mlx_snapshot_aliases_live_buffer),
            area="mlx",
        ),
        Mutant(
            "mlx-kv-restore-aliases-snapshot",
            "an mlx attention restore from position 0 hands the live layer the snapshot's own "
            "array objects, which mlx-lm writes into in place",
            _mlx_patches(_mlx_restore_aliases_snapshot),
            area="mlx",
        ),
        Mutant(
            "mlx-kv-compact-keeps-buffer",
            "a compacted mlx attention snapshot still shares the live buffer, so a tight "
            "budget counts the buffer's spare room",
            _mlx_patches(_mlx_compact_keeps_buffer),
            area="mlx",
        ),
        Mutant(
            "mlx-kv-free-keeps-offset",
            "a freed mlx attention layer keeps its offset",
            _mlx_patches(_mlx_free_keeps_offset),
            area="mlx",
        ),
        Mutant(
            "mlx-window-trims-anywhere",
            "an mlx sliding-window layer trimmed after positions rotated out",
            _mlx_patches(_mlx_rotating_trims_anywhere),
            area="mlx",
        ),
        Mutant(
            "mlx-recurrent-free-keeps-state",
            "a freed mlx recurrent layer keeps its arrays",
            _mlx_patches(_mlx_recurrent_free_keeps_state),
            area="mlx",
        ),
        # the checker: each check weakened to pass what it must report
        *[
            Mutant(
                f"weak-{name}",
                f"the {what} reports nothing",
                (lambda t=target, a=attr, r=repl: [(t, a, r)]),
                area="checker",
            )
            for name, what, target, attr, repl in [
                (
                    "node-check",
                    "per-node check (I1, I2, I5, I10)",
                    invariants,
                    "_check_node",
                    lambda node, layers, out: node.snapshot_bytes,
                ),
                ("root-check", "root check (I2)", invariants, "_check_root", _passes),
                (
                    "active-path-check",
                    "active-path check (I3, I7)",
                    invariants,
                    "_check_active_path",
                    _passes,
                ),
                ("live-check", "live-state check (I4)", invariants, "_check_live", _passes),
                ("lru-check", "LRU refresh check", invariants, "_check_used", _passes),
                ("budget-check", "budget check (I6)", invariants, "_check_budget", _passes),
                (
                    "accounting-check",
                    "totals check (I12)",
                    invariants,
                    "_check_accounting",
                    _passes,
                ),
                ("tally-check", "byte ledger check (I5)", invariants, "_check_tally", _passes),
                (
                    "request-check",
                    "per-request check (I8, I12)",
                    invariants,
                    "check_request",
                    _no_violations,
                ),
                (
                    "ceiling-audit",
                    "page-out ceiling audit (I6)",
                    invariants.EvictionAudit,
                    "paged_out",
                    _passes,
                ),
                (
                    "eviction-audit",
                    "eviction audit (I7, order)",
                    invariants.EvictionAudit,
                    "evicting",
                    _passes,
                ),
                (
                    "oracle",
                    "fresh-prefill oracle after begin (I9)",
                    FakeBackend,
                    "mismatch",
                    _passes,
                ),
                (
                    "prefill-oracle",
                    "fresh-prefill oracle after prefill (I9)",
                    FakeBackend,
                    "logits_mismatch",
                    _passes,
                ),
                ("leak-tracker", "snapshot leak tracker (I5)", FakeBackend, "unaccounted", _passes),
                (
                    "fault-check",
                    "restore-failure check (I11)",
                    RequestRunner,
                    "unexplained_restore_failures",
                    _no_violations,
                ),
                ("reuse-check", "reuse check", RequestRunner, "must_lose_nothing", _never),
            ]
        ],
        Mutant(
            "eviction-audit-ignores-depth",
            "the eviction audit's order compares age and size, not depth",
            lambda: [(invariants, "_order_key", _order_ignoring_depth)],
            area="checker",
        ),
        # the replayer: its counters and the infinite-cache bound
        Mutant(
            "ideal-without-one-token-rule",
            "the ideal counts a fully matched prompt as all cached",
            lambda: [(ideal.IdealPrefixes, "cached", _ideal_cached_uncapped)],
            area="replayer",
        ),
        Mutant(
            "ideal-remembers-one-short",
            "the ideal forgets each evaluated sequence's last token",
            lambda: [
                (ideal.IdealPrefixes, "insert", _ideal_insert_short(ideal.IdealPrefixes.insert))
            ],
            area="replayer",
        ),
        Mutant(
            "ideal-peer-counts-itself",
            "the sweep's ideal peer inserts a request before matching it",
            lambda: [(peers.Ideal, "serve", _ideal_peer_counts_itself)],
            area="replayer",
        ),
        Mutant(
            "report-ratios-off",
            "the report's ratios divide by one token too many",
            lambda: [(report, "_ratio", _ratio_over_computed)],
            area="replayer",
        ),
        # the disk tier's store
        Mutant(
            "store-manifest-before-file",
            "the manifest lists files still queued for writing",
            lambda: [(DirectoryStore, "_listable", lambda self, snapshot: True)],
            area="store",
        ),
        Mutant(
            "store-adopt-skips-checksum",
            "reopening adopts files without checking their checksums",
            lambda: [(DirectoryStore, "_intact", lambda self, data, entry: True)],
            area="store",
        ),
        Mutant(
            "store-budget-counted-late",
            "disk room is made once a write is done, not before it starts",
            lambda: [
                (Evictor, "_make_disk_room", _room_only_checked),
                (Evictor, "_write", _write_then_make_room(Evictor._write)),
            ],
            area="store",
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
