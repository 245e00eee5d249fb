"""Alibaba's Bailian usage traces (qwen-bailian-usagetraces-anon).

One JSON object a line: ``chat_id``, ``parent_chat_id`` (-1 for the first turn of a chat;
otherwise an earlier line's ``chat_id``), ``timestamp`` (seconds), ``input_length``,
``output_length``, ``turn``, ``type`` and ``hash_ids``, one salted hash a 16-token block. A
chat's turns form a chain from its root; the root's ``chat_id`` names the conversation.
Hashes are 64-bit, so they are made dense before they expand into tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..traces import ReadOptions, Request, Trace, check_int, check_number, fail, short
from .blocks import BlockIds, check_block_count, check_hash_ids

__all__ = ["BAILIAN_BLOCK", "parse_bailian"]

BAILIAN_BLOCK = 16
FIELDS = ("chat_id", "timestamp", "input_length", "output_length", "hash_ids")


def _chat_id(value: Any, name: str, path: Path, number: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise fail(path, number, f"{name} must be an integer or string, got {short(value)}")
    return str(value)


def parse_bailian(path: Path, lines: list[tuple[int, dict]], options: ReadOptions) -> Trace:
    block = options.block_size or BAILIAN_BLOCK
    convention = options.block_convention or "ceil"
    dense = BlockIds()
    roots: dict[str, str] = {}  # chat_id -> the chat_id of its chain's first turn
    requests: list[Request] = []
    last = float("-inf")
    for number, obj in lines:
        for key in FIELDS:
            if key not in obj:
                raise fail(path, number, f"missing field {key!r}")
        chat = _chat_id(obj["chat_id"], "chat_id", path, number)
        if chat in roots:
            raise fail(path, number, f"duplicate chat_id {chat}")
        parent = obj.get("parent_chat_id", -1)
        if parent in (-1, "-1"):
            roots[chat] = chat
        else:
            parent = _chat_id(parent, "parent_chat_id", path, number)
            if parent not in roots:
                raise fail(
                    path,
                    number,
                    f"parent_chat_id {parent} names no earlier chat_id: a chain's turns must "
                    "come in order, parent first (-1 marks a first turn)",
                )
            roots[chat] = roots[parent]
        stamp = check_number(obj["timestamp"], "timestamp", path, number, " of seconds")
        if stamp < last:
            raise fail(path, number, f"timestamp {stamp:g} is before the previous line's {last:g}")
        last = stamp
        if "turn" in obj:
            check_int(obj["turn"], "turn", path, number, minimum=1)
        if "type" in obj and not isinstance(obj["type"], str):
            raise fail(path, number, f"type must be a string, got {short(obj['type'])}")
        length = check_int(obj["input_length"], "input_length", path, number, minimum=1)
        output = check_int(obj["output_length"], "output_length", path, number)
        ids = check_hash_ids(obj["hash_ids"], "hash_ids", path, number, "", 1 << 64)
        check_block_count(ids, length, block, convention, path, number)
        hashed = dense.of("", ids)
        if len(ids) * block < length:
            hashed.append(dense.private())
        requests.append(
            Request(
                id=chat,
                conversation=roots[chat],
                arrival_ms=stamp * 1000.0,
                line=number,
                hash_ids=tuple(hashed),
                input_length=length,
                block_size=block,
                outputs=output,
            )
        )
    reading = {"format": "bailian", "block_size": block, "block_convention": convention}
    return Trace(str(path), "", "bailian", {}, requests, reading=reading)
