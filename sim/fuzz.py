"""Stateful fuzzing of the cache against a trivially correct oracle, with Hypothesis.

The machine serves conversations that share prefixes on purpose (a Bundle of everything
evaluated so far), branches from earlier turns, marks user restore points, moves the budget
down to zero, and injects restore failures and corrupt snapshots; half its caches have a disk
tier, whose budget it moves too, whose writes it makes fail, whose stored snapshots it cuts
short, which it restarts from (the live state and RAM lost, the disk tier adopted), and
whose reads most of them weigh against recomputing (read-or-recompute, with figures drawn
per example: a cut match must restore exactly too). After every step it checks
every structural invariant, the oracle (the live state equals a fresh prefill), that no
snapshot leaked or was closed twice, and that no restore failed without an injected fault.
A failure is shrunk by Hypothesis and written as a kvtrie trace that ``kvtrie replay``
reproduces exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisException
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    get_state_machine_test,
    initialize,
    invariant,
    precondition,
    rule,
)

from kvtrie.core.policy import TOGGLES
from kvtrie.core.prefix_cache import POLICIES, CacheStats
from kvtrie.core.trie import walk

from .build import DiskTier, make_backend, make_cache, make_policy
from .costs import CostModel
from .mutants import mutated
from .runner import CheckMode, RequestRunner
from .traces import Event, write_trace

__all__ = ["FuzzConfig", "FuzzResult", "PROFILES", "run_fuzz"]

TOGGLE_NAMES = tuple(toggle.name for toggle in TOGGLES)
ALPHABET = 5  # few distinct tokens, so prompts collide and edges split
PROFILES = {
    # name: (fake examples, mlx examples, steps)
    "quick": (300, 24, 25),
    "nightly": (10_000, 500, 40),
}
# Drawn per example unless --model names one: each engages different paths of the policies
# (partial-edge reuse and page trimming need attention-only layers; rotation and recurrent
# snapshots need their kinds).
DEFAULT_MODELS = {
    "fake": ("tiny-mixed", "tiny-attention", "tiny-swa"),
    "mlx": ("tiny-hybrid", "tiny-attention", "tiny-swa"),
}


@dataclass(frozen=True)
class FuzzConfig:
    backend: str = "fake"
    model: str | None = None
    examples: int = 300
    steps: int = 25
    seed: int | None = None
    mutant: str | None = None
    time_limit: float | None = None
    out_dir: Path = Path("tests/regressions")
    progress: bool = False

    @property
    def models(self) -> tuple[str, ...]:
        return (self.model,) if self.model else DEFAULT_MODELS[self.backend]


@dataclass
class FuzzResult:
    config: FuzzConfig
    examples: int = 0
    steps: int = 0
    shapes: set[int] = field(default_factory=set)
    models: Counter[str] = field(default_factory=Counter)  # examples per model drawn
    policies: Counter[str] = field(default_factory=Counter)  # examples per policy drawn
    max_depth: int = 0
    totals: CacheStats = field(default_factory=CacheStats)  # summed over every example
    seconds: float = 0.0
    failure: str | None = None  # a check failed or the cache raised: the shrunk example's error
    error: str | None = None  # Hypothesis itself failed (flaky, health check): no verdict
    regression_trace: str | None = None
    shrunk_requests: int = 0


def _budgets(bytes_per_token: int) -> list[int | None]:
    """Budgets from unbounded down to zero, scaled to the model's cache size."""
    return [None, 0, 4 * bytes_per_token, 24 * bytes_per_token, 96 * bytes_per_token]


def _backend_factory(backend: str, model: str) -> Callable[[], Any]:
    """A factory of fresh backends (the profile read once); an MLX model is built once and
    its faults reset."""
    shared = make_backend(backend, model)
    if backend == "fake":
        from kvtrie.backends.fake import FakeBackend

        return lambda: FakeBackend(shared.profile)
    from kvtrie.backends.base import Faults

    def fresh() -> Any:
        shared.faults = Faults()
        return shared

    return fresh


