"""The disk tier: snapshots evicted from RAM move there, are served back (checked by the
oracle), are evicted from it in LRU order, and each tier stays within its own budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from child import kvtrie

from kvtrie.core import check
from kvtrie.core.tiers import SimulatedDisk
from kvtrie.sim.cli import main

KV = 16  # bytes per token of the rig's "kv" profile
# a conversation of 30 prompt tokens and 2 outputs leaves a node of 31 (the last output is
# generated, never evaluated)
NODE = 31 * KV


def conversation(first: int, length: int = 30) -> list[int]:
    return list(range(first, first + length))


def test_a_prefix_evicted_from_ram_is_served_from_disk(rig):
    with_disk = rig("kv", budget=40 * KV, store=SimulatedDisk())
    ram_only = rig("kv", budget=40 * KV)
    for r in (with_disk, ram_only):
        for first in (100, 200, 300):  # leaving 200 pages it out, evicting 100 from RAM
            r.run(conversation(first), [1, 2])
    assert with_disk.cache.stats.moves_to_disk == 1
    assert with_disk.cache.paged_out_bytes <= 40 * KV

    again = conversation(100) + [1, 7]
    assert ram_only.run(again).cached_tokens == 0
    served = with_disk.run(again)  # rig.run asserts the restored state equals a fresh prefill
    assert served.cached_tokens == 31
    stats = with_disk.cache.stats
    assert stats.disk_page_ins == 1 and stats.disk_hit_tokens == 31
    assert stats.disk_read_bytes == NODE


def _slow_disk(cached, prompt, disk_bytes):
    """A disk of one byte a second against a second a token of prefill: reading never pays."""
    return disk_bytes + (prompt - cached)


def _fast_disk(cached, prompt, disk_bytes):
    return disk_bytes / 1e9 + (prompt - cached)


@pytest.mark.parametrize(
    "policy, estimate, served, skipped",
    [
        ("kvtrie-improved", _slow_disk, 0, 1),
        ("kvtrie-improved", _fast_disk, 31, 0),
        ("kvtrie-improved", None, 31, 0),  # no estimate: read what matched
        ("kvtrie-improved,-read-or-recompute", _slow_disk, 31, 0),
    ],
)
def test_a_disk_read_estimated_slower_than_recomputing_is_recomputed(
    rig, policy, estimate, served, skipped
):
    r = rig("kv", budget=40 * KV, policy=policy, store=SimulatedDisk(), estimate_seconds=estimate)
    for first in (100, 200, 300):
        r.run(conversation(first), [1, 2])
    assert [n.tokens[0] for n in r.cache.nodes() if n.on_disk] == [100]
    assert r.run(conversation(100) + [1, 7]).cached_tokens == served  # the oracle checks it
    stats = r.cache.stats
    assert stats.disk_reads_skipped == skipped
    assert stats.disk_page_ins == (1 if served else 0)


def test_the_disk_tier_evicts_its_least_recently_used_node(rig):
    r = rig("kv", budget=0, store=SimulatedDisk(), disk_budget=2 * NODE)
    for first in (100, 200, 300):
        r.run(conversation(first), [1, 2])
    r.run(conversation(400), [1, 2])  # moves 300 to disk, which drops 100, the oldest
    on_disk = sorted(n.tokens[0] for n in r.cache.nodes() if n.on_disk)
    assert on_disk == [200, 300]
    assert r.cache.disk_bytes == 2 * NODE
    assert r.cache.stats.disk_evictions == 1


def test_a_page_out_too_big_for_ram_goes_straight_to_disk(rig):
    r = rig("kv", budget=10 * KV, store=SimulatedDisk())
    r.run(conversation(100), [1, 2])
    r.run(conversation(200), [1, 2])
    (node,) = [n for n in r.cache.nodes() if not n.is_root and n.tokens[0] == 100]
    assert node.on_disk and r.cache.stats.snapshots_skipped == 0
    assert r.run(conversation(100) + [1, 9]).cached_tokens == 31


def test_a_failed_write_evicts_the_node_and_is_counted(rig):
    store = SimulatedDisk()
    r = rig("kv", budget=40 * KV, store=store)
    r.run(conversation(100), [1, 2])
    store.fail_next_writes(1)
    r.run(conversation(200), [1, 2])
    r.run(conversation(300), [1, 2])  # leaving 200 evicts 100 from RAM: its write fails
    assert r.cache.stats.disk_write_failures == 1
    assert all(n.tokens[0] != 100 for n in r.cache.nodes() if not n.is_root)
    assert r.run(conversation(100) + [1, 9]).cached_tokens == 0


def test_lowering_the_disk_budget_evicts_down_to_it(rig):
    r = rig("kv", budget=0, store=SimulatedDisk())
    for first in (100, 200, 300, 400):
        r.run(conversation(first), [1, 2])
    assert r.cache.disk_bytes == 3 * NODE  # the fourth is live
    r.cache.set_disk_budget(NODE)
    assert r.cache.disk_bytes == NODE and not check(r.cache)
    r.cache.set_disk_budget(0)
    assert r.cache.disk_bytes == 0 and not check(r.cache)


def test_a_node_in_two_tiers_is_a_violation(rig):
    """The checker's tier rule fires: a node marked as on disk holding a RAM snapshot."""
    r = rig("kv")
    r.run(conversation(100), [1])
    r.run(conversation(200), [1])  # leaving 100 pages it out
    (node,) = [n for n in r.cache.nodes() if n.snapshots]
    node.on_disk = True
    assert [v.invariant for v in check(r.cache)].count("TIER") == 1


