"""The time model: cost figures, the queue under arrival times, the replay's seconds, and bad
cost files."""

from __future__ import annotations

import json

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import pytest
from child import kvtrie

from kvtrie.sim.calibrate import Calibration, fit_prefill
from kvtrie.sim.cli import main
from kvtrie.sim.costs import CostModel, cost_for, load_costs
from kvtrie.sim.timebench import noise_interval
from kvtrie.sim.timing import ServerClock
from kvtrie.sim.traces import write_trace

COST = CostModel(
    "test",
    "tiny-attention",
    "a test machine",
    "made up",
    0.5,
    0.01,
    0.001,
    0.1,
    1000.0,
    2000.0,
    disk_read_bytes_per_second=100.0,
    disk_write_bytes_per_second=50.0,
)

COST_TOML = """
[costs.mine]
model = "llama-8b"
machine = "my laptop"
source = "kvtrie calibrate"
prefill_fixed_seconds = 0.5
prefill_seconds_per_token = 0.01
prefill_seconds_per_token_context = 0.001
decode_seconds_per_token = 0.1
page_in_bytes_per_second = 1.0e10
page_out_bytes_per_second = 2.0e10
disk_read_bytes_per_second = 2.0e9
disk_write_bytes_per_second = 1.0e9
"""


def test_prefill_counts_the_context_every_computed_token_attends_to():
    # 4 tokens after 10 cached: 0.5 + 4 * 0.01 + 0.001 * (4 * 10 + 4 * 3 / 2)
    assert COST.prefill_seconds(10, 4) == pytest.approx(0.586)
    assert COST.prefill_seconds(0, 14) == pytest.approx(0.5 + 0.14 + 0.001 * 91)
    assert COST.prefill_seconds(14, 0) == 0.0
    assert COST.decode_seconds(3) == pytest.approx(0.2) and COST.decode_seconds(1) == 0.0
    assert COST.restore_seconds(500) == pytest.approx(0.5)
    assert COST.page_out_seconds(400) == pytest.approx(0.2)


def test_requests_queue_in_arrival_order_behind_the_one_being_served():
    clock = ServerClock(COST)
    first = clock.serve(
        "a", 0.0, prompt=4, cached=0, paged_in_bytes=0, paged_out_bytes=0, generated=3
    )
    assert (first.queue_s, first.ttft_s) == (0.0, pytest.approx(0.546))
    # arrives at 0.5 s while the first decodes until 0.546 + 0.2; its snapshots: 300 bytes
    # paged in (0.3 s) and 400 paged out (0.2 s)
    second = clock.serve(
        "b", 500.0, prompt=14, cached=10, paged_in_bytes=300, paged_out_bytes=400, generated=1
    )
    assert second.queue_s == pytest.approx(0.246)
    assert second.ttft_s == pytest.approx(0.246 + 0.5 + 0.586)
    # without the cache it prefills all 14 tokens and restores nothing
    assert second.ttft_no_cache_s == pytest.approx(0.246 + 0.731)
    summary = clock.summary()
    assert summary["prefill_seconds_no_cache"] == pytest.approx(0.546 + 0.731)
    assert summary["seconds_saved"] == pytest.approx(0.731 - 0.586 - 0.5)
    assert summary["busy_seconds"] == pytest.approx(0.546 + 0.2 + 0.5 + 0.586)
    assert [r["request"] for r in summary["requests"]] == ["a", "b"]


def test_a_page_in_from_disk_reads_its_files_first_and_moves_to_disk_are_written_aside():
    clock = ServerClock(COST)
    # 200 bytes read from disk (2 s at 100 B/s), then paged in (0.2 s); 100 bytes moved to
    # disk (2 s at 50 B/s) by the background writer: not on the request's path
    served = clock.serve(
        "a",
        0.0,
        prompt=14,
        cached=10,
        paged_in_bytes=200,
        paged_out_bytes=0,
        generated=1,
        disk_read_bytes=200,
        disk_write_bytes=100,
    )
    assert served.disk_read_s == pytest.approx(2.0) and served.disk_write_s == pytest.approx(2.0)
    assert served.ttft_s == pytest.approx(2.0 + 0.2 + 0.586)
    summary = clock.summary()
    assert summary["disk_read_seconds"] == pytest.approx(2.0)
    assert summary["disk_write_seconds"] == pytest.approx(2.0)
    assert summary["busy_seconds"] == pytest.approx(2.2 + 0.586)


def test_a_time_scale_replays_arrivals_faster():
    clock = ServerClock(COST, time_scale=2.0)
    assert clock.serve("a", 4000.0, 4, 0, 1).arrival_s == 2.0


