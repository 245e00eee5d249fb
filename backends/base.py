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

    def unaccounted(self, held: int) -> str | None:
        """I5: None when the ``held`` snapshots are all this backend has open (none leaked,
        none closed twice), or when the backend does not track them."""
        ...


@dataclass
class Faults:
    """Fault injection shared by a backend's layers: restores that fail, as a lost or unreadable
    copy would, and snapshots damaged in place. Counted, so a restore failure nobody injected
    shows up as a bug (I11)."""

    failing_restores: int = 0
    injected: int = 0
    corruptions: int = 0

    def fail_next_restores(self, count: int = 1) -> None:
        self.failing_restores += count
        self.injected += count

    def corrupt(self, snapshot: Any) -> bool:
        """Damage ``snapshot``'s data (not its checksum); False if the backend can't."""
        damage = getattr(snapshot, "corrupt", None)
        if damage is None:
            return False
        damage()
        self.corruptions += 1
        return True

    def take_restore_failure(self) -> bool:
        if self.failing_restores > 0:
            self.failing_restores -= 1
            return True
        return False
