"""Budget sweeps: every policy at every budget over one trace, in parallel, with plots."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from kvtrie.backends.fake import FakeBackend
from kvtrie.backends.profiles import ModelProfile
from kvtrie.core.render import format_bytes

from .build import DiskTier
from .costs import CostModel
from .executors import Executor, LocalExecutor
from .outputs import write_atomic
from .peers import KVTRIE_PEERS, KvtriePeer, PeerUnavailable, Workload, costs_of, make_peer
from .report import format_duration
from .timing import ServerClock, moved_bytes
from .traces import Trace, resolve_prompt

__all__ = ["ALL_POLICIES", "SweepRow", "materialize", "run_sweep", "write_sweep"]

ALL_POLICIES = (
    "none",
    "single-entry",
    "mlx-lm",
    "mlx-lm-real",
    "sglang-radix",
    "vllm-blocks",
    "llamacpp-slots",
    "ideal",
    "belady",
    *KVTRIE_PEERS,
)
TIMELINE_POINTS = 400
BUDGET_FREE = ("ideal", "none")  # policies whose result does not depend on the budget


@dataclass
class SweepRow:
    policy: str
    budget_bytes: int | None
    hit_ratio: float
    cached_tokens: int
    computed_tokens: int
    peak_bytes: int
    wall_seconds: float
    note: str = ""
    # a kvtrie policy with a disk tier (--disk-budgets): its budget (None: inf) and peak
    disk_tier: bool = False
    disk_budget_bytes: int | None = None
    disk_peak_bytes: int = 0
    # the time model (None without cost figures for the model): estimated prefill seconds,
    # snapshot page-outs, page-ins and disk reads included (kvtrie's policies; the peers'
    # restores are not modelled), and TTFT p95 under the trace's arrival times
    prefill_seconds: float | None = None
    ttft_p95_seconds: float | None = None


def materialize(trace: Trace, profile: ModelProfile) -> Workload:
    """Every request's prompt and evaluated tokens (prompt + outputs but the last); outputs
    given only as a length are the fake model's, from a fresh prefill."""
    backend = FakeBackend(profile)
    history: dict[str, np.ndarray] = {}
    workload = []
    for request in trace.requests:
        prompt = resolve_prompt(request, history, profile.vocab_size)
        if isinstance(request.outputs, int):
            layers = backend.new_layers()
            outputs = backend.generate(layers, backend.evaluate(layers, prompt), request.outputs)
        else:
            outputs = np.asarray(request.outputs, dtype=np.int32)
        if request.id in trace.referenced:
            history[request.id] = np.concatenate([prompt, outputs])
        workload.append((prompt, np.concatenate([prompt, outputs[:-1]])))
    return workload


@dataclass(frozen=True)
class SweepInput:
    """What every cell reads: sent to each worker once, not once a cell."""

    profile: ModelProfile
    workload: Workload
    marks: list[tuple[int, ...]]
    arrivals_ms: list[float] | None = None  # each request's arrival, for the time model
    cost: CostModel | None = None


