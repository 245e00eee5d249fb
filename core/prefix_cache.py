"""The prefix cache: one live path through the trie, paged snapshots, and a byte budget.

What always holds (checked by :mod:`kvtrie.core.invariants` after every operation):

- one active path, root first; only it is backed by the live layer caches;
- after ``begin`` every layer sits at the same offset: the frontier's end or the cached prefix;
- a request always evaluates at least one prompt token, so generation has logits to start from;
- paged-out bytes are the sum over all snapshots and stay within the budget unless every
  snapshot left is on the active path; active nodes are never evicted;
- with a disk tier, a node's snapshots are in RAM or on disk, never both, each tier within its
  own budget; evicted from RAM they move to disk, evicted from disk they are dropped;
- a recurrent layer is restored from a snapshot at exactly the right offset, never rewound;
- a restore that fails frees every layer and recomputes: a wrong state is never served.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import evict
from .evict import Evictor
from .policy import POLICIES, CachePolicy
from .protocols import LayerCache, LayerKind, Snapshot
from .tiers import SavedNode, SnapshotStore, TieredLayers, is_stored
from .trie import (
    ByteLedger,
    Node,
    append_tokens,
    as_tokens,
    match,
    remove_leaf,
    shorten_bare_leaf,
    split_node,
    walk,
)

__all__ = [
    "DEFAULT_BUDGET_BYTES",
    "CachePolicy",
    "CacheStats",
    "PrefixCache",
    "RequestAccount",
    "Session",
    "POLICIES",
]

log = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 8 << 30


@dataclass
class CacheStats:
    """Counters over the cache's life."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    computed_tokens: int = 0
    page_ins: int = 0
    page_in_bytes: int = 0  # snapshot bytes copied back into the live layers
    page_out_bytes: int = 0  # snapshot bytes copied out of them (kept or, not fitting, dropped;
    # one that shares the live buffer copies none)
    page_outs: int = 0
    splits: int = 0
    merges: int = 0
    evictions: int = 0
    restore_failures: int = 0
    snapshots_skipped: int = 0  # snapshots not taken: they could not fit the budget
    # the disk tier (all zero without one)
    moves_to_disk: int = 0  # snapshot sets written to the disk tier (evicted from RAM, or too big)
    disk_write_bytes: int = 0
    disk_write_failures: int = 0  # moves that failed to write: the node was evicted instead
    disk_evictions: int = 0  # nodes evicted from the disk tier (counted in evictions too)
    disk_page_ins: int = 0  # page-ins from the disk tier (counted in page_ins too)
    disk_read_bytes: int = 0
    disk_hit_tokens: int = 0  # tokens whose state a request got from the disk tier
    disk_read_failures: int = 0  # stored snapshots that failed verification: a miss
    disk_reads_skipped: int = 0  # requests that recomputed what reading was estimated slower
    restarts: int = 0
    # requests whose live layers alone held more than a budget that counts them
    live_over_budget: int = 0
    adopted_nodes: int = 0  # nodes a (re)opened store's trie gave snapshots, over every open


@dataclass(frozen=True)
class RequestAccount:
    """What one request reused and what it had to compute; ``cached + computed == prompt``."""

    prompt_tokens: int
    matched_tokens: int
    cached_tokens: int

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


