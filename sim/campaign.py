"""A fuzzing campaign: plain Hypothesis split into independent shards, run by an executor.

One ``kvtrie fuzz`` run is one Hypothesis search, bounded by one core. A campaign runs many
searches side by side, each a shard with a seed of its own (so the draws differ), on this
machine's processes or a Ray cluster, until its duration is spent (or, with no duration, one
shard a worker). A shard is a whole run of the profile's examples, never cut short: cutting a
Hypothesis run mid-search changes what later examples draw, which Hypothesis reports as
flaky, and a whole shard is what ``kvtrie fuzz --seed S`` reruns exactly. So a campaign stops
starting shards when its time is spent, and those running finish. A failing shard shrinks its
failure where it ran and sends the shrunk trace back, with its seed in the header, to be
written on this machine; from then on (or after a Hypothesis error) no new shard starts.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .executors import Executor
from .fuzz import FuzzConfig, run_fuzz
from .outputs import write_atomic

__all__ = ["CampaignResult", "ShardResult", "run_campaign", "shard_seed"]


def shard_seed(campaign_seed: int, index: int) -> int:
    """Shard ``index``'s seed: distinct for every shard of every campaign seed below 10**6."""
    return campaign_seed * 1_000_000 + index


@dataclass(frozen=True)
class Shard:
    index: int
    seed: int


@dataclass
class ShardResult:
    index: int
    seed: int
    worker: str  # host:pid of the process that ran it
    examples: int
    steps: int
    seconds: float
    failure: str | None = None
    error: str | None = None
    trace_name: str | None = None
    trace_text: str | None = None  # the shrunk failure, to be written where the campaign runs
    shrunk_requests: int = 0


@dataclass
class CampaignResult:
    shards: list[ShardResult] = field(default_factory=list)
    regression_traces: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[ShardResult]:
        return [s for s in self.shards if s.failure]

    @property
    def errors(self) -> list[ShardResult]:
        return [s for s in self.shards if s.error]

    def per_worker(self) -> dict[str, dict[str, Any]]:
        """Shards, examples, steps, failures and seconds of each process that ran shards."""
        workers: dict[str, dict[str, Any]] = {}
        for shard in self.shards:
            row = workers.setdefault(
                shard.worker,
                {
                    "shards": 0,
                    "examples": 0,
                    "steps": 0,
                    "failures": 0,
                    "errors": 0,
                    "seconds": 0.0,
                },
            )
            row["shards"] += 1
            row["examples"] += shard.examples
            row["steps"] += shard.steps
            row["failures"] += shard.failure is not None
            row["errors"] += shard.error is not None
            row["seconds"] += shard.seconds
        return dict(sorted(workers.items()))

    def as_dict(self) -> dict[str, Any]:
        shards = [{k: v for k, v in asdict(s).items() if k != "trace_text"} for s in self.shards]
        return {
            "shards": shards,
            "workers": self.per_worker(),
            "examples": sum(s.examples for s in self.shards),
            "steps": sum(s.steps for s in self.shards),
            "failures": len(self.failures),
            "errors": len(self.errors),
            "regression_traces": self.regression_traces,
            "seconds": self.seconds,
        }


def _run_shard(base: FuzzConfig, shard: Shard) -> ShardResult:
    """One shard, on whichever worker the executor chose; the shrunk failure comes back as
    text, since that worker's disk may be another machine's."""
    with tempfile.TemporaryDirectory(prefix="kvtrie-shard-") as scratch:
        config = replace(
            base,
            seed=shard.seed,
            out_dir=Path(scratch),
            progress=False,
        )
        result = run_fuzz(config)
        trace = Path(result.regression_trace) if result.regression_trace else None
        return ShardResult(
            index=shard.index,
            seed=shard.seed,
            worker=f"{socket.gethostname()}:{os.getpid()}",
            examples=result.examples,
            steps=result.steps,
            seconds=result.seconds,
            failure=result.failure,
            error=result.error,
            trace_name=trace.name if trace else None,
            trace_text=trace.read_text() if trace else None,
            shrunk_requests=result.shrunk_requests,
        )


def _shards(
    campaign_seed: int,
    workers: int,
    duration: float | None,
    stop: Callable[[], bool],
    clock: Callable[[], float],
) -> Iterator[Shard]:
    """Shards until the duration is spent on ``clock`` or ``stop()``; with no duration, one
    a worker."""
    deadline = None if duration is None else clock() + duration
    index = 0
    while not stop():
        if index == workers if deadline is None else clock() >= deadline:
            return
        yield Shard(index, shard_seed(campaign_seed, index))
        index += 1


def run_campaign(
    base: FuzzConfig,
    executor: Executor,
    duration: float | None,
    campaign_seed: int = 0,
    out_dir: Path | None = None,
    progress: bool = False,
    clock: Callable[[], float] = time.monotonic,
) -> CampaignResult:
    """Shards of ``base`` on ``executor`` (``executor.workers`` at a time) until
    ``duration`` seconds of ``clock`` are spent; each shrunk failure is written to
    ``out_dir`` (default ``base.out_dir``)."""
    from tqdm import tqdm

    out = out_dir or base.out_dir
    campaign = CampaignResult()
    started = time.monotonic()
    bar = tqdm(
        total=None if duration is not None else executor.workers,
        desc="fuzz campaign",
        unit="shard",
        disable=None if progress else True,
    )
    shards = _shards(
        campaign_seed,
        executor.workers,
        duration,
        lambda: bool(campaign.failures or campaign.errors),
        clock,
    )
    for shard in executor.map_unordered(_run_shard, base, shards):
        campaign.shards.append(shard)
        if shard.trace_name and shard.trace_text:
            path = out / shard.trace_name
            write_atomic(path, shard.trace_text)
            campaign.regression_traces.append(str(path))
        bar.update(1)
        bar.set_postfix(
            examples=sum(s.examples for s in campaign.shards), failures=len(campaign.failures)
        )
    bar.close()
    campaign.shards.sort(key=lambda s: s.index)
    campaign.seconds = time.monotonic() - started
    return campaign
