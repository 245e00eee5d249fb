"""The compressed prefix trie: nodes and pure structural operations, no policy and no logging.

Every node's edge covers ``[start, end)`` with ``child.start == parent.end``; the root is
``[0, 0)``. Children are keyed by the first token of their edge, so siblings never share it.
Paged-out bytes change in exactly one place, :meth:`Node.set_snapshots`. A structural
operation called on a node it does not apply to is a bug in its caller and raises
``AssertionError`` with the numbers, which the replayer reports with a dump of the trie.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .protocols import LayerCache, Snapshot
from .tiers import TieredLayers, is_stored

__all__ = [
    "ByteLedger",
    "Node",
    "append_tokens",
    "as_tokens",
    "common_prefix_length",
    "descend",
    "insert",
    "match",
    "merge_with_child",
    "remove_leaf",
    "shorten_bare_leaf",
    "split_node",
    "walk",
]

TOKEN_DTYPE = np.int32


def as_tokens(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Tokens as a 1-D integer array (no copy when already one)."""
    array = np.asarray(tokens, dtype=TOKEN_DTYPE)
    if array.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {array.shape}")
    return array


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays, compared in one vector op."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differs = np.flatnonzero(a[:n] != b[:n])
    return int(differs[0]) if len(differs) else n


@dataclass(eq=False)
class ByteLedger:
    """The paged-out byte counters (RAM and disk tier), their high-water marks, and who hears
    of every touched node.

    Every structural operation and snapshot change touches the nodes it changed; listeners
    (the cache's eviction index, the invariant checker's audit) keep their own views current
    from those calls instead of walking the trie.
    """

    total: int = 0  # bytes of snapshots in RAM
    peak: int = 0
    disk_total: int = 0  # bytes of snapshots in the disk tier
    disk_peak: int = 0
    listeners: list[Callable[[Node], None]] = field(default_factory=list)

    def add(self, delta: int, disk: bool = False) -> None:
        if disk:
            self.disk_total += delta
            self.disk_peak = max(self.disk_peak, self.disk_total)
        else:
            self.total += delta
            self.peak = max(self.peak, self.total)

    def touch(self, *nodes: Node | None) -> None:
        for listener in self.listeners:
            for node in nodes:
                if node is not None:
                    listener(node)


@dataclass(eq=False)
class Node:
    """A trie node: an edge of tokens ending at ``end`` and optional per-layer snapshots."""

    tokens: np.ndarray
    end: int
    parent: Node | None = None
    children: dict[int, Node] = field(default_factory=dict)
    last_used: int = 0
    user: bool = False
    snapshots: list[Snapshot | None] | None = None
    snapshot_bytes: int = 0
    on_disk: bool = False  # its snapshots are in the disk tier (all of them: one tier a node)

    @property
    def start(self) -> int:
        return self.end - len(self.tokens)

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def has_snapshots(self) -> bool:
        return self.snapshots is not None and any(s is not None for s in self.snapshots)

    def has_all_snapshots(self) -> bool:
        return bool(self.snapshots) and all(s is not None for s in self.snapshots)

    @property
    def ram_bytes(self) -> int:
        """The bytes this node keeps in RAM (none when its snapshots are in the disk tier)."""
        return 0 if self.on_disk else self.snapshot_bytes

    def set_snapshots(self, snapshots: list[Snapshot | None] | None, ledger: ByteLedger) -> None:
        """Replace this node's snapshots, closing the old ones."""
        for old in self.take_snapshots(ledger) or []:
            if old is not None:
                old.close()
        self.give_snapshots(snapshots, ledger)

    def take_snapshots(self, ledger: ByteLedger) -> list[Snapshot | None] | None:
        """Detach the snapshots without closing them, for a split or merge that consumes them."""
        old = self.snapshots
        ledger.add(-self.snapshot_bytes, self.on_disk)
        self.snapshots = None
        self.snapshot_bytes = 0
        self.on_disk = False
        ledger.touch(self)
        return old

    def give_snapshots(self, snapshots: list[Snapshot | None] | None, ledger: ByteLedger) -> None:
        """Attach snapshots to a node that has none; stored ones put it in the disk tier
        (a node's snapshots are all in one tier)."""
        assert self.snapshots is None, "give_snapshots on a node that still holds snapshots"
        if snapshots is not None and all(s is None for s in snapshots):
            snapshots = None
        held = [s for s in snapshots or [] if s is not None]
        stored = [is_stored(s) for s in held]
        assert all(stored) or not any(stored), "a node's snapshots in two tiers"
        self.snapshots = snapshots
        self.snapshot_bytes = sum(s.nbytes for s in held)
        self.on_disk = any(stored)
        ledger.touch(self)
        ledger.add(self.snapshot_bytes, self.on_disk)

    def path(self) -> list[Node]:
        """Root-first path to this node."""
        nodes: list[Node] = []
        node: Node | None = self
        while node is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]

    def __repr__(self) -> str:
        return f"Node([{self.start}, {self.end}), children={len(self.children)})"


def walk(root: Node) -> Iterator[Node]:
    """Every node, depth first, parents before children."""
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(list(node.children.values())))


def match(root: Node, tokens: np.ndarray) -> tuple[list[Node], int]:
    """Walk ``tokens`` down from ``root``: the nodes entered and how many tokens matched.

    The last node may be matched only partly (the match ends inside its edge).
    """
    path = [root]
    pos = 0
    node = root
    while pos < len(tokens):
        child = node.children.get(int(tokens[pos]))
        if child is None:
            break
        matched = common_prefix_length(child.tokens, tokens[pos:])
        pos += matched
        path.append(child)
        if matched < len(child.tokens):
            break
        node = child
    return path, pos


