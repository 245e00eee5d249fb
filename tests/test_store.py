"""The directory store: real files, verified on every read and on reopening, one process at a
time, and a trie that survives a restart. Every ``rig.run`` checks the restored state against a
fresh prefill, so a file served wrong fails here."""

from __future__ import annotations

import json
import threading

import pytest

from kvtrie.backends.fake import FakeCodec
from kvtrie.core.store import MANIFEST, DirectoryStore, StoreError
from kvtrie.sim.cli import main

KV = 16
NODE = 31 * KV  # 30 prompt tokens and 2 outputs (the last one never evaluated)


def conversation(first: int, length: int = 30) -> list[int]:
    return list(range(first, first + length))


def store_in(path, **options):
    return lambda backend: DirectoryStore(path, FakeCodec(backend), **options)


def files(path) -> set[str]:
    return {p.name for p in (path / "snapshots").iterdir()}


def test_snapshots_go_to_files_and_come_back_verified(rig, tmp_path):
    r = rig("mixed", budget=0, store=store_in(tmp_path))
    r.run(conversation(100), [1, 2])
    r.run(conversation(200), [1, 2])  # pages 100 out, straight to disk (RAM budget 0)
    r.cache.store.flush()
    assert len(files(tmp_path)) == 3  # one file a layer: kv, rotating, recurrent
    assert r.run(conversation(100) + [1, 9]).cached_tokens == 31
    assert r.cache.stats.disk_page_ins == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_file_is_a_miss_never_a_wrong_state(rig, tmp_path, damage):
    r = rig("kv", budget=0, store=store_in(tmp_path))
    r.run(conversation(100), [1, 2])
    r.run(conversation(200), [1, 2])
    r.cache.store.flush()
    (path,) = (tmp_path / "snapshots").iterdir()
    data = path.read_bytes()
    if damage == "flip":
        path.write_bytes(data[:100] + bytes([data[100] ^ 4]) + data[101:])
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.unlink()
    assert r.run(conversation(100) + [1, 9]).cached_tokens == 0
    assert r.cache.stats.disk_read_failures == 1


def test_a_restart_adopts_the_trie_and_serves_only_new_tokens(rig, tmp_path):
    first = rig("mixed", budget=2 * NODE, store=store_in(tmp_path))
    for start in (100, 200, 300):
        first.run(conversation(start), [1, 2])
    first.cache.close()  # the live path and RAM's snapshots move to disk; the manifest written
    assert first.cache.stats.moves_to_disk == 3

    second = rig("mixed", budget=2 * NODE, store=store_in(tmp_path))
    assert second.cache.store.report.adopted_nodes == 3
    for start in (300, 100, 200):
        account = second.run(conversation(start) + [1, 5, 6])
        assert (account.cached_tokens, account.computed_tokens) == (31, 2)


def test_adopted_nodes_are_older_than_new_ones_in_their_old_order(rig, tmp_path):
    first = rig("kv", budget=0, store=store_in(tmp_path))
    for start in (100, 200, 300):
        first.run(conversation(start), [1, 2])
    first.cache.close()
    second = rig("kv", budget=0, store=store_in(tmp_path), disk_budget=3 * NODE)
    second.run(conversation(400), [1, 2])
    second.run(conversation(500), [1, 2])  # leaving 400 drops the oldest adopted node, 100
    kept = sorted(int(n.tokens[0]) for n in second.cache.nodes() if n.on_disk)
    assert kept == [200, 300, 400]


def test_opening_deletes_what_it_can_not_trust_and_nothing_else(rig, tmp_path):
    first = rig("kv", budget=0, store=store_in(tmp_path))
    for start in (100, 200, 300):
        first.run(conversation(start), [1, 2])
    first.cache.close()
    snapshots = tmp_path / "snapshots"
    names = sorted(files(tmp_path))
    assert len(names) == 3
    corrupt = snapshots / names[0]
    data = corrupt.read_bytes()
    corrupt.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    (snapshots / names[1]).unlink()
    (snapshots / "000000009999-0.safetensors").write_bytes(b"an orphan")
    (snapshots / "000000009998-0.safetensors.tmp").write_bytes(b"half written")
    (snapshots / "notes.txt").write_text("the user's own file")

    second = rig("kv", budget=0, store=store_in(tmp_path))
    report = second.cache.store.report
    assert report.deleted == {"corrupt": 1, "missing": 1, "orphaned": 1, "half-written": 1}
    assert report.adopted_nodes == 1
    assert files(tmp_path) == {names[2], "notes.txt"}
    assert any("notes.txt" in w for w in report.warnings)
    assert second.run(conversation(300) + [1, 9]).cached_tokens == 31