def replay(tmp_path, *argv: str) -> dict:
    report = tmp_path / "r.json"
    assert main(["replay", *argv, "-q", "--report", str(report)]) == 0
    return json.loads(report.read_text())


@pytest.mark.parametrize("policy", ["kvtrie-seed", "kvtrie-improved"])
def test_both_tiers_stay_within_budget_at_every_instant(tmp_path, policy):
    """Full checks audit every eviction and every move (I6 for each tier after each one)."""
    report = replay(
        tmp_path,
        "agent",
        "--budget",
        "512MiB",
        "--disk-budget",
        "1GiB",
        "--check",
        "full",
        "--policy",
        policy,
    )
    disk = report["disk_tier"]
    assert report["peak_paged_out_bytes"] <= 512 << 20 and disk["peak_bytes"] <= 1 << 30
    assert disk["moves_to_disk"] and disk["evictions"] and disk["page_ins"]
    assert report["violations"] == []


def test_ram_and_disk_hit_at_least_one_ram_tier_of_their_sum(tmp_path):
    """On the chat trace, in child processes (typeguard makes 1,851 requests slow here)."""

    def replay_child(*argv: str) -> dict:
        report = tmp_path / "r.json"
        argv = ("replay", "chat", "--policy", "kvtrie-improved", "-q", *argv)
        assert kvtrie(*argv, "--report", str(report)) == 0
        return json.loads(report.read_text())

    both = replay_child("--budget", "1GiB", "--disk-budget", "8GiB")
    one = replay_child("--budget", "9GiB")
    assert both["hit_ratio"] >= one["hit_ratio"] - 0.002
    # reading every match from an unbounded disk tier reuses what an infinite cache would
    reads_all = ("--policy", "kvtrie-improved,-read-or-recompute")
    unbounded = replay_child("--budget", "1GiB", "--disk-budget", "inf", *reads_all)
    assert unbounded["cached_tokens"] == unbounded["ideal_cached_tokens"]
    assert unbounded["peak_paged_out_bytes"] <= 1 << 30
    # weighing each read against recomputing (the default) gives up a few tokens where the
    # time model says reading a long node for them is slower, and never costs seconds
    weighed = replay_child("--budget", "1GiB", "--disk-budget", "inf")
    assert weighed["disk_tier"]["reads_skipped"] > 0
    assert weighed["cached_tokens"] < unbounded["cached_tokens"]

    def seconds(report):
        return report["time_model"]["prefill_seconds"] + report["time_model"]["snapshot_seconds"]

    assert seconds(weighed) < seconds(unbounded)