def test_the_shipped_figures_say_where_they_come_from():
    entries = load_costs()
    assert entries and all(e.source and e.machine for e in entries.values())
    assert cost_for("llama-8b", None).name == "llama-8b-m4"
    assert cost_for("tiny-mixed", None) is None  # no figures: no time model


# llama-bench's prompt-processing rates (tokens/s) at four prompt lengths, as their sources
# publish them: the fitted entries must give each one back
PUBLISHED_PP = {
    "llama-8b-m2-ultra": {512: 994.04, 1024: 1023.89, 4096: 979.47, 8192: 913.55},
    "llama-8b-m3-max": {512: 693.32, 1024: 678.04, 4096: 573.09, 8192: 505.32},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PP))
def test_a_fitted_entry_gives_its_published_prompt_rates_back(name):
    cost = load_costs()[name]
    for tokens, rate in PUBLISHED_PP[name].items():
        estimated = cost.prefill_seconds(0, tokens)
        assert estimated == pytest.approx(tokens / rate, rel=0.025), (name, tokens)


def _conversation(tmp_path):
    path = tmp_path / "conv.jsonl"
    system = list(range(1, 200))
    lines = [
        {"id": "a", "prompt": system + [300, 301], "output": [7, 8], "arrival_ms": 0},
        {"id": "b", "prompt": system + [400], "output": [9], "arrival_ms": 1000},
        {"id": "c", "prompt": system + [300, 301, 7, 8, 500], "output": [5], "arrival_ms": 1500},
    ]
    write_trace(path, {"profile": "llama-8b", "budget_bytes": None}, lines)
    return path, [len(line["prompt"]) for line in lines]


def test_replay_reports_estimated_seconds_with_and_without_the_cache(tmp_path):
    trace, prompts = _conversation(tmp_path)
    costs = tmp_path / "cost.toml"
    costs.write_text(COST_TOML)
    report_path = tmp_path / "report.json"
    argv = ["replay", str(trace), "-q", "--policy", "improved", "--cost", str(costs)]
    assert main([*argv, "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    model = report["time_model"]
    assert model["cost"]["name"] == "mine"
    mine = load_costs(costs)["mine"]
    assert model["prefill_seconds_no_cache"] == pytest.approx(
        sum(mine.prefill_seconds(0, n) for n in prompts)
    )
    assert (
        report["cached_tokens"] > 0 and model["prefill_seconds"] < model["prefill_seconds_no_cache"]
    )
    assert len(model["requests"]) == 3
    # each request says what it reused and computed, and its prefill is the model's of those
    for row, prompt in zip(model["requests"], prompts):
        assert row["cached_tokens"] + row["computed_tokens"] == prompt
        assert row["prefill_s"] == pytest.approx(
            mine.prefill_seconds(row["cached_tokens"], row["computed_tokens"])
        )
    assert sum(r["cached_tokens"] for r in model["requests"]) == report["cached_tokens"]
    # the switches page out and restore real snapshots (128 KiB a token): they cost seconds
    assert model["snapshot_seconds"] > 0
    ttft = model["ttft_seconds"]
    assert ttft["p50"] <= ttft["p95"] <= ttft["p99"]
    assert model["ttft_seconds"]["p99"] < model["ttft_seconds_no_cache"]["p99"]


def test_without_cost_figures_for_the_model_there_is_no_time_model(tmp_path, capsys):
    trace, _ = _conversation(tmp_path)
    report_path = tmp_path / "report.json"
    argv = ["replay", str(trace), "--model", "gemma-12b-swa", "--report", str(report_path)]
    assert main(argv) == 0
    assert json.loads(report_path.read_text())["time_model"] is None
    assert "estimated" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, message",
    [
        (
            ("page_in_bytes_per_second = 1.0e10", "page_in_bytes_per_second = -5.0"),
            "page_in_bytes_per_second must be > 0",
        ),
        (
            ("decode_seconds_per_token = 0.1", "decode_seconds_per_token = 0"),
            "decode_seconds_per_token must be > 0",
        ),
        (
            ("prefill_fixed_seconds = 0.5", "prefill_fixed_seconds = -0.5"),
            "prefill_fixed_seconds must be >= 0",
        ),
        (("prefill_seconds_per_token = 0.01\n", ""), "is missing 'prefill_seconds_per_token'"),
        (
            ("disk_read_bytes_per_second = 2.0e9\n", ""),
            "is missing 'disk_read_bytes_per_second'",
        ),
        (
            ("disk_write_bytes_per_second = 1.0e9", "disk_write_bytes_per_second = -1.0"),
            "disk_write_bytes_per_second must be > 0",
        ),
        (
            ('machine = "my laptop"', 'machine = "my laptop"\nspeed = 3'),
            "costs.mine.speed: unknown key",
        ),
        (
            ("decode_seconds_per_token = 0.1", 'decode_seconds_per_token = "fast"'),
            "decode_seconds_per_token must be a number",
        ),
        (("[costs.mine]", "[other]"), "no [costs.NAME] table"),
        (("model = ", "model = = "), "cost.toml"),
    ],
)
def test_a_bad_cost_file_is_exit_2_naming_the_file_and_the_key(tmp_path, capsys, change, message):
    costs = tmp_path / "cost.toml"
    costs.write_text(COST_TOML.replace(*change))
    report = tmp_path / "report.json"
    assert main(["replay", "shared-prefix", "--cost", str(costs), "--report", str(report)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(costs) in err and "\n" == err[-1] and err.count("\n") == 1
    assert not report.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--cost", "no-such-machine"],
            "neither a file nor a shipped entry (llama-8b-m4, llama-8b-m1-max, llama-8b-m2-ultra, "
            "llama-8b-m3-max)",
        ),
        (["--time-scale", "0"], "--time-scale must be a number > 0"),
        (["--time-scale", "nan"], "--time-scale must be a number > 0"),
    ],
)
def test_bad_time_options_are_exit_2(capsys, argv, message):
    assert main(["replay", "shared-prefix", "-q", *argv]) == 2
    assert message in capsys.readouterr().err


