"""The Mooncake trace and the superset serving benchmarks read.

One JSON object a line: ``input_length``, ``output_length``, ``hash_ids`` (one id a block of
``--block-size`` tokens, 512 by default), and ``timestamp`` (ms). The superset adds
``session_id`` (the conversation) and ``delay`` (ms after the session's previous turn, for a
line without a timestamp). Mooncake's own files hash the partial last block (``ceil``); some
tools leave it unhashed (``floor``). Ids are kept as they are, so a Mooncake replay expands
into the same tokens it always has.
"""

from __future__ import annotations

from pathlib import Path

from ..traces import (
    MOONCAKE_BLOCK,
    ReadOptions,
    Request,
    Trace,
    check_int,
    check_number,
    fail,
    short,
)
from .blocks import check_block_count, check_hash_ids, id_limit

__all__ = ["parse_mooncake"]

FIELDS = ("input_length", "output_length", "hash_ids")


def parse_mooncake(path: Path, lines: list[tuple[int, dict]], options: ReadOptions) -> Trace:
    block = options.block_size or MOONCAKE_BLOCK
    convention = options.block_convention or "ceil"
    limit = id_limit(block)
    requests: list[Request] = []
    last_stamp = float("-inf")
    last_arrival = 0.0
    sessions: dict[str, float] = {}  # a session's previous arrival
    tails: list[Request] = []  # floor convention: requests whose tail needs an id of its own
    for index, (number, obj) in enumerate(lines):
        for key in FIELDS:
            if key not in obj:
                raise fail(path, number, f"missing field {key!r}")
        session = obj.get("session_id")
        if session is not None and (isinstance(session, bool) or not isinstance(session, (str, int))):
            raise fail(path, number, f"session_id must be a string or integer, got {short(session)}")
        delay = check_number(obj.get("delay", 0), "delay", path, number)
        if "timestamp" in obj:
            stamp = check_number(obj["timestamp"], "timestamp", path, number)
            if stamp < last_stamp:
                raise fail(
                    path, number, f"timestamp {stamp:g} is before the previous line's {last_stamp:g}"
                )
            last_stamp = arrival = stamp
        elif session is not None and str(session) in sessions:
            arrival = sessions[str(session)] + delay
        else:
            arrival = last_arrival + delay
        length = check_int(obj["input_length"], "input_length", path, number, minimum=1)
        output = check_int(obj["output_length"], "output_length", path, number)
        ids = check_hash_ids(obj["hash_ids"], "hash_ids", path, number, "", limit)
        check_block_count(ids, length, block, convention, path, number)
        conversation = str(session) if session is not None else ""
        if session is not None:
            sessions[conversation] = arrival
        last_arrival = arrival
        request = Request(
            id=str(index),
            conversation=conversation,
            arrival_ms=arrival,
            line=number,
            hash_ids=tuple(ids),
            input_length=length,
            block_size=block,
            outputs=output,
        )
        if len(ids) * block < length:
            tails.append(request)
        requests.append(request)
    if tails:
        fresh = max((max(r.hash_ids, default=-1) for r in requests), default=-1) + 1
        if fresh + len(tails) > limit:
            raise fail(path, None, f"no room for tail ids above the largest hash id {fresh - 1}")
        for offset, request in enumerate(tails):
            request.hash_ids = (*request.hash_ids, fresh + offset)
    requests.sort(key=lambda r: r.arrival_ms)  # turns placed by delay may come later in the file
    reading = {"format": "mooncake", "block_size": block, "block_convention": convention}
    return Trace(str(path), "", "mooncake", {}, requests, reading=reading)
