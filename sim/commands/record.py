"""``kvtrie record``: a recording proxy in front of any OpenAI-compatible server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from . import EXIT_OK, UsageError, common_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    record = sub.add_parser(
        "record",
        parents=[common_options()],
        help="record a server's traffic as a trace, through a proxy",
        description="Listen where clients send OpenAI-compatible requests, forward each "
        "unchanged to --upstream (ollama, mlx_lm.server, llama.cpp, vLLM, ...), return its "
        "answer unchanged, and append one trace line per chat or text completion: arrival "
        "time, conversation (an X-Conversation-Id header, else the body's user), the prompt as "
        "--tokenizer's chat template makes it, and the output length. Plain: a kvtrie trace "
        "of token ids. --hashed: Mooncake lines of prefix-chained block ids under a secret "
        "drawn for this recording, with no prompt text or token in the file. Stop with "
        "Ctrl-C. Needs the record extra: pip install 'kvtrie[record]'.",
    )
    record.add_argument("--listen", default="127.0.0.1:8090", metavar="HOST:PORT",
                        help="where to listen (default 127.0.0.1:8090)")
    record.add_argument("--upstream", required=True, metavar="URL",
                        help="the server to forward to, e.g. http://127.0.0.1:8080")
    record.add_argument("--tokenizer", required=True, type=Path, metavar="DIR",
                        help="a model or tokenizer directory (Hugging Face layout) whose "
                        "tokenizer and chat template make the recorded prompts")
    record.add_argument("--out", required=True, type=Path,
                        help="the trace to write; it must not exist (a recording never "
                        "replaces a file)")
    record.add_argument("--hashed", action="store_true",
                        help="write hash ids of token blocks, not token ids")
    record.add_argument("--block-size", type=int, default=512, metavar="N",
                        help="--hashed: tokens a block id stands for (default 512)")
    record.add_argument("--upstream-timeout", type=float, default=600.0, metavar="S",
                        help="seconds to wait for the upstream before answering 502 "
                        "(default 600)")
    record.set_defaults(func=run)


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen takes HOST:PORT, e.g. 127.0.0.1:8090; got {text!r}")
    return host, int(port)


def _upstream(text: str) -> str:
    url = urlparse(text)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise UsageError(f"--upstream takes an http(s) URL, e.g. http://127.0.0.1:8080; got {text!r}")
    return text.rstrip("/")


def _tokenizer(path: Path) -> Any:
    """A transformers tokenizer (imported late: transformers is slow to import)."""
    if not path.is_dir():
        raise UsageError(f"--tokenizer {path}: no such directory")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many kinds for a directory it can't read
        raise UsageError(f"--tokenizer {path}: not a tokenizer directory ({exc})") from None


def run(args: argparse.Namespace) -> int:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise UsageError("kvtrie record needs aiohttp: pip install 'kvtrie[record]'") from None
    import asyncio

    from ..outputs import check_output
    from ..record import Recorder, RecordSettings
    from ..recording import TraceRecorder

    host, port = _listen(args.listen)
    upstream = _upstream(args.upstream)
    if not 1 <= args.block_size <= 1 << 20:
        raise UsageError(f"--block-size must be in [1, 1048576], got {args.block_size}")
    if not args.upstream_timeout > 0:
        raise UsageError(f"--upstream-timeout must be > 0, got {args.upstream_timeout}")
    if str(args.out) == "-":
        raise UsageError("--out -: a recording goes to a file, flushed line by line")
    try:
        check_output("--out", args.out)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.out.exists():
        raise UsageError(f"--out {args.out}: exists; a recording never replaces a file, give a new path")
    tokenizer = _tokenizer(args.tokenizer)
    settings = RecordSettings(upstream, args.out, args.hashed, args.block_size, args.upstream_timeout)
    with open(args.out, "x", encoding="utf-8") as handle:
        trace = TraceRecorder(handle, len(tokenizer), {"upstream": upstream}, args.hashed,
                              args.block_size)
        recorder = Recorder(settings, tokenizer, trace)
        try:
            asyncio.run(_serve(recorder, host, port))
        except OSError as exc:
            handle.close()
            args.out.unlink()
            raise UsageError(f"--listen {host}:{port}: {exc.strerror or exc}") from None
        except KeyboardInterrupt:
            pass
    print(f"recorded {recorder.trace.written} requests to {args.out}", file=sys.stderr)
    return EXIT_OK


async def _serve(recorder: Any, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM; the header goes out once the port is ours."""
    import asyncio
    import signal

    from aiohttp import web

    from ..record import build_app

    app = build_app(recorder)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()  # an OSError here: the port is taken or the host is not ours
        recorder.trace.write_header()
        print(f"kvtrie record: listening on http://{host}:{port}, forwarding to "
              f"{recorder.settings.upstream}, writing {recorder.settings.out}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