def test_the_fit_recovers_the_coefficients_of_exact_timings():
    truth = CostModel("t", "m", "x", "y", 0.01, 0.002, 1e-6, 0.1, 1.0, 1.0, 1.0, 1.0)
    rows = [(c, n, truth.prefill_seconds(c, n)) for c in (0, 100, 400) for n in (8, 32, 128)]
    assert fit_prefill(rows) == pytest.approx((0.01, 0.002, 1e-6), rel=1e-6)
    # a coefficient the timings make negative is dropped, not kept below zero
    flat = [(c, n, 0.5 + 0.001 * n - 1e-9 * (n * c)) for c in (0, 1000) for n in (8, 64)]
    assert min(fit_prefill(flat)) >= 0.0


def _noisy_validation(grid_factors: list[float], replay_factors: list[float]) -> dict:
    """The noise interval of a validation whose grid and replays are exact timings of COST,
    each round's (the grid's, its replay's) slowed by its factor."""
    points = [(c, n) for c in (0, 100, 400) for n in (8, 32, 128)]
    timings = [[COST.prefill_seconds(c, n) * f for f in grid_factors] for c, n in points]
    calibration = Calibration(COST, [(c, n, 0.0, 0.0) for c, n in points], timings)
    requests = [
        {"cached_tokens": cached, "computed_tokens": computed, "snapshot_s": 0.0}
        for cached, computed in ((0, 60), (50, 20), (120, 10))
    ]
    exact = [COST.prefill_seconds(r["cached_tokens"], r["computed_tokens"]) for r in requests]
    replays = [[seconds * f for seconds in exact] for f in replay_factors]
    return noise_interval(calibration, replays, requests)


def test_the_noise_interval_is_the_spread_the_rounds_give_the_errors():
    # no noise: every error is zero, whatever the draw
    for low, high in _noisy_validation([1.0] * 3, [1.0] * 3).values():
        assert low == pytest.approx(0.0, abs=1e-9) and high == pytest.approx(0.0, abs=1e-9)
    # a slow round that slows its grid and its replay alike costs no error
    for _low, high in _noisy_validation([1.0, 1.3, 1.0], [1.0, 1.3, 1.0]).values():
        assert high == pytest.approx(0.0, abs=1e-9)
    # a replay slow alone: a draw with it twice (7 in 27) measures 1.3x what the grid predicts
    for low, high in _noisy_validation([1.0] * 3, [1.0, 1.3, 1.0]).values():
        assert low == pytest.approx(0.0, abs=1e-9) and high == pytest.approx(0.3 / 1.3)