def test_without_a_disk_tier_the_report_says_none(tmp_path):
    assert replay(tmp_path, "system-prompt")["disk_tier"] is None


def test_disk_events_need_a_disk_tier(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"format": "kvtrie-trace", "version": 1}\n'
        '{"id": "a", "prompt": [1, 2, 3], "output": [4]}\n'
        '{"event": "disk_budget", "budget_bytes": 0}\n'
    )
    assert main(["replay", str(trace), "-q"]) == 2
    assert f"{trace}:3: a disk_budget event needs a disk tier" in capsys.readouterr().err
    assert main(["replay", str(trace), "-q", "--disk-budget", "1MiB"]) == 0
    assert main(["replay", str(trace), "-q", "--disk-budget", "lots"]) == 2
    assert "--disk-budget: bad size 'lots'" in capsys.readouterr().err


def test_a_sweep_with_disk_budgets_draws_ram_by_disk(tmp_path):
    def sweep(out, *extra):
        argv = ["sweep", "agent", "-q", "--processes", "1", "--out", str(tmp_path / out)]
        argv += ["--policies", "kvtrie-improved,ideal", "--budgets", "256MiB,1GiB", *extra]
        assert main(argv) == 0
        return json.loads((tmp_path / out / "sweep.json").read_text())["rows"]

    plain = sweep("plain")
    tiered = sweep("tiered", "--disk-budgets", "1GiB,inf")
    assert [r for r in tiered if not r["disk_tier"]] == [
        {**r, "wall_seconds": t["wall_seconds"]}
        for r, t in zip(plain, [r for r in tiered if not r["disk_tier"]])
    ]  # the RAM-only cells are the same with or without the disk axis
    disk = {(r["budget_bytes"], r["disk_budget_bytes"]): r for r in tiered if r["disk_tier"]}
    assert len(disk) == 4
    ram = {r["budget_bytes"]: r for r in plain if r["policy"] == "kvtrie-improved"}
    for (budget, disk_budget), row in disk.items():
        assert row["hit_ratio"] >= ram[budget]["hit_ratio"]
        assert disk_budget is None or row["disk_peak_bytes"] <= disk_budget
    assert (tmp_path / "tiered" / "disk_kvtrie-improved.png").stat().st_size > 0
    assert (
        "kvtrie-improved: hit ratio with a disk tier"
        in (tmp_path / "tiered" / "sweep.md").read_text()
    )
    assert not (tmp_path / "plain" / "disk_kvtrie-improved.png").exists()


def test_a_restart_event_keeps_the_disk_tier_and_loses_ram(tmp_path):
    trace = tmp_path / "t.jsonl"
    prompt = list(range(1, 40))
    trace.write_text(
        '{"format": "kvtrie-trace", "version": 1, "disk_budget_bytes": null}\n'
        + json.dumps({"id": "a", "prompt": prompt, "output": [50, 51]})
        + "\n"
        + json.dumps({"id": "b", "prompt": [7, 8, 9], "output": [1]})
        + '\n{"event": "restart", "clean": CLEAN}\n'
        + json.dumps({"id": "c", "prompt": prompt + [50, 60], "output": [1]})
        + "\n"
    )
    # 8 GiB: "a" is paged out to RAM, which a clean stop keeps on disk and a crash loses;
    # 0: "a" goes straight to the disk tier, which both keep
    text = trace.read_text()
    for budget, clean, cached in (("8GiB", "true", 40), ("8GiB", "false", 0), ("0", "false", 40)):
        trace.write_text(text.replace("CLEAN", clean))
        report = tmp_path / "r.json"
        assert main(["replay", str(trace), "-q", "--budget", budget, "--report", str(report)]) == 0
        assert json.loads(report.read_text())["cached_tokens"] == cached, (budget, clean)
    trace.write_text(trace.read_text().replace(', "disk_budget_bytes": null', ""))
    assert main(["replay", str(trace), "-q"]) == 2


