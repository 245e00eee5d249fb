"""Traces: the request stream the replayer reads, the kvtrie JSONL format, and the one place
that picks a reader for a file (the hashed formats are in ``formats/``).

A kvtrie trace (see ``traces/README.md``) is a header line, then one request a line. A prompt
may start with the first ``prefix_length`` tokens of an earlier request's prompt and outputs
(``prefix_of``), so a conversation's turns and branches stay small on disk. The published
formats (Mooncake, Bailian, kv-cache-tester's agentic traces) give prompts as hash ids of
token blocks; each id expands to a block of deterministic tokens, so equal ids give equal
tokens and every reader feeds the replayer the same kind of request.
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
    "FORMATS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MOONCAKE_BLOCK",
    "check_int",
    "check_number",
    "expand_blocks",
    "fail",
    "ReadOptions",
    "Request",
    "Trace",
    "TraceError",
    "load_trace",
    "read_header",
    "read_lines",
    "resolve_prompt",
    "short",
    "trace_from_lines",
    "write_trace",
]

FORMAT_NAME = "kvtrie-trace"
FORMAT_VERSION = 1
MOONCAKE_BLOCK = 512
FORMATS = ("auto", "kvtrie", "mooncake", "bailian", "agentic")
# Longer than any model's context today (10 M tokens); a length past it is a broken trace, and
# would take the replayer hours to expand or generate.
MAX_REQUEST_TOKENS = 1 << 24
# Header keys the replayer reads, and what each must be (others are kept and ignored).
HEADER_TYPES: dict[str, tuple[type, ...]] = {
    "backend": (str,),
    "profile": (str,),
    "policy": (str,),
    "budget_bytes": (int, type(None)),
    "disk_budget_bytes": (int, type(None)),  # present: a disk tier of this budget (null: inf)
    "budget_counts_live": (bool,),
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


EVENT_KINDS = (
    "budget",
    "disk_budget",
    "fail_restores",
    "fail_writes",
    "corrupt",
    "truncate",
    "restart",
)
DISK_EVENTS = ("disk_budget", "fail_writes", "truncate", "restart")  # they need a disk tier


@dataclass(frozen=True)
class Event:
    """Something done to the cache between requests: a change of the RAM or the disk tier's
    budget, an injected fault (failing restores, failing disk-tier writes, a snapshot
    damaged in place, in RAM or on disk, a disk-tier one cut short), or a restart (the process
    stops and a new one opens the same disk tier)."""

    kind: str
    line: int
    budget_bytes: int | None = None
    count: int = 0
    start: int = 0
    end: int = 0
    layer: int | None = None  # corrupt: only this layer's snapshot (None: every layer's)
    clean: bool = True  # restart: a clean stop (RAM kept on disk), or a crash (RAM lost)

    def as_line(self) -> dict[str, Any]:
        if self.kind in ("budget", "disk_budget"):
            return {"event": self.kind, "budget_bytes": self.budget_bytes}
        if self.kind in ("fail_restores", "fail_writes"):
            return {"event": self.kind, "count": self.count}
        if self.kind == "restart":
            return {"event": "restart", "clean": self.clean}
        line: dict[str, Any] = {"event": self.kind, "start": self.start, "end": self.end}
        if self.layer is not None:
            line["layer"] = self.layer
        return line


@dataclass(frozen=True)
class ReadOptions:
    """How to read a trace where its file does not say: the format (``auto`` detects it), the
    tokens one hash id stands for and whether a partial last block has an id (``ceil``) or
    not (``floor``), and when conversations of a conversation-per-file trace start (all at
    once, ``sessions_per_hour`` by a seeded Poisson process, or ``concurrency`` at a time).
    The report records the options used, so a replay can be repeated."""

    format: str = "auto"
    block_size: int | None = None
    block_convention: str | None = None
    sessions_per_hour: float | None = None
    concurrency: int | None = None
    arrival_seed: int = 0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"--format: choose one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.block_size is not None and not 1 <= self.block_size <= 1 << 20:
            raise ValueError(f"--block-size must be in [1, 1048576], got {self.block_size}")
        if self.block_convention not in (None, "ceil", "floor"):
            raise ValueError(
                f"--block-convention: choose ceil or floor, got {self.block_convention!r}"
            )
        if self.sessions_per_hour is not None and not self.sessions_per_hour > 0:
            raise ValueError(f"--sessions-per-hour must be > 0, got {self.sessions_per_hour}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.sessions_per_hour is not None and self.concurrency is not None:
            raise ValueError("give --sessions-per-hour or --concurrency, not both")


@dataclass
class Request:
    """One request: its prompt (own tokens, or a prefix of an earlier request plus tokens, or
    hash ids of ``block_size``-token blocks) and its outputs (tokens, or a count to generate).
    ``api_s``/``think_s`` are the seconds a recorded server took and its client waited, kept
    for a time model."""

    id: str
    conversation: str
    arrival_ms: float
    line: int
    tokens: np.ndarray | None = None
    prefix_of: str | None = None
    prefix_length: int = 0
    hash_ids: tuple[int, ...] = ()
    input_length: int = 0
    block_size: int = MOONCAKE_BLOCK
    outputs: list[int] | int = 0
    user_snapshots: tuple[int, ...] = ()
    events: tuple[Event, ...] = ()  # applied just before this request
    api_s: float | None = None
    think_s: float | None = None

    @property
    def hashed(self) -> bool:
        """A prompt given as hash ids (``input_length`` tokens) rather than tokens."""
        return self.input_length > 0

    @property
    def prompt_length(self) -> int:
        if self.hashed:
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
    reading: dict[str, Any] = field(default_factory=dict)  # how a hashed trace was read

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_length for r in self.requests)


def fail(path: Path, line: int | None, message: str) -> TraceError:
    """The error every reader raises: file, line (None for a whole-file or a JSON-path
    problem) and what is wrong."""
    return TraceError(path, line, message)


def check_int(
    value: Any,
    name: str,
    path: Path,
    line: int | None,
    minimum: int = 0,
    maximum: int = MAX_REQUEST_TOKENS,
) -> int:
    """``value`` as an integer in [minimum, maximum], or a TraceError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(path, line, f"{name} must be an integer, got {short(value)}")
    if value < minimum:
        raise fail(path, line, f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        raise fail(path, line, f"{name} must be <= {maximum:,}, got {short(value)}")
    return value


def check_number(
    value: Any, name: str, path: Path, line: int | None, unit: str = ""
) -> float:
    """``value`` as a number >= 0 (a time: ``unit`` says which, e.g. " of seconds"), or a
    TraceError naming ``name``; NaN is no number here."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise fail(path, line, f"{name} must be a number{unit} >= 0, got {short(value)}")
    return float(value)


def short(value: Any) -> str:
    """A value for an error message, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _token_list(value: Any, name: str, path: Path, line: int, vocab: int | None) -> np.ndarray:
    if not isinstance(value, list):
        raise fail(path, line, f"{name} must be a list of token ids, got {type(value).__name__}")
    if len(value) > MAX_REQUEST_TOKENS:
        raise fail(path, line, f"{name} has {len(value):,} tokens, over {MAX_REQUEST_TOKENS:,}")
    for i, token in enumerate(value):
        if isinstance(token, bool) or not isinstance(token, int):
            raise fail(path, line, f"{name}[{i}] is not a token id: {short(token)}")
        if token < 0 or (vocab is not None and token >= vocab):
            if vocab is None:
                raise fail(path, line, f"{name}[{i}] = {token} is not a token id (>= 0)")
            raise fail(
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
        raise fail(
            path, number, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
        ) from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(path, number, f"not JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise fail(path, number, "JSON nested too deeply to be a trace line") from None
    if not isinstance(obj, dict):
        raise fail(path, number, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def read_lines(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """The JSON objects of a JSONL file with their line numbers (blank lines skipped)."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            obj = _parse_line(path, number, raw)
            if obj is not None:
                yield number, obj


def _parse_kvtrie(path: Path, lines: list[tuple[int, dict]], vocab: int | None) -> Trace:
    line, header = lines[0]
    if header.get("version") != FORMAT_VERSION:
        raise fail(
            path,
            line,
            f"unsupported version {header.get('version')!r}; "
            f"this kvtrie reads version {FORMAT_VERSION}",
        )
    if "vocab_size" in header:
        declared = check_int(header["vocab_size"], "vocab_size", path, line, minimum=1)
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
                raise fail(path, number, f"missing field {key!r}")
        rid = str(obj["id"])
        if rid in lengths:
            raise fail(path, number, f"duplicate request id {rid!r}")
        arrival = obj.get("arrival_ms", last_arrival if requests else 0)
        check_number(arrival, "arrival_ms", path, number)
        if arrival < last_arrival:
            raise fail(
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
                raise fail(path, number, f"prefix_of {prefix_of!r} names no earlier request")
            prefix_length = check_int(obj.get("prefix_length"), "prefix_length", path, number)
            if prefix_length > lengths[prefix_of]:
                raise fail(
                    path,
                    number,
                    f"prefix_length {prefix_length} is longer than request "
                    f"{prefix_of!r} ({lengths[prefix_of]} tokens with its outputs)",
                )
            referenced.add(prefix_of)
        if "output" in obj and "output_length" in obj:
            raise fail(path, number, "give output or output_length, not both")
        if "output" in obj:
            outputs: list[int] | int = [
                int(t) for t in _token_list(obj["output"], "output", path, number, vocab)
            ]
        else:
            outputs = check_int(obj.get("output_length", 0), "output_length", path, number)
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
            raise fail(path, number, "the prompt is empty: a request needs at least one token")
        marks = obj.get("user_snapshots", [])
        if not isinstance(marks, list):
            raise fail(path, number, f"user_snapshots must be a list of offsets, got {marks!r}")
        for mark in marks:
            check_int(mark, "user_snapshots entry", path, number, minimum=1)
            if mark > request.prompt_length:
                raise fail(
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
        raise fail(path, number, f"unknown event {kind!r}; events are {', '.join(EVENT_KINDS)}")
    if kind in ("budget", "disk_budget"):
        if "budget_bytes" not in obj:
            raise fail(path, number, "missing field 'budget_bytes' (null for unbounded)")
        budget = obj["budget_bytes"]
        if budget is not None:
            budget = check_int(budget, "budget_bytes", path, number, maximum=(1 << 63) - 1)
        return Event(kind, number, budget_bytes=budget)
    if kind in ("fail_restores", "fail_writes"):
        return Event(kind, number, count=check_int(obj.get("count"), "count", path, number, 1))
    if kind == "restart":
        clean = obj.get("clean", True)
        if not isinstance(clean, bool):
            raise fail(path, number, f"clean: expected true or false, got {short(clean)}")
        return Event(kind, number, clean=clean)
    start = check_int(obj.get("start"), "start", path, number)
    end = check_int(obj.get("end"), "end", path, number, minimum=start + 1)
    layer = obj.get("layer")
    if layer is not None:
        layer = check_int(layer, "layer", path, number)
    return Event(kind, number, start=start, end=end, layer=layer)


def read_header(path: Path | str) -> dict[str, Any]:
    """The header of a kvtrie trace, its keys the replayer reads checked (empty for the
    hashed formats, which have none); a TraceError for an unreadable file or a header value of the wrong
    type."""
    path = Path(path)
    if path.is_dir():  # a folder of agentic files: no header
        return {}
    _check_file(path)
    with open(path, "rb") as handle:
        first = _parse_line(path, 1, handle.readline()) or {}
    if first.get("format") != FORMAT_NAME:
        return {}
    for key, types in HEADER_TYPES.items():
        value = first.get(key)
        wrong_bool = isinstance(value, bool) and bool not in types  # bool is an int too
        if key in first and (wrong_bool or not isinstance(value, types)):
            kinds = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise fail(path, 1, f"header {key}: expected {kinds}, got {short(value)}")
    return first


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise fail(path, None, "is a directory, not a trace file (a directory of agentic files "
                   "reads with --format agentic or auto)")
    if not path.is_file():
        raise fail(path, None, "no such trace file")


def trace_from_lines(name: str, header: dict[str, Any], requests: list[dict[str, Any]]) -> Trace:
    """A kvtrie trace held in memory (a generator's output), validated as a file would be."""
    head = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **header}
    lines = list(enumerate([head, *requests], start=1))
    return _parse_kvtrie(Path(name), lines, None)


def load_trace(
    path: Path | str, vocab_size: int | None = None, options: ReadOptions | None = None
) -> Trace:
    """Read and validate a trace. The format is ``options.format``, or detected from the first
    line (a directory is a set of agentic conversation files)."""
    from .formats.agentic import is_agentic, load_agentic
    from .formats.bailian import parse_bailian
    from .formats.mooncake import parse_mooncake

    options = options or ReadOptions()
    path = Path(path)
    if path.is_dir() and options.format in ("auto", "agentic"):
        trace = load_agentic(path, options)
        trace.sha256 = _tree_sha256(path)
        return trace
    _check_file(path)
    lines = list(read_lines(path))
    if not lines:
        raise fail(path, None, "the trace is empty")
    first_line, first = lines[0]
    kind = options.format if options.format != "auto" else _detect(first)
    if kind == "kvtrie":
        if first.get("format") != FORMAT_NAME:
            raise fail(path, first_line, f'--format kvtrie: no "format": "{FORMAT_NAME}" header')
        trace = _parse_kvtrie(path, lines, vocab_size)
    elif kind == "mooncake":
        trace = parse_mooncake(path, lines, options)
    elif kind == "bailian":
        trace = parse_bailian(path, lines, options)
    elif kind == "agentic" and len(lines) == 1 and is_agentic(first):
        trace = load_agentic(path, options)
    elif kind == "agentic":
        raise fail(path, first_line, "--format agentic: expected one JSON object with requests")
    else:
        raise fail(
            path,
            first_line,
            f'unknown trace format: expected a header with "format": "{FORMAT_NAME}", Mooncake '
            "or Bailian lines with hash_ids, or an agentic conversation object with requests "
            "(--format names one)",
        )
    trace.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return trace


def _detect(first: dict[str, Any]) -> str | None:
    """The format a trace's first line shows."""
    from .formats.agentic import is_agentic

    if first.get("format") == FORMAT_NAME:
        return "kvtrie"
    if "chat_id" in first and "hash_ids" in first:
        return "bailian"
    if "hash_ids" in first:
        return "mooncake"
    if is_agentic(first):
        return "agentic"
    return None


def _tree_sha256(path: Path) -> str:
    """One digest for a directory of trace files: each file's name and content."""
    digest = hashlib.sha256()
    for file in sorted(path.glob("*.json")):
        digest.update(file.name.encode() + b"\0" + hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def write_trace(
    path: Path | str, header: dict[str, Any], requests: Iterable[dict[str, Any]]
) -> None:
    """Write a kvtrie JSONL trace (by :func:`~kvtrie.sim.outputs.write_output`'s rules)."""
    head = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **header}
    lines = [json.dumps(head)] + [json.dumps(r, separators=(",", ":")) for r in requests]
    write_output(path, "\n".join(lines) + "\n")


def expand_blocks(
    hash_ids: tuple[int, ...], length: int, vocab_size: int, block_size: int = MOONCAKE_BLOCK
) -> np.ndarray:
    """Hash blocks as tokens: block id h gives ``block_size`` tokens drawn from (h, position),
    so equal ids give equal tokens and different ids differ; the last block is cut to
    ``length``."""
    ids = np.asarray(hash_ids, dtype=np.int64)
    positions = (ids[:, None] * block_size + np.arange(block_size)).reshape(-1)[:length]
    return ((mix64(positions, 0xB10C) >> np.uint64(16)) % np.uint64(vocab_size)).astype(np.int32)


def resolve_prompt(request: Request, history: dict[str, np.ndarray], vocab_size: int) -> np.ndarray:
    """The request's prompt tokens: hash blocks, or an earlier request's prefix (looked up in
    ``history``: prompt and outputs by id) followed by its own tokens."""
    if request.hashed:
        return expand_blocks(
            request.hash_ids, request.input_length, vocab_size, request.block_size
        )
    own = request.tokens if request.tokens is not None else np.empty(0, dtype=np.int32)
    if request.prefix_of is None:
        return own
    return np.concatenate([history[request.prefix_of][: request.prefix_length], own])
