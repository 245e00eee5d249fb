"""Where the work runs: this machine's processes or a Ray instance, with the same results; a
Ray worker lost mid-task has its task run again; a cluster that is not there is bad usage."""

from __future__ import annotations

import json
import operator
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from servers import free_port

from kvtrie.sim.cli import main
from kvtrie.sim.executors import (
    TASK_RETRIES,
    ExecutorUnavailable,
    LocalExecutor,
    RayExecutor,
    make_executor,
)

ray = pytest.importorskip("ray", reason="the test extra installs Ray")
# Ray workers cannot import a test module (its folder is on pytest's path only): the work
# functions below travel by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square_plus(shared: dict, item: int) -> tuple[int, int]:
    return item, item * item + shared["offset"]


def dies_once(shared: dict, item: int) -> tuple[int, int]:
    """The worker process dies (no exception: the process is gone) the first time it runs
    each item; the marker file says it already died once."""
    marker = Path(shared["folder"]) / f"died-{item}"
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(1)
    return item, os.getpid()


@pytest.fixture(scope="module")
def ray_executor():
    executor = RayExecutor(processes=2)
    yield executor
    executor.close()
    assert not ray.is_initialized()


def test_local_and_ray_give_the_same_results(ray_executor):
    shared = {"offset": 7}
    local = sorted(LocalExecutor(2).map_unordered(square_plus, shared, range(20)))
    in_process = sorted(LocalExecutor(1).map_unordered(square_plus, shared, range(20)))
    on_ray = sorted(ray_executor.map_unordered(square_plus, shared, range(20)))
    assert local == in_process == on_ray == [(i, i * i + 7) for i in range(20)]


def test_spawned_local_workers_give_the_same_results_as_forked_ones():
    """Spawned (what a fuzz campaign asks for: Metal's state does not survive a fork), the
    work and the shared value are pickled to each worker instead of inherited."""
    spawned = sorted(LocalExecutor(2, fork=False).map_unordered(operator.add, 7, range(6)))
    forked = sorted(LocalExecutor(2).map_unordered(operator.add, 7, range(6)))
    assert spawned == forked == list(range(7, 13))


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_items_are_drawn_only_as_workers_free(kind, ray_executor):
    executor = LocalExecutor(2) if kind == "local" else ray_executor
    drawn = []

    def items():
        for i in range(10):
            drawn.append(i)
            yield i

    results = executor.map_unordered(square_plus, {"offset": 0}, items())
    next(results)
    # the first result came back with no more than a worker's worth in flight, plus its
    # replacement: a campaign that stops drawing when its time is up starts nothing more
    assert len(drawn) <= executor.workers + 1
    assert len(list(results)) == 9 and len(drawn) == 10


def test_a_ray_task_whose_worker_dies_is_run_again(ray_executor, tmp_path):
    results = sorted(ray_executor.map_unordered(dies_once, {"folder": str(tmp_path)}, range(4)))
    assert [item for item, _ in results] == [0, 1, 2, 3]
    for item, pid in results:  # each ran to the end in a worker other than the one that died
        assert int((tmp_path / f"died-{item}").read_text()) != pid
    assert TASK_RETRIES >= 1


def test_sweep_on_ray_equals_the_local_sweep(tmp_path, capsys):
    rows = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        argv = ["sweep", "shared-prefix", "-q", "--out", str(out), "--executor", executor]
        argv += ["--budgets", "64MiB,inf", "--processes", "2"]
        argv += ["--policies", "none,ideal,vllm-blocks,kvtrie-seed,kvtrie-improved"]
        assert main(argv) == 0
        report = json.loads((out / "sweep.json").read_text())
        assert report["executor"] == executor
        rows[executor] = [
            {k: v for k, v in r.items() if k != "wall_seconds"} for r in report["rows"]
        ]
    assert len(rows["local"]) == 8 and rows["ray"] == rows["local"]


def test_a_ray_address_with_nothing_there_is_bad_usage(tmp_path, capsys):
    port = free_port()
    argv = ["sweep", "shared-prefix", "-q", "--out", str(tmp_path / "o")]
    assert main([*argv, "--executor", "ray", "--address", f"127.0.0.1:{port}"]) == 2
    assert f"--address 127.0.0.1:{port}: no Ray cluster there" in capsys.readouterr().err
    assert main([*argv, "--executor", "ray", "--address", "no-port"]) == 2
    assert main([*argv, "--address", "127.0.0.1:1"]) == 2  # --address without --executor ray
    assert "--address needs --executor ray" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    campaign = ["fuzz", "--executor", "ray", "--address", f"127.0.0.1:{port}"]
    assert main([*campaign, "-q", "--out", str(tmp_path / "fz")]) == 2
    assert not (tmp_path / "fz").exists()  # nothing made before the executor was up


def test_without_ray_installed_it_says_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray: ImportError
    with pytest.raises(ExecutorUnavailable, match=r"pip install 'kvtrie\[ray\]'"):
        make_executor("ray")
    assert main(["sweep", "shared-prefix", "--executor", "ray", "--out", str(tmp_path / "o")]) == 2
    assert "needs Ray" in capsys.readouterr().err


def test_a_sweep_joins_a_running_ray_cluster_at_its_address(tmp_path):
    """A head node started by ``ray start`` on 127.0.0.1, as a user's cluster would be (with
    a token of its own, which Ray asks of every client); the sweep joins it and leaves it
    running."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex()}
    # stopped at the end at once, not after the 30 s a node drains for by default
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    port = free_port()
    ray_cli = Path(sys.executable).parent / "ray"
    head = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--block", "--node-ip-address", "127.0.0.1"]
        + ["--port", str(port), "--num-cpus", "2", "--include-dashboard", "false"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # bounded: until the head's port answers
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        rows = {}
        for executor in ("local", "ray"):
            out = tmp_path / executor
            argv = ["sweep", "shared-prefix", "-q", "--out", str(out), "--executor", executor]
            argv += ["--budgets", "64MiB", "--policies", "none,kvtrie-seed"]
            if executor == "ray":
                argv += ["--address", f"127.0.0.1:{port}"]
            run = subprocess.run(
                [sys.executable, "-m", "kvtrie.sim.cli", *argv], env=env, capture_output=True
            )
            assert run.returncode == 0, run.stderr.decode()[-2000:]
            report = json.loads((out / "sweep.json").read_text())
            rows[executor] = [
                {k: v for k, v in r.items() if k != "wall_seconds"} for r in report["rows"]
            ]
        assert len(rows["local"]) == 2 and rows["ray"] == rows["local"]
        assert head.poll() is None  # the cluster the sweep joined is still up
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)


NO_RAY = """
import sys
from kvtrie.sim.cli import main
out = sys.argv[1]
codes = [main(["replay", "shared-prefix", "-q"]),
         main(["sweep", "shared-prefix", "-q", "--budgets", "64MiB", "--policies", "none",
               "--out", out]),
         main(["fuzz", "-q", "--examples", "5", "--steps", "3", "--out", out])]
print(codes, "ray" in sys.modules)
"""


def test_the_core_and_the_default_commands_never_import_ray(tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", NO_RAY, str(tmp_path)], capture_output=True, text=True
    )
    assert run.stdout.split()[-4:] == ["[0,", "0,", "0]", "False"], run.stderr[-2000:]