class PrefixCache:
    """A KV cache shared across conversations through a compressed prefix trie."""

    def __init__(
        self,
        layers: Sequence[LayerCache],
        budget_bytes: int | None = DEFAULT_BUDGET_BYTES,
        policy: CachePolicy | None = None,
        clock: Callable[[], int] | None = None,
        store: SnapshotStore | None = None,
        disk_budget_bytes: int | None = None,
        budget_counts_live: bool = False,
        estimate_seconds: Callable[[int, int, int], float] | None = None,
    ) -> None:
        """``store`` adds a disk tier: snapshots evicted from RAM move there, under
        ``disk_budget_bytes`` (None: unbounded), instead of being dropped.
        ``budget_counts_live``: the budget holds the live layers too, not only the paged-out
        snapshots (unified memory: both come out of one pool), so paged-out bytes are kept
        within what the live path leaves of it. ``estimate_seconds(cached, prompt,
        disk_bytes)``: the estimated seconds of a request of ``prompt`` tokens that reuses
        ``cached`` and reads ``disk_bytes`` from the disk tier (the policy's
        read-or-recompute choice uses it)."""
        if not layers:
            raise ValueError("a prefix cache needs at least one layer")
        _check_budget(budget_bytes)
        _check_budget(disk_budget_bytes, "disk_budget_bytes")
        self.layers = list(layers)
        self.budget_bytes = budget_bytes
        self.budget_counts_live = budget_counts_live
        self.store = store
        self.disk_budget_bytes = disk_budget_bytes
        self.tiered_layers = TieredLayers(self.layers, store)
        kinds = {layer.kind for layer in self.layers}
        # Only attention layers rewind to any node's end, so only they can page out the nodes
        # above the frontier; the policy drops, once, the choices these layers can't support.
        self.attention_only = kinds == {LayerKind.KV}
        self.policy = (policy or CachePolicy()).for_layers(kinds)
        self.clock = clock or itertools.count(1).__next__
        self.estimate_seconds = estimate_seconds
        self.ledger = ByteLedger()
        self.stats = CacheStats()
        self.root = Node(tokens=as_tokens([]), end=0, last_used=self.clock())
        self.active_path: list[Node] = [self.root]
        if store is not None:
            self.stats.adopted_nodes += self._adopt(store.saved())
        self.evictor = Evictor(self)
        self.evictor.budget_changed()
        self.evictor.enforce()  # what was adopted, within this run's budgets from the start
        self._session: Session | None = None
        self._points: set[int] = set()  # nodes the open request took snapshots of, by id

    def _adopt(self, saved: list[SavedNode]) -> int:
        """Rebuild the trie a store kept from an earlier run, its nodes older than any new one
        (in their old LRU order); a node that does not fit where the manifest puts it is left
        out with what hangs below it. Returns how many nodes hold adopted snapshots."""
        built: list[Node | None] = []
        held = 0
        oldest_first = sorted(range(len(saved)), key=lambda i: saved[i].last_used)
        when = {index: rank - len(saved) for rank, index in enumerate(oldest_first)}
        for index, entry in enumerate(saved):
            parent = self.root if entry.parent < 0 else built[entry.parent]
            node = None
            if parent is not None and _fits(parent, entry, self.layers):
                node = Node(
                    tokens=as_tokens(entry.tokens),
                    end=parent.end + len(entry.tokens),
                    parent=parent,
                    last_used=when[index],  # before the clock's first tick
                    user=entry.user,
                )
                parent.children[int(entry.tokens[0])] = node
                node.give_snapshots(entry.snapshots, self.ledger)
                held += node.has_snapshots()
            else:
                _close(entry.snapshots or [])
            built.append(node)
        for node in reversed([n for n in built if n is not None]):
            if not node.children and not node.user and node.snapshots is None:
                remove_leaf(node, self.ledger)  # a bare leaf: what it led to was lost
        return held

    def close(self) -> None:
        """Keep what can be kept, then let go of the store: the live path is paged out and,
        with a disk tier, every snapshot in RAM moves there (as its budget allows, oldest
        first, so the newest are kept) before the store writes down the trie. A request still
        open is dropped with the live state: what it evaluated is not known."""
        if self._session is not None:
            self._session.closed = True
            self._session = None
            self.fall_back_to_root()
        self._switch([self.root])
        if self.store is None:
            return
        for node in sorted(
            (n for n in self.nodes() if n.has_snapshots() and not n.on_disk),
            key=lambda n: n.last_used,
        ):
            if node.parent is not None and node.has_snapshots() and not node.on_disk:
                self.evictor.move_to_disk(node, {id(self.root)})
        self.store.close(self)

    def restart(self, clean: bool = True) -> None:
        """What stopping this process and starting a new one on the same store does: keep
        what :meth:`close` keeps (``clean``; a crash keeps only what is in the disk tier
        already), lose the rest (the live state, RAM's snapshots), and adopt the trie the
        reopened store verifies. The counters go on."""
        assert self.store is not None, "a restart needs a store to come back to"
        if clean:
            self.close()
        else:
            self.store.close(self)
        for node in list(self.nodes()):
            if node.is_root:
                continue
            kept = node.take_snapshots(self.ledger) or []  # a stored one stays in its store
            _close([s for s in kept if s is not None and not is_stored(s)])
            node.parent = None
            node.children = {}
            self.ledger.touch(node)
        self.root.children = {}
        self.active_path = [self.root]
        for layer in self.layers:
            layer.free()
        self.store.reopen()
        self.stats.restarts += 1
        self.stats.adopted_nodes += self._adopt(self.store.saved())
        self.evictor.budget_changed()
        self.evictor.index.rebuild_if_enabled()
        self.evictor.disk_index.rebuild_if_enabled()
        self.evictor.enforce()

    def set_budget(self, budget_bytes: int | None) -> None:
        """Change the budget (None: unbounded) and evict down to it at once."""
        _check_budget(budget_bytes)
        self.budget_bytes = budget_bytes
        self.evictor.budget_changed()
        self.evictor.enforce()

    def set_disk_budget(self, disk_budget_bytes: int | None) -> None:
        """Change the disk tier's budget (None: unbounded) and evict down to it at once."""
        _check_budget(disk_budget_bytes, "disk_budget_bytes")
        self.disk_budget_bytes = disk_budget_bytes
        self.evictor.budget_changed()
        self.evictor.enforce()

    @property
    def paged_out_bytes(self) -> int:
        """Bytes of snapshots in RAM (the budget's)."""
        return self.ledger.total

    @property
    def ram_limit(self) -> int | None:
        """What paged-out bytes may reach now: the budget, less the live layers' bytes when
        the budget counts them (None: unbounded)."""
        if self.budget_bytes is None:
            return None
        if not self.budget_counts_live:
            return self.budget_bytes
        return max(0, self.budget_bytes - self.live_bytes)

    @property
    def disk_bytes(self) -> int:
        """Bytes of snapshots in the disk tier (the disk budget's)."""
        return self.ledger.disk_total

    @property
    def live_offset(self) -> int:
        """The offset every layer can serve: the smallest of the layers' offsets."""
        return min(layer.offset for layer in self.layers)

    @property
    def live_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def page_in_moves(self) -> bool:
        """Whether a page-in moves snapshots into the live layers now
        (:class:`~kvtrie.core.policy.PageInMoves`): only under a budget, since an unbounded
        cache has no reason to hold the live path once."""
        return self.policy.page_in_moves.on and self.budget_bytes is not None

    # ---- begin / switch -------------------------------------------------------------------

    def begin(self, prompt: Sequence[int] | np.ndarray, counted: bool = True) -> Session:
        """Restore the longest cached prefix of ``prompt`` and return the session to finish it.

        A session still open is closed first, with the outputs it has. ``counted=False``
        keeps it out of the request statistics: a server recording a state it computed
        elsewhere is not a request.
        """
        tokens = as_tokens(prompt)
        if len(tokens) == 0:
            raise ValueError("a prompt needs at least one token")
        if self._session is not None:
            self._session.close(self._session.outputs)
        self._points.clear()
        path, longest = match(self.root, tokens)
        path, matched = self.leave_one_token(tokens, path, longest)
        path, matched = self._cheaper_than_reading(len(tokens), path, matched)
        partial = len(path) > 1 and path[-1].start < matched < path[-1].end
        prefix = self._switch_to_match(path, tokens[:matched], partial)
        snapshot_at = matched if (partial or (prefix == 0 and matched > 0)) else 0
        account = RequestAccount(len(tokens), matched, prefix)
        if counted:
            self.stats.requests += 1
            self.stats.prompt_tokens += account.prompt_tokens
            self.stats.cached_tokens += account.cached_tokens
            self.stats.computed_tokens += account.computed_tokens
        log.info(
            "cache %s total=%d matched=%d cached=%d left=%d pending_snapshot=%d",
            "hit" if prefix else "miss",
            len(tokens),
            longest,
            prefix,
            len(tokens) - prefix,
            snapshot_at,
        )
        self._session = Session(self, tokens, account, snapshot_at)
        return self._session

    def leave_one_token(
        self, tokens: np.ndarray, path: list[Node], matched: int
    ) -> tuple[list[Node], int]:
        """The longest match of ``tokens`` that leaves at least one token to evaluate, so
        generation has logits to start from: the full match, unless it covers every token."""
        if matched == len(tokens):
            return match(self.root, tokens[:-1])
        return path, matched

    def _cheaper_than_reading(
        self, prompt: int, path: list[Node], matched: int
    ) -> tuple[list[Node], int]:
        """The match to restore: the whole of it, or, when reading the disk tier is estimated
        slower than recomputing, only the part above the disk-tier node to stop at (the one
        that gives the least estimated seconds)."""
        if (
            self.store is None
            or self.estimate_seconds is None
            or not self.policy.read_or_recompute.on
        ):
            return path, matched
        live = set(map(id, self.active_path))
        to_read = [
            n.snapshot_bytes if n.on_disk and n.snapshots and id(n) not in live else 0 for n in path
        ]
        best = (self.estimate_seconds(matched, prompt, sum(to_read)), len(path), matched)
        for index in range(1, len(path)):
            if to_read[index]:
                stop = path[index].start
                seconds = self.estimate_seconds(stop, prompt, sum(to_read[:index]))
                if seconds < best[0]:
                    best = (seconds, index, stop)
        if best[1] < len(path):
            self.stats.disk_reads_skipped += 1
            log.info("disk tier: recomputing from %d, reading to %d is slower", best[2], matched)
        return path[: best[1]], best[2]

    def _switch_to_match(self, path: list[Node], matched_tokens: np.ndarray, partial: bool) -> int:
        """Switch to the matched path and return how many prompt tokens the live state covers."""
        matched = len(matched_tokens)
        if partial and self.policy.partial_edges.on:
            self._switch(path)
            node = path[-1]
            if self.active_path[-1] is node and self.rewind_inside(node, matched):
                self.evictor.enforce()  # the paged-out node left the active path
                return matched
            # That switch may have failed a restore and then evicted, and an eviction merges
            # nodes: match again in the trie as it is now.
            path, _ = match(self.root, matched_tokens)
            partial = path[-1].end > matched
        self._switch(path[:-1] if partial else path)
        return self.live_offset

    def rewind_inside(self, node: Node, target: int) -> bool:
        """Rewind every live layer from the frontier ``node``'s end to ``target`` inside its
        edge, if every layer can; the node is paged out first so its tail stays restorable,
        and leaves the active path. When page-ins move, only the part past ``target`` is
        paged out: the node is split there and its head stays live."""
        if not all(layer.can_restore(None, target) for layer in self.layers):
            return False
        self.active_path.pop()
        if self.page_in_moves:
            self.active_path.append(
                split_node(node, target - node.start, self.tiered_layers, self.ledger)
            )
            self.stats.splits += 1
            self.release_live_path()
        if not node.has_all_snapshots():
            self._page_out(node, self._on_path(node))
        for layer in self.layers:
            layer.restore(None, target)
        return True

    def _switch(self, new_path: list[Node]) -> None:
        """Page out the old frontier, rewind to the common ancestor, page in ``new_path``."""
        try:
            self._switch_unbudgeted(new_path)
        finally:
            self.evictor.enforce()

    def _switch_unbudgeted(self, new_path: list[Node]) -> None:
        old_path = self.active_path
        common = 0
        while common < min(len(old_path), len(new_path)) and old_path[common] is new_path[common]:
            common += 1
        ancestor_end = old_path[common - 1].end if common else 0

        # Only the frontier's live state is right for every layer (a recurrent layer holds the
        # state at the frontier, not at any node above it), so only the frontier is paged out;
        # on an attention-only model, so are the nodes above it whose snapshots moved in.
        # Room for a page-out is made before it, evicting neither path: the new path is about
        # to be paged in.
        protected = self._on_path(*old_path, *new_path)
        frontier = old_path[-1]
        if len(old_path) - 1 >= common and not frontier.has_all_snapshots():
            self._page_out_leaving(frontier, protected)
        self._page_out_interior(old_path[common:-1], protected)

        for layer in self.layers:
            if not layer.restore(None, ancestor_end):
                layer.free()

        read_from_disk: list[Node] = []
        for node in new_path:
            if not node.snapshots or all(layer.offset >= node.end for layer in self.layers):
                continue  # nothing to restore (live already): a disk-tier one is not even read
            with ExitStack() as reading:
                snapshots = self._readable(node, reading)
                if snapshots is None:
                    break  # the disk tier could not verify it: a miss from here on
                paged_in = self._page_in(node, snapshots)
            if paged_in is None:
                break  # a node above was never paged out (its snapshot did not fit): stop here
            if not paged_in:
                self.fall_back_to_root()
                return
            if node.end > ancestor_end:
                self.stats.page_ins += 1
                if node.on_disk:
                    self.stats.disk_page_ins += 1
                    read_from_disk.append(node)
                log.debug("page in [%d, %d) disk=%s", node.start, node.end, node.on_disk)

        self.active_path = list(new_path)
        aligned = self.live_offset
        for layer in self.layers:
            if layer.offset != aligned and not layer.restore(None, aligned):
                log.warning("align failed offset=%d: freeing all layers", aligned)
                self.stats.restore_failures += 1
                self.fall_back_to_root()
                return
        while self.active_path[-1].end > aligned:
            self.active_path.pop()
        # the tokens the disk tier served: those of the nodes read that the live layers reach
        self.stats.disk_hit_tokens += sum(
            max(0, min(node.end, aligned) - max(node.start, ancestor_end))
            for node in read_from_disk
        )
        self.release_live_path()

    def _readable(
        self, node: Node, reading: ExitStack
    ) -> list[Snapshot | None] | None:
        """``node``'s snapshots as the layers can restore from them: its own in RAM, copies
        opened (until ``reading`` closes) in the disk tier. None when a stored one fails its
        store's check: the node's snapshots are dropped, counted, and never served."""
        assert node.snapshots is not None
        if not node.on_disk:
            return node.snapshots
        opened = [
            reading.enter_context(snap.opened()) if is_stored(snap) else None
            for snap in node.snapshots
        ]
        if any(copy is None and snap is not None for copy, snap in zip(opened, node.snapshots)):
            log.warning("disk tier: [%d, %d) failed verification, dropped", node.start, node.end)
            self.stats.disk_read_failures += 1
            node.set_snapshots(None, self.ledger)
            return None
        self.stats.disk_read_bytes += node.snapshot_bytes
        return opened

    def _page_in(self, node: Node, snapshots: list[Snapshot | None]) -> bool | None:
        """Restore the layers that are not yet past ``node``'s end from its ``snapshots``:
        True when done, None (nothing changed) when a layer can't take them, False when a
        restore failed (the caller falls back to the root).

        When the node holds no state for a layer still short of its end (a split's parent
        holds no whole state; a merge across a gap keeps the child's whole state and no
        range), only its attention ranges are restored: a whole state restored past a layer
        left behind could never come back to it, and the live layers would not line up (a
        deeper node may still serve them all)."""
        behind = any(
            snap is None and layer.offset < node.end for layer, snap in zip(self.layers, snapshots)
        )
        restoring = [
            (index, layer, snap)
            for index, (layer, snap) in enumerate(zip(self.layers, snapshots))
            if snap is not None
            and layer.offset < node.end
            and (not behind or layer.kind is LayerKind.KV)
        ]
        if not all(layer.can_restore(snap, node.end) for _, layer, snap in restoring):
            return None
        for index, layer, snap in restoring:
            nbytes = snap.nbytes
            if not layer.restore(snap, node.end):
                log.warning(
                    "restore failed layer=%d start=%d end=%d: freeing all layers",
                    index,
                    node.start,
                    node.end,
                )
                self.stats.restore_failures += 1
                return False
            self.stats.page_in_bytes += nbytes
        return True

    def release_live_path(self) -> None:
        """When page-ins move, close the active nodes' snapshots: the live layers hold the
        same state, and leaving the path pages its nodes out again."""
        if self.page_in_moves:
            for node in self.active_path[1:]:
                node.set_snapshots(None, self.ledger)

    def _page_out_interior(self, nodes: list[Node], protected: dict[int, Node]) -> None:
        """Page out the active nodes above the frontier that the live layers alone hold (their
        snapshots moved in), deepest first, rewinding to each one's end: attention only."""
        for node in reversed(nodes):
            if node.has_all_snapshots() or not self.attention_only:
                continue
            for layer in self.layers:
                layer.restore(None, node.end)
            self._page_out(node, protected)

    def fall_back_to_root(self) -> None:
        """A restore failed: free every layer and recompute from the root, never serving a
        wrong state."""
        self._save_live_path()
        for layer in self.layers:
            layer.free()
        self.active_path = [self.root]

    def _save_live_path(self) -> None:
        """Before the live layers are freed, page out the active nodes that only they hold
        (their snapshots moved in), so a failed restore further down loses none of them."""
        if not self.policy.page_in_moves.on:
            return
        live = self.live_offset
        for layer in self.layers:
            layer.restore(None, live)
        path = [node for node in self.active_path[1:] if node.end <= live]
        self._page_out_interior(path, self._on_path())

    # ---- snapshots and trie growth --------------------------------------------------------

    def _on_path(self, *nodes: Node) -> dict[int, Node]:
        """The active path and ``nodes`` by id: what making room must not evict."""
        return {id(node): node for node in (*self.active_path, *nodes)}

    def _page_out(
        self,
        node: Node,
        protected: dict[int, Node],
        snapshots: list[Snapshot | None] | None = None,
    ) -> bool:
        """Page ``node`` out of the live layers (at its end, or these ``snapshots`` of them),
        counted; False when it did not fit the budget."""
        if snapshots is None:
            snapshots = self._live_snapshots(node)
        if not self._attach(node, snapshots, protected):
            return False
        self.stats.page_outs += 1
        log.debug("page out [%d, %d)", node.start, node.end)
        return True

    def _page_out_leaving(self, leaf: Node, protected: dict[int, Node]) -> None:
        """Page out the frontier the switch leaves: under pressure, with
        :class:`~kvtrie.core.policy.WholePagesUnderPressure`, cut back to a page boundary
        first; a leaf whose snapshot can't fit at all leaves the trie (nothing could restore
        it)."""
        snapshots = self._live_snapshots(leaf)
        keep = evict.page_floor(leaf.end) - leaf.start
        if (
            self.policy.whole_pages.on
            and self.ram_limit is not None
            and self.ledger.total - leaf.ram_bytes + _nbytes(snapshots) > self.ram_limit
            and not leaf.children
            and not leaf.user
            and 0 < keep < len(leaf.tokens)
        ):
            # Its sub-page tail pays bytes in every stored leaf but saves at most a page of
            # recompute, and only to a request that extends exactly this sequence.
            _close(snapshots)
            leaf.set_snapshots(None, self.ledger)
            for layer in self.layers:
                layer.restore(None, leaf.start + keep)
            shorten_bare_leaf(leaf, keep, self.ledger)
            snapshots = self._live_snapshots(leaf)
        if not self._page_out(leaf, protected, snapshots):
            if not leaf.children and not leaf.user and leaf.snapshots is None:
                remove_leaf(leaf, self.ledger)

    def _live_snapshots(self, node: Node) -> list[Snapshot | None]:
        for index, layer in enumerate(self.layers):
            if layer.offset != node.end:
                raise AssertionError(
                    f"snapshot of [{node.start}, {node.end}) but layer {index} is at {layer.offset}"
                )
        snapshots = [layer.snapshot(node.start) for layer in self.layers]
        if self.ram_limit is not None and (
            self.ledger.total - node.ram_bytes + _nbytes(snapshots) > self.ram_limit
        ):
            # A snapshot may share the live buffer, counted whole, to spare a copy; under
            # pressure it is copied out instead, so the budget holds data, not spare room.
            snapshots = [
                None if snap is None else layer.compact(snap)
                for layer, snap in zip(self.layers, snapshots)
            ]
        self.stats.page_out_bytes += sum(s.copied_nbytes for s in snapshots if s is not None)
        return snapshots

    def _attach(self, node: Node, snapshots: list[Snapshot | None], protected: dict[int, Node]) -> bool:
        """Give ``node`` these snapshots (replacing its own) once the budget has room for
        them, never evicting ``node`` or a ``protected`` node for it; a snapshot set that can't
        fit is closed and counted as skipped, and the node keeps what it had."""
        size = _nbytes(snapshots)
        protected = {**protected, id(node): node}
        if not self.evictor.make_room(size - node.ram_bytes, protected):
            # too big for RAM with the paths it must keep: straight to the disk tier, if any
            if self.evictor.store_on_disk(node, snapshots, protected):
                return True
            self.stats.snapshots_skipped += 1
            log.debug("snapshot skipped start=%d end=%d bytes=%d", node.start, node.end, size)
            return False
        node.set_snapshots(snapshots, self.ledger)
        for observer in self.evictor.observers:
            observer.paged_out(self, node)
        return True

    def attach_live_snapshots(self, node: Node, protected: dict[int, Node] | None = None) -> bool:
        """Replace ``node``'s snapshots with fresh copies of the live layers' ``[start, end)``,
        making room first (never evicting the active path or ``protected``); False, with the
        snapshot not taken, when it can't fit the budget."""
        protected = self._on_path() if protected is None else protected
        return self._attach(node, self._live_snapshots(node), protected)

    def advance(self, frontier: Node, tokens: np.ndarray) -> Node:
        """Extend the active path from ``frontier`` over ``tokens``; returns the new frontier.

        Existing children are followed, a partly matched edge is split, and what is left is
        appended as a new node.
        """
        path, matched = match(frontier, tokens)
        last = path[-1]
        if len(path) > 1 and frontier.end + matched < last.end:
            path[-1] = split_node(
                last, frontier.end + matched - last.start, self.tiered_layers, self.ledger
            )
            self.stats.splits += 1
        self.active_path.extend(path[1:])
        dest = path[-1]
        rest = tokens[matched:]
        if len(rest):
            if not dest.children and not dest.user and not self.keeps(dest):
                dest.set_snapshots(None, self.ledger)  # so the leaf can be extended in place
            extended = append_tokens(dest, rest, self.ledger)
            if extended is not dest:
                self.active_path.append(extended)
            dest = extended
        return dest

    def keeps(self, leaf: Node) -> bool:
        """Whether extending ``leaf`` keeps its snapshots (see
        :class:`~kvtrie.core.policy.KeepRestorePoints`): every leaf's on an attention-only
        model, else only a point this request took."""
        if not self.policy.keep_restore_points.on:
            return False
        return self.attention_only or id(leaf) in self._points

    def snapshot_live(self, tokens: np.ndarray, user: bool) -> None:
        """Advance the trie to the live offset over ``tokens`` (the request's so far) and
        attach fresh snapshots there; when page-ins move, only the node boundary is kept
        (leaving the path pages the node out)."""
        offset = self.live_offset
        frontier = self.active_path[-1]
        if frontier.end > offset:
            log.warning("snapshot skipped offset=%d frontier_end=%d", offset, frontier.end)
            return
        if frontier.end < offset:
            frontier = self.advance(frontier, tokens[frontier.end : offset])
        elif frontier.has_all_snapshots():
            frontier.user = frontier.user or user
            return
        frontier.user = frontier.user or user
        if self.page_in_moves:
            self.release_live_path()  # the node boundary is what counts; leaving pages out
            return
        if self.attach_live_snapshots(frontier):
            self._points.add(id(frontier))
            log.debug("snapshot offset=%d user=%s", offset, user)

    def finish(self, session: Session, tokens: np.ndarray) -> None:
        """Close ``session``: grow the trie over ``tokens`` (prompt + outputs) up to the live
        offset and mark the active path used."""
        if self._session is session:
            self._session = None
        offsets = [layer.offset for layer in self.layers]
        if len(set(offsets)) > 1 or max(offsets) > len(tokens):
            # The caller's count and what the layers evaluated disagree: the live state can't
            # be trusted, so it is dropped (the next request recomputes) before saying so.
            self.fall_back_to_root()
            raise ValueError(
                f"close(): prompt + outputs hold {len(tokens)} tokens but the layers evaluated "
                f"{sorted(set(offsets))}; every token the model evaluated must be given, each "
                "layer must have evaluated all of them (the live state was dropped)"
            )
        offset = offsets[0]
        if offset <= 0:
            return
        frontier = self.active_path[-1]
        if offset > frontier.end:
            self.advance(frontier, tokens[frontier.end : offset])
        self.mark_used(self.active_path)
        if self.budget_counts_live and self.budget_bytes is not None:
            if self.live_bytes > self.budget_bytes:
                self.stats.live_over_budget += 1
            self.evictor.enforce()  # the live layers grew by what the request evaluated
        if self.store is not None:
            self.store.after_request(self)

    def last_point(self, prompt_length: int) -> int:
        """Where :class:`~kvtrie.core.policy.RestorePointBeforeLastToken` snapshots a prompt:
        one token before its end, the most a repeat of it can reuse."""
        return prompt_length - 1

    def mark_used(self, path: list[Node]) -> None:
        """Every node of the path was used now: LRU time is refreshed on all of them."""
        now = self.clock()
        for node in path:
            node.last_used = now
        self.evictor.used(path)

    # ---- introspection --------------------------------------------------------------------

    def nodes(self) -> Iterable[Node]:
        return walk(self.root)


