"""``kvtrie serve``: mlx_lm.server with kvtrie's cache, started on 127.0.0.1 with a tiny local
model directory and driven by the official ``openai`` client: outputs equal greedy decoding
without a cache, ``cached_tokens`` is what the conversation shares, the recording replays to
the same cached tokens, four concurrent clients stay right and within the budget, and bad
input is one line (exit 2) or an HTTP 400 while the server keeps serving."""

from __future__ import annotations

import http.client
import json
import socket
import threading

import pytest
from servers import HOST, free_port, start_kvtrie, stop

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from kvtrie.backends.mlx.models import save_model_directory

    return save_model_directory("tiny-attention", tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def greedy(model_dir):
    """Greedy tokens of a prompt on the same model, with no cache at all."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(model_dir))

    def tokens(prompt: list[int], count: int) -> list[int]:
        steps = generate_step(mx.array(prompt), model, max_tokens=count)
        return [int(token) for token, _ in steps]

    return tokens


def _serve(tmp_path, model_dir, *args: str):
    port = free_port()
    log = tmp_path / "serve.log"
    proc = start_kvtrie(["serve", "--model", str(model_dir), "--host", HOST, "--port", str(port),
                         *args], log)
    client = openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="unused",
                           max_retries=0, timeout=120)
    return proc, port, client, log


def _summary(log) -> dict:
    lines = [line for line in log.read_text().splitlines() if line.startswith("kvtrie serve: {")]
    assert lines, log.read_text()
    return json.loads(lines[-1].split(": ", 1)[1])


def _turn(client, messages, stream: bool):
    """The reply's text and usage."""
    if not stream:
        reply = client.chat.completions.create(model="default_model", messages=messages,
                                               max_tokens=5)
        return reply.choices[0].message.content, reply.usage
    chunks = client.chat.completions.create(
        model="default_model", messages=messages, max_tokens=5, stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = [], None
    for chunk in chunks:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    return "".join(text), usage


def test_served_conversations_are_greedy_cached_and_replay_the_same(tmp_path, model_dir, greedy):
    from kvtrie.sim.cli import main

    record = tmp_path / "served.jsonl"
    proc, _, client, log = _serve(tmp_path, model_dir, "--budget", "inf", "--record", str(record))
    try:
        histories = {0: [], 1: []}
        usages = []
        for turn in range(3):
            for user, history in histories.items():
                asked = [*history, {"role": "user", "content": f"w{40 + user} w{50 + turn} w60"}]
                text, usage = _turn(client, asked, stream=(turn + user) % 2 == 1)
                usages.append(usage)
                histories[user] = [*asked, {"role": "assistant", "content": text}]
        assert stop(proc) == 0
    finally:
        stop(proc)
    summary = _summary(log)
    assert summary["violations"] == [] and summary["requests"] == 6
    header, *lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert header["format"] == "kvtrie-trace" and len(lines) == 6
    for line, usage in zip(lines, usages):
        generated = line["output"][:-1]  # the last one is never evaluated (see kvtrie.sim.serve)
        assert generated == greedy(line["prompt"], 5), "outputs differ from no cache"
        assert usage.prompt_tokens == len(line["prompt"])
    # at an unbounded budget a request reuses the longest prefix any earlier one left held
    # (its prompt and generated tokens), less one token: a turn, all its previous turn held
    held: list[list[int]] = []
    for i, (line, usage) in enumerate(zip(lines, usages)):
        prompt = line["prompt"]
        shared = max((_common(prompt, h) for h in held), default=0)
        assert usage.prompt_tokens_details.cached_tokens == min(shared, len(prompt) - 1)
        if i >= 2:  # the same user's previous turn is a prefix, in full
            previous = held[i - 2]
            assert prompt[: len(previous)] == previous and shared >= len(previous)
        held.append(prompt + line["output"][:-1])
    report = tmp_path / "replay.json"
    assert main(["replay", str(record), "--backend", "mlx", "--model", str(model_dir),
                 "--budget", "inf", "--policy", "kvtrie-improved", "-q",
                 "--report", str(report)]) == 0
    replayed = json.loads(report.read_text())
    assert replayed["cached_tokens"] == sum(u.prompt_tokens_details.cached_tokens for u in usages)
    assert replayed["cached_tokens"] == summary["cached_tokens"]


def test_four_concurrent_clients_stay_right_and_within_the_budget(tmp_path, model_dir, greedy):
    budget = 24 * 1024  # about 48 tokens of this model's KV: evictions all along
    record = tmp_path / "load.jsonl"
    proc, _, client, log = _serve(tmp_path, model_dir, "--budget", str(budget),
                                  "--record", str(record))
    errors: list[BaseException] = []

    def user(index: int) -> None:
        try:
            for conversation in range(5):
                history: list = []
                for turn in range(4):
                    asked = [*history, {"role": "user",
                                        "content": f"w{100 + index} w{200 + conversation} w{300 + turn}"}]
                    text, _ = _turn(client, asked, stream=turn % 2 == 1)
                    history = [*asked, {"role": "assistant", "content": text}]
        except BaseException as exc:  # noqa: B902 - reported below, in the test's thread
            errors.append(exc)

    try:
        threads = [threading.Thread(target=user, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not any(t.is_alive() for t in threads) and errors == []
        assert stop(proc) == 0
    finally:
        stop(proc)
    summary = _summary(log)
    assert summary["violations"] == [] and summary["requests"] == 80
    assert summary["peak_paged_out_bytes"] <= budget
    lines = [json.loads(line) for line in record.read_text().splitlines()[1:]]
    assert len(lines) == 80
    for line in lines:
        assert line["output"][:-1] == greedy(line["prompt"], 5)


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _post(port: int, body: bytes) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    status, data = response.status, response.read()
    conn.close()
    return status, json.loads(data)


def test_bad_requests_are_400s_and_the_server_keeps_serving(tmp_path, model_dir):
    proc, port, client, log = _serve(tmp_path, model_dir, "--max-context", "16")
    try:
        status, body = _post(port, b'{"messages": [')
        assert status == 400 and "Invalid JSON" in body["error"]
        long = {"model": "default_model", "max_tokens": 2,
                "messages": [{"role": "user", "content": " ".join(["w9"] * 40)}]}
        status, body = _post(port, json.dumps(long).encode())
        assert status == 400 and "this model's context is 16" in body["error"]
        text, usage = _turn(client, [{"role": "user", "content": "w7 w8"}], stream=False)
        assert usage.completion_tokens == 5
        assert stop(proc) == 0
    finally:
        stop(proc)


def test_bad_serve_input_is_one_line_and_exit_2(tmp_path, capsys, model_dir):
    from kvtrie.sim.cli import main

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": ')
    assert main(["serve", "--model", str(broken)]) == 2
    err = capsys.readouterr().err
    assert f"{broken / 'config.json'}: not valid JSON" in err and len(err.strip().splitlines()) == 1
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        taken = busy.getsockname()[1]
        assert main(["serve", "--model", str(model_dir), "--host", HOST,
                     "--port", str(taken)]) == 2
    err = capsys.readouterr().err
    assert f"--port {taken}: {HOST}:{taken} is in use" in err and "Traceback" not in err
    existing = tmp_path / "taken.jsonl"
    existing.write_text("mine\n")
    assert main(["serve", "--model", str(model_dir), "--record", str(existing)]) == 2
    assert "a recording never replaces one" in capsys.readouterr().err
    assert existing.read_text() == "mine\n"