def descend(
    root: Node,
    tokens: np.ndarray,
    ledger: ByteLedger,
    on_split: Callable[[Node, Node], None] | None = None,
) -> tuple[list[Node], int]:
    """:func:`match`, but an edge the match ends inside is split there, so the path ends on a
    node boundary; ``on_split(head, tail)`` hears of that split (snapshot-free tries only)."""
    path, matched = match(root, tokens)
    last = path[-1]
    if matched < last.end:
        head = split_node(last, matched - last.start, [], ledger)
        if on_split is not None:
            on_split(head, last)
        path[-1] = head
    return path, matched


def insert(
    root: Node,
    tokens: np.ndarray,
    ledger: ByteLedger,
    on_split: Callable[[Node, Node], None] | None = None,
) -> tuple[list[Node], int]:
    """Store ``tokens`` as a path from ``root`` in a snapshot-free trie: the path to their
    end (a new leaf holds what was not there yet) and how many tokens were new."""
    path, matched = descend(root, tokens, ledger, on_split)
    if matched < len(tokens):
        parent = path[-1]
        leaf = Node(
            tokens=tokens[matched:].copy(),
            end=len(tokens),
            parent=parent,
            last_used=parent.last_used,
        )
        parent.children[int(tokens[matched])] = leaf
        ledger.touch(parent, leaf)
        path.append(leaf)
    return path, len(tokens) - matched


def append_tokens(node: Node, tokens: np.ndarray, ledger: ByteLedger) -> Node:
    """Hang ``tokens`` under ``node``: extend a bare leaf in place, else add a child."""
    ledger.touch(node)
    if node.is_root or node.children or node.has_snapshots():
        child = Node(
            tokens=tokens.copy(), end=node.end + len(tokens), parent=node, last_used=node.last_used
        )
        node.children[int(tokens[0])] = child
        ledger.touch(child)
        return child
    node.tokens = np.concatenate([node.tokens, tokens])
    node.end += len(tokens)
    return node


def split_node(
    node: Node, at: int, caches: Sequence[LayerCache] | TieredLayers, ledger: ByteLedger
) -> Node:
    """Cut ``node``'s edge after ``at`` tokens; returns the new parent holding the first part.

    Snapshots are split by each layer; a layer that can't split leaves the parent half empty.
    """
    if not 0 < at < len(node.tokens):
        raise AssertionError(f"split at {at} outside the edge of {len(node.tokens)} tokens")
    assert node.parent is not None
    parent = Node(
        tokens=node.tokens[:at].copy(),
        end=node.start + at,
        parent=node.parent,
        last_used=node.last_used,
    )
    old = node.take_snapshots(ledger)
    node.tokens = node.tokens[at:].copy()
    if old is not None:
        halves = [
            layer.split(snap, parent.end) if snap is not None else (None, None)
            for layer, snap in zip(caches, old)
        ]
        parent.give_snapshots([h[0] for h in halves], ledger)
        node.give_snapshots([h[1] for h in halves], ledger)
    node.parent.children[int(parent.tokens[0])] = parent
    parent.children[int(node.tokens[0])] = node
    node.parent = parent
    ledger.touch(parent, node, parent.parent)
    return parent


def merge_with_child(
    node: Node, caches: Sequence[LayerCache] | TieredLayers, ledger: ByteLedger
) -> Node:
    """Fold ``node``'s only child into it; returns the absorbed child (now detached)."""
    if len(node.children) != 1:
        raise AssertionError(f"merge needs exactly one child, node has {len(node.children)}")
    (child,) = node.children.values()
    mine = node.take_snapshots(ledger)
    theirs = child.take_snapshots(ledger)
    if mine is not None or theirs is not None:
        n = len(caches)
        mine = mine or [None] * n
        theirs = theirs or [None] * n
        node.give_snapshots(
            [layer.merge(a, b) for layer, a, b in zip(caches, mine, theirs)], ledger
        )
    node.tokens = np.concatenate([node.tokens, child.tokens])
    node.end = child.end
    node.children = child.children
    for grandchild in node.children.values():
        grandchild.parent = node
    node.user = child.user
    node.last_used = max(node.last_used, child.last_used)
    child.parent = None
    child.children = {}
    ledger.touch(node, child, *node.children.values())
    return child


def remove_leaf(node: Node, ledger: ByteLedger) -> None:
    """Detach a leaf from its parent and close its snapshots."""
    if node.parent is None:
        raise AssertionError("the root can't be removed")
    if node.children:
        raise AssertionError(f"{node!r} is not a leaf")
    del node.parent.children[int(node.tokens[0])]
    ledger.touch(node, node.parent)
    node.parent = None
    node.set_snapshots(None, ledger)


def shorten_bare_leaf(node: Node, length: int, ledger: ByteLedger) -> None:
    """Keep only the first ``length`` tokens of a leaf that holds no snapshots."""
    if node.children or node.snapshots is not None:
        raise AssertionError(f"{node!r} is not a bare leaf")
    if not 0 < length <= len(node.tokens):
        raise AssertionError(f"can't shorten an edge of {len(node.tokens)} tokens to {length}")
    node.end = node.start + length
    node.tokens = node.tokens[:length].copy()
    ledger.touch(node)
