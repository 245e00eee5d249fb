"""The cache's policy: one small strategy object per choice, and named bundles of them.

Each choice where kvtrie's improved policy departs from the seed is a class of its own with a
``name`` (how ``--policy`` spells it) and a docstring that says what it changes, why, and what
it was measured to gain. A choice whose precondition the model's layers do not meet (partial
edges on a recurrent model, say) is replaced by the seed's behaviour once, when the cache is
built, by :meth:`CachePolicy.for_layers`; nothing else in the core asks about layer kinds to
decide policy.

A bundle is spelled ``improved``, ``seed``, or a bundle followed by changes:
``improved,-page-in-moves`` (the improved policy without moving page-ins),
``seed,+partial-edges,snapshot-interval=256``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .evict import EvictionOrder, OldestDeepestLargest
from .protocols import LayerKind

__all__ = [
    "CachePolicy",
    "POLICIES",
    "STRATEGIES",
    "parse_policy",
]


@dataclass(frozen=True)
class PartialEdges:
    """On a match that ends inside an edge, keep the matched part live and recompute only the
    rest. The seed backs up to the edge's parent and recomputes the whole edge. Needs every
    layer to rewind (no recurrent layer). Gain: on the generated traces, most of the improved
    policy's extra hits at large budgets (agent: one turn's edited tail instead of its turn)."""

    name = "partial-edges"
    on: bool = True

    def applies(self, kinds: frozenset[LayerKind]) -> bool:
        return LayerKind.RECURRENT not in kinds


@dataclass(frozen=True)
class KeepRestorePoints:
    """When a request extends a leaf that holds snapshots, hang the new tokens under it as a
    child and keep the leaf's snapshots, instead of dropping them to extend the leaf in place
    (the seed). A branch later at that point restores instead of recomputing. On a model with
    recurrent or sliding-window layers only the points the request itself took (its match
    point, interval and last-token points) are kept: there each point is a whole state, and
    keeping every earlier leaf's cost more than it saved (agent on gemma-12b-swa at 4 GiB:
    0.702 against the seed's 0.856; with this rule 0.856)."""

    name = "keep-restore-points"
    on: bool = True

    def applies(self, kinds: frozenset[LayerKind]) -> bool:
        return True


@dataclass(frozen=True)
class TrimTailPages:
    """Evict only as many whole pages from the end of a long attention-only leaf as the excess
    over the budget needs, keeping its prefix restorable; the seed drops the whole leaf. Gain:
    Mooncake at 1 TiB, 0.270 hit ratio against the seed's 0.112 (with the choices below)."""

    name = "trim-tail-pages"
    on: bool = True

    def applies(self, kinds: frozenset[LayerKind]) -> bool:
        return kinds == {LayerKind.KV}


@dataclass(frozen=True)
class WholePagesUnderPressure:
    """Over budget, a leaf being paged out keeps whole pages only, as a block cache stores it:
    its sub-page tail costs bytes in every stored leaf and saves at most a page of recompute.
    Gain: closed a 977-token gap to vLLM's block cache on shared-prefix at 8 GiB."""

    name = "whole-pages"
    on: bool = True

    def applies(self, kinds: frozenset[LayerKind]) -> bool:
        return kinds == {LayerKind.KV}


@dataclass(frozen=True)
class PageInMoves:
    """Under a budget, paging a node in moves its snapshots into the live layers instead of
    copying them, so the live path is not held twice; leaving the path pages its nodes out
    again. Attention only (a recurrent layer holds only the frontier's state). Gain: on agent
    at 1 GiB the copies had held 2,736 of 8,192 budgeted tokens."""

    name = "page-in-moves"
    on: bool = True

    def applies(self, kinds: frozenset[LayerKind]) -> bool:
        return kinds == {LayerKind.KV}


