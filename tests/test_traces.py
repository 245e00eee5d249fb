"""Trace formats: round trips, and every kind of bad input named by file, line and value."""

from __future__ import annotations

import json

import numpy as np
import pytest
from third_party import third_party

from kvtrie.sim.cli import main
from kvtrie.sim.traces import MOONCAKE_BLOCK, TraceError, expand_blocks, load_trace, write_trace

HEADER = {"format": "kvtrie-trace", "version": 1}


def write_lines(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_kvtrie_trace_round_trips_with_prefixes_and_branches(tmp_path):
    path = tmp_path / "t.jsonl"
    write_trace(
        path,
        {"vocab_size": 100},
        [
            {
                "id": "a",
                "conversation": "c",
                "arrival_ms": 0,
                "prompt": [1, 2, 3],
                "output": [4, 5],
            },
            {
                "id": "b",
                "conversation": "c",
                "arrival_ms": 5,
                "prefix_of": "a",
                "prefix_length": 5,
                "prompt": [6],
                "output_length": 3,
                "user_snapshots": [3],
            },
            {
                "id": "c",
                "conversation": "c",
                "arrival_ms": 9,
                "prefix_of": "a",
                "prefix_length": 2,
                "prompt": [7, 8],
                "output": [9],
            },
        ],
    )
    trace = load_trace(path)
    assert trace.format == "kvtrie" and len(trace.requests) == 3 and len(trace.sha256) == 64
    a, b, c = trace.requests
    assert (a.prompt_length, b.prompt_length, c.prompt_length) == (3, 6, 4)
    assert b.outputs == 3 and b.user_snapshots == (3,)
    assert trace.referenced == {"a"}


def test_mooncake_blocks_expand_deterministically_and_share_equal_ids():
    a = expand_blocks((7, 8), 600, 1000)
    b = expand_blocks((7, 9), 1024, 1000)
    assert len(a) == 600 and len(b) == 1024
    assert np.array_equal(a[:MOONCAKE_BLOCK], b[:MOONCAKE_BLOCK])
    assert not np.array_equal(a[MOONCAKE_BLOCK:600], b[MOONCAKE_BLOCK:600])
    assert np.array_equal(a, expand_blocks((7, 8), 600, 1000))
    assert a.max() < 1000 and a.min() >= 0


def test_the_mooncake_trace_loads():
    trace = load_trace(third_party("mooncake"))
    assert trace.format == "mooncake" and len(trace.requests) == 12031
    assert trace.prompt_tokens == 144_793_823


BAD_KVTRIE = [
    ('{"id": "a", "prompt": [1,', 2, "not JSON"),
    ({"id": "a"}, 2, "missing field 'prompt'"),
    ({"id": "a", "prompt": [1], "output_length": -3}, 2, "output_length must be >= 0, got -3"),
    ({"id": "a", "prompt": [1, 5000]}, 2, "prompt[1] = 5000 is outside the model's vocabulary"),
    ({"id": "a", "prompt": [1, "x"]}, 2, "prompt[1] is not a token id"),
    ({"id": "a", "prompt": []}, 2, "the prompt is empty"),
    (
        {"id": "a", "prompt": [1], "prefix_of": "zz", "prefix_length": 1},
        2,
        "prefix_of 'zz' names no earlier request",
    ),
    ({"id": "a", "prompt": [1], "user_snapshots": [9]}, 2, "user snapshot at 9 is past"),
]


@pytest.mark.parametrize(("line", "lineno", "message"), BAD_KVTRIE)
def test_bad_kvtrie_lines_name_file_line_and_value(tmp_path, line, lineno, message):
    path = write_lines(tmp_path / "bad.jsonl", [HEADER, line])
    with pytest.raises(TraceError) as info:
        load_trace(path, vocab_size=1000)
    assert str(info.value).startswith(f"{path}:{lineno}: ")
    assert message in str(info.value)


def test_out_of_order_arrivals_and_duplicate_ids_are_rejected(tmp_path):
    path = write_lines(
        tmp_path / "t.jsonl",
        [
            HEADER,
            {"id": "a", "arrival_ms": 10, "prompt": [1]},
            {"id": "b", "arrival_ms": 5, "prompt": [2]},
        ],
    )
    with pytest.raises(TraceError, match=r":3: arrival_ms 5 is before"):
        load_trace(path)
    path = write_lines(
        tmp_path / "d.jsonl", [HEADER, {"id": "a", "prompt": [1]}, {"id": "a", "prompt": [2]}]
    )
    with pytest.raises(TraceError, match=r":3: duplicate request id 'a'"):
        load_trace(path)


MOONCAKE_OK = {"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"hash_ids": [1]}, "1 hash ids for input_length 600: expected 2 blocks"),
        ({"input_length": -1}, "input_length must be >= 1, got -1"),
        ({"output_length": -2}, "output_length must be >= 0, got -2"),
        ({"hash_ids": [1, -4]}, "hash_ids[1] must be an integer in [0, 2**54), got -4"),
        ({"timestamp": "soon"}, "timestamp must be a number"),
    ],
)
def test_bad_mooncake_lines(tmp_path, fields, message):
    path = write_lines(tmp_path / "m.jsonl", [MOONCAKE_OK, {**MOONCAKE_OK, **fields}])
    with pytest.raises(TraceError) as info:
        load_trace(path)
    assert f"{path}:2: " in str(info.value) and message in str(info.value)


