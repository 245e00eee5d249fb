"""Runs one request through the cache on a backend and checks it: the loop a server runs.

begin -> (oracle on the restored prefix) -> prefill the rest -> produce the outputs -> close ->
(structural invariants). Beside the cache it keeps the infinite cache's count of what each
request could reuse (:class:`~kvtrie.sim.ideal.IdealPrefixes`): the replay reports it, and
the reuse check compares the cache with it where the cache must lose nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from kvtrie.backends.base import Backend
from kvtrie.core.invariants import Checker, Violation, check
from kvtrie.core.prefix_cache import PrefixCache, RequestAccount, Session
from kvtrie.core.protocols import LayerKind
from kvtrie.core.trie import as_tokens

from .ideal import IdealPrefixes
from .traces import Event

__all__ = ["CheckMode", "RequestResult", "RequestRunner"]


@dataclass(frozen=True)
class CheckMode:
    """How often to check: ``every`` request, every Nth (``sample:N``), ``full`` (walk the whole
    trie each time, for small runs), or ``off``."""

    every: int = 1
    full: bool = False

    @classmethod
    def parse(cls, text: str) -> CheckMode:
        if text == "every":
            return cls()
        if text == "full":
            return cls(full=True)
        if text == "off":
            return cls(every=0)
        if text.startswith("sample:"):
            try:
                n = int(text.split(":", 1)[1])
            except ValueError:
                n = 0
            if n >= 1:
                return cls(every=n)
        raise ValueError(f"bad check mode {text!r}; use every, full, sample:N (N >= 1) or off")

    def due(self, index: int) -> bool:
        return self.every > 0 and index % self.every == 0


@dataclass
class RequestResult:
    account: RequestAccount
    outputs: np.ndarray
    ideal_cached: int = 0  # what an infinite cache would have reused of this prompt
    violations: list[Violation] = field(default_factory=list)
    # wall seconds of the switch (page-out and restores) and of the prompt's prefill, checks
    # left out: what a time model's estimate is compared with on a real backend
    restore_seconds: float = 0.0
    prefill_seconds: float = 0.0


class RequestRunner:
    """Drives requests through ``cache`` on ``backend``, checking as ``mode`` says."""

    def __init__(
        self,
        backend: Backend,
        cache: PrefixCache,
        mode: CheckMode | None = None,
    ) -> None:
        self.backend = backend
        self.cache = cache
        self.mode = mode or CheckMode()
        self.checker = Checker(cache, self.mode.full) if self.mode.every else None
        self.index = 0
        self.ideal = IdealPrefixes()
        # nothing evicted and no fault injected yet: see :meth:`must_lose_nothing`
        self.pristine = cache.budget_bytes is None

    def must_lose_nothing(self) -> bool:
        """Whether this cache must reuse exactly what an infinite cache would: unbounded since
        it was built (nothing evicted), no fault injected, attention layers only and partial
        edges on (every other policy reuses less by design: the seed backs up to a node's
        start, a recurrent layer only restores at a snapshot)."""
        cache = self.cache
        return (
            self.pristine
            and cache.budget_bytes is None
            and cache.policy.partial_edges.on
            and all(layer.kind is LayerKind.KV for layer in cache.layers)
        )

    def apply(self, event: Event) -> list[Violation]:
        """Apply a trace event (budget change, injected fault) and check what it caused."""
        if event.kind == "budget":
            self.pristine = self.pristine and event.budget_bytes is None
            self.cache.set_budget(event.budget_bytes)
        elif event.kind == "disk_budget":
            self.cache.set_disk_budget(event.budget_bytes)
        elif event.kind == "fail_restores":
            self.pristine = False
            self.backend.faults.fail_next_restores(event.count)
        elif event.kind == "fail_writes":
            self.pristine = False
            self.cache.store.fail_next_writes(event.count)
        elif event.kind == "restart":
            self.pristine = False
            self.cache.restart(event.clean)
        elif event.kind == "truncate":
            self.pristine = False
            for node in self.cache.nodes():
                if (node.start, node.end) == (event.start, event.end) and node.on_disk:
                    for snap in node.snapshots or []:
                        if snap is not None:
                            snap.truncate()
        else:
            self.pristine = False
            for node in self.cache.nodes():
                if (node.start, node.end) == (event.start, event.end):
                    for index, snap in enumerate(node.snapshots or []):
                        if snap is not None and event.layer in (None, index):
                            self.backend.faults.corrupt(snap)
        return self._structural(None) if self.mode.every else []

    def run(
        self,
        prompt: Sequence[int] | np.ndarray,
        outputs: Sequence[int] | np.ndarray | int,
        user_marks: Iterable[int] = (),
    ) -> RequestResult:
        """Serve one request; ``outputs`` are forced tokens, or a count to generate."""
        checking = self.mode.due(self.index)
        self.index += 1
        layers = self.cache.layers
        lossless = self.must_lose_nothing()
        started = time.perf_counter()
        session = self.cache.begin(prompt)
        restore_seconds = time.perf_counter() - started
        ideal = self.ideal.cached(session.prompt)
        violations: list[Violation] = []
        if checking:
            violations += self._structural(session)
            if lossless and session.cached_tokens != ideal:
                violations.append(
                    Violation(
                        "REUSE",
                        f"reused {session.cached_tokens} of {len(session.prompt)} prompt tokens "
                        f"where an infinite cache reuses {ideal} (policy {self.cache.policy.name}"
                        ", attention only, nothing evicted, no fault)",
                    )
                )
            why = self.backend.mismatch(layers, session.prompt[: session.cached_tokens])
            if why is not None:
                violations.append(Violation("I9", f"after begin: {why}"))
        started = time.perf_counter()
        logits = session.prefill(lambda tokens: self.backend.evaluate(layers, tokens), user_marks)
        prefill_seconds = time.perf_counter() - started
        if checking:
            why = self.backend.logits_mismatch(session.prompt, logits)
            if why is not None:
                violations.append(Violation("I9", f"after prefill: {why}"))
        if isinstance(outputs, int):
            produced = self.backend.generate(layers, logits, outputs)
        else:
            produced = as_tokens(outputs)
            if len(produced) > 1:
                self.backend.evaluate(layers, produced[:-1])
        session.close(produced)
        self.ideal.insert(np.concatenate([session.prompt, produced[:-1]]))
        if checking:
            violations += self._structural(session)
            violations += self.unexplained_restore_failures()
        return RequestResult(
            session.account, produced, ideal, violations, restore_seconds, prefill_seconds
        )

    def unexplained_restore_failures(self) -> list[Violation]:
        """I11: a restore may fail only where a fault was injected (a corrupt snapshot makes
        failures this count can't predict, so then it says nothing)."""
        faults = self.backend.faults
        failures = self.cache.stats.restore_failures
        if not faults.corruptions and failures > faults.injected:
            return [
                Violation(
                    "I11",
                    f"{failures} restores failed, only {faults.injected} failures were injected",
                )
            ]
        return []

    def _structural(self, session: Session | None) -> list[Violation]:
        assert self.checker is not None
        found = self.checker.check(session)
        why = self.backend.unaccounted(self.checker.held_snapshots)
        if why is not None:
            found.append(Violation("I5", why))
        if self.mode.full:  # the whole trie too; report what either finds, once
            found += [v for v in check(self.cache, session) if v not in found]
        return found
