"""The replayer: reports, exit codes, the infinite-cache bound, and stopping on a violation."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from third_party import third_party

from kvtrie.backends.fake import FakeBackend, FakeRecurrentCache
from kvtrie.backends.profiles import get_profile
from kvtrie.sim.build import parse_size
from kvtrie.sim.cli import build_parser, main
from kvtrie.sim.traces import expand_blocks, load_trace
from kvtrie.traces import EMBEDDED

REPORT_KEYS = {
    "requests",
    "prompt_tokens",
    "cached_tokens",
    "computed_tokens",
    "hit_ratio",
    "ideal_hit_ratio",
    "violations",
    "peak_paged_out_bytes",
    "budget_bytes",
    "evictions",
    "page_ins",
    "page_outs",
    "splits",
    "merges",
    "wall_seconds",
    "tokens_per_second",
    "backend",
    "model",
    "policy",
    "trace",
}


def run_replay(tmp_path, *argv):
    report = tmp_path / "r.json"
    code = main(["replay", *argv, "-q", "--report", str(report)])
    return code, json.loads(report.read_text())


def lcp_bound(prompts, evaluated):
    """Independent bound: for each request, the longest common prefix with anything evaluated
    before it, keeping one token to evaluate."""
    total = 0
    for i, prompt in enumerate(prompts):
        best = 0
        for earlier in evaluated[:i]:
            n = min(len(prompt), len(earlier))
            diff = np.nonzero(prompt[:n] != earlier[:n])[0]
            best = max(best, int(diff[0]) if len(diff) else n)
        total += min(best, len(prompt) - 1)
    return total


def test_improved_policy_at_infinite_budget_meets_the_independent_lcp_bound(tmp_path):
    mooncake = third_party("mooncake")
    limit = 250
    code, improved = run_replay(
        tmp_path,
        "mooncake",
        "--budget",
        "inf",
        "--policy",
        "kvtrie-improved",
        "--limit",
        str(limit),
    )
    assert code == 0 and improved["violations"] == []
    _, seed = run_replay(tmp_path, "mooncake", "--budget", "inf", "--limit", str(limit))
    # recompute every prompt and the outputs the fake model gives it, without the cache
    backend = FakeBackend(get_profile("llama-8b"))
    trace = load_trace(mooncake)
    prompts, evaluated = [], []
    for request in trace.requests[:limit]:
        prompt = expand_blocks(request.hash_ids, request.input_length, backend.vocab_size)
        layers = backend.new_layers()
        outputs = backend.generate(layers, backend.evaluate(layers, prompt), request.outputs)
        prompts.append(prompt)
        evaluated.append(np.concatenate([prompt, outputs[:-1]]))
    bound = lcp_bound(prompts, evaluated)
    assert improved["cached_tokens"] == bound == improved["ideal_cached_tokens"]
    assert seed["cached_tokens"] <= bound
    assert seed["cached_tokens"] < improved["cached_tokens"]  # the partial-edge loss


def test_report_has_the_contract_fields_and_adds_up(tmp_path):
    code, report = run_replay(tmp_path, "branching", "--model", "qwen3-next-hybrid")
    assert code == 0
    assert REPORT_KEYS <= set(report)
    assert report["cached_tokens"] + report["computed_tokens"] == report["prompt_tokens"]
    assert report["hit_ratio"] == pytest.approx(report["cached_tokens"] / report["prompt_tokens"])
    assert report["budget_bytes"] == 8 << 30
    assert report["trace"]["sha256"] and report["trace"]["format"] == "kvtrie"


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_bundled_traces_replay_clean_on_every_layer_kind(tmp_path, name):
    for model in ("llama-8b", "gemma-12b-swa", "qwen3-next-hybrid"):
        code, report = run_replay(tmp_path, name, "--model", model, "--budget", "64MiB")
        assert code == 0, report["violations"]
        assert report["hit_ratio"] <= report["ideal_hit_ratio"] + 1e-12


@pytest.mark.parametrize("policy", ["kvtrie-seed", "kvtrie-improved"])
def test_bundled_traces_replay_clean_with_all_three_layer_kinds_under_pressure(tmp_path, policy):
    """A model with attention, sliding-window and recurrent layers, at a budget small enough
    that whole-state layers are split, evicted and (in the seed) merged."""
    totals = {"merges": 0, "splits": 0, "evictions": 0}
    for name in sorted(EMBEDDED):
        code, report = run_replay(
            tmp_path, name, "--model", "hybrid-all-kinds", "--budget", "1GiB", "--policy", policy
        )
        assert code == 0, report["violations"]
        assert report["peak_paged_out_bytes"] <= 1 << 30
        for key in totals:
            totals[key] += report[key]
    assert totals["splits"] and totals["evictions"]
    assert totals["merges"] or policy == "kvtrie-improved"  # improved does not merge


def test_incremental_and_full_checks_agree(tmp_path):
    _, every = run_replay(tmp_path, "rag", "--budget", "32MiB", "--check", "every")
    _, full = run_replay(tmp_path, "rag", "--budget", "32MiB", "--check", "full")
    assert every["violations"] == full["violations"] == []
    assert every["cached_tokens"] == full["cached_tokens"]


def test_budget_sizes_parse():
    assert parse_size("8GiB") == 8 << 30
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("4096") == 4096
    assert parse_size("inf") is None
    with pytest.raises(ValueError, match="bad size"):
        parse_size("lots")


def test_a_violation_stops_the_replay_with_its_request_and_a_trie_dump(
    tmp_path, monkeypatch, capsys
):
    # sabotage: let recurrent layers "rewind" by moving the offset and keeping a stale state
    monkeypatch.setattr(FakeRecurrentCache, "can_restore", lambda self, snapshot, target: True)
    monkeypatch.setattr(
        FakeRecurrentCache, "_rewind", lambda self, target: setattr(self, "_offset", target)
    )
    code, report = run_replay(tmp_path, "system-prompt", "--model", "qwen3-next-hybrid")
    assert code == 1
    first = report["violations"][0]
    assert first["invariant"] == "I9" and first["request"].startswith("r")
    assert report["stopped_early"] and report["requests"] < 64
    assert "kv cache live_tokens=" in capsys.readouterr().err


def test_keep_going_collects_every_violation(tmp_path, monkeypatch):
    monkeypatch.setattr(FakeRecurrentCache, "can_restore", lambda self, snapshot, target: True)
    monkeypatch.setattr(
        FakeRecurrentCache, "_rewind", lambda self, target: setattr(self, "_offset", target)
    )
    code, report = run_replay(
        tmp_path, "system-prompt", "--model", "qwen3-next-hybrid", "--keep-going"
    )
    assert code == 1 and report["requests"] == 64 and len(report["violations"]) > 1


def test_markdown_summary_is_written(tmp_path):
    md = tmp_path / "summary.md"
    assert main(["replay", "agent", "-q", "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "| hit ratio |" in text and "| violations | 0 |" in text


def test_gen_is_deterministic_and_prints_ideal_reuse(tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path in (a, b):
        assert (
            main(["gen", "branching", "--seed", "7", "--set", "chats=3", "--out", str(path)]) == 0
        )
    assert a.read_bytes() == b.read_bytes()
    assert "ideal reuse" in capsys.readouterr().out
    assert main(["gen", "agent", "--set", "wings=3", "--out", str(a)]) == 2


def test_help_explains_every_command(capsys):
    for argv in (["--help"], ["replay", "--help"], ["gen", "--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--budget" in out and "kvtrie-improved" in out


def test_every_subcommand_has_a_help_that_reads_as_written(capsys):
    # argparse leaves a description's "%%" as it is, so an escaped percent shows doubled
    (commands,) = (
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    assert len(commands.choices) >= 10
    for name in commands.choices:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: kvtrie {name}") and "%%" not in out and "%(" not in out