# Every strategy of the policy can be switched on or off from either bundle, so the fuzzer
# runs combinations no named bundle has (the strategies must be sound in any combination).
POLICY_SPELLINGS = st.builds(
    lambda bundle, changes, interval: ",".join(
        [bundle, *changes] + ([f"snapshot-interval={interval}"] if interval else [])
    ),
    st.sampled_from(sorted(POLICIES)),
    st.lists(
        st.sampled_from([f"{sign}{name}" for name in TOGGLE_NAMES for sign in "+-"]),
        max_size=3,
        unique_by=lambda change: change[1:],
    ),
    st.sampled_from([0, 0, 3, 8]),
)


# How fast the fuzzed disk tier reads, in tokens' worth of snapshot bytes a second, against
# recomputing one token a second (plus 1/16 s per token of context it attends to): at 0.25
# reading a node only wins after about 48 tokens of context, at 0.5 after about 16, at 4
# it always wins. None: the cache has no estimate and always reads.
DISK_READ_SPEEDS = (None, 0.25, 0.5, 4.0)


def fuzz_cost(model: str, bytes_per_token: int, disk_read_speed: float) -> CostModel:
    """The figures a fuzzed cache weighs its disk tier's reads against recomputing with (the
    read-or-recompute strategy); a regression trace's header carries them."""
    return CostModel(
        name="fuzz",
        model=model,
        machine="kvtrie fuzz",
        source=f"kvtrie fuzz: disk reads at {disk_read_speed} tokens/s against recompute",
        prefill_fixed_seconds=0.0,
        prefill_seconds_per_token=1.0,
        prefill_seconds_per_token_context=1 / 16,
        decode_seconds_per_token=1.0,
        page_in_bytes_per_second=1e12,
        page_out_bytes_per_second=1e12,
        disk_read_bytes_per_second=bytes_per_token * disk_read_speed,
        disk_write_bytes_per_second=1e12,
    )