def test_a_damaged_manifest_adopts_nothing(rig, tmp_path):
    first = rig("kv", budget=0, store=store_in(tmp_path))
    first.run(conversation(100), [1, 2])
    first.cache.close()
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["body"]["nodes"][0]["tokens"][3] += 1  # the checksum no longer matches
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    second = rig("kv", budget=0, store=store_in(tmp_path))
    assert second.cache.store.report.adopted_nodes == 0
    assert second.cache.store.report.deleted == {"orphaned": 1}
    assert files(tmp_path) == set()


def test_one_process_at_a_time(tmp_path):
    from kvtrie.backends.fake import FakeBackend
    from kvtrie.backends.profiles import get_profile

    codec = FakeCodec(FakeBackend(get_profile("tiny-attention")))
    store = DirectoryStore(tmp_path, codec)
    with pytest.raises(StoreError, match=r"in use by another process \(PID \d+\)"):
        DirectoryStore(tmp_path, codec)
    store.close()
    DirectoryStore(tmp_path, codec).close()


def test_another_models_store_or_a_newer_format_is_refused(rig, tmp_path):
    first = rig("kv", budget=0, store=store_in(tmp_path))
    first.run(conversation(100), [1, 2])
    first.cache.close()
    before = files(tmp_path)
    with pytest.raises(StoreError, match="holds states of another model"):
        rig("mixed", budget=0, store=store_in(tmp_path))
    assert files(tmp_path) == before  # refused, nothing deleted
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["body"]["version"] = 99
    text = json.dumps(manifest["body"], sort_keys=True).encode()
    import hashlib

    manifest["sha256"] = hashlib.sha256(text).hexdigest()
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="format version 99, newer than"):
        rig("kv", budget=0, store=store_in(tmp_path))
    assert files(tmp_path) == before


def test_a_read_of_a_snapshot_still_being_written_gets_it_from_ram(rig, tmp_path, monkeypatch):
    import kvtrie.core.store as store_module

    release = threading.Event()
    real_write = store_module._write_atomically

    def slow_write(path, data):
        release.wait(10)
        real_write(path, data)

    monkeypatch.setattr(store_module, "_write_atomically", slow_write)
    r = rig("kv", budget=0, store=store_in(tmp_path))
    r.run(conversation(100), [1, 2])
    r.run(conversation(200), [1, 2])
    assert files(tmp_path) == set()  # the write is held back
    assert r.run(conversation(100) + [1, 9]).cached_tokens == 31
    release.set()
    r.cache.store.flush()
    assert len(files(tmp_path)) == 1


def test_replay_refuses_a_store_it_can_not_use(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["replay", "system-prompt", "-q", "--disk-dir", str(a_file)]) == 2
    assert "is a file, not a store directory" in capsys.readouterr().err
    busy = tmp_path / "busy"
    (busy / "mine.txt").parent.mkdir()
    (busy / "mine.txt").write_text("keep me")
    assert main(["replay", "system-prompt", "-q", "--disk-dir", str(busy)]) == 2
    assert "not a kvtrie store and not empty" in capsys.readouterr().err
    assert (busy / "mine.txt").read_text() == "keep me"
    assert main(["replay", "system-prompt", "-q", "--disk-dir", str(a_file / "sub")]) == 2
    assert "can't use it as a store" in capsys.readouterr().err


def test_replay_on_a_store_equals_the_simulated_disk_and_resumes(tmp_path):
    def replay(*argv):
        report = tmp_path / "r.json"
        argv = ("replay", "agent", "--budget", "256MiB", "--disk-budget", "2GiB", *argv)
        assert main([*argv, "-q", "--report", str(report)]) == 0
        return json.loads(report.read_text())

    simulated = replay()
    stored = replay("--disk-dir", str(tmp_path / "store"))
    for key in ("cached_tokens", "evictions", "page_ins"):
        assert stored[key] == simulated[key]
    again = replay("--disk-dir", str(tmp_path / "store"))
    assert again["disk_tier"]["opened"]["adopted_nodes"] > 0
    assert again["violations"] == []


