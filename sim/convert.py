"""``kvtrie convert``: a trace in any format kvtrie reads, written as a kvtrie or a Mooncake
trace, so traces can be shared in the common format.

Both directions go through tokens: each prompt is resolved exactly as the replayer resolves it
(hash ids expand into the same tokens for the same vocabulary), then written again.

- **to kvtrie**: each request names the earlier request it shares the longest prefix with
  (``prefix_of``/``prefix_length``) and carries only the tokens after it, so the file stays
  small and replays into the very same prompts.
- **to Mooncake**: prompts are cut into ``block_size`` blocks, each given an id for its content
  and everything before it (prefix-chained, the partial last block included: the ``ceil``
  convention), so reuse survives to the block granularity.

Outputs the trace only counts (``output_length``) are generated anew by the replay's backend:
they stay counts. A prompt that extends such generated outputs has no tokens to write there;
kvtrie refuses to guess them. Budget and fault events, and user restore points, have no place
in a Mooncake line, so converting a trace that holds them to Mooncake is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from .traces import Request, Trace, resolve_prompt

__all__ = ["ConvertError", "to_kvtrie", "to_mooncake"]

MATCH_BLOCK = 64  # the granularity at which to_kvtrie looks for the earlier request to extend


class ConvertError(ValueError):
    """A trace that can't be written in the target format without losing something."""


def _chain(tokens: np.ndarray, block: int, partial: bool) -> Iterator[bytes]:
    """Digests of the first 1, 2, ... blocks of ``tokens`` (and of the partial last block when
    ``partial``): equal digests mean equal prefixes."""
    digest = b""
    end = len(tokens) if partial else len(tokens) - len(tokens) % block
    for start in range(0, end, block):
        piece = tokens[start : start + block].astype(np.int32).tobytes()
        digest = hashlib.blake2b(digest + piece, digest_size=16).digest()
        yield digest


def _prompts(trace: Trace, vocab_size: int) -> Iterator[tuple[Request, np.ndarray]]:
    """Every request with its prompt tokens, outputs by the trace's own rules."""
    history: dict[str, np.ndarray] = {}
    generated: dict[str, int] = {}  # request id -> where its generated outputs begin
    for request in trace.requests:
        prompt = resolve_prompt(request, history, vocab_size)
        source = request.prefix_of
        if source in generated and request.prefix_length > generated[source]:
            raise ConvertError(
                f"{trace.path}:{request.line}: request {request.id} extends the outputs request "
                f"{source} leaves to the backend (output_length); a converted trace has no "
                "tokens for them"
            )
        if request.id in trace.referenced:
            if isinstance(request.outputs, int):
                generated[request.id] = len(prompt)
                history[request.id] = prompt
            else:
                history[request.id] = np.concatenate([prompt, np.asarray(request.outputs, np.int32)])
        yield request, prompt


def _outputs(request: Request) -> dict[str, Any]:
    if isinstance(request.outputs, int):
        return {"output_length": request.outputs}
    return {"output": [int(t) for t in request.outputs]}


def to_kvtrie(trace: Trace, vocab_size: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header and request lines of the same trace in kvtrie's format."""
    header = {
        "vocab_size": vocab_size,
        "converted_from": {"path": trace.path, "format": trace.format, "sha256": trace.sha256,
                           "reading": trace.reading},
    }
    known: dict[bytes, str] = {}  # a prefix digest -> the latest request that holds it
    sequences: dict[str, np.ndarray] = {}  # what a later request may extend: prompt [+ outputs]
    lines: list[dict[str, Any]] = []
    for request, prompt in _prompts(trace, vocab_size):
        source, shared = None, 0
        for digest in _chain(prompt, MATCH_BLOCK, partial=False):
            if digest not in known:
                break
            source = known[digest]
        if source is not None:
            earlier = sequences[source]
            n = min(len(earlier), len(prompt))
            differ = np.flatnonzero(earlier[:n] != prompt[:n])
            shared = int(differ[0]) if len(differ) else n
        line: dict[str, Any] = {"id": request.id, "conversation": request.conversation,
                                "arrival_ms": request.arrival_ms}
        if shared:
            line["prefix_of"], line["prefix_length"] = source, shared
        line["prompt"] = [int(t) for t in prompt[shared:]]
        line.update(_outputs(request))
        if request.user_snapshots:
            line["user_snapshots"] = list(request.user_snapshots)
        for event in request.events:
            lines.append(event.as_line())
        lines.append(line)
        sequence = prompt
        if not isinstance(request.outputs, int):
            sequence = np.concatenate([prompt, np.asarray(request.outputs, np.int32)])
        sequences[request.id] = sequence
        for digest in _chain(sequence, MATCH_BLOCK, partial=False):
            known[digest] = request.id
    lines.extend(event.as_line() for event in trace.trailing_events)
    return header, lines


def to_mooncake(trace: Trace, vocab_size: int, block_size: int) -> list[dict[str, Any]]:
    """Mooncake lines (``session_id`` when the trace names conversations) of the same trace."""
    if trace.trailing_events or any(r.events for r in trace.requests):
        raise ConvertError(
            f"{trace.path}: holds budget or fault events, which a Mooncake trace can't carry"
        )
    if any(r.user_snapshots for r in trace.requests):
        raise ConvertError(
            f"{trace.path}: holds user restore points (user_snapshots), which a Mooncake trace "
            "can't carry"
        )
    ids: dict[bytes, int] = {}
    lines = []
    for request, prompt in _prompts(trace, vocab_size):
        hashed = [ids.setdefault(d, len(ids)) for d in _chain(prompt, block_size, partial=True)]
        line: dict[str, Any] = {
            "timestamp": request.arrival_ms,
            "input_length": len(prompt),
            "output_length": request.output_length,
            "hash_ids": hashed,
        }
        if request.conversation:
            line["session_id"] = request.conversation
        lines.append(line)
    return lines
