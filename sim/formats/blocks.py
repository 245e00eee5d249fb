"""Hash-id blocks shared by the hashed formats: id checks, the block-count rule, and ids made
dense so every format's ids expand into distinct tokens.

A hashed prompt of ``length`` tokens has ``ceil(length / B)`` ids under the ``ceil``
convention (the last, partial block has an id) and ``floor(length / B)`` under ``floor`` (the
tail is not hashed). An unhashed tail is content nobody else shares, so a reader gives it an id
of its own (:meth:`BlockIds.private`); every prompt then expands by the ``ceil`` rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..traces import fail, short

__all__ = ["BlockIds", "check_block_count", "check_hash_ids", "expected_blocks", "id_limit"]


def id_limit(block_size: int) -> int:
    """Ids expand to positions ``id * block_size + k``, which must fit in 63 bits."""
    return (1 << 63) // block_size


def expected_blocks(length: int, block_size: int, convention: str) -> int:
    if convention == "ceil":
        return -(-length // block_size)
    return length // block_size


def check_hash_ids(
    value: Any, name: str, path: Path, line: int | None, where: str, limit: int
) -> list[int]:
    """A list of non-negative integer ids below ``limit``, or a TraceError naming the entry."""
    if not isinstance(value, list):
        raise fail(path, line, f"{where}{name} must be a list of integers, got {short(value)}")
    for i, hid in enumerate(value):
        if isinstance(hid, bool) or not isinstance(hid, int) or not 0 <= hid < limit:
            raise fail(
                path,
                line,
                f"{where}{name}[{i}] must be an integer in [0, {_power(limit)}), got {short(hid)}",
            )
    return value


def _power(limit: int) -> str:
    """``2**54`` rather than its 17 digits, when it is a power of two."""
    return f"2**{limit.bit_length() - 1}" if limit & (limit - 1) == 0 else str(limit)


def check_block_count(
    ids: list[int],
    length: int,
    block_size: int,
    convention: str,
    path: Path,
    line: int | None,
    where: str = "",
    length_name: str = "input_length",
) -> None:
    want = expected_blocks(length, block_size, convention)
    if len(ids) != want:
        rule = "ceil" if convention == "ceil" else "floor"
        raise fail(
            path,
            line,
            f"{where}{len(ids)} hash ids for {length_name} {length}: expected {want} blocks of "
            f"{block_size} tokens ({rule} convention; --block-size and --block-convention "
            "set another)",
        )


class BlockIds:
    """Dense ids: each (namespace, raw id) pair gets the next integer, so ids that are only
    unique within a file, or 64-bit hashes, expand into distinct tokens; private ids name
    unhashed tails."""

    def __init__(self) -> None:
        self._ids: dict[tuple[str, int], int] = {}

    def of(self, namespace: str, raw: list[int]) -> list[int]:
        table = self._ids
        out = []
        for hid in raw:
            key = (namespace, hid)
            dense = table.get(key)
            if dense is None:
                dense = table[key] = len(table)
            out.append(dense)
        return out

    def private(self) -> int:
        key = ("", -len(self._ids) - 1)  # no raw id is negative: never shared
        dense = self._ids[key] = len(self._ids)
        return dense