def test_a_restart_in_process_reopens_the_store_and_adopts_it(rig, tmp_path):
    r = rig("mixed", budget=2 * NODE, store=store_in(tmp_path))
    for start in (100, 200, 300):
        r.run(conversation(start), [1, 2])
    r.cache.restart()  # the live path and RAM lost, the store closed and opened again
    assert r.cache.stats.restarts == 1 and r.cache.store.report.adopted_nodes == 3
    for start in (300, 100, 200):
        assert r.run(conversation(start) + [1, 5, 6]).cached_tokens == 31


@pytest.mark.parametrize("background", [False, True])
def test_a_full_disk_loses_snapshots_never_serves_them_and_keeps_no_bytes(
    rig, tmp_path, monkeypatch, background
):
    import errno

    import kvtrie.core.store as store_module

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    r = rig("kv", budget=0, store=store_in(tmp_path, background=background))
    r.run(conversation(100), [1, 2])
    monkeypatch.setattr(store_module, "_write_atomically", full)
    r.run(conversation(200), [1, 2])  # pages 100 out: its write fails
    r.cache.store.flush()
    assert r.cache.store.write_errors == 1
    assert all(f.pending is None for f in r.cache.store._files.values())
    stats = r.cache.stats
    written = stats.disk_write_failures  # in the request: the cache evicts the node at once
    assert r.run(conversation(100) + [1, 9]).cached_tokens == 0
    # behind the request: the node stays, and reading it is a miss
    assert (written, stats.disk_read_failures) == ((0, 1) if background else (1, 0))
    assert files(tmp_path) == set()


def test_a_replay_stopped_and_resumed_on_its_store_reuses_what_an_unbroken_one_does(tmp_path):
    def replay(*argv):
        report = tmp_path / "r.json"
        assert (
            main(["replay", "agent", "--budget", "256MiB", *argv, "-q", "--report", str(report)])
            == 0
        )
        return json.loads(report.read_text())

    unbroken = replay("--disk-budget", "inf")
    store = str(tmp_path / "store")
    first = replay("--disk-dir", store, "--limit", "50")
    second = replay("--disk-dir", store, "--start", "50")
    assert first["requests"] + second["requests"] == unbroken["requests"]
    assert second["disk_tier"]["opened"]["adopted_nodes"] > 0
    assert first["cached_tokens"] + second["cached_tokens"] == unbroken["cached_tokens"]
    fresh = replay("--disk-dir", str(tmp_path / "fresh"), "--start", "50")
    assert fresh["cached_tokens"] < second["cached_tokens"]


def test_start_past_the_end_or_over_generated_outputs_is_bad_input(tmp_path, capsys):
    assert main(["replay", "agent", "--start", "1000", "-q"]) == 2
    assert "--start 1000: the trace has" in capsys.readouterr().err
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"format": "kvtrie-trace", "version": 1}\n'
        '{"id": "a", "prompt": [1, 2, 3], "output_length": 4}\n'
        '{"id": "b", "prefix_of": "a", "prefix_length": 5, "prompt": [5], "output_length": 2}\n'
    )
    assert main(["replay", str(trace), "--start", "1", "-q"]) == 2
    assert "--start 1 skips request 'a', which a later request continues" in capsys.readouterr().err


def test_reopened_with_a_smaller_disk_budget_the_oldest_go_at_once(rig, tmp_path):
    first = rig("kv", budget=0, store=store_in(tmp_path))
    for start in (100, 200, 300, 400):
        first.run(conversation(start), [1, 2])
    first.cache.close()
    second = rig("kv", budget=0, store=store_in(tmp_path), disk_budget=2 * NODE)
    assert second.cache.disk_bytes == 2 * NODE  # before any request
    kept = sorted(int(n.tokens[0]) for n in second.cache.nodes() if n.on_disk)
    assert kept == [300, 400]
    second.cache.store.flush()
    assert len(files(tmp_path)) == 2
