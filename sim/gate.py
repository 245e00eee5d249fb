"""The regression gate: replay configured checks, compare with a committed baseline, and fail
on a lower hit ratio, more computed tokens or memory, a slower replay, or any violation.

Timings are compared as ratios to a reference replay run in the same invocation, never as
absolute seconds: CI machines differ and are noisy.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from kvtrie.backends.profiles import get_profile
from kvtrie.core.render import format_bytes

from .build import make_backend, make_cache, make_policy, parse_size, trace_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

__all__ = ["GateConfig", "GateError", "Check", "load_config", "run_gate"]

CHECK_KEYS = {
    "name",
    "trace",
    "backend",
    "model",
    "budget",
    "policy",
    "limit",
    "quick",
    "fuzz",
    "examples",
    "min_hit_ratio",
    "max_computed_tokens",
    "max_peak_paged_out_bytes",
}


MIN_TIMED_SECONDS = 0.5  # shorter replays are all noise on a shared CI machine
GATE_KEYS = {"baseline", "tolerance", "time_tolerance", "time_repeats", "reference"}
TOP_KEYS = {"gate", "check"}


class GateError(ValueError):
    """Bad gate configuration, located by TOML key and line."""


@dataclass
class Check:
    name: str
    trace: str = ""
    backend: str = "fake"
    model: str = "llama-8b"
    budget: str = "8GiB"
    policy: str = "kvtrie-seed"
    limit: int | None = None
    quick: bool = True  # part of `kvtrie gate --quick`
    fuzz: str | None = None  # "quick": a fuzz run instead of a replay
    examples: int = 100
    min_hit_ratio: float | None = None
    max_computed_tokens: int | None = None
    max_peak_paged_out_bytes: int | None = None


@dataclass
class GateConfig:
    path: Path
    baseline: Path
    tolerance: float = 0.01
    time_tolerance: float = 0.5
    # A check's time ratio takes the least CPU time of this many runs of the check and of the
    # reference, made in turn: one slow moment on a shared machine can't move the verdict.
    time_repeats: int = 3
    baseline_data: dict[str, Any] = field(default_factory=dict)
    reference: Check = field(default_factory=lambda: Check("reference", trace="agent"))
    checks: list[Check] = field(default_factory=list)


def _line_of(text: str, key: str, table_index: int | None) -> int:
    """The line of ``key`` (inside the table_index-th [[check]] when given), for errors."""
    lines = text.splitlines()
    start = 0
    if table_index is not None:
        headers = [i for i, ln in enumerate(lines) if ln.strip() == "[[check]]"]
        start = headers[table_index] if table_index < len(headers) else 0
    for i in range(start, len(lines)):
        if re.match(rf"\s*{re.escape(key)}\s*=", lines[i]):
            return i + 1
    return start + 1


def _check_from(
    table: dict[str, Any], index: int | None, text: str, where: str, root: Path
) -> Check:
    def fail(key: str, message: str) -> GateError:
        return GateError(f"{where}:{_line_of(text, key, index)}: {key}: {message}")

    unknown = set(table) - CHECK_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise fail(key, f"unknown key; known keys are {', '.join(sorted(CHECK_KEYS))}")
    if "name" not in table:
        raise GateError(f"{where}:{_line_of(text, '[[check]]', index)}: a check needs a name")
    expected = {
        "limit": int,
        "examples": int,
        "max_computed_tokens": int,
        "max_peak_paged_out_bytes": int,
        "min_hit_ratio": (int, float),
        "quick": bool,
    }
    for key, kind in expected.items():
        if key in table and (
            not isinstance(table[key], kind) or (kind is int and isinstance(table[key], bool))
        ):
            raise fail(key, f"expected {getattr(kind, '__name__', 'a number')}, got {table[key]!r}")
    for key in ("trace", "backend", "model", "budget", "policy", "fuzz", "name"):
        if key in table and not isinstance(table[key], str):
            raise fail(key, f"expected a string, got {table[key]!r}")
    check = Check(**table)
    if check.fuzz is None and not check.trace:
        raise fail("name", 'a check needs a trace (or fuzz = "quick")')
    if check.fuzz not in (None, "quick"):
        raise fail("fuzz", f'only "quick" is supported, got {check.fuzz!r}')
    if check.backend not in ("fake", "mlx"):
        raise fail("backend", f"choose fake or mlx, got {check.backend!r}")
    if check.min_hit_ratio is not None and not 0 <= check.min_hit_ratio <= 1:
        raise fail("min_hit_ratio", f"expected a number in [0, 1], got {check.min_hit_ratio!r}")
    for key in ("limit", "examples"):
        if key in table and table[key] < 1:
            raise fail(key, f"expected an integer >= 1, got {table[key]}")
    try:
        parse_size(check.budget)
    except ValueError as exc:
        raise fail("budget", str(exc)) from None
    try:
        make_policy(check.policy)
    except ValueError as exc:
        raise fail("policy", str(exc)) from None
    try:
        _check_model(check.backend, check.model, root)
    except ValueError as exc:
        raise fail("model", str(exc)) from None
    try:
        found = check.trace and trace_path(check.trace, root).exists()
    except ValueError as exc:
        raise fail("trace", str(exc)) from None
    if check.trace and not found:
        raise fail("trace", f"no trace file or bundled trace named {check.trace!r}")
    return check


def _check_model(backend: str, model: str, root: Path) -> None:
    """A model name the backend knows, checked without building it."""
    if backend == "fake":
        if model.endswith(".toml") and not Path(model).is_absolute():
            model = str(root / model)
        get_profile(model)
    else:
        from kvtrie.backends.mlx.models import tiny_model

        if tiny_model(model) is None and not Path(model).is_dir():
            raise ValueError(f"unknown MLX model {model!r}: a tiny model name or a model directory")


def load_config(path: Path, needs_baseline: bool = True) -> GateConfig:
    """Read and validate gate.toml and its baseline before any replay runs; errors name the
    key and its line. Without ``needs_baseline`` (``--update-baseline``, the only way to
    create one) a missing baseline is allowed."""
    root = Path(path).parent
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GateError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise GateError(f"{path}: {exc}") from None

    def fail(key: str, message: str) -> GateError:
        return GateError(f"{path}:{_line_of(text, key, None)}: {key}: {message}")

    for key in sorted(set(data) - TOP_KEYS):
        raise fail(key, "unknown table or key; gate.toml has [gate] and [[check]] tables")
    gate = data.get("gate", {})
    if not isinstance(gate, dict):
        raise fail("gate", "expected a [gate] table")
    for key in sorted(set(gate) - GATE_KEYS):
        raise fail(key, f"unknown key in [gate]; known keys are {', '.join(sorted(GATE_KEYS))}")
    baseline = gate.get("baseline", "traces/baselines/gate.json")
    if not isinstance(baseline, str):
        raise fail("baseline", f"expected a path, got {baseline!r}")
    config = GateConfig(path=Path(path), baseline=root / baseline)
    for key in ("tolerance", "time_tolerance"):
        if key in gate:
            value = gate[key]
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not math.isfinite(value)
                or value < 0
            ):
                raise fail(key, f"expected a finite number >= 0, got {value!r}")
            setattr(config, key, float(value))
    if "time_repeats" in gate:
        value = gate["time_repeats"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise fail("time_repeats", f"expected an integer >= 1, got {value!r}")
        config.time_repeats = value
    if "reference" in gate:
        if not isinstance(gate["reference"], dict):
            raise fail("reference", "expected a [gate.reference] table")
        config.reference = _check_from(
            {"name": "reference", **gate["reference"]}, None, text, str(path), root
        )
    checks = data.get("check", [])
    if not isinstance(checks, list) or not checks:
        raise GateError(f"{path}: no [[check]] tables")
    config.checks = [_check_from(t, i, text, str(path), root) for i, t in enumerate(checks)]
    names = [c.name for c in config.checks]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise GateError(f"{path}: two checks are named {dup!r}")
    config.baseline_data = _read_baseline(config.baseline, needs_baseline)
    return config


def _read_baseline(path: Path, needed: bool) -> dict[str, Any]:
    if not path.exists():
        if needed:
            raise GateError(
                f"{path}: no baseline; kvtrie gate --update-baseline creates it from this run"
            )
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise GateError(f"{path}: not a readable baseline ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("checks", {}), dict):
        raise GateError(f"{path}: a baseline is a JSON object with a 'checks' object")
    return data


def _replay_metrics(check: Check, root: Path) -> dict[str, Any]:
    from .replay import replay
    from .runner import CheckMode
    from .traces import load_trace

    backend = make_backend(check.backend, check.model)
    trace = load_trace(trace_path(check.trace, root), vocab_size=backend.vocab_size)
    cache = make_cache(backend, parse_size(check.budget), make_policy(check.policy))
    started = time.process_time()  # CPU time: another process's load does not count
    outcome = replay(trace, backend, cache, CheckMode(), check.limit, progress=False)
    seconds = time.process_time() - started
    stats = cache.stats
    return {
        "hit_ratio": stats.cached_tokens / stats.prompt_tokens if stats.prompt_tokens else 0.0,
        "computed_tokens": stats.computed_tokens,
        # what the budget and the policy cost against an infinite cache
        "reuse_lost": outcome.ideal_cached_tokens - stats.cached_tokens,
        "merges": stats.merges,
        "peak_paged_out_bytes": cache.ledger.peak,
        "violations": len(outcome.violations),
        "seconds": seconds,
    }


def _fuzz_metrics(check: Check) -> dict[str, Any]:
    import tempfile

    from .fuzz import FuzzConfig, run_fuzz

    with tempfile.TemporaryDirectory() as out:
        result = run_fuzz(
            FuzzConfig(
                backend=check.backend,
                model=None if check.model == "llama-8b" else check.model,
                examples=check.examples,
                steps=20,
                out_dir=Path(out),
            )
        )
    return {
        # Hypothesis failing itself (flaky, health check) is no clean run either
        "violations": 1 if result.failure or result.error else 0,
        "failure": result.failure or result.error,
        "examples": result.examples,
        "seconds": result.seconds,
    }


@dataclass
class Row:
    check: str
    metric: str
    baseline: Any
    now: Any
    ok: bool
    note: str = ""

    @property
    def change(self) -> str:
        if (
            isinstance(self.baseline, (int, float))
            and isinstance(self.now, (int, float))
            and self.baseline
        ):
            return f"{(self.now - self.baseline) / abs(self.baseline):+.1%}"
        return ""


def _fmt(metric: str, value: Any) -> str:
    if value is None:
        return "-"
    if metric == "peak_paged_out_bytes":
        return format_bytes(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _compare(
    check: Check, now: dict[str, Any], base: dict[str, Any] | None, config: GateConfig
) -> list[Row]:
    rows = [
        Row(
            check.name,
            "violations",
            0,
            now["violations"],
            now["violations"] == 0,
            now.get("failure") or "",
        )
    ]
    if check.fuzz:
        return rows
    tol, ttol = config.tolerance, config.time_tolerance
    limits = {
        "hit_ratio": check.min_hit_ratio,
        "computed_tokens": check.max_computed_tokens,
        "peak_paged_out_bytes": check.max_peak_paged_out_bytes,
    }
    for metric, higher_is_better in (
        ("hit_ratio", True),
        ("computed_tokens", False),
        ("reuse_lost", False),
        ("peak_paged_out_bytes", False),
        ("time_ratio", False),
    ):
        value = now.get(metric)
        before = None if base is None else base.get(metric)
        ok, notes = True, []
        if value is None:  # a replay too short to time reliably
            rows.append(Row(check.name, metric, before, None, True, "too short to time"))
            continue
        slack = ttol if metric == "time_ratio" else tol
        if before is not None:
            if higher_is_better:
                ok = value >= before * (1 - slack) - 1e-12
            else:
                ok = value <= before * (1 + slack) + 1e-12
            if not ok:
                notes.append(f"beyond the {slack:.0%} tolerance")
        else:
            notes.append("no baseline")
        limit = limits.get(metric)
        if limit is not None and (value < limit if higher_is_better else value > limit):
            ok = False
            notes.append(f"limit {_fmt(metric, limit)}")
        rows.append(Row(check.name, metric, before, value, ok, "; ".join(notes)))
    return rows


def _time_ratio(check: Check, first: dict[str, Any], config: GateConfig) -> float:
    """The check's CPU time over the reference's, each the least of ``time_repeats`` runs made
    in turn (check, reference, check, reference, ...; the first check run is the one just
    made). Noise on a shared machine only ever adds time, so the least run is the one closest
    to the code's own cost, and one slow moment can't fail the gate."""
    root = config.path.parent
    checks, references = [first["seconds"]], []
    for repeat in range(config.time_repeats):
        if repeat:
            checks.append(_replay_metrics(check, root)["seconds"])
        references.append(_replay_metrics(config.reference, root)["seconds"])
    return min(checks) / min(references)


def run_gate(
    config: GateConfig, quick: bool, update_baseline: bool, progress: Any = None
) -> tuple[list[Row], dict[str, Any]]:
    """Run the checks (``quick``: only those marked quick) and compare with the baseline."""
    root = config.path.parent
    baseline = config.baseline_data
    reference = _replay_metrics(config.reference, root)
    results: dict[str, Any] = {"reference_seconds": reference["seconds"], "checks": {}}
    rows: list[Row] = []
    for check in config.checks:
        if quick and not check.quick:
            continue
        if progress:
            progress(check.name)
        now = _fuzz_metrics(check) if check.fuzz else _replay_metrics(check, root)
        if not check.fuzz and min(now["seconds"], reference["seconds"]) >= MIN_TIMED_SECONDS:
            now["time_ratio"] = _time_ratio(check, now, config)
        results["checks"][check.name] = now
        rows += _compare(check, now, baseline.get("checks", {}).get(check.name), config)
    if update_baseline:
        merged = {
            "checks": {
                **baseline.get("checks", {}),
                **{
                    name: {k: v for k, v in m.items() if k not in ("seconds", "failure")}
                    for name, m in results["checks"].items()
                },
            }
        }
        from .outputs import write_atomic

        write_atomic(config.baseline, json.dumps(merged, indent=2, sort_keys=True) + "\n")
    return rows, results


def table(rows: list[Row]) -> str:
    width = max(len(r.check) for r in rows)
    lines = [
        f"{'check':{width}}  {'metric':22} {'baseline':>14}  {'now':>14} {'change':>8}  status"
    ]
    for r in rows:
        lines.append(
            f"{r.check:{width}}  {r.metric:22} {_fmt(r.metric, r.baseline):>14}  "
            f"{_fmt(r.metric, r.now):>14} {r.change:>8}  "
            f"{'ok' if r.ok else 'FAIL'}{'  ' + r.note if r.note else ''}"
        )
    return "\n".join(lines)


def markdown(rows: list[Row]) -> str:
    out = [
        "### kvtrie gate",
        "",
        "| check | metric | baseline | now | change | status |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        status = "ok" if r.ok else f"**FAIL** {r.note}"
        out.append(
            f"| {r.check} | {r.metric} | {_fmt(r.metric, r.baseline)} | "
            f"{_fmt(r.metric, r.now)} | {r.change} | {status} |"
        )
    return "\n".join(out) + "\n"


def junit(rows: list[Row], seconds: dict[str, float]) -> str:
    checks = list(dict.fromkeys(r.check for r in rows))
    failures = sum(1 for c in checks if any(not r.ok for r in rows if r.check == c))
    cases = []
    for name in checks:
        bad = [r for r in rows if r.check == name and not r.ok]
        body = ""
        if bad:
            text = "; ".join(
                f"{r.metric}: {_fmt(r.metric, r.baseline)} -> {_fmt(r.metric, r.now)} {r.note}"
                for r in bad
            )
            body = f"<failure message={quoteattr(text)}>{escape(text)}</failure>"
        cases.append(
            f'  <testcase classname="kvtrie.gate" name={quoteattr(name)} '
            f'time="{seconds.get(name, 0.0):.3f}">{body}</testcase>'
        )
    return (
        f'<?xml version="1.0" encoding="utf-8"?>\n<testsuite name="kvtrie gate" '
        f'tests="{len(checks)}" failures="{failures}">\n' + "\n".join(cases) + "\n</testsuite>\n"
    )
