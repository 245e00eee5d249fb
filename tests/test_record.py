"""``kvtrie record`` with real parts: mlx_lm.server on a tiny local model directory upstream, the
official ``openai`` client sending multi-turn conversations through the recorder, then a replay
of the recording; and the recorder facing an upstream that errs, is slow, or is down, and a
client that goes away mid-stream."""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import time

import pytest
from servers import HOST, free_port, http_server, start_mlx_server, start_recorder, stop

openai = pytest.importorskip("openai")
pytest.importorskip("aiohttp")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """mlx_lm.server serving a tiny random-weight model from a local directory."""
    from kvtrie.backends.mlx.models import save_model_directory

    root = tmp_path_factory.mktemp("upstream")
    model = save_model_directory("tiny-attention", root / "model")
    port = free_port()
    proc = start_mlx_server(model, port, root / "server.log")
    yield model, f"http://{HOST}:{port}"
    stop(proc)


@pytest.fixture(scope="module")
def tokenizer(upstream):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(upstream[0]))


def _client(port: int):
    return openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="unused", max_retries=0,
                         timeout=60)


def _record(tmp_path, upstream_url: str, model, *extra: str):
    port = free_port()
    out = tmp_path / "recording.jsonl"
    proc = start_recorder(
        ["--upstream", upstream_url, "--tokenizer", str(model), "--out", str(out), *extra],
        port,
        tmp_path / "recorder.log",
    )
    return proc, port, out


def _chat(client, model, messages, key, stream, usage):
    """One turn; the reply's text and the completion tokens the client was told."""
    if not stream:
        reply = client.chat.completions.create(
            model=str(model), messages=messages, max_tokens=4,
            extra_headers={"X-Conversation-Id": key},
        )
        return reply.choices[0].message.content, reply.usage.completion_tokens
    options = {"stream_options": {"include_usage": True}} if usage else {}
    chunks = client.chat.completions.create(
        model=str(model), messages=messages, max_tokens=4, stream=True, user=key, **options
    )
    text, produced = [], None
    for chunk in chunks:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            produced = chunk.usage.completion_tokens
    return "".join(text), produced


