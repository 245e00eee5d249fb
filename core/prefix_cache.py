"""The prefix cache: one live path through the trie, paged snapshots, and a byte budget.

What always holds (checked by :mod:`kvtrie.core.invariants` after every operation):

- one active path, root first; only it is backed by the live layer caches;
- after ``begin`` every layer sits at the same offset: the frontier's end or the cached prefix;
- a request always evaluates at least one prompt token, so generation has logits to start from;
- paged-out bytes are the sum over all snapshots and stay within the budget unless every
  snapshot left is on the active path; active nodes are never evicted;
- a recurrent layer is restored from a snapshot at exactly the right offset, never rewound;
- a restore that fails frees every layer and recomputes: a wrong state is never served.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .evict import EvictionOrder, OldestDeepestLargest
from .protocols import LayerCache, LayerKind
from .trie import (
    ByteLedger,
    Node,
    append_tokens,
    as_tokens,
    match,
    merge_with_child,
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
TRIM_PAGE = 16  # tokens: leaves are trimmed in pages of this size


@dataclass(frozen=True)
class CachePolicy:
    """The choices that differ between the seed's behaviour and kvtrie's improvements."""

    name: str = "kvtrie-seed"
    # On a match ending inside an edge, keep the matched part when every layer can rewind to it.
    reuse_partial_edge: bool = False
    # When extending a leaf, keep its snapshots (add a child) instead of dropping them.
    keep_restore_points: bool = False
    # Snapshot every this many tokens of a long prefill (0: only where the seed does).
    snapshot_interval: int = 0
    # Evict only the tail of a long attention-only leaf, page by page, when that is enough.
    trim_leaves: bool = False
    # Over budget, a leaf being paged out keeps whole pages only (as block caches store it).
    whole_pages_under_pressure: bool = False
    # Under a budget, paging a node in moves its snapshots into the live layers instead of
    # copying them, so the live path is not held twice; leaving it pages its nodes out again.
    page_in_moves: bool = False
    # After a leaf eviction, fold a parent left with one child into it (the seed's rule).
    merge_lone_children: bool = True
    eviction: EvictionOrder = field(default_factory=OldestDeepestLargest)


POLICIES: dict[str, CachePolicy] = {
    "kvtrie-seed": CachePolicy(),
    "kvtrie-improved": CachePolicy(
        name="kvtrie-improved",
        reuse_partial_edge=True,
        keep_restore_points=True,
        trim_leaves=True,
        whole_pages_under_pressure=True,
        page_in_moves=True,
        merge_lone_children=False,
    ),
}


@dataclass
class CacheStats:
    """Counters over the cache's life."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    computed_tokens: int = 0
    page_ins: int = 0
    page_outs: int = 0
    splits: int = 0
    merges: int = 0
    evictions: int = 0
    restore_failures: int = 0


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
    ) -> None:
        if not layers:
            raise ValueError("a prefix cache needs at least one layer")
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0 or None (unbounded), got {budget_bytes}")
        self.layers = list(layers)
        self.budget_bytes = budget_bytes
        self.policy = policy or CachePolicy()
        self.clock = clock or itertools.count(1).__next__
        self.ledger = ByteLedger()
        self.stats = CacheStats()
        self.root = Node(tokens=as_tokens([]), end=0, last_used=self.clock())
        self.active_path: list[Node] = [self.root]
        self._session: Session | None = None

    def set_budget(self, budget_bytes: int | None) -> None:
        """Change the budget (None: unbounded) and evict down to it at once."""
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0 or None (unbounded), got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._enforce_budget()

    @property
    def paged_out_bytes(self) -> int:
        return self.ledger.total

    @property
    def live_offset(self) -> int:
        """The offset every layer can serve: the smallest of the layers' offsets."""
        return min(layer.offset for layer in self.layers)

    @property
    def live_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    # ---- begin / switch -------------------------------------------------------------------

    def begin(self, prompt: Sequence[int] | np.ndarray) -> Session:
        """Restore the longest cached prefix of ``prompt`` and return the session to finish it.

        A session still open is closed first, with the outputs it has.
        """
        tokens = as_tokens(prompt)
        if len(tokens) == 0:
            raise ValueError("a prompt needs at least one token")
        if self._session is not None:
            self._session.close(self._session.outputs)
        path, longest = match(self.root, tokens)
        path, matched = self._leave_one_token(tokens, path, longest)
        partial = len(path) > 1 and path[-1].start < matched < path[-1].end
        prefix = self._switch_to_match(path, tokens[:matched], partial)
        snapshot_at = matched if (partial or (prefix == 0 and matched > 0)) else 0
        account = RequestAccount(len(tokens), matched, prefix)
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

    def _leave_one_token(
        self, tokens: np.ndarray, path: list[Node], matched: int
    ) -> tuple[list[Node], int]:
        """The longest match of ``tokens`` that leaves at least one token to evaluate, so
        generation has logits to start from: the full match, unless it covers every token."""
        if matched == len(tokens):
            return match(self.root, tokens[:-1])
        return path, matched

    def _switch_to_match(self, path: list[Node], matched_tokens: np.ndarray, partial: bool) -> int:
        """Switch to the matched path and return how many prompt tokens the live state covers."""
        matched = len(matched_tokens)
        if partial and self._can_reuse_partial_edge():
            self._switch(path)
            node = path[-1]
            if self.active_path[-1] is node and self._rewind_inside(node, matched):
                self._enforce_budget()  # the paged-out node left the active path
                return matched
            # That switch may have failed a restore and then evicted, and an eviction merges
            # nodes: match again in the trie as it is now.
            path, _ = match(self.root, matched_tokens)
            partial = path[-1].end > matched
        self._switch(path[:-1] if partial else path)
        return self.live_offset

    def _rewind_inside(self, node: Node, target: int) -> bool:
        """Rewind every live layer from the frontier ``node``'s end to ``target`` inside its
        edge, if every layer can; the node is paged out first so its tail stays restorable,
        and leaves the active path. With ``page_in_moves`` only the part past ``target`` is
        paged out: the node is split there and its head stays live."""
        if not all(layer.can_restore(None, target) for layer in self.layers):
            return False
        self.active_path.pop()
        if self._page_in_moves():
            self.active_path.append(split_node(node, target - node.start, self.layers, self.ledger))
            self.stats.splits += 1
            self._release_live_path()
        if not node.has_all_snapshots():
            self._attach_live_snapshots(node)
            self.stats.page_outs += 1
        for layer in self.layers:
            layer.restore(None, target)
        return True

    def _can_reuse_partial_edge(self) -> bool:
        return self.policy.reuse_partial_edge and all(
            layer.kind is not LayerKind.RECURRENT for layer in self.layers
        )

    def _switch(self, new_path: list[Node]) -> None:
        """Page out the old frontier, rewind to the common ancestor, page in ``new_path``."""
        try:
            self._switch_unbudgeted(new_path)
        finally:
            self._enforce_budget()

    def _switch_unbudgeted(self, new_path: list[Node]) -> None:
        old_path = self.active_path
        common = 0
        while common < min(len(old_path), len(new_path)) and old_path[common] is new_path[common]:
            common += 1
        ancestor_end = old_path[common - 1].end if common else 0

        # Only the frontier's live state is right for every layer (a recurrent layer holds the
        # state at the frontier, not at any node above it), so only the frontier is paged out;
        # on an attention-only model, so are the nodes above it whose snapshots moved in.
        frontier = old_path[-1]
        if len(old_path) - 1 >= common and not frontier.has_all_snapshots():
            self._attach_live_snapshots(frontier)
            self.stats.page_outs += 1
            log.debug("page out [%d, %d)", frontier.start, frontier.end)
            self._drop_partial_page(frontier)
        self._page_out_interior(old_path[common:-1])

        for layer in self.layers:
            if not layer.restore(None, ancestor_end):
                layer.free()

        for node in new_path:
            if not node.snapshots:
                continue
            for index, (layer, snap) in enumerate(zip(self.layers, node.snapshots)):
                if snap is None or layer.offset >= node.end:
                    continue
                if not layer.restore(snap, node.end):
                    log.warning(
                        "restore failed layer=%d start=%d end=%d: freeing all layers",
                        index,
                        node.start,
                        node.end,
                    )
                    self.stats.restore_failures += 1
                    self._fall_back_to_root()
                    return
            if node.end > ancestor_end:
                self.stats.page_ins += 1
                log.debug("page in [%d, %d)", node.start, node.end)

        self.active_path = list(new_path)
        aligned = self.live_offset
        for layer in self.layers:
            if layer.offset != aligned and not layer.restore(None, aligned):
                log.warning("align failed offset=%d: freeing all layers", aligned)
                self.stats.restore_failures += 1
                self._fall_back_to_root()
                return
        while self.active_path[-1].end > aligned:
            self.active_path.pop()
        self._release_live_path()

    def _release_live_path(self) -> None:
        """With ``page_in_moves``, close the active nodes' snapshots: the live layers hold the
        same state, and leaving the path pages its nodes out again."""
        if self._page_in_moves():
            for node in self.active_path[1:]:
                node.set_snapshots(None, self.ledger)

    def _page_in_moves(self) -> bool:
        return (
            self.policy.page_in_moves and self.budget_bytes is not None and self._attention_only()
        )

    def _page_out_interior(self, nodes: list[Node]) -> None:
        """Page out the active nodes above the frontier that the live layers alone hold (their
        snapshots moved in), deepest first, rewinding to each one's end: attention only."""
        for node in reversed(nodes):
            if node.has_all_snapshots() or not self._attention_only():
                continue
            for layer in self.layers:
                layer.restore(None, node.end)
            self._attach_live_snapshots(node)
            self.stats.page_outs += 1
            log.debug("page out [%d, %d)", node.start, node.end)

    def _fall_back_to_root(self) -> None:
        self._save_live_path()
        for layer in self.layers:
            layer.free()
        self.active_path = [self.root]

    def _save_live_path(self) -> None:
        """Before the live layers are freed, page out the active nodes that only they hold
        (their snapshots moved in), so a failed restore further down loses none of them."""
        if not self.policy.page_in_moves or not self._attention_only():
            return
        live = self.live_offset
        for layer in self.layers:
            layer.restore(None, live)
        self._page_out_interior([node for node in self.active_path[1:] if node.end <= live])

    # ---- snapshots and trie growth --------------------------------------------------------

    def _attach_live_snapshots(self, node: Node) -> None:
        """Replace ``node``'s snapshots with fresh copies of the live layers' ``[start, end)``."""
        for index, layer in enumerate(self.layers):
            if layer.offset != node.end:
                raise AssertionError(
                    f"snapshot of [{node.start}, {node.end}) but layer {index} is at {layer.offset}"
                )
        node.set_snapshots([layer.snapshot(node.start) for layer in self.layers], self.ledger)

    def _advance(self, frontier: Node, tokens: np.ndarray) -> Node:
        """Extend the active path from ``frontier`` over ``tokens``; returns the new frontier.

        Existing children are followed, a partly matched edge is split, and what is left is
        appended as a new node.
        """
        path, matched = match(frontier, tokens)
        last = path[-1]
        if len(path) > 1 and frontier.end + matched < last.end:
            path[-1] = split_node(
                last, frontier.end + matched - last.start, self.layers, self.ledger
            )
            self.stats.splits += 1
        self.active_path.extend(path[1:])
        dest = path[-1]
        rest = tokens[matched:]
        if len(rest):
            if not dest.children and not dest.user and not self.policy.keep_restore_points:
                dest.set_snapshots(None, self.ledger)  # so the leaf can be extended in place
            extended = append_tokens(dest, rest, self.ledger)
            if extended is not dest:
                self.active_path.append(extended)
            dest = extended
        return dest

    # ---- eviction -------------------------------------------------------------------------

    def _enforce_budget(self) -> None:
        """Evict until paged-out bytes fit the budget or only active snapshots are left."""
        if self.budget_bytes is None or self.ledger.total <= self.budget_bytes:
            return
        active = {id(node) for node in self.active_path}
        priority = self.policy.eviction.priority
        while self.ledger.total > self.budget_bytes:
            candidates = [node for node in walk(self.root) if self._evictable(node, active)]
            if not candidates:
                break
            victim = min(candidates, key=priority)
            self.ledger.record_eviction(victim, candidates)
            self._evict(victim, active)

    def _attention_only(self) -> bool:
        return all(layer.kind is LayerKind.KV for layer in self.layers)

    def _drop_partial_page(self, leaf: Node) -> None:
        """Over budget, cut a just paged-out leaf back to a page boundary.

        Its sub-page tail pays bytes in every stored leaf but saves at most a page of
        recompute, and only to a request that extends exactly this sequence; when memory is
        short those bytes keep more shared prefix instead. With room to spare the tail stays.
        """
        if (
            not self.policy.whole_pages_under_pressure
            or self.budget_bytes is None
            or self.ledger.total <= self.budget_bytes
            or leaf.children
            or leaf.user
            or not self._attention_only()
        ):
            return
        keep = leaf.end // TRIM_PAGE * TRIM_PAGE - leaf.start
        if 0 < keep < len(leaf.tokens):
            # The live layers are still at the leaf's end: page it out again, shorter (cheaper
            # than splitting the snapshots and closing the tail).
            leaf.set_snapshots(None, self.ledger)
            for layer in self.layers:
                layer.restore(None, leaf.start + keep)
            shorten_bare_leaf(leaf, keep, self.ledger)
            self._attach_live_snapshots(leaf)

    def _trim_leaf(self, node: Node) -> bool:
        """Drop just enough whole pages from the end of an attention-only leaf to fit the
        budget, keeping its prefix restorable; False when the whole leaf has to go."""
        if not self.policy.trim_leaves or self.budget_bytes is None:
            return False
        if not node.has_all_snapshots() or not self._attention_only():
            return False
        per_token = node.snapshot_bytes / len(node.tokens)
        tokens = math.ceil((self.ledger.total - self.budget_bytes) / per_token)
        keep = len(node.tokens) - math.ceil(tokens / TRIM_PAGE) * TRIM_PAGE
        if keep < 1:
            return False
        split_node(node, keep, self.layers, self.ledger)
        self.stats.splits += 1
        remove_leaf(node, self.ledger)
        return True

    def _evictable(self, node: Node, active: set[int]) -> bool:
        return id(node) not in active and not node.is_root and node.has_snapshots()

    def _evict(self, node: Node, active: set[int]) -> None:
        self.stats.evictions += 1
        log.debug(
            "evict start=%d end=%d children=%d bytes=%d user=%s",
            node.start,
            node.end,
            len(node.children),
            node.snapshot_bytes,
            node.user,
        )
        if not node.children and self._trim_leaf(node):
            return
        if not node.children:
            parent = node.parent
            assert parent is not None
            remove_leaf(node, self.ledger)
            # A parent left with one child folds into it, unless it is a user restore point or
            # live (merging an active node would move the frontier under the live layers).
            if (
                self.policy.merge_lone_children
                and not parent.is_root
                and not parent.user
                and len(parent.children) == 1
                and id(parent) not in active
            ):
                merge_with_child(parent, self.layers, self.ledger)
                self.stats.merges += 1
        elif len(node.children) == 1:
            merge_with_child(node, self.layers, self.ledger)
            self.stats.merges += 1
        else:
            node.set_snapshots(None, self.ledger)  # a branch point keeps its place

    def _mark_used(self, path: list[Node]) -> None:
        """Every node of the path was used now: LRU time is refreshed on all of them."""
        now = self.clock()
        for node in path:
            node.last_used = now

    # ---- introspection --------------------------------------------------------------------

    def nodes(self) -> Iterable[Node]:
        return walk(self.root)


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
        stops = set(user)
        if start <= self.snapshot_offset <= end:
            stops.add(self.snapshot_offset)
        interval = self.cache.policy.snapshot_interval
        if interval > 0:
            stops.update(range((start // interval + 1) * interval, end, interval))
        stops.discard(0)
        result = None
        offset = start
        for stop in sorted(stops | {end}):
            if stop > offset:
                result = evaluate(self.prompt[offset:stop])
                offset = stop
            if stop in stops:
                self.snapshot(user=stop in user)
        return result

    def snapshot(self, user: bool = False) -> None:
        """Advance the trie to the live offset and attach fresh snapshots there (with
        ``page_in_moves``, only the node boundary: leaving the path pages the node out)."""
        self._check_open()
        cache = self.cache
        offset = cache.live_offset
        if offset <= 0:
            return
        if self.snapshot_offset and offset >= self.snapshot_offset:
            self.snapshot_offset = 0
        frontier = cache.active_path[-1]
        if frontier.end > offset:
            log.warning("snapshot skipped offset=%d frontier_end=%d", offset, frontier.end)
            return
        if frontier.end < offset:
            frontier = cache._advance(frontier, self._tokens()[frontier.end : offset])
        elif frontier.has_all_snapshots():
            frontier.user = frontier.user or user
            return
        frontier.user = frontier.user or user
        if cache._page_in_moves():
            cache._release_live_path()  # the node boundary is what counts; leaving pages out
            return
        cache._attach_live_snapshots(frontier)
        log.debug("snapshot offset=%d user=%s", offset, user)
        cache._enforce_budget()

    def close(self, outputs: Sequence[int] | np.ndarray = ()) -> None:
        """Record the generated tokens, grow the trie to the live offset, mark the path used."""
        if self.closed:
            return
        self.outputs = as_tokens(outputs)
        self.closed = True
        cache = self.cache
        cache._session = None
        offset = cache.live_offset
        if offset <= 0:
            return
        tokens = self._tokens()
        if offset > len(tokens):
            raise ValueError(
                f"the layers are at {offset} but prompt + outputs hold only {len(tokens)} tokens"
            )
        frontier = cache.active_path[-1]
        if offset > frontier.end:
            cache._advance(frontier, tokens[frontier.end : offset])
        cache._mark_used(cache.active_path)

    def _tokens(self) -> np.ndarray:
        if not len(self.outputs):
            return self.prompt
        return np.concatenate([self.prompt, self.outputs])

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this session is closed")
