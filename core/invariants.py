"""One checker for SPEC.md's structural invariants, used by the tests, the replayer and the fuzzer.

``check(cache)`` walks the whole trie. :class:`Checker` gives the same verdicts after every
request in time proportional to what changed: the trie's ledger records every node a structural
operation or a snapshot change touched, and the checker re-verifies those and recomputes its own
byte tally from their snapshots. I9 and I11 need a backend to recompute state, so they live with
the oracle in the backends.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass

import numpy as np

from .evict import OldestDeepestLargest
from .prefix_cache import PrefixCache, RequestAccount, Session
from .protocols import LayerCache, LayerKind
from .tiers import is_stored
from .trie import Node, walk

__all__ = ["Checker", "EvictionAudit", "Violation", "check", "check_request"]


@dataclass(frozen=True)
class Violation:
    """A broken invariant: which one, and the numbers that show it."""

    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.detail}"


def _where(node: Node) -> str:
    return f"node [{node.start}, {node.end})"


def _check_node(node: Node, layers: list[LayerCache], out: list[Violation]) -> int:
    """I1, I2, I5 and I10 for one node and its link to its parent; returns its bytes (in its
    tier: ``node.on_disk``)."""
    parent = node.parent
    if parent is not None:
        if len(node.tokens) == 0:
            out.append(Violation("I1", f"{_where(node)} has an empty edge"))
        elif parent.children.get(int(node.tokens[0])) is not node:
            out.append(Violation("I1", f"{_where(node)} is not its parent's child for its token"))
        if node.start != parent.end:
            out.append(
                Violation("I2", f"{_where(node)} starts at {node.start}, parent ends {parent.end}")
            )
    if node.snapshots is None:
        if node.snapshot_bytes:
            out.append(Violation("I5", f"{_where(node)} counts {node.snapshot_bytes} B of nothing"))
        return 0
    if node.is_root:
        out.append(Violation("I5", "the root holds snapshots"))
    if len(node.snapshots) != len(layers):
        out.append(
            Violation(
                "I5", f"{_where(node)} has {len(node.snapshots)} snapshots, {len(layers)} layers"
            )
        )
    held = 0
    for layer, snap in zip(layers, node.snapshots):
        if snap is None:
            continue
        held += snap.nbytes
        if is_stored(snap) != node.on_disk:
            out.append(
                Violation(
                    "TIER",
                    f"{_where(node)} is {'on disk' if node.on_disk else 'in RAM'} but holds a "
                    f"{'RAM' if node.on_disk else 'stored'} snapshot",
                )
            )
        if snap.end != node.end:
            invariant = "I10" if layer.kind is LayerKind.RECURRENT else "I2"
            out.append(
                Violation(
                    invariant, f"{layer.kind.value} snapshot of {_where(node)} ends at {snap.end}"
                )
            )
        if layer.kind is LayerKind.KV and snap.start != node.start:
            out.append(Violation("I2", f"kv snapshot of {_where(node)} starts at {snap.start}"))
    if held != node.snapshot_bytes:
        out.append(
            Violation("I5", f"{_where(node)} counts {node.snapshot_bytes} B, holds {held} B")
        )
    return held


def _check_root(cache: PrefixCache, out: list[Violation]) -> None:
    root = cache.root
    if root.parent is not None or root.end != 0 or len(root.tokens) != 0:
        out.append(Violation("I2", f"root must be [0, 0) with no parent, is {_where(root)}"))


def _check_active_path(cache: PrefixCache, out: list[Violation]) -> None:
    path = cache.active_path
    if not path or path[0] is not cache.root:
        out.append(Violation("I3", "the active path does not start at the root"))
        return
    for prev, node in zip(path, path[1:]):
        if node.parent is not prev or prev.children.get(int(node.tokens[0])) is not node:
            out.append(
                Violation("I7", f"active {_where(node)} is not in the trie under {_where(prev)}")
            )


def _order_key(node: Node) -> tuple[int, int, int]:
    """SPEC.md's eviction order, computed here and not by the cache: oldest, deepest, largest."""
    return (node.last_used, -node.end, -node.snapshot_bytes)