def _token_bytes(backend: Any) -> int:
    """Paged-out bytes per token of this backend's attention layers (for budget scales)."""
    layers = backend.new_layers()
    backend.evaluate(layers, np.ones(4, dtype=np.int32))
    return max(1, sum(layer.nbytes for layer in layers) // 4)


def _path_tokens(node: Any) -> list[int]:
    """The tokens from the root to the end of ``node``."""
    parts = []
    while node is not None:
        parts.append(node.tokens)
        node = node.parent
    return [int(t) for part in reversed(parts) for t in part]


def _machine(
    config: FuzzConfig, result: FuzzResult, last: dict[str, Any], tick: Callable[[], Any]
) -> type:
    backends = {model: _backend_factory(config.backend, model) for model in config.models}
    token_bytes = {model: _token_bytes(new()) for model, new in backends.items()}
    budgets = {model: _budgets(token_bytes[model]) for model in backends}
    deadline = None if config.time_limit is None else time.monotonic() + config.time_limit
    tokens = st.lists(st.integers(1, ALPHABET), min_size=1, max_size=10)
    outputs = st.lists(st.integers(1, ALPHABET), min_size=0, max_size=3)

    class CacheMachine(RuleBasedStateMachine):
        histories = Bundle("histories")

        def __init__(self) -> None:
            super().__init__()
            self.lines: list[dict[str, Any]] = []
            self.found: list = []
            # Past the time limit new examples do nothing, so Hypothesis runs out its count
            # at once; never once a failure was seen, or its shrinking would replay no-ops,
            # find them passing and call the failure flaky.
            self.idle = (
                deadline is not None and time.monotonic() > deadline and not last.get("failed")
            )
            last["machine"] = self
            result.examples += 1
            tick()

        @initialize(
            disk=st.booleans(),
            policy=POLICY_SPELLINGS,
            model=st.sampled_from(config.models),
            counts_live=st.booleans(),
            disk_read_speed=st.sampled_from(DISK_READ_SPEEDS),
        )
        def start(
            self,
            policy: str,
            model: str,
            disk: bool,
            counts_live: bool,
            disk_read_speed: float | None,
        ) -> None:
            self.policy = policy
            self.model = model
            self.disk = disk  # a disk tier (unbounded until a disk_budget event)
            self.counts_live = counts_live  # the budget holds the live layers too
            self.cost = None  # the figures its read-or-recompute choice weighs, if any
            if disk and disk_read_speed is not None:
                self.cost = fuzz_cost(model, token_bytes[model], disk_read_speed)
            result.models[model] += 1
            result.policies[make_policy(policy).name] += 1
            self.backend = backends[model]()
            tier = DiskTier(None) if disk else None
            self.cache = make_cache(
                self.backend,
                None,
                make_policy(policy),
                tier,
                budget_counts_live=counts_live,
                cost=self.cost,
            )
            self.runner = RequestRunner(self.backend, self.cache, CheckMode(full=True))

        def _serve(self, prompt: list[int], out: list[int], mark: int | None) -> list[int]:
            if self.idle:
                return prompt
            marks = [mark] if mark else []
            line: dict[str, Any] = {"id": f"r{len(self.lines)}", "prompt": prompt, "output": out}
            if marks:
                line["user_snapshots"] = marks
            self.lines.append(line)
            with self._failure_noted():
                result = self.runner.run(np.asarray(prompt, dtype=np.int32), out, marks)
            self.found += result.violations
            self._collect()
            return prompt + out

        @contextlib.contextmanager
        def _failure_noted(self):
            try:
                yield
            except Exception:
                last["failed"] = True
                raise

        def _apply(self, event: Event) -> None:
            if self.idle:
                return
            self.lines.append(event.as_line())
            with self._failure_noted():
                self.found += self.runner.apply(event)
            self._collect()

        @invariant()
        def every_check_holds(self) -> None:
            """The one place the machine asserts: what the runner's checks found in the last
            step (every structural invariant, the oracle, leaks, unexplained restore
            failures)."""
            found, self.found = self.found, []
            if found:
                last["failed"] = True
            assert not found, "; ".join(map(str, found))

        def _collect(self) -> None:
            result.steps += 1
            nodes = list(walk(self.cache.root))
            result.shapes.add(hash(tuple(sorted((n.start, n.end) for n in nodes))))
            result.max_depth = max(result.max_depth, len(self.cache.active_path) - 1)

        @rule(target=histories, prompt=tokens, out=outputs, mark=st.none() | st.integers(1, 10))
        def new_conversation(self, prompt, out, mark):
            return self._serve(prompt, out, mark if mark and mark <= len(prompt) else None)

        @rule(target=histories, base=histories, extra=tokens, out=outputs)
        def continue_conversation(self, base, extra, out):
            return self._serve(base + extra, out, None)

        @rule(
            target=histories,
            base=histories,
            cut=st.integers(0, 30),
            extra=st.lists(st.integers(1, ALPHABET), max_size=4),
            out=outputs,
            mark=st.none() | st.integers(1, 30),
        )
        def branch(self, base, cut, extra, out, mark):
            """Edit (new tokens after a cut) or regenerate (the same prefix again)."""
            prompt = base[: max(1, min(cut, len(base)))] + extra
            return self._serve(prompt, out, mark if mark and mark <= len(prompt) else None)

        @rule(step=st.integers(0, len(_budgets(1)) - 1))
        def set_budget(self, step):
            self._apply(Event("budget", 0, budget_bytes=budgets[self.model][step]))

        @precondition(lambda self: self.disk)
        @rule(step=st.integers(0, len(_budgets(1)) - 1))
        def set_disk_budget(self, step):
            self._apply(Event("disk_budget", 0, budget_bytes=budgets[self.model][step]))

        @rule()
        def fail_next_restore(self):
            self._apply(Event("fail_restores", 0, count=1))

        @precondition(lambda self: self.disk)
        @rule(count=st.integers(1, 3))
        def fail_next_writes(self, count):
            self._apply(Event("fail_writes", 0, count=count))

        @precondition(lambda self: self.disk)
        @rule(clean=st.booleans())
        def restart(self, clean):
            """The process stops (cleanly, or crashing with RAM lost) and a new one opens
            the disk tier: what it adopts must restore exactly (the oracle), what it lost is
            recomputed."""
            self._apply(Event("restart", 0, clean=clean))

        @precondition(lambda self: any(n.has_snapshots() for n in walk(self.cache.root)))
        @rule(data=st.data())
        def corrupt_snapshots(self, data):
            holders = {(n.start, n.end): n for n in walk(self.cache.root) if n.has_snapshots()}
            start, end = data.draw(st.sampled_from(sorted(holders)))
            # one layer's snapshot, or all: a single bad layer must not be served either,
            # even when the layers restored before and after it are sound
            layer = data.draw(st.none() | st.integers(0, len(self.cache.layers) - 1))
            self._apply(Event("corrupt", 0, start=start, end=end, layer=layer))
            if data.draw(st.booleans()):  # and ask for it at once: the restore must refuse it
                self._serve(_path_tokens(holders[(start, end)]) + [1], [], None)

        @precondition(lambda self: any(n.on_disk for n in walk(self.cache.root)))
        @rule(data=st.data())
        def truncate_stored(self, data):
            """A disk-tier snapshot cut short behind the cache's back: a miss, never served."""
            stored = {(n.start, n.end): n for n in walk(self.cache.root) if n.on_disk}
            start, end = data.draw(st.sampled_from(sorted(stored)))
            self._apply(Event("truncate", 0, start=start, end=end))
            if data.draw(st.booleans()):  # and ask for it at once
                self._serve(_path_tokens(stored[(start, end)]) + [1], [], None)

        def teardown(self):
            if hasattr(self, "cache"):
                stats = self.cache.stats
                for name in vars(stats):
                    setattr(
                        result.totals, name, getattr(result.totals, name) + getattr(stats, name)
                    )

    CacheMachine.TestCase.settings = settings(
        max_examples=config.examples,
        stateful_step_count=config.steps,
        deadline=None,
        database=None,
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
        derandomize=config.seed is None,
        print_blob=False,
    )
    return CacheMachine


def _write_regression(config: FuzzConfig, machine: Any, failure: str) -> Path:
    lines = machine.lines
    digest = hashlib.sha256(json.dumps(lines).encode()).hexdigest()[:10]
    name = f"{config.mutant or config.backend}-{digest}.jsonl"
    header = {
        "backend": config.backend,
        "profile": getattr(machine, "model", config.models[0]),
        "policy": getattr(machine, "policy", "kvtrie-seed"),
        "budget_bytes": None,
        **({"disk_budget_bytes": None} if getattr(machine, "disk", False) else {}),
        **({"budget_counts_live": True} if getattr(machine, "counts_live", False) else {}),
        **({"cost": machine.cost.as_table()} if getattr(machine, "cost", None) else {}),
        "found_by": "kvtrie fuzz",
        "mutant": config.mutant,
        "seed": config.seed,  # kvtrie fuzz --seed S draws this example again
        "failure": failure.splitlines()[0][:500],
    }
    path = config.out_dir / name
    write_trace(path, header, lines)
    return path


def run_fuzz(config: FuzzConfig) -> FuzzResult:
    """Run the state machine; on a failure, write the shrunk example as a regression trace."""
    from tqdm import tqdm

    result = FuzzResult(config)
    last: dict[str, Any] = {}
    started = time.monotonic()
    bar = tqdm(
        total=config.examples,
        desc=config.mutant or "fuzz",
        unit="ex",
        leave=False,
        disable=None if config.progress else True,
    )
    core_log = logging.getLogger("kvtrie.core")
    level = core_log.level
    core_log.setLevel(logging.ERROR)  # injected faults make expected restore warnings
    with mutated(config.mutant):
        machine = _machine(config, result, last, bar.update)
        test = get_state_machine_test(machine, settings=machine.TestCase.settings)
        if config.seed is not None:
            test = seed(config.seed)(test)
        try:
            test()
        except Exception as exc:
            if isinstance(exc, HypothesisException):
                # Hypothesis failing itself (a flaky example, a failed health check), not the
                # cache: no verdict on the code under test
                result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            else:  # a failing example, already shrunk by Hypothesis
                result.failure = f"{type(exc).__name__}: {exc}"
            if result.failure and "machine" in last:
                path = _write_regression(config, last["machine"], result.failure)
                result.regression_trace = str(path)
                result.shrunk_requests = sum(
                    1 for line in last["machine"].lines if "prompt" in line
                )
        finally:
            core_log.setLevel(level)
            bar.close()
    result.seconds = time.monotonic() - started
    return result
