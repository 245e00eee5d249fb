"""Runs one request through the cache on a backend and checks it: the loop a server runs.

begin -> (oracle on the restored prefix) -> prefill the rest -> produce the outputs -> close ->
(structural invariants).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from kvtrie.backends.base import Backend
from kvtrie.core.invariants import Checker, Violation, check
from kvtrie.core.prefix_cache import PrefixCache, RequestAccount, Session
from kvtrie.core.trie import as_tokens

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
    violations: list[Violation] = field(default_factory=list)


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

    def apply(self, event: Event) -> list[Violation]:
        """Apply a trace event (budget change, injected fault) and check what it caused."""
        if event.kind == "budget":
            self.cache.set_budget(event.budget_bytes)
        elif event.kind == "fail_restores":
            self.backend.faults.fail_next_restores(event.count)
        else:
            for node in self.cache.nodes():
                if (node.start, node.end) == (event.start, event.end):
                    for snap in node.snapshots or []:
                        if snap is not None:
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
        session = self.cache.begin(prompt)
        violations: list[Violation] = []
        if checking:
            violations += self._structural(session)
            why = self.backend.mismatch(layers, session.prompt[: session.cached_tokens])
            if why is not None:
                violations.append(Violation("I9", f"after begin: {why}"))
        logits = session.prefill(lambda tokens: self.backend.evaluate(layers, tokens), user_marks)
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
        if checking:
            violations += self._structural(session)
            faults = self.backend.faults
            failures = self.cache.stats.restore_failures
            if not faults.corruptions and failures > faults.injected:
                violations.append(
                    Violation(
                        "I11",
                        f"{failures} restores failed, only {faults.injected} failures were injected",
                    )
                )
        return RequestResult(session.account, produced, violations)

    def _structural(self, session: Session | None) -> list[Violation]:
        assert self.checker is not None
        found = self.checker.check(session)
        why = self.backend.unaccounted(self.checker.held_snapshots)
        if why is not None:
            found.append(Violation("I5", why))
        if self.mode.full:  # the whole trie too; report what either finds, once
            found += [v for v in check(self.cache, session) if v not in found]
        return found
