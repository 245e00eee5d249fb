"""Writing a recorded trace: requests numbered as they arrive, each line written once every
earlier request has finished, flushed as written; token ids (a kvtrie trace) or, hashed,
Mooncake lines of prefix-chained HMAC block ids under a secret drawn for this recording.

Both recorders use it: ``kvtrie record`` (a proxy) and ``kvtrie serve --record``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from .formats.blocks import id_limit
from .traces import FORMAT_NAME, FORMAT_VERSION

__all__ = ["TraceRecorder", "hashed_ids", "prompt_of"]


def hashed_ids(tokens: Sequence[int], secret: bytes, block_size: int) -> list[int]:
    """Chained block ids: block k's id is an HMAC of blocks 0..k (the partial last block
    included), cut to the ids a replay can expand."""
    limit = id_limit(block_size)
    digest = b""
    ids = []
    for start in range(0, len(tokens), block_size):
        block = b"".join(int(t).to_bytes(4, "little") for t in tokens[start : start + block_size])
        digest = hmac.new(secret, digest + block, hashlib.sha256).digest()
        ids.append(int.from_bytes(digest[:8], "little") % limit)
    return ids


def prompt_of(tokenizer: Any, kind: str, body: dict[str, Any]) -> list[int]:
    """A chat (its messages through the tokenizer's chat template) or text completion's prompt
    as token ids."""
    if kind == "chat":
        tokens = tokenizer.apply_chat_template(
            body["messages"], tools=body.get("tools"), add_generation_prompt=True, tokenize=True
        )
        if hasattr(tokens, "keys"):  # a BatchEncoding
            tokens = tokens["input_ids"]
        return [int(t) for t in tokens]
    prompt = body["prompt"]
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return prompt
    return [int(t) for t in tokenizer.encode(prompt, add_special_tokens=False)]


@dataclass
class TraceRecorder:
    """Numbers requests as they arrive and writes each finished one's line in that order, so
    the file is a trace in arrival order while requests finish in any order. Thread-safe."""

    handle: TextIO
    vocab_size: int
    source: dict[str, Any]
    hashed: bool = False
    block_size: int = 512
    started: float = field(default_factory=time.monotonic)
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    next_seq: int = 0
    next_to_write: int = 0
    done: dict[int, dict[str, Any] | None] = field(default_factory=dict)
    written: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def write_header(self) -> None:
        """The kvtrie header (Mooncake lines have none)."""
        if self.hashed:
            return
        header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "vocab_size": self.vocab_size,
                  "recorded": {**self.source,
                               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
        self.handle.write(json.dumps(header) + "\n")
        self.handle.flush()

    def arrive(self) -> tuple[int, float]:
        """A new request's number and arrival time (ms since the recording started)."""
        with self.lock:
            seq, self.next_seq = self.next_seq, self.next_seq + 1
        return seq, (time.monotonic() - self.started) * 1000.0

    def finish(self, seq: int, line: dict[str, Any] | None) -> None:
        """Request ``seq``'s line (None: it writes nothing); every line whose predecessors are
        all finished is written."""
        with self.lock:
            self.done[seq] = line
            while self.next_to_write in self.done:
                ready = self.done.pop(self.next_to_write)
                self.next_to_write += 1
                if ready is not None:
                    self.handle.write(json.dumps(ready, separators=(",", ":")) + "\n")
                    self.handle.flush()
                    self.written += 1

    def line(
        self,
        seq: int,
        arrival_ms: float,
        key: str | None,
        prompt: Sequence[int],
        outputs: Sequence[int] | int,
    ) -> dict[str, Any]:
        """A request's trace line; ``outputs`` are tokens (forced in a replay) or a count."""
        count = outputs if isinstance(outputs, int) else len(outputs)
        if self.hashed:
            line: dict[str, Any] = {
                "timestamp": round(arrival_ms, 3),
                "input_length": len(prompt),
                "output_length": count,
                "hash_ids": hashed_ids(prompt, self.secret, self.block_size),
            }
            if key is not None:
                digest = hmac.new(self.secret, key.encode(), hashlib.sha256)
                line["session_id"] = digest.hexdigest()[:16]
            return line
        line = {"id": f"r{seq}", "arrival_ms": round(arrival_ms, 3)}
        if key is not None:
            line["conversation"] = key
        line["prompt"] = [int(t) for t in prompt]
        if isinstance(outputs, int):
            line["output_length"] = outputs
        else:
            line["output"] = [int(t) for t in outputs]
        return line
