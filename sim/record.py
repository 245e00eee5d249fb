"""``kvtrie record``: an OpenAI-compatible recording proxy in front of any server.

It forwards every request unchanged and returns the upstream's answer unchanged (streamed
chunks as they come). For each chat or text completion that succeeds it appends one trace line:
the arrival time, the conversation key the client sent (an ``X-Conversation-Id`` header, else
the body's ``user``), the prompt as the given tokenizer and its chat template make it, and the
output length from the response's usage (counted by the tokenizer when a stream has none).

Plain recordings are kvtrie traces (token ids). ``hashed`` recordings are Mooncake lines:
prefix-chained ids of ``block_size``-token blocks, each an HMAC of the block and everything
before it under a secret drawn for this recording and never written, so no prompt text and
no token can be read back from the file, while equal prefixes still give equal ids.

Lines go out in arrival order (a finished request waits for the ones that came before it) and
are flushed as written: a killed recorder loses only requests in flight, never half a line. A
request that fails, or whose client goes away mid-stream, writes no line.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from .recording import TraceRecorder, prompt_of

__all__ = ["Recorder", "RecordSettings", "build_app"]

log = logging.getLogger("kvtrie.record")

RECORDED = {"/v1/chat/completions": "chat", "/v1/completions": "text"}
# not forwarded: hop-by-hop headers, and the encodings (aiohttp decodes what it receives, so
# the recorder can read usage; the client gets the decoded body with its true length)
HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive",
              "content-encoding", "accept-encoding", "upgrade"}


@dataclass(frozen=True)
class RecordSettings:
    upstream: str
    out: Path
    hashed: bool = False
    block_size: int = 512
    timeout_s: float = 600.0


@dataclass
class Recorder:
    """The proxy's recording: a trace writer and the tokenizer that makes prompts."""

    settings: RecordSettings
    tokenizer: Any
    trace: TraceRecorder


def _forward_headers(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "upstream_error", "code": status}}
    return web.json_response(body, status=status)


class _Events:
    """What a relayed server-sent-event stream said: its text, the usage's completion tokens
    when it carries them, and whether its ``[DONE]`` went by."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.pieces: list[str] = []
        self.produced: int | None = None
        self.done = False
        self._pending = b""

    def feed(self, chunk: bytes) -> bool:
        """Take one relayed chunk; True once the stream's ``[DONE]`` has been relayed."""
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            if line.strip() == b"data: [DONE]":
                self.done = True
                continue
            try:
                event = json.loads(line[5:])
            except json.JSONDecodeError:
                continue
            if not isinstance(event, dict):
                continue
            for choice in (event.get("choices") or [])[:1]:
                if self.kind == "chat":
                    piece = (choice.get("delta") or {}).get("content")
                else:
                    piece = choice.get("text")
                self.pieces.append(piece or "")
            usage = event.get("usage") or {}
            if isinstance(usage.get("completion_tokens"), int):
                self.produced = usage["completion_tokens"]
        return self.done

    def text(self) -> str:
        return "".join(self.pieces)


def _completion_tokens(data: bytes) -> int | None:
    try:
        usage = json.loads(data).get("usage") or {}
    except (ValueError, AttributeError):
        return None
    produced = usage.get("completion_tokens")
    return produced if isinstance(produced, int) and produced >= 0 else None


# the application's state, typed (aiohttp warns on plain string keys)
RECORDER = web.AppKey("recorder", Recorder)
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def _proxy(request: web.Request) -> web.StreamResponse:
    recorder = request.app[RECORDER]
    session = request.app[SESSION]
    settings = recorder.settings
    kind = RECORDED.get(request.path) if request.method == "POST" else None
    seq, arrival_ms = recorder.trace.arrive() if kind else (-1, 0.0)
    line = None
    try:
        raw = await request.read()
        prompt, key = None, None
        if kind:
            try:
                body = json.loads(raw)
                prompt = prompt_of(recorder.tokenizer, kind, body)
                key = request.headers.get("X-Conversation-Id") or body.get("user")
                key = None if key is None else str(key)
            except Exception as exc:  # the upstream judges the request; we only can't record it
                log.warning("request %d not recorded: its prompt could not be tokenized (%s)", seq, exc)
        url = settings.upstream.rstrip("/") + request.rel_url.path_qs
        try:
            upstream = await session.request(
                request.method, url, data=raw, headers=_forward_headers(request.headers),
                timeout=aiohttp.ClientTimeout(total=settings.timeout_s),
            )
        except asyncio.TimeoutError:
            return _error(502, f"upstream {settings.upstream} did not answer within {settings.timeout_s:g} s")
        except aiohttp.ClientError as exc:
            return _error(502, f"upstream {settings.upstream} unreachable: {exc}")
        async with upstream:
            headers = _forward_headers(upstream.headers)
            streamed = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
            if not streamed:
                data = await upstream.read()
                if upstream.status == 200 and prompt is not None:
                    produced = _completion_tokens(data)
                    if produced is None:
                        log.warning("request %d not recorded: no usage in the answer", seq)
                    else:
                        line = recorder.trace.line(seq, arrival_ms, key, prompt, produced)
                return web.Response(status=upstream.status, headers=headers, body=data)
            response = web.StreamResponse(status=upstream.status, headers=headers)
            await response.prepare(request)
            events = _Events(kind or "")
            delivered = False  # the client has every byte the upstream sent, or its [DONE]
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                    delivered = events.feed(chunk)
                delivered = True
                await response.write_eof()
            except (ConnectionResetError, aiohttp.ClientConnectionError):
                # a client that hangs up once it has [DONE] has had the whole answer
                if not delivered:
                    log.warning("request %d not recorded: the stream was cut", seq)
                    return response
            except asyncio.CancelledError:
                log.warning("request %d not recorded: cancelled mid-stream", seq)
                raise
            if upstream.status == 200 and prompt is not None:
                produced = events.produced
                if produced is None:
                    produced = len(recorder.tokenizer.encode(events.text(), add_special_tokens=False))
                line = recorder.trace.line(seq, arrival_ms, key, prompt, produced)
            return response
    finally:
        if kind:
            recorder.trace.finish(seq, line)


def build_app(recorder: Recorder) -> web.Application:
    app = web.Application(client_max_size=1 << 30)
    app[RECORDER] = recorder

    async def session_context(app: web.Application):
        app[SESSION] = aiohttp.ClientSession()
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session_context)
    app.router.add_route("*", "/{tail:.*}", _proxy)
    return app