def test_a_budget_that_counts_the_live_layers_keeps_both_within_it(rig):
    r = rig("kv", budget=80 * KV, counts_live=True)
    cache = r.cache
    for first in (100, 200, 300):
        r.run(conversation(first), [1, 2])  # every check: I6 against what the live layers leave
        assert cache.paged_out_bytes + cache.live_bytes <= 80 * KV
    assert cache.paged_out_bytes > 0  # what the live conversation leaves is used
    r.run(list(range(500, 600)), [1])  # 100 live tokens: more than the budget
    assert cache.stats.live_over_budget == 1
    assert cache.paged_out_bytes == 0


def _header_cost_trace(tmp_path, **changes):
    """A trace whose header carries a disk tier, RAM budget 0 and a fuzzer's cost figures (a
    disk that reads a quarter of a token's bytes a second against a second a token of
    prefill), as a regression trace of the fuzzer does; three conversations, the first again."""
    from kvtrie.sim.fuzz import fuzz_cost

    cost = fuzz_cost("tiny-attention", 64, 0.25).as_table()
    header = {
        "format": "kvtrie-trace",
        "version": 1,
        "profile": "tiny-attention",
        "policy": "kvtrie-improved",
        "budget_bytes": 0,
        "disk_budget_bytes": None,
        "cost": {**cost, **changes},
    }
    lines = [
        {"id": f"r{i}", "prompt": conversation(first), "output": [1]}
        for i, first in enumerate((100, 200, 100))
    ]
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps(line) + "\n" for line in [header, *lines]))
    return trace


def test_a_trace_header_cost_gives_the_replay_its_estimate(tmp_path):
    trace = _header_cost_trace(tmp_path)
    out = tmp_path / "report.json"
    assert main(["replay", str(trace), "-q", "--report", str(out)]) == 0  # the oracle on it
    report = json.loads(out.read_text())
    assert report["disk_tier"]["reads_skipped"] == 1 and report["cached_tokens"] == 0
    assert report["time_model"]["cost"]["name"] == "from-trace"
    # --cost overrides the header: a shipped entry's fast disk is read
    assert main(["replay", str(trace), "-q", "--cost", "llama-8b-m4", "--report", str(out)]) == 0
    assert json.loads(out.read_text())["disk_tier"]["reads_skipped"] == 0


def test_a_bad_cost_in_a_trace_header_is_exit_2_naming_file_line_and_key(tmp_path, capsys):
    trace = _header_cost_trace(tmp_path, disk_read_bytes_per_second=-1.0)
    assert main(["replay", str(trace), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"{trace}:1: header cost" in err and "disk_read_bytes_per_second must be > 0" in err
    assert err.count("\n") == 1


def test_a_disk_node_the_live_layers_cannot_line_up_with_is_a_miss_not_a_failure(tmp_path):
    """Found by the nightly MLX fuzz: after failed writes and a merge across a gap, a disk-tier
    node of tiny-hybrid held its recurrent states and no attention range; restoring those
    states ran them past the attention layers, which then could not line up (a restore
    failure nobody injected, I11), and its tokens were counted as served from disk."""
    trace = Path(__file__).parent / "regressions" / "mlx-34529a05ae.jsonl"
    report = tmp_path / "report.json"
    assert main(["replay", str(trace), "-q", "--report", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["restore_failures"] == 0
    disk = result["disk_tier"]
    assert disk["page_ins"] == 1 and disk["hit_tokens"] <= result["cached_tokens"]
    assert disk["ram_hit_tokens"] >= 0
