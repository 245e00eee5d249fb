"""Every bad input is one located line and exit 2, nothing is written, and no output path
ever clobbers what is not kvtrie's own; an unexpected error is exit 3, never 1."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtrie.sim.cli import main

HEADER = {"format": "kvtrie-trace", "version": 1}
REQUEST = {"id": "a", "prompt": [1, 2, 3], "output": [4]}


def _file(path: Path, content: bytes | str) -> Path:
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


def _jsonl(path: Path, *lines: object) -> Path:
    return _file(path, "".join(json.dumps(line) + "\n" for line in lines))


def _trace_lines() -> list[bytes]:
    return [json.dumps(line).encode() for line in (HEADER, REQUEST)]


# (name, files to make {name: content}, argv with {dir} for the folder, expected message part)
BAD_INPUTS = [
    # seeded, and starting with a byte UTF-8 never starts with: os.urandom once began with a
    # newline, and the error moved to line 2
    (
        "random bytes",
        {"t": b"\x8f" + random.Random(7).randbytes(1999)},
        ["replay", "{dir}/t"],
        "{dir}/t:1: not UTF-8",
    ),
    (
        "bad byte on line 502",
        {"t": b"\n".join([b'{"format": "kvtrie-trace", "version": 1}'] + [b"{}"] * 500)
         + b'\n{"id": "x", "prompt": [1, \xff]}\n'},
        ["replay", "{dir}/t"],
        "{dir}/t:502: not UTF-8 text (byte 0xff",
    ),
    ("header profile 5", {"t": [{**HEADER, "profile": 5}, REQUEST]}, ["replay", "{dir}/t"],
     "{dir}/t:1: header profile: expected str, got 5"),
    ("header policy list", {"t": [{**HEADER, "policy": ["x"]}, REQUEST]}, ["replay", "{dir}/t"],
     "{dir}/t:1: header policy"),
    ("output_length 10**12", {"t": [HEADER, {"id": "a", "prompt": [1], "output_length": 10**12}]},
     ["replay", "{dir}/t"], "{dir}/t:2: output_length must be <= 16,777,216"),
    ("deeply nested JSON", {"t": json.dumps(HEADER) + "\n" + "[" * 100_000 + "]" * 100_000},
     ["replay", "{dir}/t"], "{dir}/t:2: JSON nested too deeply"),
    ("Mooncake hash id 2**63",
     {"t": [{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [2**63]}]},
     ["replay", "{dir}/t"], "{dir}/t:1: hash_ids[0] must be an integer in [0, 2**54)"),
    ("a directory as TRACE", {}, ["replay", "{dir}"], "is a directory with no *.json files: not a trace"),
    ("--budget of 400 digits", {}, ["replay", "agent", "--budget", "9" * 400],
     "--budget: '9999999999"),
    ("--budget -1GiB", {}, ["replay", "agent", "--budget=-1GiB"], "--budget: bad size '-1GiB'"),
    ("vocab_size = 0", {"p.toml": '[profiles.x]\nvocab_size = 0\nlayers = [{kind = "kv", '
                        'bytes_per_token = 2}]\n'}, ["replay", "agent", "--model", "{dir}/p.toml"],
     "{dir}/p.toml: profiles.x.vocab_size: expected an integer >= 1, got 0"),
    ("layers = []", {"p.toml": "[profiles.x]\nvocab_size = 9\nlayers = []\n"},
     ["replay", "agent", "--model", "{dir}/p.toml"], "profiles.x.layers: expected a non-empty"),
    ("profiles = 5", {"p.toml": "profiles = 5\n"}, ["replay", "agent", "--model", "{dir}/p.toml"],
     "{dir}/p.toml: profiles: expected [profiles.NAME] tables"),
    ("gen --set users=0", {}, ["gen", "system-prompt", "--set", "users=0", "--out", "{dir}/g"],
     "--set users=0: must be in [1,"),
    ("gen --set of an unknown size", {}, ["gen", "agent", "--set", "users=3", "--out", "{dir}/g"],
     "--set users: agent has no such size"),
    ("gen --out a directory", {}, ["gen", "agent", "--out", "{dir}"], "is a directory"),
    ("sweep --limit -5", {}, ["sweep", "agent", "--limit", "-5", "--out", "{dir}/s"],
     "--limit must be >= 1, got -5"),
    ("sweep --limit 0", {}, ["sweep", "agent", "--limit", "0", "--out", "{dir}/s"],
     "--limit must be >= 1, got 0"),
    ("sweep --budgets ''", {}, ["sweep", "agent", "--budgets", "", "--out", "{dir}/s"],
     "--budgets: give at least one budget"),
    ("sweep --out a file", {"f": "x"}, ["sweep", "agent", "--out", "{dir}/f"],
     "exists and is not a directory"),
    ("fuzz --examples 0", {}, ["fuzz", "--examples", "0", "--out", "{dir}/z"],
     "--examples must be >= 1, got 0"),
    ("fuzz --steps 0", {}, ["fuzz", "--steps", "0", "--out", "{dir}/z"], "--steps must be >= 1"),
    ("fuzz --examples -1", {}, ["fuzz", "--examples", "-1", "--out", "{dir}/z"],
     "--examples must be >= 1, got -1"),
    ("fuzz --model gpt5", {}, ["fuzz", "--model", "gpt5", "--out", "{dir}/z"],
     "unknown model profile 'gpt5'"),
    ("MLX model with a broken config.json", {"m/config.json": '{"model_type": '},
     ["replay", "agent", "--backend", "mlx", "--model", "{dir}/m"],
     "{dir}/m/config.json: not valid JSON"),
    ("--report over the input trace", {"t": [HEADER, REQUEST]},
     ["replay", "{dir}/t", "--report", "{dir}/t"], "--report {dir}/t: that is an input"),
    ("--report in a missing directory", {}, ["replay", "agent", "--report", "{dir}/no/r.json"],
     "does not exist"),
]


@pytest.mark.parametrize("name, files, argv, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_located_line_and_exit_2(tmp_path, capsys, name, files, argv, message):
    for relative, content in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, list):
            _jsonl(path, *content)
        else:
            _file(path, content)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    argv = [a.replace("{dir}", str(tmp_path)) for a in argv]
    report = [] if "--report" in argv or argv[0] != "replay" else ["--report", str(tmp_path / "r")]
    assert main([*argv, *report]) == 2
    err = capsys.readouterr().err
    assert message.replace("{dir}", str(tmp_path)) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_an_internal_error_exits_3_with_a_line_and_the_traceback_under_v(monkeypatch, capsys):
    from kvtrie.sim import replay

    def broken(*args, **kwargs):
        raise KeyError("the cache's own bug")

    monkeypatch.setattr(replay, "replay", broken)
    assert main(["replay", "system-prompt", "-q", "--limit", "1"]) == 3
    err = capsys.readouterr().err
    assert "internal error, please report" in err and "Traceback" not in err
    assert main(["replay", "system-prompt", "-q", "--limit", "1", "-v"]) == 3
    assert "Traceback" in capsys.readouterr().err


def test_verbose_works_after_the_subcommand():
    import subprocess
    import sys

    from kvtrie.sim.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["replay", "agent", "-v"]).verbose == 1
    assert parse(["replay", "agent", "-vv"]).verbose == parse(["-vv", "replay", "agent"]).verbose == 2
    assert parse(["replay", "agent"]).verbose == 0
    argv = [sys.executable, "-m", "kvtrie.sim.cli", "replay", "system-prompt", "--limit", "2"]
    done = subprocess.run([*argv, "-q", "-v"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "cache miss total=" in done.stderr


# ---- outputs -------------------------------------------------------------------------------


def test_a_report_to_a_character_device_is_written_through(tmp_path):
    assert main(["replay", "system-prompt", "-q", "--limit", "2", "--report", os.devnull]) == 0
    assert Path(os.devnull).is_char_device()


def test_a_report_to_a_fifo_is_written_through(tmp_path):
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    assert main(["replay", "system-prompt", "-q", "--limit", "2", "--report", str(fifo)]) == 0
    reader.join(timeout=30)
    assert json.loads(got[0])["requests"] == 2 and fifo.is_fifo()


def test_a_report_through_a_symlink_replaces_its_target(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert main(["replay", "system-prompt", "-q", "--limit", "2", "--report", str(link)]) == 0
    assert link.is_symlink() and json.loads(target.read_text())["requests"] == 2


def test_a_report_to_stdout(capsys):
    assert main(["replay", "system-prompt", "-q", "--limit", "2", "--report", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["requests"] == 2


def test_a_sweep_into_an_old_sweep_leaves_none_of_its_files_stale(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "paged_out.png").write_bytes(b"an older sweep's plot")
    (out / "notes.txt").write_text("the user's own")
    argv = ["sweep", "branching", "--policies", "none,ideal", "--budgets", "inf", "-q"]
    assert main([*argv, "--out", str(out)]) == 0
    assert not (out / "paged_out.png").exists()  # no kvtrie policy, no timeline: removed
    assert (out / "notes.txt").read_text() == "the user's own"
    assert (out / "sweep.json").exists()


# ---- readers never raise a traceback ---------------------------------------------------------

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def _mutated_lines(draw_bytes: bytes) -> bytes:
    lines = _trace_lines()
    return b"\n".join(lines[:1] + [draw_bytes] + lines[1:]) + b"\n"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(
    content=st.one_of(
        st.binary(max_size=300),
        st.builds(_mutated_lines, st.binary(max_size=80)),
        json_values.map(lambda v: (json.dumps(HEADER) + "\n" + json.dumps(v) + "\n").encode()),
        st.dictionaries(st.sampled_from(sorted(REQUEST) + ["output_length", "prefix_of"]),
                        json_values, max_size=4)
        .map(lambda v: (json.dumps(HEADER) + "\n" + json.dumps(v) + "\n").encode()),
        json_values.map(lambda v: (json.dumps({**HEADER, "profile": v}) + "\n").encode()),
    )
)
def test_the_trace_reader_parses_or_names_the_line(tmp_path_factory, content):
    from kvtrie.sim.traces import TraceError, load_trace, read_header

    path = tmp_path_factory.mktemp("t") / "trace.jsonl"
    path.write_bytes(content)
    try:
        read_header(path)
        load_trace(path, vocab_size=100)
    except TraceError as exc:
        assert str(exc).startswith(f"{path}")


@FUZZ
@given(
    content=st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: f"[profiles.x]\nvocab_size = {json.dumps(v)}\nlayers = []\n"),
        st.sampled_from(["profiles = 5", "[profiles]\nx = 1", "[profiles.x]\nlayers = [3]"]),
        st.dictionaries(st.sampled_from(["kind", "count", "bytes_per_token", "window",
                                         "state_bytes", "extra"]),
                        st.integers(-3, 3) | st.sampled_from(["kv", "rotating", "recurrent", "x"]))
        .map(lambda d: "[profiles.x]\nvocab_size = 10\nlayers = [{"
             + ", ".join(f"{k} = {json.dumps(v)}" for k, v in d.items()) + "}]\n"),
    )
)
def test_the_profile_loader_parses_or_names_the_file(tmp_path_factory, content):
    from kvtrie.backends.profiles import load_profiles

    path = tmp_path_factory.mktemp("p") / "p.toml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    try:
        load_profiles(path)
    except ValueError as exc:
        assert str(exc).startswith(str(path))


@FUZZ
@given(
    content=st.one_of(
        st.binary(max_size=200),
        st.sampled_from(
            [
                "[gate]\ntolerence = 0.1\n[[check]]\nname = 'a'\ntrace = 'agent'\n",
                "[[chek]]\nname = 'a'\n",
                "[gate]\ntolerance = nan\n[[check]]\nname = 'a'\ntrace = 'agent'\n",
                "[[check]]\nname = 'a'\ntrace = 'nowhere'\n",
                "[[check]]\nname = 'a'\ntrace = 'agent'\nmodel = 'gpt5'\n",
                "[[check]]\nname = 'a'\ntrace = 'agent'\npolicy = 'greedy'\n",
                "[[check]]\nname = 'a'\ntrace = 'agent'\nbackend = 'cuda'\n",
                "gate = 3\n",
            ]
        ),
        json_values.map(lambda v: f"[[check]]\nname = 'a'\ntrace = 'agent'\nlimit = {json.dumps(v)}\n"),
    )
)
def test_the_gate_loader_parses_or_names_the_line(tmp_path_factory, content):
    from kvtrie.sim.gate import GateError, load_config

    path = tmp_path_factory.mktemp("g") / "gate.toml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    try:
        load_config(path, needs_baseline=False)
    except GateError as exc:
        assert str(exc).startswith(str(path))


def test_a_reader_that_hangs_up_is_not_an_internal_error():
    """``kvtrie ... | head``: the pipe closes under the command's output (``true`` closes it
    before the first write, so the write always meets a closed pipe)."""
    import subprocess
    import sys

    command = f"{sys.executable} -m kvtrie.sim.cli gen agent --out - | true"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr
