"""What the replayer, the fuzzer and the tests need from a backend beyond the layer caches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from kvtrie.core.protocols import LayerCache

__all__ = ["Backend", "Faults"]


class Backend(Protocol):
    """A model: builds layer caches, evaluates tokens on them, and checks them against a fresh
    prefill (the I9 oracle)."""

    name: str
    vocab_size: int
    faults: Faults

    def new_layers(self) -> list[LayerCache]:
        """Empty live caches, one per layer (group)."""
        ...

    def evaluate(self, layers: Sequence[LayerCache], tokens: np.ndarray) -> Any:
        """Advance every layer by ``tokens``; returns the last position's logits (or None)."""
        ...

    def generate(self, layers: Sequence[LayerCache], logits: Any, count: int) -> np.ndarray:
        """Produce ``count`` tokens from ``logits``, evaluating all but the last, as decoding does."""
        ...

    def mismatch(self, layers: Sequence[LayerCache], prefix: np.ndarray) -> str | None:
        """I9 after begin: None when the live layers equal a fresh prefill of ``prefix``."""
        ...

    def logits_mismatch(self, prompt: np.ndarray, logits: Any) -> str | None:
        """I9 after prefill: None when ``logits`` equal a fresh full prefill's of ``prompt``."""
        ...


@dataclass
class Faults:
    """Fault injection shared by a backend's layers: the next ``failing_restores`` restores
    from a snapshot fail, as a lost or unreadable copy would."""

    failing_restores: int = 0

    def take_restore_failure(self) -> bool:
        if self.failing_restores > 0:
            self.failing_restores -= 1
            return True
        return False