def test_mooncake_time_going_backwards_is_rejected(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [{**MOONCAKE_OK, "timestamp": 9}, MOONCAKE_OK])
    with pytest.raises(TraceError, match=r":2: timestamp 0 is before the previous line's 9"):
        load_trace(path)


def test_unknown_format_and_empty_file(tmp_path):
    with pytest.raises(TraceError, match="unknown trace format"):
        load_trace(write_lines(tmp_path / "u.jsonl", [{"hello": 1}]))
    with pytest.raises(TraceError, match="the trace is empty"):
        load_trace(write_lines(tmp_path / "e.jsonl", []))
    with pytest.raises(TraceError, match="no such trace file"):
        load_trace(tmp_path / "missing.jsonl")


def test_cli_bad_input_exits_2_and_writes_no_report(tmp_path, capsys):
    path = write_lines(tmp_path / "bad.jsonl", [HEADER, {"id": "a", "prompt": [1, 999999]}])
    report = tmp_path / "report.json"
    assert main(["replay", str(path), "--model", "llama-8b", "--report", str(report)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: prompt[1] = 999999 is outside the model's vocabulary [0, 128256)" in err
    assert not report.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--budget", "8 parsecs"],
        ["--check", "sometimes"],
        ["--limit", "0"],
        ["--model", "nope"],
    ],
)
def test_cli_bad_options_exit_2(argv, capsys):
    assert main(["replay", "system-prompt", *argv]) == 2
    assert "kvtrie replay:" in capsys.readouterr().err


def test_events_and_header_defaults_replay(tmp_path, capsys):
    path = write_lines(
        tmp_path / "e.jsonl",
        [
            {**HEADER, "profile": "tiny-mixed", "budget_bytes": None, "policy": "kvtrie-improved"},
            {"id": "a", "prompt": [1, 2, 3, 4, 5, 6]},
            {"id": "b", "prompt": [1, 2, 3, 4, 8]},  # splits a's edge and snapshots at 4
            {"id": "d", "prompt": [9]},
            {"event": "fail_restores", "count": 1},
            {"id": "c", "prompt": [1, 2, 3, 4, 7]},  # must restore [0, 4): the injected failure
            {"event": "corrupt", "start": 0, "end": 4},
            {"event": "budget", "budget_bytes": 0},
        ],
    )
    trace = load_trace(path)
    assert [e.kind for e in trace.requests[3].events] == ["fail_restores"]
    assert [e.kind for e in trace.trailing_events] == ["corrupt", "budget"]
    report = tmp_path / "r.json"
    assert main(["replay", str(path), "-q", "--report", str(report)]) == 0
    result = json.loads(report.read_text())
    assert (result["model"], result["policy"]) == ("tiny-mixed", "kvtrie-improved")
    assert result["restore_failures"] == 1 and result["violations"] == []


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"event": "explode"}, "unknown event 'explode'"),
        ({"event": "budget"}, "missing field 'budget_bytes'"),
        ({"event": "fail_restores", "count": 0}, "count must be >= 1"),
        ({"event": "corrupt", "start": 5, "end": 5}, "end must be >= 6"),
    ],
)
def test_bad_events(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [HEADER, line])
    with pytest.raises(TraceError, match=message):
        load_trace(path)