def _facts(node: Node) -> tuple[int, int, int]:
    return (node.last_used, node.end, node.snapshot_bytes)


class EvictionAudit:
    """Checks the ceiling after every page-out, and recomputes evictions' victims from a walk
    of the trie, independently of the cache's eviction index, so the index is verified rather
    than trusted.

    A walk per eviction would cost what the index saves, so unless ``every_eviction`` is set
    (the fuzzer's full checks) an eviction is audited once the evictions since the last audit
    reach 1/16 of the nodes that audit walked: the walks add O(16) work per eviction, whatever
    the trie's size, and the first eviction of a run is always audited.
    """

    WALK_SHARE = 16

    def __init__(self, cache: PrefixCache, every_eviction: bool) -> None:
        self.every_eviction = every_eviction
        self.credit = 0  # evictions since the last audit
        self.walked = 0  # nodes the last audit walked
        self.audited = 0
        self.violations: list[Violation] = []
        self.checks_order = cache.policy.eviction.name == OldestDeepestLargest.name
        cache.evictor.observers.append(self)

    def evicting(self, cache: PrefixCache, victim: Node, active: Container[int]) -> None:
        self.credit += 1
        if not self.every_eviction and self.credit * self.WALK_SHARE < self.walked:
            return
        self.credit = 0
        self.audited += 1
        on_path = {id(n) for n in cache.active_path}
        if id(victim) in on_path:
            self.violations.append(Violation("I7", f"evicting active {_where(victim)}"))
        nodes = list(walk(cache.root))
        self.walked = len(nodes)
        # ``active`` is what this eviction must spare: the active path, and during a switch
        # the path about to be paged in too
        candidates = [
            n
            for n in nodes
            if id(n) not in on_path
            and id(n) not in active
            and not n.is_root
            and n.has_snapshots()
            and n.on_disk == victim.on_disk  # each tier evicts its own, in the same order
        ]
        if not self.checks_order or not candidates:
            return
        first = min(candidates, key=_order_key)
        if _order_key(victim) != _order_key(first):
            self.violations.append(
                Violation(
                    "EVICT",
                    f"evicted (last_used, end, bytes) = {_facts(victim)} before "
                    f"{_facts(first)}, which is older, deeper or larger",
                )
            )

    def paged_out(self, cache: PrefixCache, node: Node) -> None:
        """I6 at every instant: room is made before a page-out, so after one paged-out bytes
        are within the budget (what the live layers leave of it, when it counts them),
        whatever was there before."""
        self._ceiling(
            f"paging out {_where(node)}", "paged-out", cache.ledger.total, _ram_limit(cache)
        )

    def moved_to_disk(self, cache: PrefixCache, node: Node) -> None:
        """The disk tier's I6: room is made there before a move, so after one its bytes are
        within its budget."""
        where = f"moving {_where(node)} to disk"
        self._ceiling(where, "disk-tier", cache.ledger.disk_total, cache.disk_budget_bytes)

    def _ceiling(self, what: str, tier: str, total: int, budget: int | None) -> None:
        if budget is not None and total > budget:
            self.violations.append(
                Violation(
                    "I6", f"{what} took {tier} bytes to {total} B, over the budget {budget} B"
                )
            )

    def take(self) -> list[Violation]:
        found, self.violations = self.violations, []
        return found


def _check_used(cache: PrefixCache, nodes: list[Node], out: list[Violation]) -> None:
    """LRU: after a request closes, every node of its path was used at once, and last."""
    times = {n.last_used for n in cache.active_path[1:]}
    if len(times) > 1:
        out.append(Violation("LRU", f"the closed path's nodes were used at times {sorted(times)}"))
    if times:
        newest = max(times)
        later = [n for n in nodes if n.last_used > newest]
        if later:
            out.append(
                Violation(
                    "LRU",
                    f"{_where(later[0])} used at {later[0].last_used}, after the "
                    f"request that just closed ({newest})",
                )
            )


