"""A text picture of the trie, like the seed's dumpTree: offsets, tokens, bytes and flags."""

from __future__ import annotations

from .prefix_cache import PrefixCache
from .trie import Node

__all__ = ["format_bytes", "render_trie"]


def format_bytes(n: int | float) -> str:
    """Bytes in binary units: ``512 B``, ``1.5 KiB``, ``8.0 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _label(node: Node, active: set[int]) -> str:
    label = f"[{node.start},{node.end}) {len(node.tokens)}t"
    if node.snapshot_bytes:
        label += " " + format_bytes(node.snapshot_bytes)
    flags = [
        flag
        for flag, on in (
            ("user", node.user),
            ("snap", node.has_all_snapshots()),
            ("active", id(node) in active),
        )
        if on
    ]
    return label + (f" ({', '.join(flags)})" if flags else "")


def render_trie(cache: PrefixCache, max_nodes: int = 200) -> str:
    """The summary line and one line a node, children indented under their parent."""
    active = {id(n) for n in cache.active_path}
    lines: list[str] = []
    count = snapshots = 0
    stack: list[tuple[Node, str, str]] = [(cache.root, "", "")]
    while stack:
        node, connector, indent = stack.pop()
        count += 1
        snapshots += node.has_all_snapshots()
        if len(lines) < max_nodes:
            lines.append(connector + _label(node, active))
        children = list(node.children.values())
        for i, child in reversed(list(enumerate(children))):
            last = i == len(children) - 1
            stack.append(
                (
                    child,
                    indent + ("`-- " if last else "|-- "),
                    indent + ("    " if last else "|   "),
                )
            )
    if count > len(lines):
        lines.append(f"... {count - len(lines)} more nodes")
    head = (
        f"kv cache live_tokens={cache.live_offset} live={format_bytes(cache.live_bytes)} "
        f"paged_out={format_bytes(cache.paged_out_bytes)} nodes={count} snapshots={snapshots}"
    )
    return "\n".join([head, *lines])
