"""Servers the tests start on 127.0.0.1 with a free port, wait for with bounded loops, and
stop: mlx_lm.server with a tiny local model directory, ``kvtrie record`` in front of it, and
small HTTP servers in this process."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class _JoinedServer(http.server.ThreadingHTTPServer):
    """Its request threads are joined when it closes: a handler still running (one that
    sleeps past its client's timeout, say) finishes, and prints what it prints, inside the
    test that started it, not in whichever test runs next."""

    daemon_threads = False


@contextlib.contextmanager
def http_server(handler) -> Iterator[http.server.ThreadingHTTPServer]:
    """An HTTP server with ``handler`` on 127.0.0.1 and a free port, serving from a thread
    until the block ends, then shut down with its request threads finished."""
    server = _JoinedServer((HOST, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _wait(proc: subprocess.Popen, ready, what: str, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text()}")
        if ready():
            return
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{what} not ready within {timeout_s} s")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def start_mlx_server(model: Path, port: int, log: Path) -> subprocess.Popen:
    """mlx_lm.server with a local model directory; its log (one line a request) goes to a
    file, so a full pipe can never stall it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm.server", "--model", str(model), "--host", HOST,
         "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=open(log, "w"), text=True,
    )
    _wait(proc, lambda: _answers(f"http://{HOST}:{port}/v1/models"), "mlx_lm.server", 120, log)
    return proc


def start_kvtrie(args: list[str], log: Path) -> subprocess.Popen:
    """A ``kvtrie`` command that serves (record, serve), ready once it says it listens; its
    output goes to ``log``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvtrie.sim.cli", *args],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    _wait(proc, lambda: "listening on" in log.read_text(), f"kvtrie {args[0]}", 120, log)
    return proc


def start_recorder(args: list[str], port: int, log: Path) -> subprocess.Popen:
    """``kvtrie record`` on ``port``."""
    return start_kvtrie(["record", "--listen", f"{HOST}:{port}", *args], log)


def stop(proc: subprocess.Popen, timeout_s: float = 30) -> int:
    """Ctrl-C, as a user stops it; the exit status (killed when it does not stop in time)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
