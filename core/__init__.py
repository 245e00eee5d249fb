"""The backend-agnostic core: the prefix trie, the cache that shares it, eviction, invariants."""

from .invariants import Checker, Violation, check
from .prefix_cache import (
    DEFAULT_BUDGET_BYTES,
    POLICIES,
    CachePolicy,
    CacheStats,
    PrefixCache,
    RequestAccount,
    Session,
)
from .protocols import LayerCache, LayerKind, Snapshot

__all__ = [
    "DEFAULT_BUDGET_BYTES",
    "POLICIES",
    "CachePolicy",
    "CacheStats",
    "Checker",
    "LayerCache",
    "LayerKind",
    "PrefixCache",
    "RequestAccount",
    "Session",
    "Snapshot",
    "Violation",
    "check",
]