def _check_live(cache: PrefixCache, session: Session | None, out: list[Violation]) -> None:
    offsets = [layer.offset for layer in cache.layers]
    if len(set(offsets)) > 1:
        out.append(Violation("I4", f"live layers at different offsets {offsets}"))
    live = min(offsets)
    frontier = cache.active_path[-1]
    if frontier.end > live:
        out.append(Violation("I4", f"frontier ends at {frontier.end} past the live offset {live}"))
    if session is None or session.closed:
        return
    account = session.account
    if live != frontier.end and live != account.cached_tokens:
        out.append(
            Violation(
                "I4",
                f"live offset {live} is neither the frontier's end {frontier.end} "
                f"nor the cached prefix {account.cached_tokens}",
            )
        )
    if account.cached_tokens > account.matched_tokens:
        out.append(
            Violation(
                "I4",
                f"cached {account.cached_tokens} tokens, matched only {account.matched_tokens}",
            )
        )
    path_tokens = np.concatenate([n.tokens for n in cache.active_path])
    if not np.array_equal(path_tokens, session.prompt[: len(path_tokens)]):
        out.append(Violation("I4", "the active path's tokens are not the prompt's prefix"))


def _ram_limit(cache: PrefixCache) -> int | None:
    """What paged-out bytes may hold: the budget, or what the live layers leave of it when it
    counts them (computed here, not taken from the cache)."""
    budget = cache.budget_bytes
    if budget is None or not cache.budget_counts_live:
        return budget
    return max(0, budget - sum(layer.nbytes for layer in cache.layers))


def _over_budget(cache: PrefixCache) -> bool:
    ram, disk = _ram_limit(cache), cache.disk_budget_bytes
    return (ram is not None and cache.ledger.total > ram) or (
        disk is not None and cache.ledger.disk_total > disk
    )


def _check_budget(cache: PrefixCache, holders: list[Node], out: list[Violation]) -> None:
    active = {id(n) for n in cache.active_path}
    for on_disk, budget, total, what in (
        (False, _ram_limit(cache), cache.ledger.total, "paged-out"),
        (True, cache.disk_budget_bytes, cache.ledger.disk_total, "disk tier"),
    ):
        if budget is None or total <= budget:
            continue
        outside = [n for n in holders if id(n) not in active and n.on_disk == on_disk]
        if outside:
            out.append(
                Violation(
                    "I6",
                    f"{what} {total} B over the budget {budget} B with "
                    f"{len(outside)} evictable nodes left",
                )
            )


def _check_accounting(cache: PrefixCache, out: list[Violation]) -> None:
    stats = cache.stats
    if stats.cached_tokens + stats.computed_tokens != stats.prompt_tokens:
        out.append(
            Violation(
                "I12",
                f"cached {stats.cached_tokens} + computed {stats.computed_tokens} "
                f"!= prompt {stats.prompt_tokens}",
            )
        )


def _check_tally(cache: PrefixCache, tally: int, disk_tally: int, out: list[Violation]) -> None:
    if tally != cache.ledger.total:
        out.append(
            Violation("I5", f"paged-out counter {cache.ledger.total} B, snapshots sum to {tally} B")
        )
    if disk_tally != cache.ledger.disk_total:
        out.append(
            Violation(
                "I5",
                f"disk-tier counter {cache.ledger.disk_total} B, its snapshots sum to "
                f"{disk_tally} B",
            )
        )


def _backend_held(node: Node) -> int:
    """How many of ``node``'s snapshots keep a backend snapshot open (a file store's don't)."""
    return sum(
        s is not None and (not is_stored(s) or s.keeps_backend_snapshot)
        for s in node.snapshots or []
    )


