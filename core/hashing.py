"""Deterministic 64-bit mixing, for the fake backend's states and synthetic trace tokens."""

from __future__ import annotations

import numpy as np

__all__ = ["mix64"]

_U64 = np.uint64


def mix64(values: np.ndarray, salt: int) -> np.ndarray:
    """One multiply-xorshift round over ``values + salt``: equal inputs map equal, others
    scatter over all 64 bits (one round is enough here and keeps replays fast)."""
    x = (values.astype(_U64) + _U64(salt & ((1 << 64) - 1))) * _U64(0xBF58476D1CE4E5B9)
    return x ^ (x >> _U64(31))
