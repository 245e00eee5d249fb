"""Trace names: the generated default kvtrie ships (and regenerates byte for byte), and the
third-party traces it never ships: ``kvtrie traces get`` from a mirror served on 127.0.0.1,
checked against the recorded sha256, and a name that is not here is exit 2 with the command."""

from __future__ import annotations

import functools
import http.server
import shutil

import numpy as np
import pytest
from servers import HOST, free_port, http_server
from third_party import third_party

from kvtrie.sim.cli import main


def test_the_shipped_chat_trace_is_what_its_generator_writes(tmp_path):
    from kvtrie.traces import bundled_path

    out = tmp_path / "chat.jsonl"
    assert main(["gen", "chat", "--seed", "1", "--out", str(out)]) == 0
    assert out.read_bytes() == bundled_path("chat").read_bytes()


def test_the_chat_generator_keeps_the_mooncake_figures_it_cites():
    from kvtrie.sim.chatgen import block_ideal, chat_lines

    lines = chat_lines(5, requests=4000)
    inputs = np.array([line["input_length"] for line in lines])
    outputs = np.array([line["output_length"] for line in lines])
    cached, total = block_ideal(lines)
    assert abs(len(lines) - 4000) < 400
    assert 0.9 < inputs.mean() / 12_035 < 1.1 and 0.9 < outputs.mean() / 343 < 1.1
    assert abs(cached / total - 0.374) < 0.03  # Mooncake's own infinite-cache bound
    assert all(line["hash_ids"][0] == 0 for line in lines)  # the shared system prompt
    assert inputs.max() <= 126_195


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """The agentic sample served from a folder on 127.0.0.1, and an empty user cache."""
    source = third_party("agentic")
    root = tmp_path / "mirror"
    shutil.copytree(source, root / "agentic")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    with http_server(handler) as server:
        monkeypatch.setenv("KVTRIE_TRACE_MIRROR", f"http://{HOST}:{server.server_port}")
        monkeypatch.setenv("KVTRIE_CACHE_DIR", str(tmp_path / "cache"))
        yield root


def test_traces_get_checks_every_file_and_the_name_then_resolves_to_the_cache(mirror, tmp_path):
    from kvtrie.traces import bundled_path

    assert main(["traces", "get", "agentic", "-q"]) == 0
    cached = tmp_path / "cache" / "traces" / "agentic"
    assert bundled_path("agentic") == cached
    assert sorted(p.name for p in cached.iterdir()) == sorted(
        p.name for p in (mirror / "agentic").glob("*.json")
    )
    assert main(["traces", "get", "agentic", "-q"]) == 0  # already there: kept


def test_a_damaged_download_is_refused_and_nothing_is_kept(mirror, tmp_path, capsys):
    damaged = mirror / "agentic" / "trace_0016.json"
    damaged.chmod(0o644)
    damaged.write_text(damaged.read_text().replace('"out":', '"out" :', 1))
    assert main(["traces", "get", "agentic", "-q", "--force"]) == 1
    err = capsys.readouterr().err
    assert "trace_0016.json: sha256" in err and "nothing was kept" in err
    cached = tmp_path / "cache" / "traces" / "agentic"
    assert not (cached / "trace_0016.json").exists()
    assert not [p for p in cached.iterdir() if p.name.startswith(".")]  # no temporary left


def test_without_a_network_get_prints_the_manual_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVTRIE_TRACE_MIRROR", f"http://{HOST}:{free_port()}")
    monkeypatch.setenv("KVTRIE_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["traces", "get", "mooncake", "-q"]) == 2
    err = capsys.readouterr().err
    assert "could not download" in err and "to get it by hand" in err
    assert "b8cbb061a85206d729d91cdc2981f43c9e0d99209dce588d3af5f7934408b9df" in err


def test_a_third_party_name_not_here_is_exit_2_naming_the_command(tmp_path, monkeypatch, capsys):
    import kvtrie.traces

    monkeypatch.setenv("KVTRIE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kvtrie.traces, "shared_dirs", lambda: [])
    report = tmp_path / "r.json"
    for argv in (["replay", "mooncake", "--report", str(report)],
                 ["sweep", "agentic", "--out", str(tmp_path / "s")],
                 ["convert", "agentic", str(tmp_path / "c.jsonl"), "--to", "kvtrie"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "run `kvtrie traces get" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert main(["traces", "list"]) == 0
    listing = capsys.readouterr().out
    assert "not here: kvtrie traces get mooncake" in listing and "chat" in listing
