"""Cost figures: how many seconds a request's prefill, decode and restores take on a named
model and machine, read from ``backends/costs.toml`` or a file of the user's own.

The prefill is DistServe's model, ``a + b * n + c * (attended context)``, with the attended
context summed exactly: ``n`` computed tokens after ``cached`` reused ones attend to
``n * cached + n * (n - 1) / 2`` earlier positions, so reuse at the front of a long prompt
saves more than its count. Every figure in the shipped file says where it comes from.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

from kvtrie.backends.profiles import read_toml, toml_table

__all__ = [
    "DEFAULT_COSTS",
    "CostModel",
    "attended",
    "cost_for",
    "cost_from_table",
    "load_costs",
    "shipped_costs",
]

DEFAULT_COSTS = "costs.toml"  # shipped beside the profiles, in kvtrie.backends

_TEXT = ("model", "machine", "source")
_RATES = (
    "prefill_seconds_per_token",
    "decode_seconds_per_token",
    "page_in_bytes_per_second",
    "page_out_bytes_per_second",
    "disk_read_bytes_per_second",
    "disk_write_bytes_per_second",
)
_NON_NEGATIVE = ("prefill_fixed_seconds", "prefill_seconds_per_token_context")


def attended(cached: int, computed: int) -> float:
    """Earlier positions the ``computed`` tokens after ``cached`` reused ones attend to, all
    together: each attends to the cached ones and to the computed ones before it."""
    return computed * cached + computed * (computed - 1) / 2


@dataclass(frozen=True)
class CostModel:
    name: str
    model: str
    machine: str
    source: str
    prefill_fixed_seconds: float
    prefill_seconds_per_token: float
    prefill_seconds_per_token_context: float
    decode_seconds_per_token: float
    page_in_bytes_per_second: float
    page_out_bytes_per_second: float
    disk_read_bytes_per_second: float
    disk_write_bytes_per_second: float

    @classmethod
    def unit(cls, model: str, source: str) -> CostModel:
        """Figures of 1 (a second a token, a byte a second) and no fixed or context term: for
        a replay that only measures, its estimates unused."""
        zero = {key: 0.0 for key in _NON_NEGATIVE}
        return cls("unit", model, "this machine", source, **zero, **{key: 1.0 for key in _RATES})

    def prefill_seconds(self, cached: int, computed: int) -> float:
        """Seconds to evaluate ``computed`` tokens after ``cached`` reused ones."""
        if computed <= 0:
            return 0.0
        return (
            self.prefill_fixed_seconds
            + self.prefill_seconds_per_token * computed
            + self.prefill_seconds_per_token_context * attended(cached, computed)
        )

    def decode_seconds(self, generated: int) -> float:
        """Seconds for the tokens generated after the first (the prefill yields the first)."""
        return self.decode_seconds_per_token * max(0, generated - 1)

    def restore_seconds(self, nbytes: int) -> float:
        return nbytes / self.page_in_bytes_per_second

    def page_out_seconds(self, nbytes: int) -> float:
        return nbytes / self.page_out_bytes_per_second

    def disk_read_seconds(self, nbytes: int) -> float:
        """Seconds to read (and verify) ``nbytes`` of stored snapshots from the disk tier."""
        return nbytes / self.disk_read_bytes_per_second

    def disk_write_seconds(self, nbytes: int) -> float:
        return nbytes / self.disk_write_bytes_per_second

    def request_seconds(self, cached: int, prompt: int, disk_bytes: int) -> float:
        """A request's estimated seconds when it reuses ``cached`` of ``prompt`` tokens and
        reads ``disk_bytes`` of them from the disk tier: what the cache's read-or-recompute
        choice weighs."""
        return self.disk_read_seconds(disk_bytes) + self.prefill_seconds(cached, prompt - cached)

    def describe(self) -> dict[str, object]:
        return dict(vars(self))

    def as_table(self) -> dict[str, object]:
        """The figures as a ``[costs.NAME]`` table holds them (a trace header's ``cost``)."""
        return {key: value for key, value in vars(self).items() if key != "name"}


def cost_from_table(name: str, table: object, where: str) -> CostModel:
    """The figures of one ``[costs.NAME]`` table (or a trace header's ``cost``, the same
    keys); a ValueError names ``where`` and the key."""
    keys = (*_TEXT, *_RATES, *_NON_NEGATIVE)
    table = toml_table(table, f"{where}: costs.{name}", set(keys))
    missing = [key for key in keys if key not in table]
    if missing:
        raise ValueError(f"{where}: [costs.{name}] is missing {missing[0]!r}")
    for key in _TEXT:
        if not isinstance(table[key], str) or not table[key]:
            raise ValueError(f"{where}: [costs.{name}] {key} must be a non-empty string")
    numbers = {}
    for key in _RATES + _NON_NEGATIVE:
        value = table[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ValueError(f"{where}: [costs.{name}] {key} must be a number, got {value!r}")
        if key in _RATES and value <= 0:
            raise ValueError(f"{where}: [costs.{name}] {key} must be > 0, got {value!r}")
        if value < 0:
            raise ValueError(f"{where}: [costs.{name}] {key} must be >= 0, got {value!r}")
        numbers[key] = float(value)
    return CostModel(name, table["model"], table["machine"], table["source"], **numbers)


def load_costs(path: Path | None = None) -> dict[str, CostModel]:
    """Every ``[costs.NAME]`` table of ``path`` (default: the shipped file); a ValueError
    names the file and the key."""
    data, source = read_toml(path, DEFAULT_COSTS)
    tables = data.get("costs")
    if not isinstance(tables, dict) or not tables:
        raise ValueError(
            f"{source}: no [costs.NAME] table (the shipped {DEFAULT_COSTS} has the form)"
        )
    return {name: cost_from_table(name, table, source) for name, table in tables.items()}


@functools.cache
def shipped_costs() -> dict[str, CostModel]:
    """The shipped file's entries, read once a process (``--cost``'s help lists them, and
    every subcommand's parser is built at start-up)."""
    return load_costs()


def cost_for(model: str, cost: str | None) -> CostModel | None:
    """The cost figures of a replay: ``cost`` names a shipped entry or a file with one entry;
    with none, the shipped entry for ``model``, or None when there is none (no time model)."""
    shipped = shipped_costs()
    if cost is None:
        return next((entry for entry in shipped.values() if entry.model == model), None)
    if cost in shipped:
        return shipped[cost]
    path = Path(cost)
    if not path.exists():
        raise ValueError(
            f"--cost: {cost!r} is neither a file nor a shipped entry ({', '.join(shipped)})"
        )
    entries = load_costs(path)
    if len(entries) != 1:
        raise ValueError(f"{path}: holds {len(entries)} [costs.NAME] tables; give one")
    return next(iter(entries.values()))