def _serve_all(peer: Any, shared: SweepInput) -> tuple[int, list, ServerClock | None]:
    """Every request through ``peer``: tokens reused, the paged-out bytes' timeline, and the
    time model's clock (None without cost figures)."""
    workload = shared.workload
    clock = ServerClock(shared.cost) if shared.cost is not None else None
    arrivals = shared.arrivals_ms or [0.0] * len(workload)
    stats = peer.cache.stats if isinstance(peer, KvtriePeer) else None
    every = max(1, len(workload) // TIMELINE_POINTS)
    timeline = []
    cached = 0
    for index, (prompt, evaluated) in enumerate(workload):
        before = replace(stats) if clock is not None and stats is not None else None
        reused = peer.serve(prompt, evaluated)
        cached += reused
        if peer.tracks_timeline and index % every == 0:
            timeline.append((index, peer.bytes))
        if clock is None:
            continue
        moved = moved_bytes(before, stats) if before is not None else {}
        generated = len(evaluated) - len(prompt) + 1
        clock.serve(str(index), arrivals[index], len(prompt), reused, generated=generated, **moved)
    return cached, timeline, clock


Cell = tuple[str, int | None, DiskTier | None]


def _cell(shared: SweepInput, cell: Cell) -> tuple[SweepRow, list]:
    """One (policy, budget, disk tier) cell: every request through one peer, kvtrie's own
    included."""
    policy, budget, disk = cell
    profile, workload = shared.profile, shared.workload
    started = time.perf_counter()
    prompt_tokens = sum(len(p) for p, _ in workload)
    tier = {"disk_tier": disk is not None, "disk_budget_bytes": disk and disk.budget}
    try:
        peer = make_peer(
            policy,
            budget,
            costs_of(profile),
            workload,
            profile=profile,
            marks=shared.marks,
            disk=disk,
            time_cost=shared.cost,
        )
    except PeerUnavailable as why:
        return SweepRow(policy, budget, 0.0, 0, prompt_tokens, 0, 0.0, str(why), **tier), []
    cached, timeline, clock = _serve_all(peer, shared)
    timed = {}
    if clock is not None:
        summary = clock.summary()
        timed = {
            "prefill_seconds": summary["prefill_seconds"] + summary["snapshot_seconds"],
            "ttft_p95_seconds": summary["ttft_seconds"]["p95"],
        }
    row = SweepRow(
        policy,
        budget,
        cached / prompt_tokens if prompt_tokens else 0.0,
        cached,
        prompt_tokens - cached,
        peer.peak_bytes,
        time.perf_counter() - started,
        **tier,
        disk_peak_bytes=peer.disk_peak_bytes,
        **timed,
    )
    return row, timeline


def run_sweep(
    workload: Workload,
    profile: ModelProfile,
    budgets: list[int | None],
    policies: list[str],
    executor: Executor | None = None,
    progress: bool | None = None,
    marks: list[tuple[int, ...]] | None = None,
    disk_budgets: list[int | None] | None = None,
    arrivals_ms: list[float] | None = None,
    cost: CostModel | None = None,
) -> tuple[list[SweepRow], dict[str, list]]:
    """Every (policy, budget) cell, on ``executor`` (default: every core of this machine);
    rows in policy then budget order, the same whichever executor ran them. ``marks`` are each
    request's user restore points (only kvtrie's policies use them). ``disk_budgets`` adds,
    for kvtrie's policies, a cell for each RAM budget with each disk tier. With ``cost``, each
    row has the time model's prefill seconds and TTFT p95 at ``arrivals_ms``."""
    from tqdm import tqdm

    unknown = [p for p in policies if p not in ALL_POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {', '.join(ALL_POLICIES)}")
    # ideal and none do not depend on the budget: one cell each
    cells: list[Cell] = [
        (p, b, None) for p in policies for b in (budgets if p not in BUDGET_FREE else [None])
    ]
    cells += [
        (p, b, DiskTier(d))
        for p in policies
        if p in KVTRIE_PEERS
        for b in budgets
        for d in disk_budgets or []
    ]
    shared = SweepInput(profile, workload, marks or [()] * len(workload), arrivals_ms, cost)
    # the longest cells first, so the workers are not left waiting on one at the end
    cells.sort(key=lambda c: (c[0] not in ("belady", "vllm-blocks", *KVTRIE_PEERS),))
    rows, timelines = [], {}
    bar = tqdm(
        total=len(cells),
        desc="sweep",
        unit="cell",
        disable=None if progress is None else not progress,
    )
    for row, timeline in (executor or LocalExecutor()).map_unordered(_cell, shared, cells):
        rows.append(row)
        if timeline and not row.disk_tier:
            timelines[f"{row.policy}@{_budget_label(row.budget_bytes)}"] = timeline
        bar.update(1)
    bar.close()
    order = {p: i for i, p in enumerate(policies)}
    rows.sort(
        key=lambda r: (
            order[r.policy],
            r.disk_tier,
            _size_key(r.disk_budget_bytes),
            _size_key(r.budget_bytes),
        )
    )
    return rows, timelines


def _size_key(size: int | None) -> float:
    return float("inf") if size is None else size


def _budget_label(budget: int | None) -> str:
    return "inf" if budget is None else format_bytes(budget)


def _row_for(rows: list[SweepRow], policy: str, budget: int | None) -> SweepRow | None:
    """The measured row of a policy at a budget, RAM only (budget-free policies have one
    row)."""
    for row in rows:
        if row.disk_tier:
            continue
        if row.policy == policy and (row.budget_bytes == budget or policy in BUDGET_FREE):
            return None if row.note else row
    return None


def _disk_grid(
    rows: list[SweepRow], policy: str, budgets: list[int | None], value: str = "hit_ratio"
) -> tuple[list[int | None], list[list[Any]]]:
    """A kvtrie policy's ``value`` (a row's field) by disk budget (rows) and RAM budget
    (columns)."""
    disks = list(dict.fromkeys(r.disk_budget_bytes for r in rows if r.disk_tier))
    grid = []
    for disk in disks:
        by_ram = {
            r.budget_bytes: getattr(r, value)
            for r in rows
            if r.policy == policy and r.disk_tier and r.disk_budget_bytes == disk
        }
        grid.append([by_ram[b] for b in budgets])
    return disks, grid


# what the tables show: a row's field, its heading, how a value is written
_MEASURES = (
    ("hit_ratio", "hit ratio", lambda v: f"{v:.4f}"),
    ("ttft_p95_seconds", "estimated TTFT p95", format_duration),
)


def _timed(rows: list[SweepRow]) -> bool:
    return any(r.ttft_p95_seconds is not None for r in rows)


def _disk_markdown(rows: list[SweepRow], budgets: list[int | None]) -> str:
    out = []
    for policy in dict.fromkeys(r.policy for r in rows if r.disk_tier):
        for value, heading, written in _MEASURES[: 1 + _timed(rows)]:
            disks, grid = _disk_grid(rows, policy, budgets, value)
            head = "| disk \\ RAM | " + " | ".join(_budget_label(b) for b in budgets) + " |"
            lines = [head, "|---" * (len(budgets) + 1) + "|"]
            for disk, cells in zip(disks, grid):
                lines.append(f"| {_budget_label(disk)} | " + " | ".join(map(written, cells)) + " |")
            out.append(f"\n{policy}: {heading} with a disk tier\n\n" + "\n".join(lines) + "\n")
    return "".join(out)


def _markdown(rows: list[SweepRow], budgets: list[int | None]) -> str:
    policies = list(dict.fromkeys(r.policy for r in rows))
    head = "| policy | " + " | ".join(_budget_label(b) for b in budgets) + " |"
    tables = []
    for value, heading, written in _MEASURES[: 1 + _timed(rows)]:
        lines = [head, "|---" * (len(budgets) + 1) + "|"]
        for policy in policies:
            cells = []
            for budget in budgets:
                row = _row_for(rows, policy, budget)
                cells.append(written(getattr(row, value)) if row else "-")
            lines.append(f"| {policy} | " + " | ".join(cells) + " |")
        tables.append(f"{heading} by budget\n\n" + "\n".join(lines) + "\n")
    return "\n".join(tables) + _disk_markdown(rows, budgets)


def _plots(
    out: Path, rows: list[SweepRow], budgets: list[int | None], timelines: dict, title: str
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [b for b in budgets if b is not None]
    inf_x = (max(finite) * 4) if finite else 1
    written = []

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for policy in dict.fromkeys(r.policy for r in rows):
        points = [
            (inf_x if r.budget_bytes is None else r.budget_bytes, r.hit_ratio)
            for r in rows
            if r.policy == policy and not r.note
        ]
        if policy in BUDGET_FREE and points:
            ax.axhline(
                points[0][1],
                linestyle=":",
                color="gray" if policy == "none" else "black",
                label=policy,
            )
            continue
        points.sort()
        if points:
            ax.plot(*zip(*points), marker="o", label=policy)
    ax.set_xscale("log")
    ticks = finite + ([inf_x] if None in budgets else [])
    ax.set_xticks(ticks, [_budget_label(b) for b in finite] + (["inf"] if None in budgets else []))
    ax.set_xlabel("budget (bytes kept beyond the live sequence)")
    ax.set_ylabel("hit ratio (cached / prompt tokens)")
    ax.set_title(f"Hit ratio vs budget: {title}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    _save(fig, out / "hit_ratio.png")
    plt.close(fig)
    written.append("hit_ratio.png")

    fig, ax = plt.subplots(figsize=(10.5, 5.5))
    policies = [p for p in dict.fromkeys(r.policy for r in rows)]
    width = 0.8 / max(1, len(finite) + (None in budgets))
    for j, budget in enumerate(budgets):
        heights = []
        for policy in policies:
            row = _row_for(rows, policy, budget)
            heights.append(row.computed_tokens / 1e6 if row else 0)
        ax.bar(np.arange(len(policies)) + j * width, heights, width, label=_budget_label(budget))
    ax.set_xticks(
        np.arange(len(policies)) + width * (len(budgets) - 1) / 2, policies, rotation=30, ha="right"
    )
    ax.set_ylabel("computed prompt tokens (millions)")
    ax.set_title(f"Tokens each policy computes: {title}")
    ax.legend(title="budget", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    _save(fig, out / "computed_tokens.png")
    plt.close(fig)
    written.append("computed_tokens.png")

    for policy in dict.fromkeys(r.policy for r in rows if r.disk_tier):
        name = f"disk_{policy}.png"
        _heat_map(out / name, rows, budgets, policy, title)
        written.append(name)

    seed = {k: v for k, v in timelines.items() if k.startswith("kvtrie-seed@")}
    if seed:
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for label, timeline in seed.items():
            x, y = zip(*timeline)
            ax.plot(x, np.asarray(y) / 2**30, label=label.split("@")[1])
        ax.set_xlabel("request")
        ax.set_yscale("symlog", linthresh=0.1)  # finite budgets stay visible beside inf
        ax.set_ylabel("paged-out bytes (GiB, log above 0.1)")
        ax.set_title(f"kvtrie-seed paged-out bytes over the trace: {title}")
        ax.legend(title="budget", fontsize=8)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        _save(fig, out / "paged_out.png")
        plt.close(fig)
        written.append("paged_out.png")
    return written


def _heat_map(
    path: Path, rows: list[SweepRow], budgets: list[int | None], policy: str, title: str
) -> None:
    """The hit ratio over RAM budget x disk budget, each cell labelled with its value; beside
    it, with cost figures, the estimated TTFT p95 (its colours reversed: lower is better)."""
    import matplotlib.pyplot as plt

    measures = _MEASURES[: 1 + _timed(rows)]
    disks = _disk_grid(rows, policy, budgets)[0]
    fig, axes = plt.subplots(
        1,
        len(measures),
        figsize=(len(measures) * (1.3 * len(budgets) + 3), 0.7 * len(disks) + 2.5),
        squeeze=False,
    )
    for ax, (value, heading, written) in zip(axes[0], measures):
        grid = np.array(_disk_grid(rows, policy, budgets, value)[1], dtype=float)
        hit = value == "hit_ratio"
        image = ax.imshow(grid, cmap="viridis" if hit else "viridis_r", aspect="auto", vmin=0)
        light = 0.6 * grid.max()  # viridis is light above this (viridis_r below): dark text
        for (i, j), cell in np.ndenumerate(grid):
            color = "black" if (cell > light) == hit else "white"
            ax.text(j, i, written(cell), ha="center", va="center", color=color, fontsize=8)
        ax.set_xticks(range(len(budgets)), [_budget_label(b) for b in budgets])
        ax.set_yticks(range(len(disks)), [_budget_label(d) for d in disks])
        ax.set_xlabel("RAM budget")
        ax.set_ylabel("disk budget")
        ax.set_title(f"{policy} {heading}, RAM x disk: {title}", fontsize=9)
        fig.colorbar(image, ax=ax, label=heading if hit else f"{heading} (s)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _save(fig: Any, path: Path) -> None:
    """Save a figure so the PNG is replaced whole or not at all."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getvalue())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


SWEEP_FILES = (
    "sweep.json",
    "sweep.csv",
    "sweep.md",
    "hit_ratio.png",
    "computed_tokens.png",
    "paged_out.png",
    *(f"disk_{policy}.png" for policy in KVTRIE_PEERS),
)


def write_sweep(
    out: Path,
    meta: dict[str, Any],
    rows: list[SweepRow],
    budgets: list[int | None],
    timelines: dict,
) -> list[str]:
    """sweep.json, sweep.csv, sweep.md and the PNG plots, each written whole; an earlier
    sweep's files that this one does not write are removed, so none is left stale."""
    out.mkdir(exist_ok=True)
    records = [r.__dict__ for r in rows]
    write_atomic(out / "sweep.json", json.dumps({**meta, "rows": records}, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    write_atomic(out / "sweep.csv", buffer.getvalue())
    markdown = _markdown(rows, budgets)
    write_atomic(out / "sweep.md", f"# kvtrie sweep: {meta['trace']}\n\n" + markdown)
    written = [
        "sweep.json",
        "sweep.csv",
        "sweep.md",
        *_plots(out, rows, budgets, timelines, Path(meta["trace"]).name),
    ]
    for stale in set(SWEEP_FILES) - set(written):
        (out / stale).unlink(missing_ok=True)
    return written