def _nbytes(snapshots: list[Snapshot | None]) -> int:
    return sum(snap.nbytes for snap in snapshots if snap is not None)


def _close(snapshots: list[Snapshot | None]) -> None:
    for snap in snapshots:
        if snap is not None:
            snap.close()


def _fits(parent: Node, entry: SavedNode, layers: Sequence[LayerCache]) -> bool:
    """Whether a saved node can hang under ``parent``: a non-empty edge whose first token is
    free there, and snapshots that cover its range."""
    if len(entry.tokens) == 0 or int(entry.tokens[0]) in parent.children:
        return False
    if entry.snapshots is None:
        return True
    end = parent.end + len(entry.tokens)
    return len(entry.snapshots) == len(layers) and all(
        snap is None
        or (snap.end == end and (layer.kind is not LayerKind.KV or snap.start == parent.end))
        for layer, snap in zip(layers, entry.snapshots)
    )


def _check_budget(budget_bytes: int | None, name: str = "budget_bytes") -> None:
    if budget_bytes is not None and budget_bytes < 0:
        raise ValueError(f"{name} must be >= 0 or None (unbounded), got {budget_bytes}")


class Session:
    """One request between ``begin`` and ``close``: evaluate ``remaining``, then close."""

    def __init__(
        self, cache: PrefixCache, prompt: np.ndarray, account: RequestAccount, snapshot_at: int
    ) -> None:
        self.cache = cache
        self.prompt = prompt
        self.account = account
        self.snapshot_offset = snapshot_at
        self.outputs = as_tokens([])
        self.closed = False

    @property
    def cached_tokens(self) -> int:
        return self.account.cached_tokens

    @property
    def remaining(self) -> np.ndarray:
        """Prompt tokens the caller must evaluate (never empty)."""
        return self.prompt[self.account.cached_tokens :]

    def prefill(
        self,
        evaluate: Callable[[np.ndarray], Any],
        user_marks: Iterable[int] = (),
        until: int | None = None,
    ) -> Any:
        """Evaluate the remaining prompt up to offset ``until`` (default: all of it), stopping
        to snapshot at the scheduled offsets.

        ``evaluate`` advances every live layer by the tokens it is given and returns what the
        backend returns (logits); the result of the last call is returned. A user mark at or
        after the cached prefix becomes a user restore point; earlier marks are already live
        history and are skipped.
        """
        self._check_open()
        start = self.account.cached_tokens
        end = len(self.prompt) if until is None else max(start, min(until, len(self.prompt)))
        user = {m for m in user_marks if start <= m <= end}
        stops = self._stops(start, end) | user
        result = None
        offset = start
        for stop in sorted(stops | {end}):
            if stop > offset:
                result = evaluate(self.prompt[offset:stop])
                offset = stop
                if self.cache.budget_counts_live:
                    self.cache.evictor.enforce()  # what the live layers grew by
            if stop in stops:
                self.snapshot(user=stop in user)
        return result

    def _stops(self, start: int, end: int) -> set[int]:
        """Offsets in (0, end] where a prefill from ``start`` stops to snapshot: the pending
        snapshot, the policy's schedule, the last-token restore point."""
        stops = set()
        if start <= self.snapshot_offset <= end:
            stops.add(self.snapshot_offset)
        stops.update(self.cache.policy.schedule.stops(start, end))
        last = self.cache.last_point(len(self.prompt))
        if self.cache.policy.last_token_restore_point.on and start < last <= end:
            stops.add(last)
        stops.discard(0)
        return stops

    def last_stop(self, until: int) -> int:
        """The furthest offset up to ``until`` at which a prefill stops to snapshot (the cached
        prefix when none): evaluating beyond it takes no snapshot, so a caller may leave
        those tokens to its own model call (one call instead of two)."""
        start = self.account.cached_tokens
        return max(self._stops(start, max(start, until)) | {start})

    def snapshot(self, user: bool = False) -> None:
        """Advance the trie to the live offset and attach fresh snapshots there."""
        self._check_open()
        offset = self.cache.live_offset
        if offset <= 0:
            return
        if self.snapshot_offset and offset >= self.snapshot_offset:
            self.snapshot_offset = 0
        self.cache.snapshot_live(self._tokens(), user)

    def close(self, outputs: Sequence[int] | np.ndarray = ()) -> None:
        """Record the generated tokens, grow the trie to the live offset, mark the path used."""
        if self.closed:
            return
        self.outputs = as_tokens(outputs)
        self.closed = True
        self.cache.finish(self, self._tokens())

    def _tokens(self) -> np.ndarray:
        if not len(self.outputs):
            return self.prompt
        return np.concatenate([self.prompt, self.outputs])

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this session is closed")
