"""The pure trie: match, append, split, merge and remove, as table cases on bare nodes."""

from __future__ import annotations

import numpy as np
import pytest


def _trie(*edges: list[int]):
    """A trie of bare nodes: each edge becomes a node under the deepest node it extends."""
    from kvtrie.core.trie import ByteLedger, Node, as_tokens, match

    root = Node(tokens=as_tokens([]), end=0)
    for edge in edges:
        path, matched = match(root, as_tokens(edge))
        parent = path[-1]
        assert matched == parent.end, "test edges must end on node boundaries"
        rest = as_tokens(edge[matched:])
        parent.children[int(rest[0])] = Node(tokens=rest, end=len(edge), parent=parent)
    return root, ByteLedger()


def _ranges(root) -> list[tuple[int, int]]:
    from kvtrie.core.trie import walk

    return sorted((n.start, n.end) for n in walk(root) if not n.is_root)


@pytest.mark.parametrize(
    "edges, prompt, matched, path_ends",
    [
        ([], [1, 2], 0, [0]),
        ([[1, 2, 3]], [1, 2, 3], 3, [0, 3]),
        ([[1, 2, 3]], [1, 2], 2, [0, 3]),  # ends inside the edge: the node is entered
        ([[1, 2, 3]], [1, 9], 1, [0, 3]),
        ([[1, 2, 3]], [9], 0, [0]),
        ([[1, 2], [1, 2, 3, 4], [1, 2, 7]], [1, 2, 7, 8], 3, [0, 2, 3]),
        ([[1, 2], [1, 2, 3, 4]], [1, 2, 3, 4, 5], 4, [0, 2, 4]),
    ],
)
def test_match(edges, prompt, matched, path_ends):
    from kvtrie.core.trie import as_tokens, match

    root, _ = _trie(*edges)
    path, found = match(root, as_tokens(prompt))
    assert found == matched
    assert [n.end for n in path] == path_ends


@pytest.mark.parametrize(
    "edge, at, parent_range, child_range",
    [([1, 2, 3, 4], 1, (0, 1), (1, 4)), ([1, 2, 3, 4], 3, (0, 3), (3, 4))],
)
def test_split_keeps_offsets_and_links(edge, at, parent_range, child_range):
    from kvtrie.core.trie import as_tokens, match, split_node

    root, ledger = _trie(edge)
    (node,) = root.children.values()
    parent = split_node(node, at, [], ledger)
    assert (parent.start, parent.end) == parent_range
    assert (node.start, node.end) == child_range
    assert node.parent is parent and parent.parent is root
    assert root.children[edge[0]] is parent and parent.children[edge[at]] is node
    assert match(root, as_tokens(edge))[1] == len(edge)


@pytest.mark.parametrize("at", [0, 4, -1])
def test_split_outside_the_edge_is_a_caller_bug(at):
    from kvtrie.core.trie import split_node

    root, ledger = _trie([1, 2, 3, 4])
    (node,) = root.children.values()
    with pytest.raises(AssertionError, match="outside the edge"):
        split_node(node, at, [], ledger)


def test_merge_folds_the_only_child_and_keeps_the_newest_use():
    from kvtrie.core.trie import merge_with_child, split_node

    root, ledger = _trie([1, 2, 3, 4, 5])
    (node,) = root.children.values()
    parent = split_node(node, 2, [], ledger)
    node.last_used, parent.last_used = 7, 3
    absorbed = merge_with_child(parent, [], ledger)
    assert absorbed is node and node.parent is None
    assert (parent.start, parent.end) == (0, 5) and parent.last_used == 7
    assert np.array_equal(parent.tokens, [1, 2, 3, 4, 5]) and not parent.children


def test_merge_needs_exactly_one_child():
    from kvtrie.core.trie import merge_with_child

    root, ledger = _trie([1, 2], [1, 2, 3], [1, 2, 4])
    (node,) = root.children.values()
    with pytest.raises(AssertionError, match="exactly one child, node has 2"):
        merge_with_child(node, [], ledger)


def test_remove_leaf_detaches_it_and_refuses_interior_nodes():
    from kvtrie.core.trie import remove_leaf

    root, ledger = _trie([1, 2], [1, 2, 3], [1, 2, 4])
    (node,) = root.children.values()
    with pytest.raises(AssertionError, match="not a leaf"):
        remove_leaf(node, ledger)
    leaf = node.children[3]
    remove_leaf(leaf, ledger)
    assert leaf.parent is None and _ranges(root) == [(0, 2), (2, 3)]
    with pytest.raises(AssertionError, match="root"):
        remove_leaf(root, ledger)


def test_append_extends_a_bare_leaf_in_place_but_not_a_restore_point():
    from kvtrie.core.trie import ByteLedger, Node, append_tokens, as_tokens

    ledger = ByteLedger()
    root = Node(tokens=as_tokens([]), end=0)
    leaf = append_tokens(root, as_tokens([1, 2]), ledger)
    assert append_tokens(leaf, as_tokens([3]), ledger) is leaf and leaf.end == 3
    leaf.children[9] = Node(tokens=as_tokens([9]), end=4, parent=leaf)
    child = append_tokens(leaf, as_tokens([4, 5]), ledger)
    assert child is not leaf and (child.start, child.end) == (3, 5)


def test_every_structural_change_is_heard_by_the_ledger_listeners():
    from kvtrie.core.trie import as_tokens, split_node

    root, ledger = _trie([1, 2, 3])
    heard = []
    ledger.listeners.append(heard.append)
    (node,) = root.children.values()
    parent = split_node(node, 1, [], ledger)
    assert {id(parent), id(node), id(root)} <= {id(n) for n in heard}
    assert as_tokens([1]).tolist() == parent.tokens.tolist()