def _cut_stream(port: int, model) -> None:
    """A streamed chat whose client reads the first bytes and hangs up."""
    body = json.dumps({"model": str(model), "stream": True, "max_tokens": 3000,
                       "messages": [{"role": "user", "content": "w9 w9 w9"}]})
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.read1(16)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def _template(tokenizer, messages) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _common(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_a_recorded_session_replays_with_its_conversation_structure(
    tmp_path, upstream, tokenizer
):
    from kvtrie.sim.cli import main

    model, url = upstream
    proc, port, out = _record(tmp_path, url, model)
    try:
        _cut_stream(port, model)
        client = _client(port)
        histories: dict[str, list] = {"conversation-0": [], "conversation-1": []}
        sent = []  # (conversation, the messages asked, the completion tokens the client saw)
        for turn in range(3):
            for key, history in histories.items():
                asked = [*history, {"role": "user", "content": f"w{20 + len(sent)} w{30 + turn}"}]
                reply, produced = _chat(client, model, asked, key, stream=turn > 0,
                                        usage=turn == 1)
                sent.append((key, asked, produced))
                histories[key] = [*asked, {"role": "assistant", "content": reply}]
        text = client.completions.create(model=str(model), prompt="w7 w8 w9", max_tokens=3)
        assert stop(proc) == 0
    finally:
        stop(proc)
    header, *lines = _lines(out)
    assert header["format"] == "kvtrie-trace" and header["vocab_size"] == len(tokenizer)
    assert len(lines) == 7, "the cut stream writes no line; the six turns and the text do"
    chats, completion = lines[:6], lines[6]
    for (key, asked, produced), line in zip(sent, chats):
        assert line["conversation"] == key
        assert line["prompt"] == _template(tokenizer, asked)
        if produced is not None:  # a stream without usage: counted by the tokenizer
            assert line["output_length"] == produced
    assert completion["prompt"] == [7, 8, 9]
    assert completion["output_length"] == text.usage.completion_tokens
    structure = 0  # each turn extends the conversation's previous prompt in full
    for i, line in enumerate(chats):
        earlier = [c for c in chats[:i] if c["conversation"] == line["conversation"]]
        if earlier:
            assert line["prompt"][: len(earlier[-1]["prompt"])] == earlier[-1]["prompt"]
        shared = max((_common(line["prompt"], c["prompt"]) for c in chats[:i]), default=0)
        structure += min(shared, len(line["prompt"]) - 1)
    report = tmp_path / "report.json"
    assert main(["replay", str(out), "--budget", "inf", "--policy", "kvtrie-improved", "-q",
                 "--report", str(report)]) == 0
    replayed = json.loads(report.read_text())
    assert replayed["requests"] == 7
    # the ideal also counts the replay's own generated outputs; they match a recorded prompt
    # only by chance, a token at a time
    assert structure <= replayed["ideal_cached_tokens"] <= structure + 7
    assert replayed["cached_tokens"] == replayed["ideal_cached_tokens"]


def test_a_hashed_recording_holds_no_token_and_keeps_the_reuse(tmp_path, upstream):
    from kvtrie.sim.cli import main

    model, url = upstream
    proc, port, out = _record(tmp_path, url, model, "--hashed", "--block-size", "4")
    try:
        client = _client(port)
        messages = [{"role": "user", "content": "w11 w12 w13 w14 w15 w16"}]
        for turn in range(3):
            reply, _ = _chat(client, model, messages, "k", stream=False, usage=False)
            messages = [*messages, {"role": "assistant", "content": reply},
                        {"role": "user", "content": f"w{40 + turn} w41 w42"}]
        assert stop(proc) == 0
    finally:
        stop(proc)
    lines = _lines(out)
    assert len(lines) == 3
    for line in lines:
        assert set(line) == {"timestamp", "input_length", "output_length", "hash_ids",
                             "session_id"}
        assert len(line["hash_ids"]) == -(-line["input_length"] // 4)
    assert len({line["session_id"] for line in lines}) == 1 and lines[0]["session_id"] != "k"
    for before, after in zip(lines, lines[1:]):
        full = before["input_length"] // 4
        assert after["hash_ids"][:full] == before["hash_ids"][:full]
    report = tmp_path / "report.json"
    assert main(["replay", str(out), "--block-size", "4", "--budget", "inf", "-q",
                 "--report", str(report)]) == 0
    replayed = json.loads(report.read_text())
    whole_blocks = sum(line["input_length"] // 4 * 4 for line in lines[:-1])
    assert replayed["ideal_cached_tokens"] >= whole_blocks


class _Upstream(http.server.BaseHTTPRequestHandler):
    """An upstream that answers 503 with a body of its own, or, asked for 'slow', sleeps."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if b"slow" in body:
            time.sleep(3)
        payload = json.dumps({"error": {"message": "overloaded, try later"}}).encode()
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


def test_an_upstream_error_passes_through_and_a_slow_one_is_a_502(tmp_path, upstream):
    model = upstream[0]
    with http_server(_Upstream) as server:
        proc, port, out = _record(tmp_path, f"http://{HOST}:{server.server_port}", model,
                                  "--upstream-timeout", "1")
        try:
            client = _client(port)
            ask = [{"role": "user", "content": "w10"}]
            with pytest.raises(openai.APIStatusError) as error:
                client.chat.completions.create(model="m", messages=ask)
            assert error.value.status_code == 503
            assert error.value.body["message"] == "overloaded, try later"
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as error:
                client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "slow"}]
                )
            assert error.value.status_code == 502 and time.monotonic() - started < 2.9
            with pytest.raises(openai.APIStatusError) as error:  # still serving
                client.completions.create(model="m", prompt="w5")
            assert error.value.status_code == 503
            assert stop(proc) == 0
        finally:
            stop(proc)
    header, *lines = _lines(out)
    assert header["format"] == "kvtrie-trace" and lines == []


def test_an_upstream_that_is_down_is_a_502_and_the_recorder_keeps_running(tmp_path, upstream):
    model = upstream[0]
    proc, port, out = _record(tmp_path, f"http://{HOST}:{free_port()}", model)
    try:
        client = _client(port)
        for _ in range(2):
            with pytest.raises(openai.APIStatusError) as error:
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": "w6"}])
            assert error.value.status_code == 502
            assert "unreachable" in error.value.body["message"]
        assert proc.poll() is None
        assert stop(proc) == 0
    finally:
        stop(proc)
    assert len(_lines(out)) == 1  # the header alone


def test_bad_recorder_input_is_one_line_and_exit_2(tmp_path, capsys, upstream):
    from kvtrie.sim.cli import main

    model = str(upstream[0])
    existing = tmp_path / "taken.jsonl"
    existing.write_text("mine\n")
    base = ["record", "--upstream", "http://127.0.0.1:9", "--tokenizer", model]
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        taken = busy.getsockname()[1]
        cases = [
            ([*base, "--out", str(existing)], "exists; a recording never replaces a file"),
            ([*base, "--out", str(tmp_path / "a.jsonl"), "--listen", f"{HOST}:{taken}"],
             f"--listen {HOST}:{taken}: "),
            (["record", "--upstream", "ftp://x", "--tokenizer", model, "--out",
              str(tmp_path / "b.jsonl")], "--upstream takes an http(s) URL"),
            (["record", "--upstream", "http://127.0.0.1:9", "--tokenizer",
              str(tmp_path / "none"), "--out", str(tmp_path / "c.jsonl")], "no such directory"),
            ([*base, "--out", str(tmp_path / "d.jsonl"), "--listen", "localhost"],
             "--listen takes HOST:PORT"),
        ]
        for argv, message in cases:
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert existing.read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.jsonl"]
