"""``kvtrie serve``: mlx-lm's own OpenAI-compatible server (``mlx_lm.server``: its HTTP
handler, its batching) with kvtrie's cache in place of its ``LRUPromptCache``.

mlx_lm.server builds its prompt cache inside its ``run()``; kvtrie runs the server's
``main()`` (so every option it has keeps its name and meaning) with ``run`` replaced by one
that loads the model, builds a :class:`~kvtrie.backends.mlx.server_cache.ServerPromptCache`
and serves with a handler that answers 400 to a prompt longer than the model's context.
Responses report ``usage.prompt_tokens_details.cached_tokens`` as the server counts it from
the cache. Tested with mlx-lm 0.32.x; it uses ``mlx_lm.server``'s ``ResponseGenerator``,
``APIHandler`` and ``_run_http_server``.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from kvtrie.core.policy import CachePolicy

from .recording import TraceRecorder, prompt_of

__all__ = ["ServeSettings", "serve"]

log = logging.getLogger("kvtrie.serve")


@dataclass
class ServeSettings:
    budget_bytes: int | None
    policy: CachePolicy
    max_context: int | None
    record: TraceRecorder | None = None
    summary: dict[str, Any] = field(default_factory=dict)  # the cache's, when it stopped


def context_of(config: dict[str, Any]) -> int | None:
    """The model's context from its config.json (``max_position_embeddings``), if it says."""
    value = config.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


class _Recording:
    """``--record``: a line per finished request, with the tokens the server generated (a
    replay forces them, so it meets the same prompts and outputs and caches what the server
    cached)."""

    def __init__(self, recorder: TraceRecorder) -> None:
        self.recorder = recorder
        self.pending: list[tuple[int, float, list[int]]] = []  # (seq, arrival, prompt)
        self.lock = threading.Lock()

    def fetched(self, tokens: list[int], cached: int) -> None:
        seq, arrival = self.recorder.arrive()
        with self.lock:
            self.pending.append((seq, arrival, tokens))

    def inserted(self, tokens: list[int], cache_type: str) -> None:
        if cache_type != "assistant":
            return  # a segment of a prompt still being served
        with self.lock:
            found = next(
                (p for p in reversed(self.pending) if tokens[: len(p[2])] == p[2]), None
            )
            if found is None:
                log.warning("a finished answer matches no fetched prompt: not recorded")
                return
            self.pending.remove(found)
        seq, arrival, prompt = found
        # the server's cache holds every generated token (its batch feeds the last one too),
        # and a replay never evaluates an output's last token: one more, never evaluated,
        # makes the replay's state the server's
        generated = tokens[len(prompt):]
        outputs = [*generated, generated[-1]] if generated else [prompt[-1]]
        self.recorder.finish(seq, self.recorder.line(seq, arrival, None, prompt, outputs))


def _check_port(host: str, port: int) -> None:
    """A port another process holds is one clear line, before the model loads."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ValueError(f"--port {port}: {host}:{port} is in use or not ours ({exc.strerror})") from None


def serve(argv: list[str], settings: ServeSettings) -> None:
    """Run mlx_lm.server's ``main`` with ``argv`` and kvtrie's cache."""
    import mlx_lm.server as server

    from kvtrie.backends.mlx.server_cache import ServerPromptCache

    class Handler(server.APIHandler):
        """mlx_lm.server's handler, with one more check: the prompt fits the context."""

        def do_POST(self) -> None:
            length = self.headers.get("Content-Length")
            kind = {"/v1/completions": "text", "/v1/chat/completions": "chat",
                    "/chat/completions": "chat"}.get(self.path)
            if kind is None or length is None or not length.isdigit() or settings.max_context is None:
                return super().do_POST()
            raw = self.rfile.read(int(length))
            self.rfile = io.BytesIO(raw)
            try:
                body = json.loads(raw)
                tokens = prompt_of(self.response_generator.model_provider.tokenizer, kind, body)
            except Exception:  # the server's own checks answer malformed requests
                return super().do_POST()
            if len(tokens) > settings.max_context:
                message = (f"the prompt holds {len(tokens)} tokens; this model's context is "
                           f"{settings.max_context}")
                self._set_completion_headers(400)
                self.end_headers()
                self.wfile.write(json.dumps({"error": message}).encode())
                return None
            return super().do_POST()

    def run(host: str, port: int, model_provider: Any, **_: Any) -> None:
        _check_port(host, port)
        model_provider.load("default_model")
        recording = _Recording(settings.record) if settings.record is not None else None
        cache = ServerPromptCache(
            model_provider.model,
            model_provider.model_key,
            settings.budget_bytes,
            settings.policy,
            on_fetch=recording.fetched if recording else None,
            on_insert=recording.inserted if recording else None,
        )
        generator = server.ResponseGenerator(model_provider, cache)
        print(f"kvtrie serve: listening on http://{host}:{port} with kvtrie's cache "
              f"({settings.policy.name})", flush=True)
        try:
            server._run_http_server(host, port, generator, handler_class=Handler)
        finally:
            generator.stop_and_join()
            settings.summary = cache.summary()

    saved_argv, saved_run = sys.argv, server.run
    sys.argv, server.run = ["kvtrie serve", *argv], run
    try:
        server.main()
    finally:
        sys.argv, server.run = saved_argv, saved_run
