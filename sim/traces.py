"""Trace formats: kvtrie JSONL and the Mooncake trace, read with errors that name file and line.

A kvtrie trace (see ``traces/README.md``) is a header line, then one request a line. A prompt
may start with the first ``prefix_length`` tokens of an earlier request's prompt and outputs
(``prefix_of``), so a conversation's turns and branches stay small on disk. Mooncake lines
(``timestamp``, ``input_length``, ``output_length``, ``hash_ids``) are detected automatically;
each hash id expands to 512 deterministic tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvtrie.core.hashing import mix64
from kvtrie.core.trie import as_tokens

from .outputs import write_output

__all__ = [
    "Event",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MOONCAKE_BLOCK",
    "expand_blocks",
    "Request",
    "Trace",
    "TraceError",
    "load_trace",
    "read_header",
    "resolve_prompt",
    "trace_from_lines",
    "write_trace",
]

FORMAT_NAME = "kvtrie-trace"
FORMAT_VERSION = 1
MOONCAKE_BLOCK = 512
# Longer than any model's context today (10 M tokens); a length past it is a broken trace, and
# would take the replayer hours to expand or generate.
MAX_REQUEST_TOKENS = 1 << 24
MAX_HASH_ID = (1 << 63) // MOONCAKE_BLOCK  # ids expand to positions id * 512 + k in 64 bits
# Header keys the replayer reads, and what each must be (others are kept and ignored).
HEADER_TYPES: dict[str, tuple[type, ...]] = {
    "backend": (str,),
    "profile": (str,),
    "policy": (str,),
    "budget_bytes": (int, type(None)),
    "mutant": (str, type(None)),
    "vocab_size": (int,),
}


class TraceError(ValueError):
    """Bad trace input, located by file and line."""

    def __init__(self, path: Path | str, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


EVENT_KINDS = ("budget", "fail_restores", "corrupt")


@dataclass(frozen=True)
class Event:
    """Something done to the cache between requests: a budget change or an injected fault."""

    kind: str
    line: int
    budget_bytes: int | None = None
    count: int = 0
    start: int = 0
    end: int = 0
    layer: int | None = None  # corrupt: only this layer's snapshot (None: every layer's)

    def as_line(self) -> dict[str, Any]:
        if self.kind == "budget":
            return {"event": "budget", "budget_bytes": self.budget_bytes}
        if self.kind == "fail_restores":
            return {"event": "fail_restores", "count": self.count}
        line: dict[str, Any] = {"event": "corrupt", "start": self.start, "end": self.end}
        if self.layer is not None:
            line["layer"] = self.layer
        return line


@dataclass
class Request:
    """One request: its prompt (own tokens, or a prefix of an earlier request plus tokens, or
    Mooncake hash blocks) and its outputs (tokens, or a count to generate)."""

    id: str
    conversation: str
    arrival_ms: float
    line: int
    tokens: np.ndarray | None = None
    prefix_of: str | None = None
    prefix_length: int = 0
    hash_ids: tuple[int, ...] = ()
    input_length: int = 0
    outputs: list[int] | int = 0
    user_snapshots: tuple[int, ...] = ()
    events: tuple[Event, ...] = ()  # applied just before this request

    @property
    def prompt_length(self) -> int:
        if self.hash_ids:
            return self.input_length
        own = len(self.tokens) if self.tokens is not None else 0
        return self.prefix_length + own

    @property
    def output_length(self) -> int:
        return self.outputs if isinstance(self.outputs, int) else len(self.outputs)


@dataclass
class Trace:
    path: str
    sha256: str
    format: str
    header: dict[str, Any]
    requests: list[Request]
    referenced: set[str] = field(default_factory=set)
    trailing_events: tuple[Event, ...] = ()  # applied after the last request

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_length for r in self.requests)


def _fail(path: Path, line: int | None, message: str) -> TraceError:
    return TraceError(path, line, message)


def _int(
    value: Any,
    name: str,
    path: Path,
    line: int,
    minimum: int = 0,
    maximum: int = MAX_REQUEST_TOKENS,
) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, line, f"{name} must be an integer, got {_short(value)}")
    if value < minimum:
        raise _fail(path, line, f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        raise _fail(path, line, f"{name} must be <= {maximum:,}, got {_short(value)}")
    return value


def _short(value: Any) -> str:
    """A value for an error message, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _token_list(value: Any, name: str, path: Path, line: int, vocab: int | None) -> np.ndarray:
    if not isinstance(value, list):
        raise _fail(path, line, f"{name} must be a list of token ids, got {type(value).__name__}")
    if len(value) > MAX_REQUEST_TOKENS:
        raise _fail(path, line, f"{name} has {len(value):,} tokens, over {MAX_REQUEST_TOKENS:,}")
    for i, token in enumerate(value):
        if isinstance(token, bool) or not isinstance(token, int):
            raise _fail(path, line, f"{name}[{i}] is not a token id: {_short(token)}")
        if token < 0 or (vocab is not None and token >= vocab):
            if vocab is None:
                raise _fail(path, line, f"{name}[{i}] = {token} is not a token id (>= 0)")
            raise _fail(
                path,
                line,
                f"{name}[{i}] = {token} is outside the model's vocabulary [0, {vocab}); "
                f"kvtrie gen KIND --vocab-size {vocab} writes a trace for this model",
            )
    return as_tokens(value)


