"""kv-cache-tester's agentic traces: one recorded coding-agent conversation a JSON file.

A file holds ``block_size`` (64), ``hash_id_scope`` (``local``: ids mean something only
within the file, so each file's ids get a namespace of their own) and ``requests``: model calls
(``t`` seconds since the conversation started, ``in``, ``out``, ``hash_ids`` with one id a FULL
block, so the tail is unhashed: the ``floor`` convention, and ``api_time``/``think_time``) and
``subagent`` entries, nested agents whose own requests count ``t`` from the subagent's start.
Each subagent is a conversation of its own. The files do not say how conversations overlap:
they start all at once, by a seeded Poisson process (``sessions_per_hour``), or
``concurrency`` at a time, each next one when a running one ends; the trace records which.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..traces import ReadOptions, Request, Trace, check_int, check_number, fail, short
from .blocks import BlockIds, check_block_count, check_hash_ids

__all__ = ["AGENTIC_BLOCK", "is_agentic", "load_agentic"]

AGENTIC_BLOCK = 64


def is_agentic(first: dict[str, Any]) -> bool:
    """A file's object is an agentic conversation when it holds a list of requests."""
    return isinstance(first.get("requests"), list)


@dataclass
class _Call:
    t: float
    obj: dict[str, Any]
    where: str


@dataclass
class _Conversation:
    name: str
    namespace: str
    block_size: int
    path: Path
    offset: float  # seconds after its file's conversation started
    calls: list[_Call] = field(default_factory=list)

    def end(self) -> float:
        last = self.calls[-1]
        api = _seconds(last.obj.get("api_time"), "api_time", self.path, last.where) or 0.0
        return self.offset + last.t + api


def _seconds(value: Any, name: str, path: Path, where: str) -> float | None:
    """An optional time of a request (``t``, ``api_time``, ``think_time``)."""
    return None if value is None else check_number(value, f"{where}{name}", path, None, " of seconds")


def _walk(
    path: Path,
    requests: Any,
    conversation: _Conversation,
    where: str,
    out: list[_Conversation],
) -> None:
    """The model calls of one (sub)agent into ``conversation``, its subagents as their own."""
    if not isinstance(requests, list) or not requests:
        raise fail(path, None, f"{where}requests must be a non-empty list, got {short(requests)}")
    out.append(conversation)
    last = 0.0
    for i, obj in enumerate(requests):
        here = f"{where}requests[{i}]."
        if not isinstance(obj, dict):
            raise fail(path, None, f"{here[:-1]} must be an object, got {short(obj)}")
        t = _seconds(obj.get("t"), "t", path, here)
        if t is None:
            raise fail(path, None, f"{here}t is missing")
        if obj.get("type") == "subagent":
            name = obj.get("agent_id", f"sub{i}")
            sub = _Conversation(
                f"{conversation.name}/{name}",
                conversation.namespace,
                conversation.block_size,
                path,
                conversation.offset + t,
            )
            if "requests" not in obj:
                raise fail(path, None, f"{here}requests is missing: a subagent needs requests")
            _walk(path, obj["requests"], sub, here, out)
            continue
        if t < last:
            raise fail(path, None, f"{here}t {t:g} is before the previous request's {last:g}")
        last = t
        conversation.calls.append(_Call(t, obj, here))
    if not conversation.calls:
        raise fail(path, None, f"{where}requests holds only subagents: no model call")


def _read_file(path: Path, options: ReadOptions) -> list[_Conversation]:
    try:
        obj = json.loads(path.read_bytes())
    except UnicodeDecodeError:
        raise fail(path, None, "not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise fail(path, exc.lineno, f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict) or "requests" not in obj:
        raise fail(path, None, "expected a JSON object with requests (an agentic trace)")
    block = options.block_size or check_int(
        obj.get("block_size", AGENTIC_BLOCK), "block_size", path, None, minimum=1
    )
    scope = obj.get("hash_id_scope", "local")
    if scope not in ("local", "global"):
        raise fail(path, None, f"hash_id_scope must be local or global, got {short(scope)}")
    name = str(obj.get("id", path.stem))
    namespace = str(path.resolve()) if scope == "local" else ""
    out: list[_Conversation] = []
    _walk(path, obj["requests"], _Conversation(name, namespace, block, path, 0.0), "", out)
    return out


def _starts(files: list[list[_Conversation]], options: ReadOptions) -> list[float]:
    """When each file's conversation starts, in seconds."""
    n = len(files)
    if options.sessions_per_hour is not None:
        rng = np.random.default_rng(options.arrival_seed)
        gaps = rng.exponential(3600.0 / options.sessions_per_hour, size=n)
        return [0.0] + [float(x) for x in np.cumsum(gaps[1:])]
    if options.concurrency is None:
        return [0.0] * n
    running: list[float] = []  # end times of the conversations in progress
    starts = []
    for conversations in files:
        start = heapq.heappop(running) if len(running) >= options.concurrency else 0.0
        starts.append(start)
        heapq.heappush(running, start + max(c.end() for c in conversations))
    return starts


def _arrival(options: ReadOptions) -> dict[str, Any]:
    if options.sessions_per_hour is not None:
        return {"process": "poisson", "sessions_per_hour": options.sessions_per_hour,
                "seed": options.arrival_seed}
    if options.concurrency is not None:
        return {"process": "concurrency", "concurrency": options.concurrency}
    return {"process": "all-at-once"}


def load_agentic(path: Path, options: ReadOptions) -> Trace:
    """One agentic file, or every ``*.json`` file of a directory (in name order)."""
    paths = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not paths:
        raise fail(
            path, None, "is a directory with no *.json files: not a trace (a folder of "
            "agentic conversation files is one)"
        )
    files = [_read_file(p, options) for p in paths]
    convention = options.block_convention or "floor"
    dense = BlockIds()
    requests: list[Request] = []
    for start, conversations in zip(_starts(files, options), files):
        for conversation in conversations:
            block = conversation.block_size
            for index, call in enumerate(conversation.calls):
                obj, where, where_path = call.obj, call.where, conversation.path
                length = _count(obj, "in", where_path, where, 1)
                output = _count(obj, "out", where_path, where, 0)
                ids = check_hash_ids(obj.get("hash_ids"), "hash_ids", where_path, None, where, 1 << 64)
                check_block_count(ids, length, block, convention, where_path, None, where, "in")
                hashed = dense.of(conversation.namespace, ids)
                if len(ids) * block < length:
                    hashed.append(dense.private())
                requests.append(
                    Request(
                        id=f"{conversation.name}#{index}",
                        conversation=conversation.name,
                        arrival_ms=(start + conversation.offset + call.t) * 1000.0,
                        line=index,
                        hash_ids=tuple(hashed),
                        input_length=length,
                        block_size=block,
                        outputs=output,
                        api_s=_seconds(obj.get("api_time"), "api_time", where_path, where),
                        think_s=_seconds(obj.get("think_time"), "think_time", where_path, where),
                    )
                )
    requests.sort(key=lambda r: r.arrival_ms)
    reading = {
        "format": "agentic",
        "files": len(paths),
        "block_convention": convention,
        "arrival": _arrival(options),
    }
    if options.block_size is not None:
        reading["block_size"] = options.block_size
    return Trace(str(path), "", "agentic", {}, requests, reading=reading)


def _count(obj: dict[str, Any], name: str, path: Path, where: str, minimum: int) -> int:
    if name not in obj:
        raise fail(path, None, f"{where}{name} is missing")
    return check_int(obj[name], f"{where}{name}", path, None, minimum)