def check_request(account: RequestAccount) -> list[Violation]:
    """I8 and I12 for one request."""
    out = []
    if account.computed_tokens < 1:
        out.append(
            Violation(
                "I8",
                f"no prompt token evaluated (prompt {account.prompt_tokens}, "
                f"cached {account.cached_tokens})",
            )
        )
    if not 0 <= account.cached_tokens <= account.prompt_tokens:
        out.append(
            Violation("I12", f"cached {account.cached_tokens} outside [0, {account.prompt_tokens}]")
        )
    return out


def _check_shared(
    cache: PrefixCache, session: Session | None, nodes: list[Node], out: list[Violation]
) -> None:
    _check_root(cache, out)
    _check_active_path(cache, out)
    _check_live(cache, session, out)
    _check_accounting(cache, out)
    if session is not None:
        out.extend(check_request(session.account))
        if session.closed:
            _check_used(cache, nodes, out)


def check(cache: PrefixCache, session: Session | None = None) -> list[Violation]:
    """Every structural invariant (I1-I8, I10, I12) over the whole trie; empty when sound."""
    out: list[Violation] = []
    owners: dict[int, Node] = {}
    tallies = [0, 0]  # RAM, disk
    holders = []
    nodes = list(walk(cache.root))
    for node in nodes:
        tallies[node.on_disk] += _check_node(node, cache.layers, out)
        for child in node.children.values():
            if child.parent is not node:
                out.append(Violation("I2", f"{_where(child)} does not point back to its parent"))
        for snap in node.snapshots or []:
            if snap is not None:
                if id(snap) in owners:
                    out.append(Violation("I5", f"one snapshot held by {_where(node)} and another"))
                owners[id(snap)] = node
        if node.has_snapshots():
            holders.append(node)
    _check_tally(cache, tallies[0], tallies[1], out)
    _check_budget(cache, holders, out)
    _check_shared(cache, session, nodes, out)
    return out


class Checker:
    """The invariants of :func:`check` after every request, in time proportional to the nodes
    touched since the last call (a snapshot held twice is found by the full :func:`check`)."""

    def __init__(self, cache: PrefixCache, audit_every_eviction: bool = False) -> None:
        self.cache = cache
        self._touched: set[Node] = set()
        cache.ledger.listeners.append(self._touched.add)
        self.audit = EvictionAudit(cache, audit_every_eviction)
        self._bytes: dict[Node, tuple[int, bool]] = {}  # bytes, and whether on disk
        self._counts: dict[Node, int] = {}
        self._tallies = [0, 0]  # RAM, disk
        self.held_snapshots = 0  # how many snapshots the trie holds, by the checker's own count
        for node in walk(cache.root):
            self._record(node, [])

    def _attached(self, node: Node) -> bool:
        parent = node.parent
        if parent is None:
            return node is self.cache.root
        return len(node.tokens) > 0 and parent.children.get(int(node.tokens[0])) is node

    def _record(self, node: Node, out: list[Violation]) -> None:
        held = _check_node(node, self.cache.layers, out)
        self._forget(node)
        self._tallies[node.on_disk] += held
        count = _backend_held(node)
        self.held_snapshots += count
        if node.snapshots is not None:
            self._bytes[node] = (held, node.on_disk)
            self._counts[node] = count

    def _forget(self, node: Node) -> None:
        held, on_disk = self._bytes.pop(node, (0, False))
        self._tallies[on_disk] -= held
        self.held_snapshots -= self._counts.pop(node, 0)

    def check(self, session: Session | None = None) -> list[Violation]:
        out: list[Violation] = []
        touched = set(self._touched)
        self._touched.clear()
        for node in touched:
            if self._attached(node):
                self._record(node, out)
            else:
                self._forget(node)
        _check_tally(self.cache, self._tallies[0], self._tallies[1], out)
        if _over_budget(self.cache):
            _check_budget(self.cache, [n for n in self._bytes if n.has_snapshots()], out)
        _check_shared(self.cache, session, [n for n in touched if self._attached(n)], out)
        out.extend(self.audit.take())
        return out