def _parse_line(path: Path, number: int, raw: bytes) -> dict[str, Any] | None:
    """One JSONL line as an object (None when blank), or a TraceError naming the line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(
            path, number, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
        ) from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(path, number, f"not JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise _fail(path, number, "JSON nested too deeply to be a trace line") from None
    if not isinstance(obj, dict):
        raise _fail(path, number, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_lines(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            obj = _parse_line(path, number, raw)
            if obj is not None:
                yield number, obj


def _parse_kvtrie(path: Path, lines: list[tuple[int, dict]], vocab: int | None) -> Trace:
    line, header = lines[0]
    if header.get("version") != FORMAT_VERSION:
        raise _fail(
            path,
            line,
            f"unsupported version {header.get('version')!r}; "
            f"this kvtrie reads version {FORMAT_VERSION}",
        )
    if "vocab_size" in header:
        declared = _int(header["vocab_size"], "vocab_size", path, line, minimum=1)
        vocab = declared if vocab is None else min(vocab, declared)
    requests: list[Request] = []
    lengths: dict[str, int] = {}
    referenced: set[str] = set()
    pending: list[Event] = []
    last_arrival = float("-inf")
    for number, obj in lines[1:]:
        if "event" in obj:
            pending.append(_parse_event(path, number, obj))
            continue
        for key in ("id", "prompt"):
            if key not in obj:
                raise _fail(path, number, f"missing field {key!r}")
        rid = str(obj["id"])
        if rid in lengths:
            raise _fail(path, number, f"duplicate request id {rid!r}")
        arrival = obj.get("arrival_ms", last_arrival if requests else 0)
        if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or arrival < 0:
            raise _fail(path, number, f"arrival_ms must be a number >= 0, got {arrival!r}")
        if arrival < last_arrival:
            raise _fail(
                path,
                number,
                f"arrival_ms {arrival} is before the previous request's "
                f"{last_arrival}: requests must be in arrival order",
            )
        last_arrival = arrival
        tokens = _token_list(obj["prompt"], "prompt", path, number, vocab)
        prefix_of = obj.get("prefix_of")
        prefix_length = 0
        if prefix_of is not None:
            prefix_of = str(prefix_of)
            if prefix_of not in lengths:
                raise _fail(path, number, f"prefix_of {prefix_of!r} names no earlier request")
            prefix_length = _int(obj.get("prefix_length"), "prefix_length", path, number)
            if prefix_length > lengths[prefix_of]:
                raise _fail(
                    path,
                    number,
                    f"prefix_length {prefix_length} is longer than request "
                    f"{prefix_of!r} ({lengths[prefix_of]} tokens with its outputs)",
                )
            referenced.add(prefix_of)
        if "output" in obj and "output_length" in obj:
            raise _fail(path, number, "give output or output_length, not both")
        if "output" in obj:
            outputs: list[int] | int = [
                int(t) for t in _token_list(obj["output"], "output", path, number, vocab)
            ]
        else:
            outputs = _int(obj.get("output_length", 0), "output_length", path, number)
        request = Request(
            id=rid,
            conversation=str(obj.get("conversation", rid)),
            arrival_ms=float(arrival),
            line=number,
            tokens=tokens,
            prefix_of=prefix_of,
            prefix_length=prefix_length,
            outputs=outputs,
        )
        if request.prompt_length < 1:
            raise _fail(path, number, "the prompt is empty: a request needs at least one token")
        marks = obj.get("user_snapshots", [])
        if not isinstance(marks, list):
            raise _fail(path, number, f"user_snapshots must be a list of offsets, got {marks!r}")
        for mark in marks:
            _int(mark, "user_snapshots entry", path, number, minimum=1)
            if mark > request.prompt_length:
                raise _fail(
                    path,
                    number,
                    f"user snapshot at {mark} is past the prompt ({request.prompt_length} tokens)",
                )
        request.user_snapshots = tuple(sorted(set(marks)))
        request.events, pending = tuple(pending), []
        lengths[rid] = request.prompt_length + request.output_length
        requests.append(request)
    return Trace(str(path), "", "kvtrie", header, requests, referenced, tuple(pending))


def _parse_event(path: Path, number: int, obj: dict[str, Any]) -> Event:
    kind = obj["event"]
    if kind not in EVENT_KINDS:
        raise _fail(path, number, f"unknown event {kind!r}; events are {', '.join(EVENT_KINDS)}")
    if kind == "budget":
        if "budget_bytes" not in obj:
            raise _fail(path, number, "missing field 'budget_bytes' (null for unbounded)")
        budget = obj["budget_bytes"]
        if budget is not None:
            budget = _int(budget, "budget_bytes", path, number, maximum=(1 << 63) - 1)
        return Event(kind, number, budget_bytes=budget)
    if kind == "fail_restores":
        return Event(kind, number, count=_int(obj.get("count"), "count", path, number, 1))
    start = _int(obj.get("start"), "start", path, number)
    end = _int(obj.get("end"), "end", path, number, minimum=start + 1)
    layer = obj.get("layer")
    if layer is not None:
        layer = _int(layer, "layer", path, number)
    return Event(kind, number, start=start, end=end, layer=layer)


def _parse_mooncake(path: Path, lines: list[tuple[int, dict]]) -> Trace:
    requests = []
    last = float("-inf")
    for index, (number, obj) in enumerate(lines):
        for key in ("timestamp", "input_length", "output_length", "hash_ids"):
            if key not in obj:
                raise _fail(path, number, f"missing field {key!r}")
        stamp = obj["timestamp"]
        if isinstance(stamp, bool) or not isinstance(stamp, (int, float)) or stamp < 0:
            raise _fail(path, number, f"timestamp must be a number >= 0, got {stamp!r}")
        if stamp < last:
            raise _fail(path, number, f"timestamp {stamp} is before the previous line's {last}")
        last = stamp
        length = _int(obj["input_length"], "input_length", path, number, minimum=1)
        output = _int(obj["output_length"], "output_length", path, number)
        ids = obj["hash_ids"]
        if not isinstance(ids, list) or not ids:
            raise _fail(path, number, f"hash_ids must be a non-empty list, got {ids!r}")
        for i, hid in enumerate(ids):
            if isinstance(hid, bool) or not isinstance(hid, int) or not 0 <= hid < MAX_HASH_ID:
                raise _fail(
                    path,
                    number,
                    f"hash_ids[{i}] must be an integer in [0, 2**54), got {_short(hid)}",
                )
        blocks = -(-length // MOONCAKE_BLOCK)
        if len(ids) != blocks:
            raise _fail(
                path,
                number,
                f"{len(ids)} hash ids for input_length {length}: expected "
                f"{blocks} blocks of {MOONCAKE_BLOCK} tokens",
            )
        requests.append(
            Request(
                id=str(index),
                conversation="",
                arrival_ms=float(stamp),
                line=number,
                hash_ids=tuple(ids),
                input_length=length,
                outputs=output,
            )
        )
    return Trace(str(path), "", "mooncake", {}, requests)


def read_header(path: Path | str) -> dict[str, Any]:
    """The header of a kvtrie trace, its keys the replayer reads checked (empty for a
    Mooncake trace); a TraceError for an unreadable file or a header value of the wrong
    type."""
    path = Path(path)
    _check_file(path)
    with open(path, "rb") as handle:
        first = _parse_line(path, 1, handle.readline()) or {}
    if first.get("format") != FORMAT_NAME:
        return {}
    for key, types in HEADER_TYPES.items():
        value = first.get(key)
        if key in first and (isinstance(value, bool) or not isinstance(value, types)):
            kinds = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise _fail(path, 1, f"header {key}: expected {kinds}, got {_short(value)}")
    return first


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise _fail(path, None, "is a directory, not a trace file")
    if not path.is_file():
        raise _fail(path, None, "no such trace file")


def trace_from_lines(name: str, header: dict[str, Any], requests: list[dict[str, Any]]) -> Trace:
    """A kvtrie trace held in memory (a generator's output), validated as a file would be."""
    head = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **header}
    lines = list(enumerate([head, *requests], start=1))
    return _parse_kvtrie(Path(name), lines, None)


