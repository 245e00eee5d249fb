"""The published trace formats: Mooncake and its superset, Bailian, kv-cache-tester's agentic
conversations; each read from small hand-made files and the real samples, with its bad input
one located line and exit 2; and ``kvtrie convert`` between them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from third_party import third_party

from kvtrie.sim.cli import main
from kvtrie.sim.traces import ReadOptions, load_trace, resolve_prompt


def _jsonl(path: Path, *lines: object) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _prompts(trace, vocab=1000):
    history: dict = {}
    return [resolve_prompt(r, history, vocab) for r in trace.requests]


def _replay(tmp_path, *argv: str) -> dict:
    report = tmp_path / "report.json"
    assert main(["replay", *argv, "--budget", "inf", "--policy", "kvtrie-improved", "-q",
                 "--report", str(report)]) == 0
    return json.loads(report.read_text())


# ---- Mooncake and the superset ------------------------------------------------------------


def test_the_superset_places_turns_by_delay_within_their_session(tmp_path):
    path = _jsonl(
        tmp_path / "m.jsonl",
        {"timestamp": 0, "session_id": "a", "input_length": 20, "output_length": 1, "hash_ids": [1, 2]},
        {"timestamp": 500, "session_id": "b", "input_length": 10, "output_length": 1, "hash_ids": [3]},
        {"session_id": "a", "delay": 100, "input_length": 30, "output_length": 2, "hash_ids": [1, 2, 4]},
    )
    trace = load_trace(path, options=ReadOptions(block_size=10))
    assert [(r.conversation, r.arrival_ms) for r in trace.requests] == [
        ("a", 0.0), ("a", 100.0), ("b", 500.0)
    ]
    first, second, _ = _prompts(trace)
    assert np.array_equal(first, second[:20]) and len(second) == 30
    assert trace.reading == {"format": "mooncake", "block_size": 10, "block_convention": "ceil"}


def test_under_floor_an_unhashed_tail_is_shared_with_nobody(tmp_path):
    lines = [{"timestamp": t, "input_length": 25, "output_length": 1, "hash_ids": [7, 8]}
             for t in (0, 1)]
    trace = load_trace(_jsonl(tmp_path / "m.jsonl", *lines),
                       options=ReadOptions(block_size=10, block_convention="floor"))
    a, b = _prompts(trace)
    assert np.array_equal(a[:20], b[:20]) and not np.array_equal(a[20:], b[20:])
    assert trace.requests[0].hash_ids[-1] != trace.requests[1].hash_ids[-1]
    assert min(trace.requests[0].hash_ids[-1], trace.requests[1].hash_ids[-1]) > 8


def test_the_mooncake_sample_keeps_its_reference_figures():
    trace = load_trace(third_party("mooncake"))
    assert len(trace.requests) == 12031 and trace.prompt_tokens == 144_793_823
    seen: set[tuple[int, int]] = set()
    cached = 0  # an infinite cache at block granularity, the one-token rule
    for request in trace.requests:
        k = 0
        while k < len(request.hash_ids) and (k, request.hash_ids[k]) in seen:
            k += 1
        cached += min(k * 512, request.input_length - 1)
        seen.update(enumerate(request.hash_ids))
    assert cached / trace.prompt_tokens == pytest.approx(0.3736, abs=5e-5)  # its README's bound


# ---- Bailian -----------------------------------------------------------------------------

BAILIAN = [
    {"chat_id": 159, "parent_chat_id": -1, "timestamp": 61.114, "input_length": 40,
     "output_length": 12, "type": "text", "turn": 1, "hash_ids": [2**63 + 5, 17, 99]},
    {"chat_id": 160, "parent_chat_id": -1, "timestamp": 61.5, "input_length": 20,
     "output_length": 3, "type": "search", "turn": 1, "hash_ids": [2**63 + 5, 44]},
    {"chat_id": 171, "parent_chat_id": 159, "timestamp": 75.0, "input_length": 70,
     "output_length": 8, "type": "text", "turn": 2, "hash_ids": [2**63 + 5, 17, 99, 100, 101]},
]


def test_a_bailian_chain_is_one_conversation_and_its_blocks_are_16_tokens(tmp_path):
    trace = load_trace(_jsonl(tmp_path / "b.jsonl", *BAILIAN))
    assert trace.format == "bailian"
    assert [(r.id, r.conversation, r.arrival_ms) for r in trace.requests] == [
        ("159", "159", 61114.0), ("160", "160", 61500.0), ("171", "159", 75000.0)
    ]
    first, other, turn2 = _prompts(trace)
    assert np.array_equal(first[:40], turn2[:40]) and np.array_equal(first[:16], other[:16])
    assert not np.array_equal(first[16:20], other[16:20])
    report = _replay(tmp_path, str(tmp_path / "b.jsonl"))
    # blocks of 16: request 2 reuses the system block, request 3 the 40-token first turn
    # (its partial block [32, 40) has the same id, so the same tokens)
    assert report["ideal_cached_tokens"] == 16 + 40


# ---- kv-cache-tester agentic traces ------------------------------------------------------


def _agentic(name: str, calls: list[dict], **extra) -> dict:
    return {"id": name, "block_size": 4, "hash_id_scope": "local", "requests": calls, **extra}


def _call(t: float, n: int, ids: list[int], **extra) -> dict:
    return {"t": t, "type": "n", "in": n, "out": 2, "hash_ids": ids, "api_time": 1.5,
            "think_time": 0.5, **extra}


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "agentic"
    folder.mkdir()
    sub = {"t": 5.0, "type": "subagent", "agent_id": "explore", "requests": [
        _call(0.0, 8, [50, 51]), _call(2.0, 12, [50, 51, 52])]}
    _json(folder / "one.json", _agentic("one", [_call(0.0, 9, [1, 2]), sub,
                                                 _call(10.0, 13, [1, 2, 3])]))
    _json(folder / "two.json", _agentic("two", [_call(0.0, 9, [1, 2]), _call(4.0, 9, [1, 2])]))
    return folder


def test_agentic_files_subagents_and_local_ids(tmp_path):
    trace = load_trace(_folder(tmp_path))
    assert trace.format == "agentic"
    assert trace.reading == {"format": "agentic", "files": 2, "block_convention": "floor",
                             "arrival": {"process": "all-at-once"}}
    rows = [(r.conversation, r.arrival_ms) for r in trace.requests]
    assert rows == [("one", 0.0), ("two", 0.0), ("two", 4000.0), ("one/explore", 5000.0),
                    ("one/explore", 7000.0), ("one", 10000.0)]
    by_id = {r.id: p for r, p in zip(trace.requests, _prompts(trace))}
    # local scope: file two's ids 1, 2 are not file one's
    assert not np.array_equal(by_id["one#0"][:8], by_id["two#0"][:8])
    assert np.array_equal(by_id["two#0"][:8], by_id["two#1"][:8])
    assert np.array_equal(by_id["one#0"][:8], by_id["one#1"][:8])
    assert by_id["one#0"][8] != by_id["one#1"][8]  # an unhashed tail is its request's own
    assert trace.requests[0].api_s == 1.5 and trace.requests[0].think_s == 0.5


def test_agentic_arrivals_are_a_choice_the_trace_records(tmp_path):
    folder = _folder(tmp_path)
    one_at_a_time = load_trace(folder, options=ReadOptions(concurrency=1))
    starts = {r.conversation: r.arrival_ms for r in reversed(one_at_a_time.requests)}
    assert starts["two"] == 11500.0  # one ends at 10 s + its last call's 1.5 s
    poisson = [load_trace(folder, options=ReadOptions(sessions_per_hour=60, arrival_seed=s))
               for s in (3, 3, 4)]
    arrivals = [[r.arrival_ms for r in t.requests] for t in poisson]
    assert arrivals[0] == arrivals[1] != arrivals[2]
    assert poisson[0].reading["arrival"] == {"process": "poisson", "sessions_per_hour": 60,
                                             "seed": 3}
    report = _replay(tmp_path, str(folder), "--concurrency", "1")
    assert report["trace"]["reading"]["arrival"] == {"process": "concurrency", "concurrency": 1}


def test_the_agentic_sample_matches_its_readme(tmp_path):
    folder = third_party("agentic")
    report = _replay(tmp_path, str(folder), "--limit", "200")
    assert report["requests"] == 200 and report["violations"] == []
    trace = load_trace(folder)
    assert len(trace.requests) == 1224 and trace.prompt_tokens == 116_328_394
    assert max(r.input_length for r in trace.requests) == 423_055


# ---- bad input of the new readers: one located line, exit 2, no report --------------------

MOON = {"timestamp": 0, "input_length": 20, "output_length": 1, "hash_ids": [1]}
CALL = {"t": 0, "type": "n", "in": 8, "out": 1, "hash_ids": [1, 2]}
BAD = [
    ("bailian parent not yet seen", "b.jsonl", [{**BAILIAN[2]}], [],
     "{p}:1: parent_chat_id 159 names no earlier chat_id"),
    ("bailian negative length", "b.jsonl", [{**BAILIAN[0], "input_length": -4}], [],
     "{p}:1: input_length must be >= 1, got -4"),
    ("bailian ids disagree with the length", "b.jsonl", [{**BAILIAN[0], "hash_ids": [1, 2]}], [],
     "{p}:1: 2 hash ids for input_length 40: expected 3 blocks of 16 tokens (ceil"),
    ("bailian timestamp a string", "b.jsonl", [{**BAILIAN[0], "timestamp": "61"}], [],
     "{p}:1: timestamp must be a number of seconds >= 0, got '61'"),
    ("bailian duplicate chat", "b.jsonl", [BAILIAN[0], BAILIAN[0]], [],
     "{p}:2: duplicate chat_id 159"),
    ("mooncake floor count", "m.jsonl", [{**MOON, "input_length": 40}],
     ["--block-convention", "floor", "--block-size", "16"],
     "{p}:1: 1 hash ids for input_length 40: expected 2 blocks of 16 tokens (floor"),
    ("mooncake delay negative", "m.jsonl", [{**MOON, "delay": -1}], [],
     "{p}:1: delay must be a number >= 0, got -1"),
    ("mooncake session a list", "m.jsonl", [{**MOON, "session_id": [1]}], [],
     "{p}:1: session_id must be a string or integer, got [1]"),
    ("agentic subagent without requests", "a.json",
     [_agentic("x", [CALL, {"t": 1, "type": "subagent", "agent_id": "s"}])], [],
     "{p}: requests[1].requests is missing: a subagent needs requests"),
    ("agentic subagent with no calls", "a.json",
     [_agentic("x", [CALL, {"t": 1, "type": "subagent", "requests": []}])], [],
     "{p}: requests[1].requests must be a non-empty list"),
    ("agentic negative out", "a.json", [_agentic("x", [{**CALL, "out": -3}])], [],
     "{p}: requests[0].out must be >= 0, got -3"),
    ("agentic in a string", "a.json", [_agentic("x", [{**CALL, "in": "8"}])], [],
     "{p}: requests[0].in must be an integer, got '8'"),
    ("agentic ids disagree with in", "a.json", [_agentic("x", [{**CALL, "in": 12}])], [],
     "{p}: requests[0].2 hash ids for in 12: expected 3 blocks of 4 tokens (floor"),
    ("agentic t backwards", "a.json", [_agentic("x", [{**CALL, "t": 5}, CALL])], [],
     "{p}: requests[1].t 0 is before the previous request's 5"),
    ("agentic hash id a float", "a.json", [_agentic("x", [{**CALL, "hash_ids": [1, 2.5]}])], [],
     "{p}: requests[0].hash_ids[1] must be an integer in [0, 2**64), got 2.5"),
    ("agentic scope unknown", "a.json", [_agentic("x", [CALL], hash_id_scope="world")], [],
     "{p}: hash_id_scope must be local or global, got 'world'"),
    ("agentic not one object", "a.json", [[CALL]], ["--format", "agentic"],
     "{p}:1: expected a JSON object, got list"),
    ("both arrival options", "a.json", [_agentic("x", [CALL])],
     ["--concurrency", "2", "--sessions-per-hour", "3"],
     "give --sessions-per-hour or --concurrency, not both"),
]


@pytest.mark.parametrize("name, file, lines, options, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_of_the_new_readers(tmp_path, capsys, name, file, lines, options, message):
    path = _jsonl(tmp_path / file, *lines)
    report = tmp_path / "report.json"
    assert main(["replay", str(path), *options, "--report", str(report)]) == 2
    err = capsys.readouterr().err
    assert message.replace("{p}", str(path)) in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not report.exists()


# ---- kvtrie convert ----------------------------------------------------------------------


def _convert(tmp_path, source: str, name: str, *argv: str) -> Path:
    out = tmp_path / name
    assert main(["convert", source, str(out), *argv]) == 0
    return out


def test_a_hashed_trace_converted_to_kvtrie_replays_into_the_same_prompts(tmp_path):
    source = tmp_path / "chat.jsonl"
    assert main(["gen", "chat", "--seed", "2", "--set", "requests=120", "--set", "minutes=6",
                 "--out", str(source)]) == 0
    kvtrie = _convert(tmp_path, str(source), "chat-kvtrie.jsonl", "--to", "kvtrie")
    before, after = _replay(tmp_path, str(source)), _replay(tmp_path, str(kvtrie))
    for key in ("prompt_tokens", "cached_tokens", "ideal_cached_tokens", "output_tokens"):
        assert before[key] == after[key], key
    assert before["cached_tokens"] > 0
    assert json.loads(kvtrie.read_text().splitlines()[0])["converted_from"]["format"] == "mooncake"


def test_an_agentic_file_converted_to_mooncake_keeps_its_hit_ratio_to_the_block(tmp_path):
    source = third_party("agentic") / "trace_0006.json"
    original = _replay(tmp_path, str(source))
    same = _convert(tmp_path, str(source), "a64.jsonl", "--to", "mooncake", "--out-block-size", "64")
    assert _replay(tmp_path, str(same), "--block-size", "64")["cached_tokens"] == original["cached_tokens"]
    coarse = _convert(tmp_path, str(source), "a512.jsonl", "--to", "mooncake")
    regrouped = _replay(tmp_path, str(coarse))
    requests = original["requests"]
    assert 0 <= original["cached_tokens"] - regrouped["cached_tokens"] <= requests * 512


def test_a_kvtrie_trace_converted_to_mooncake_loses_only_blocks_and_resent_outputs(tmp_path):
    from kvtrie.sim.traces import load_trace as load

    source = tmp_path / "agent.jsonl"
    assert main(["gen", "agent", "--seed", "1", "--out", str(source)]) == 0
    moon = _convert(tmp_path, str(source), "agent-m.jsonl", "--to", "mooncake", "--out-block-size", "16")
    before = _replay(tmp_path, str(source))
    after = _replay(tmp_path, str(moon), "--block-size", "16")
    assert before["prompt_tokens"] == after["prompt_tokens"]
    trace = load(source)
    # a Mooncake replay generates its own outputs, so a next turn re-sending the forced ones
    # computes them again; beyond that, each prompt loses at most a block
    resent = sum(len(r.outputs) for r in trace.requests if r.id in trace.referenced)
    lost = before["cached_tokens"] - after["cached_tokens"]
    assert 0 <= lost <= resent + 16 * before["requests"]


def test_convert_refuses_what_the_target_cannot_hold(tmp_path, capsys):
    source = tmp_path / "branching.jsonl"
    assert main(["gen", "branching", "--seed", "1", "--out", str(source)]) == 0
    assert main(["convert", str(source), str(tmp_path / "m.jsonl"), "--to", "mooncake"]) == 2
    assert "user restore points" in capsys.readouterr().err
    generated = tmp_path / "g.jsonl"
    generated.write_text(
        '{"format": "kvtrie-trace", "version": 1}\n'
        '{"id": "a", "prompt": [1, 2, 3], "output_length": 4}\n'
        '{"id": "b", "prefix_of": "a", "prefix_length": 5, "prompt": [9]}\n'
    )
    assert main(["convert", str(generated), str(tmp_path / "k.jsonl"), "--to", "kvtrie"]) == 2
    assert "extends the outputs request a leaves to the backend" in capsys.readouterr().err
    assert main(["convert", str(source), str(source), "--to", "kvtrie"]) == 2
    assert "that is an input" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["branching.jsonl", "g.jsonl"]
