"""The regression gate: the committed gate passes, a worse change fails with a clear table,
bad configuration names its key and line, and the CI workflows validate."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from third_party import third_party

from kvtrie.sim.cli import main

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "traces" / "baselines" / "gate.json"


def small_gate(tmp_path: Path, budget: str = "4GiB", extra: str = "") -> Path:
    config = tmp_path / "gate.toml"
    config.write_text(f"""
[gate]
baseline = "{BASELINE}"
time_tolerance = 1000  # timing is the full gate's verdict, not these tests'
[gate.reference]
trace = "system-prompt"
[[check]]
name = "agent-hybrid"
trace = "agent"
policy = "kvtrie-improved"
budget = "{budget}"
model = "qwen3-next-hybrid"
{extra}
""")
    return config


def test_committed_gate_passes_in_its_quick_form():
    third_party("mooncake")  # the gate replays the third-party traces: skipped without them
    third_party("agentic")
    # a child process, so typeguard's slowdown stays out; timing stays lenient on a busy runner
    code = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvtrie.sim.cli",
            "gate",
            "--quick",
            "-q",
            "--time-tolerance",
            "20",
            "--config",
            str(ROOT / "gate.toml"),
        ],
        cwd=ROOT,
    ).returncode
    assert code == 0


def test_same_configuration_passes_and_writes_junit_and_markdown(tmp_path, monkeypatch, capsys):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    junit = tmp_path / "gate.xml"
    assert main(["gate", "--config", str(small_gate(tmp_path)), "-q", "--junit", str(junit)]) == 0
    suite = ET.parse(junit).getroot()
    assert suite.get("tests") == "1" and suite.get("failures") == "0"
    assert "| agent-hybrid | hit_ratio |" in summary.read_text()
    assert "gate passed" in capsys.readouterr().out


def test_a_smaller_budget_fails_with_the_regression_in_the_table(tmp_path, capsys):
    junit = tmp_path / "gate.xml"
    assert (
        main(["gate", "--config", str(small_gate(tmp_path, "16MiB")), "-q", "--junit", str(junit)])
        == 1
    )
    out = capsys.readouterr().out
    hit_line = next(line for line in out.splitlines() if "hit_ratio" in line)
    assert "FAIL" in hit_line and "0.9045" in hit_line and "beyond the 1% tolerance" in hit_line
    assert ET.parse(junit).getroot().get("failures") == "1"


def test_a_mutant_fails_the_gate_on_its_violations(tmp_path, capsys):
    assert (
        main(
            [
                "gate",
                "--config",
                str(small_gate(tmp_path, budget="1GiB")),  # small enough to evict
                "-q",
                "--time-tolerance",
                "100",
                "--mutant",
                "evict-newest-first",
            ]
        )
        == 1
    )
    line = next(x for x in capsys.readouterr().out.splitlines() if "violations" in x)
    assert "FAIL" in line


def test_update_baseline_rewrites_it(tmp_path):
    baseline = tmp_path / "base.json"
    config = small_gate(tmp_path)
    config.write_text(config.read_text().replace(str(BASELINE), str(baseline)))
    assert main(["gate", "--config", str(config), "-q", "--update-baseline"]) == 0
    assert '"agent-hybrid"' in baseline.read_text()
    assert main(["gate", "--config", str(config), "-q"]) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('colour = "blue"', r"gate.toml:13: colour: unknown key"),
        ('limit = "ten"', r"gate.toml:13: limit: expected int, got 'ten'"),
        ("fuzz = 3", r"gate.toml:13: fuzz: expected a string"),
        ('backend = "cuda"', r"gate.toml:13: backend: choose fake or mlx"),
        ("min_hit_ratio = 1.5", r"gate.toml:13: min_hit_ratio: expected a number in [0, 1]"),
    ],
)
def test_bad_configuration_names_key_and_line(tmp_path, capsys, extra, message):
    assert main(["gate", "--config", str(small_gate(tmp_path, extra=extra))]) == 2
    assert message in capsys.readouterr().err


def test_bad_budget_and_toml_syntax(tmp_path, capsys):
    assert main(["gate", "--config", str(small_gate(tmp_path, budget="lots"))]) == 2
    assert "gate.toml:11: budget: bad size 'lots'" in capsys.readouterr().err
    broken = tmp_path / "broken.toml"
    broken.write_text("[gate\n")
    assert main(["gate", "--config", str(broken)]) == 2
    assert "line 1" in capsys.readouterr().err


def test_workflows_validate_against_githubs_schema():
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    assert len(workflows) == 2
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.github-workflows",
            *map(str, workflows),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("time_tolerance = 1000", "tolerence = 0.1", ":4: tolerence: unknown key in [gate]"),
        ("[[check]]", "[[chek]]", ": chek: unknown table or key"),
        ("time_tolerance = 1000", "tolerance = nan", ":4: tolerance: expected a finite number"),
        ('model = "qwen3-next-hybrid"', 'model = "gpt5"', ": model: unknown model profile 'gpt5'"),
        ('policy = "kvtrie-improved"', 'policy = "greedy"', ": policy: unknown policy 'greedy'"),
        ('trace = "agent"', 'trace = "nowhere"', ":9: trace: no trace file or bundled trace"),
    ],
)
def test_configuration_errors_are_found_before_any_replay(
    tmp_path, capsys, monkeypatch, old, new, message
):
    from kvtrie.sim import gate

    def no_replay(*args):
        raise AssertionError("a replay ran before the configuration was checked")

    monkeypatch.setattr(gate, "_replay_metrics", no_replay)
    config = small_gate(tmp_path)
    config.write_text(config.read_text().replace(old, new))
    assert main(["gate", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_missing_baseline_is_bad_input_unless_it_is_being_created(tmp_path, capsys):
    config = small_gate(tmp_path)
    config.write_text(config.read_text().replace(str(BASELINE), str(tmp_path / "none.json")))
    assert main(["gate", "--config", str(config), "-q"]) == 2
    assert "no baseline; kvtrie gate --update-baseline creates it" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    config.write_text(config.read_text().replace(str(tmp_path / "none.json"), str(broken)))
    assert main(["gate", "--config", str(config), "-q"]) == 2
    assert "not a readable baseline" in capsys.readouterr().err