def load_trace(path: Path | str, vocab_size: int | None = None) -> Trace:
    """Read and validate a trace; the format is detected from its first line."""
    path = Path(path)
    _check_file(path)
    lines = list(_read_lines(path))
    if not lines:
        raise _fail(path, None, "the trace is empty")
    first_line, first = lines[0]
    if first.get("format") == FORMAT_NAME:
        trace = _parse_kvtrie(path, lines, vocab_size)
    elif "hash_ids" in first:
        trace = _parse_mooncake(path, lines)
    else:
        raise _fail(
            path,
            first_line,
            f"unknown trace format: expected a header with "
            f'"format": "{FORMAT_NAME}" or Mooncake lines with hash_ids',
        )
    trace.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return trace


def write_trace(
    path: Path | str, header: dict[str, Any], requests: Iterable[dict[str, Any]]
) -> None:
    """Write a kvtrie JSONL trace (by :func:`~kvtrie.sim.outputs.write_output`'s rules)."""
    head = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **header}
    lines = [json.dumps(head)] + [json.dumps(r, separators=(",", ":")) for r in requests]
    write_output(path, "\n".join(lines) + "\n")


def expand_blocks(hash_ids: tuple[int, ...], length: int, vocab_size: int) -> np.ndarray:
    """Mooncake blocks as tokens: block id h gives 512 tokens drawn from (h, position), so equal
    ids give equal tokens and different ids differ; the last block is cut to ``length``."""
    ids = np.asarray(hash_ids, dtype=np.int64)
    positions = (ids[:, None] * MOONCAKE_BLOCK + np.arange(MOONCAKE_BLOCK)).reshape(-1)[:length]
    return ((mix64(positions, 0xB10C) >> np.uint64(16)) % np.uint64(vocab_size)).astype(np.int32)


def resolve_prompt(request: Request, history: dict[str, np.ndarray], vocab_size: int) -> np.ndarray:
    """The request's prompt tokens: Mooncake blocks, or an earlier request's prefix (looked up
    in ``history``: prompt and outputs by id) followed by its own tokens."""
    if request.hash_ids:
        return expand_blocks(request.hash_ids, request.input_length, vocab_size)
    own = request.tokens if request.tokens is not None else np.empty(0, dtype=np.int32)
    if request.prefix_of is None:
        return own
    return np.concatenate([history[request.prefix_of][: request.prefix_length], own])