def test_calibrate_writes_cost_figures_that_replay_reads_and_checks_against_mlx(tmp_path):
    costs, disk = tmp_path / "cost.toml", tmp_path / "disk"
    disk.mkdir()
    (disk / "mine.txt").write_text("a user's file")
    argv = ["--model", "tiny-attention", "--quick", "-q", "--disk-dir", str(disk)]
    assert kvtrie("calibrate", *argv, "--out", str(costs)) == 0
    (entry,) = load_costs(costs).values()
    assert entry.model == "tiny-attention" and entry.prefill_seconds_per_token > 0
    assert entry.decode_seconds_per_token > 0 and entry.page_in_bytes_per_second > 0
    assert entry.disk_read_bytes_per_second > 0 and entry.disk_write_bytes_per_second > 0
    assert str(disk) in entry.source
    # the store it timed is gone; the folder's own files are untouched
    assert [p.name for p in disk.iterdir()] == ["mine.txt"]
    assert len(tomllib.loads(costs.read_text())["calibration"][entry.name]["relative_error"]) == 9
    trace = tmp_path / "short.jsonl"
    lines = [
        {"id": "a", "prompt": list(range(5, 60)), "output": [7, 8], "arrival_ms": 0},
        {"id": "b", "prompt": list(range(5, 60)) + [7, 8, 9], "output": [3], "arrival_ms": 10},
    ]
    write_trace(trace, {"backend": "mlx", "profile": "tiny-attention"}, lines)
    report = tmp_path / "report.json"
    argv = ["replay", str(trace), "-q", "--cost", str(costs), "--report", str(report)]
    assert kvtrie(*argv) == 0
    model = json.loads(report.read_text())["time_model"]
    check = model["validation"]  # the MLX backend's measured seconds beside the estimate
    assert check["measured_seconds"] > 0 and check["estimated_seconds"] > 0
    assert all(r["measured_prefill_s"] > 0 for r in model["requests"])


def test_the_fake_backend_has_no_measured_seconds_to_validate(tmp_path):
    trace, _ = _conversation(tmp_path)
    report = tmp_path / "report.json"
    assert main(["replay", str(trace), "-q", "--report", str(report)]) == 0
    model = json.loads(report.read_text())["time_model"]
    assert model["validation"] is None
    assert all(r["measured_prefill_s"] is None for r in model["requests"])


def test_calibrate_refuses_a_disk_dir_that_is_not_a_directory(tmp_path, capsys):
    out, disk = tmp_path / "c.toml", tmp_path / "a_file"
    disk.write_text("x")
    argv = ["calibrate", "--model", "tiny-attention", "--disk-dir", str(disk), "--out", str(out)]
    assert main(argv) == 2
    assert f"--disk-dir: {disk} is not a directory" in capsys.readouterr().err
    assert not out.exists()


def test_calibrate_refuses_an_unknown_model(tmp_path, capsys):
    assert main(["calibrate", "--model", "no-such-model", "--out", str(tmp_path / "c.toml")]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert not (tmp_path / "c.toml").exists()


def test_a_sweep_cell_has_the_seconds_and_ttft_a_replay_of_it_reports(tmp_path):
    trace, prompts = _conversation(tmp_path)
    costs = tmp_path / "cost.toml"
    costs.write_text(COST_TOML)
    out = tmp_path / "sweep"
    argv = ["sweep", str(trace), "-q", "--processes", "1", "--out", str(out), "--cost", str(costs)]
    assert main([*argv, "--policies", "none,kvtrie-improved", "--budgets", "inf"]) == 0
    rows = {r["policy"]: r for r in json.loads((out / "sweep.json").read_text())["rows"]}
    mine = load_costs(costs)["mine"]
    assert rows["none"]["prefill_seconds"] == pytest.approx(
        sum(mine.prefill_seconds(0, n) for n in prompts)
    )
    report_path = tmp_path / "report.json"
    replay = ["replay", str(trace), "-q", "--policy", "improved", "--budget", "inf"]
    assert main([*replay, "--cost", str(costs), "--report", str(report_path)]) == 0
    model = json.loads(report_path.read_text())["time_model"]
    improved = rows["kvtrie-improved"]
    assert improved["prefill_seconds"] == pytest.approx(
        model["prefill_seconds"] + model["snapshot_seconds"]
    )
    assert improved["ttft_p95_seconds"] == pytest.approx(model["ttft_seconds"]["p95"])
    assert improved["ttft_p95_seconds"] < rows["none"]["ttft_p95_seconds"]
    assert "estimated TTFT p95 by budget" in (out / "sweep.md").read_text()


def test_a_sweep_without_cost_figures_has_no_seconds(tmp_path):
    trace, _ = _conversation(tmp_path)
    out = tmp_path / "sweep"
    argv = ["sweep", str(trace), "-q", "--processes", "1", "--out", str(out), "--budgets", "inf"]
    assert main([*argv, "--policies", "none", "--model", "gemma-12b-swa"]) == 0
    (row,) = json.loads((out / "sweep.json").read_text())["rows"]
    assert row["prefill_seconds"] is None and row["ttft_p95_seconds"] is None
    assert "TTFT" not in (out / "sweep.md").read_text()


def test_a_sweep_refuses_a_bad_time_scale(tmp_path, capsys):
    argv = ["sweep", "shared-prefix", "-q", "--out", str(tmp_path / "s"), "--time-scale", "-1"]
    assert main(argv) == 2
    assert "--time-scale must be a number > 0" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