@dataclass(frozen=True)
class MergeLoneChildren:
    """After a leaf eviction, fold a parent left with one child into that child (the seed's
    rule). Off in the improved policy: the merge gave a never-reused suffix its parent's
    recency, so it outlived prefixes that were reused."""

    name = "merge-lone-children"
    on: bool = True

    def applies(self, kinds: frozenset[LayerKind]) -> bool:
        return True


@dataclass(frozen=True)
class RestorePointBeforeLastToken:
    """Snapshot every prompt one token before its end, so a regenerate or an identical
    prompt restores all but that token. Only for models with a layer that can't rewind there
    (recurrent, sliding window): an attention-only model rewinds to any point of the prompt.
    Needs keep-restore-points, which keeps it when its own request extends it. Off in
    both bundles: on branching (a third of its requests regenerate or edit), hybrid models
    reuse 0.881 against 0.844 at every budget, but each point holds a whole recurrent state
    (peak 5.1 GiB against 2.2 GiB unbounded, qwen3-next-hybrid) and on agent loops, which
    never regenerate, those states crowd out what is reused (1 GiB: 0.609 against 0.682)."""

    name = "last-token-restore-point"
    on: bool = True

    def applies(self, kinds: frozenset[LayerKind]) -> bool:
        return kinds != {LayerKind.KV}


@dataclass(frozen=True)
class ReadOrRecompute:
    """With a disk tier and a time estimate (the cache's ``estimate_seconds``, from the time
    model's cost figures), restore a match from the disk tier only where reading it is
    estimated faster than recomputing: the match stops above the disk-tier node from which
    reading costs more than prefilling, and the rest is recomputed. The seed reads whatever
    matched. Without an estimate nothing changes. Gain: small with the shipped figures (an
    Apple SSD reads llama-8b's state about 90x faster than an M4 recomputes it; it fires only
    where a match uses a few tokens of a long disk-tier node: 32 of Mooncake's requests at
    8 GiB + 1 TiB); on a 20 MB/s disk, where reading made Mooncake slower than no cache
    (277.9 h of prefill against 272.4 h), 258.6 h and TTFT p50 166.7 h against 176.4 h."""

    name = "read-or-recompute"
    on: bool = True

    def applies(self, kinds: frozenset[LayerKind]) -> bool:
        return True


@dataclass(frozen=True)
class SnapshotSchedule:
    """Also snapshot every ``interval`` tokens of a long prefill (0: only where the seed does),
    so a request diverging inside a long new prompt restores from the nearest point."""

    name = "snapshot-interval"
    interval: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or self.interval < 0:
            raise ValueError(f"snapshot-interval must be an integer >= 0, got {self.interval!r}")

    def stops(self, start: int, end: int) -> range:
        """The scheduled snapshot offsets strictly inside ``(start, end)``."""
        if self.interval <= 0:
            return range(0)
        return range((start // self.interval + 1) * self.interval, end, self.interval)


TOGGLES = (
    PartialEdges,
    KeepRestorePoints,
    TrimTailPages,
    WholePagesUnderPressure,
    PageInMoves,
    MergeLoneChildren,
    RestorePointBeforeLastToken,
    ReadOrRecompute,
)
STRATEGIES = tuple(t.name for t in TOGGLES) + (SnapshotSchedule.name,)


@dataclass(frozen=True)
class CachePolicy:
    """A named bundle of strategies; the defaults are the seed's behaviour."""

    name: str = "kvtrie-seed"
    partial_edges: PartialEdges = PartialEdges(False)
    keep_restore_points: KeepRestorePoints = KeepRestorePoints(False)
    trim_tail_pages: TrimTailPages = TrimTailPages(False)
    whole_pages: WholePagesUnderPressure = WholePagesUnderPressure(False)
    page_in_moves: PageInMoves = PageInMoves(False)
    merge_lone_children: MergeLoneChildren = MergeLoneChildren(True)
    last_token_restore_point: RestorePointBeforeLastToken = RestorePointBeforeLastToken(False)
    read_or_recompute: ReadOrRecompute = ReadOrRecompute(False)
    schedule: SnapshotSchedule = SnapshotSchedule(0)
    eviction: EvictionOrder = field(default_factory=OldestDeepestLargest)

    def toggles(self) -> dict[str, Any]:
        """The on/off strategies by field name, in field order."""
        return {
            f.name: value
            for f in fields(self)
            if isinstance(value := getattr(self, f.name), TOGGLES)
        }

    def for_layers(self, kinds: Iterable[LayerKind]) -> CachePolicy:
        """This policy with every choice the layers can't support turned off."""
        kinds = frozenset(kinds)
        changes = {
            attr: replace(value, on=False)
            for attr, value in self.toggles().items()
            if value.on and not value.applies(kinds)
        }
        return replace(self, **changes) if changes else self

    def with_changes(self, changes: Iterable[str]) -> CachePolicy:
        """Apply ``+name``, ``-name``, ``name`` and ``snapshot-interval=K`` changes."""
        policy = self
        attrs = {value.name: attr for attr, value in self.toggles().items()}
        for change in changes:
            text = change.strip()
            if not text:
                continue
            key, sep, value = text.partition("=")
            if sep:
                if key != SnapshotSchedule.name:
                    raise ValueError(f"only {SnapshotSchedule.name}=K takes a value, got {text!r}")
                if not value.isdigit():
                    raise ValueError(f"{SnapshotSchedule.name} takes an integer >= 0, got {value!r}")
                policy = replace(policy, schedule=SnapshotSchedule(int(value)))
                continue
            on = not key.startswith("-")
            key = key.lstrip("+-")
            if key not in attrs:
                raise ValueError(
                    f"unknown strategy {key!r}; choose from {', '.join(t.name for t in TOGGLES)} "
                    f"or {SnapshotSchedule.name}=K"
                )
            policy = replace(policy, **{attrs[key]: replace(getattr(policy, attrs[key]), on=on)})
        return policy

    def spelled(self) -> str:
        """The shortest spelling of this policy as a bundle and changes (a round trip of
        :func:`parse_policy`)."""
        best = None
        for bundle_name, bundle in POLICIES.items():
            changes = [
                ("+" if mine.on else "-") + mine.name
                for mine, theirs in zip(self.toggles().values(), bundle.toggles().values())
                if mine.on != theirs.on
            ]
            if self.schedule != bundle.schedule:
                changes.append(f"{SnapshotSchedule.name}={self.schedule.interval}")
            text = ",".join([bundle_name, *changes])
            if best is None or len(text) < len(best):
                best = text
        assert best is not None
        return best


POLICIES: dict[str, CachePolicy] = {
    "kvtrie-seed": CachePolicy(),
    "kvtrie-improved": CachePolicy(
        name="kvtrie-improved",
        partial_edges=PartialEdges(True),
        keep_restore_points=KeepRestorePoints(True),
        trim_tail_pages=TrimTailPages(True),
        whole_pages=WholePagesUnderPressure(True),
        page_in_moves=PageInMoves(True),
        merge_lone_children=MergeLoneChildren(False),
        read_or_recompute=ReadOrRecompute(True),
    ),
}
ALIASES = {"seed": "kvtrie-seed", "improved": "kvtrie-improved"}


def parse_policy(text: str) -> CachePolicy:
    """A policy from its spelling: a bundle name (``kvtrie-seed``, ``kvtrie-improved``, or
    ``seed``/``improved``), then comma-separated strategy changes."""
    bundle, *changes = [part.strip() for part in text.split(",")]
    name = ALIASES.get(bundle, bundle)
    if name not in POLICIES:
        raise ValueError(
            f"unknown policy {bundle!r}; choose {', '.join(POLICIES)} (or seed, improved), "
            f"optionally followed by changes such as ,-page-in-moves"
        )
    policy = POLICIES[name].with_changes(changes)
    if policy == POLICIES[name]:
        return policy
    return replace(policy, name=policy.spelled())
