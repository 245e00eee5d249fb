"""Where a sweep's cells and a fuzz campaign's shards run: this machine's processes, or a Ray
cluster.

Both executors take the same work function ``work(shared, item)``, run it over the same items
and give back the same results, as each finishes; only where the work runs differs. ``shared``
(a trace's workload, a fuzz configuration) is sent once, not once an item: forked workers
inherit it, and Ray keeps it in the object store, where each node fetches it once. Items are
drawn from their iterator only as a worker frees, so a fuzz campaign can stop drawing when its
time is up. Ray is an optional extra: only :class:`RayExecutor` imports it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from itertools import islice
from typing import Any, Protocol

__all__ = [
    "EXECUTORS",
    "TASK_RETRIES",
    "Executor",
    "ExecutorUnavailable",
    "LocalExecutor",
    "RayExecutor",
    "make_executor",
]

EXECUTORS = ("local", "ray")
# A Ray task whose worker or node is lost is run again, this many times, before the sweep or
# campaign fails; a Python exception in the work itself is a bug and is not retried.
TASK_RETRIES = 3
CONNECT_SECONDS = 5.0  # how long --address may take to answer at all


class ExecutorUnavailable(ValueError):
    """The executor cannot start (Ray not installed, no cluster at the address): bad usage."""


class Executor(Protocol):
    name: str
    workers: int  # items in flight at a time

    def map_unordered(
        self, work: Callable[[Any, Any], Any], shared: Any, items: Iterable[Any]
    ) -> Iterator[Any]: ...

    def close(self) -> None: ...


_WORK: dict[str, Any] = {}  # a forked worker's work function and shared value


def _install(work: Callable[[Any, Any], Any], shared: Any) -> None:
    _WORK.update(work=work, shared=shared)


def _run_installed(item: Any) -> Any:
    return _WORK["work"](_WORK["shared"], item)


class LocalExecutor:
    """This machine's cores: a pool of processes (in this process when there is one worker).
    Forked where the system forks and ``fork`` is asked for, so a large shared value (a
    sweep's workload) is inherited, not pickled; else spawned, for work that builds what
    must not cross a fork (MLX's Metal state on macOS: a fuzz campaign's models)."""

    name = "local"

    def __init__(self, processes: int | None = None, fork: bool = True) -> None:
        self.workers = processes or os.cpu_count() or 1
        self.fork = fork and hasattr(os, "fork")

    def map_unordered(
        self, work: Callable[[Any, Any], Any], shared: Any, items: Iterable[Any]
    ) -> Iterator[Any]:
        items = iter(items)
        if self.workers == 1:
            for item in items:
                yield work(shared, item)
            return
        context = multiprocessing.get_context("fork" if self.fork else "spawn")
        with ProcessPoolExecutor(
            self.workers, mp_context=context, initializer=_install, initargs=(work, shared)
        ) as pool:
            pending: set[Future] = {
                pool.submit(_run_installed, i) for i in islice(items, self.workers)
            }
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
                    pending.update(pool.submit(_run_installed, i) for i in islice(items, 1))

    def close(self) -> None:
        """Nothing outlives :meth:`map_unordered`."""


class RayExecutor:
    """A Ray cluster at ``address``, or a Ray instance of this machine's own (``processes``
    CPUs) when there is none. Each node needs kvtrie installed, the same version as here."""

    name = "ray"

    def __init__(self, address: str | None = None, processes: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise ExecutorUnavailable(
                "--executor ray needs Ray: pip install 'kvtrie[ray]'"
            ) from None
        self._ray = ray
        _check_reachable(address)
        self._started = not ray.is_initialized()  # else: the caller's own ray.init() stands
        if self._started:
            try:
                ray.init(
                    # "local": a new instance of our own, even beside a cluster on this machine
                    address=address or "local",
                    num_cpus=processes if address is None else None,
                    include_dashboard=False,
                    logging_level=logging.ERROR,
                )
            except (ConnectionError, ValueError, RuntimeError) as why:
                raise ExecutorUnavailable(
                    f"--address {address}: no Ray cluster there ({str(why).splitlines()[0]})"
                ) from None
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        if processes is not None:
            self.workers = min(self.workers, processes)

    def map_unordered(
        self, work: Callable[[Any, Any], Any], shared: Any, items: Iterable[Any]
    ) -> Iterator[Any]:
        ray = self._ray
        shared_ref = ray.put(shared)  # a task's ObjectRef argument arrives resolved
        task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=False)(work)
        items = iter(items)
        pending = [task.remote(shared_ref, item) for item in islice(items, self.workers)]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
            pending.extend(task.remote(shared_ref, item) for item in islice(items, 1))

    def close(self) -> None:
        """Shut down the Ray instance this executor started; leave a cluster it joined."""
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()


def _check_reachable(address: str | None) -> None:
    """A ``host:port`` with nothing listening fails in seconds, not after Ray's own minutes of
    retrying."""
    if address is None or address == "auto" or "://" in address:
        return  # auto finds a local cluster or fails at once; ray:// is Ray Client's to check
    host, _, port = address.rpartition(":")
    if not port.isdigit() or not host:
        raise ExecutorUnavailable(f"--address {address!r}: give host:port, auto or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as why:
        raise ExecutorUnavailable(f"--address {address}: no Ray cluster there ({why})") from None


def make_executor(
    name: str, processes: int | None = None, address: str | None = None, fork: bool = True
) -> LocalExecutor | RayExecutor:
    """The executor a user named (``--executor``, ``--processes``/``--workers``, ``--address``);
    ``fork`` as :class:`LocalExecutor` takes it. An ExecutorUnavailable names what is
    missing."""
    if name == "local":
        if address is not None:
            raise ExecutorUnavailable("--address needs --executor ray")
        return LocalExecutor(processes, fork)
    if name == "ray":
        return RayExecutor(address, processes)
    raise ExecutorUnavailable(f"unknown executor {name!r}; choose {' or '.join(EXECUTORS)}")
