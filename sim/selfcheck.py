"""The verifier's own tests: every check shown to fire on the smallest bad state, the
replayer's counters against a brute-force count, and each strategy's hand-computed outcome.

A check only ever seen passing may be checking nothing, so each bad-state case builds a small
sound cache on the fake backend, asks the check about it (it must pass), breaks exactly one
thing and asks again: the check must report it, with the right invariant and the numbers that
show it. The cases live in the package, not only under tests/, because ``kvtrie fuzz
--mutants all`` runs them under every mutant: a mutant that weakens a check is killed here,
where the fuzzer, driving a correct cache, would never make the bad state the check exists for.

Checks are called through their modules (``invariants.check``), so a mutant's patch is seen.
"""

from __future__ import annotations

import itertools
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvtrie.backends.fake import FakeBackend, FakeCodec
from kvtrie.backends.profiles import LayerSpec, ModelProfile, get_profile
from kvtrie.core import invariants
from kvtrie.core.evict import TRIM_PAGE
from kvtrie.core.invariants import Checker, Violation
from kvtrie.core.policy import parse_policy
from kvtrie.core.prefix_cache import PrefixCache, RequestAccount
from kvtrie.core.protocols import LayerKind
from kvtrie.core.store import MANIFEST, DirectoryStore
from kvtrie.core.tiers import SimulatedDisk
from kvtrie.core.trie import Node, as_tokens, walk

from . import ideal as ideal_module
from . import peers, report, traces
from .generators import generate
from .replay import replay
from .runner import CheckMode, RequestRunner

__all__ = ["CASES", "KINDS", "SelfCheck", "Scene", "failures"]

# One fake model a layer kind, and one with all three (its first layer is attention, its last
# recurrent), so a check is shown to fire on each kind and on the first and last layer.
KINDS: dict[str, ModelProfile] = {
    "attention": ModelProfile(
        "attention", (LayerSpec(LayerKind.KV, bytes_per_token=16),), vocab_size=1000
    ),
    "sliding": ModelProfile(
        "sliding", (LayerSpec(LayerKind.ROTATING, bytes_per_token=16, window=4),), 1000
    ),
    "recurrent": ModelProfile(
        "recurrent", (LayerSpec(LayerKind.RECURRENT, state_bytes=100),), vocab_size=1000
    ),
    "mixed": get_profile("tiny-mixed"),
}
ALL = tuple(KINDS)
PAGE = list(range(1, TRIM_PAGE + 1))  # one page of tokens: the shared node ends on a boundary


class Scene:
    """A sound cache on the fake backend, every check on. ``requests`` default to three that
    leave root -> [0, 16) -> [16, 18) and [16, 19), and root -> [0, 1) active."""

    def __init__(
        self,
        kind: str,
        policy: str = "kvtrie-seed",
        budget: int | None = None,
        requests: tuple[list[int], ...] = (PAGE + [17, 18], PAGE + [19, 20, 21], [99]),
        estimate_seconds: Callable[[int, int, int], float] | None = None,
    ) -> None:
        """``estimate_seconds``: a simulated disk tier too, and the cache's estimate of a
        request's seconds (see :class:`~kvtrie.core.prefix_cache.PrefixCache`)."""
        self.kind = kind
        self.backend = FakeBackend(KINDS[kind])
        self.cache = PrefixCache(
            self.backend.new_layers(),
            budget_bytes=budget,
            policy=parse_policy(policy),
            clock=itertools.count(1).__next__,
            store=None if estimate_seconds is None else SimulatedDisk(),
            estimate_seconds=estimate_seconds,
        )
        self.runner = RequestRunner(self.backend, self.cache, CheckMode(full=True))
        self.session: Any = None
        self.memo: dict[str, Any] = {}  # what a case keeps between its steps
        for prompt in requests:
            self.serve(prompt)

    def serve(self, prompt: list[int]) -> RequestAccount:
        result = self.runner.run(np.asarray(prompt), [])
        if result.violations:
            raise AssertionError(f"the scene is unsound: {result.violations[0]}")
        return result.account

    @property
    def layers(self) -> list:
        return self.cache.layers

    def node(self, start: int, end: int) -> Node:
        (node,) = [n for n in walk(self.cache.root) if (n.start, n.end) == (start, end)]
        return node

    def ranges(self) -> list[tuple[int, int]]:
        return sorted((n.start, n.end) for n in walk(self.cache.root) if not n.is_root)

    def held(self) -> int:
        """Snapshots the trie holds, by a walk."""
        return sum(s is not None for n in walk(self.cache.root) for s in (n.snapshots or []))


@dataclass(frozen=True)
class SelfCheck:
    """One self-test: ``run(kind)`` returns None when it holds, else what went wrong."""

    name: str
    area: str  # checker, replayer or strategies: where a failure here points
    kinds: tuple[str, ...]
    run: Callable[[str], str | None] = field(repr=False)
    invariant: str = ""  # a checker case: the invariant its bad state breaks


def failures(cases: list[SelfCheck] | None = None) -> list[str]:
    """Every failing case and kind, one line each (empty: the verifier is sound)."""
    found = []
    log = logging.getLogger("kvtrie")
    level = log.level
    log.setLevel(logging.CRITICAL)  # the replays' own violation logs: the lines say it
    try:
        for case in CASES if cases is None else cases:
            for kind in case.kinds:
                try:
                    why = case.run(kind)
                except Exception as exc:  # a check that crashes has not reported the state
                    why = f"raised {type(exc).__name__}: {exc}"
                if why is not None:
                    found.append(f"{case.area}/{case.name}[{kind}]: {why}")
    finally:
        log.setLevel(level)
    return found


# ---- bad states: each check fires ----------------------------------------------------------


def _full(s: Scene) -> list[Violation]:
    return invariants.check(s.cache, s.session)


def bad_state(
    name: str,
    invariant: str,
    damage: Callable[[Scene], None],
    expect: Callable[[Scene], str] | str,
    kinds: tuple[str, ...] = ALL,
    probe: Callable[[Scene], list[Violation]] = _full,
    prepare: Callable[[Scene], None] | None = None,
    policy: str = "kvtrie-seed",
) -> SelfCheck:
    """``probe`` (the check under test) passes after ``prepare``, and after ``damage`` reports
    ``invariant`` with a detail containing ``expect`` (worked out before the damage)."""

    def run(kind: str) -> str | None:
        scene = Scene(kind, policy)
        if prepare is not None:
            prepare(scene)
        good = probe(scene)
        if good:
            return f"the sound state fails: {good[0]}"
        expected = expect(scene) if callable(expect) else expect
        damage(scene)
        bad = probe(scene)
        if not any(v.invariant == invariant and expected in v.detail for v in bad):
            said = "; ".join(map(str, bad)) or "nothing"
            return f"expected {invariant} with {expected!r}, got {said}"
        return None

    return SelfCheck(name, "checker", kinds, run, invariant)


def _first(s: Scene) -> int:
    return 0


def _last(s: Scene) -> int:
    return len(s.layers) - 1


def _set(obj: Any, attr: str, value: Any) -> None:
    setattr(obj, attr, value)


def _rekey(s: Scene) -> None:
    node = s.node(16, 18)
    node.tokens = node.tokens.copy()
    node.tokens[0] = 777


def _shorten_shared(s: Scene) -> None:
    node = s.node(0, 16)
    node.tokens, node.end = node.tokens[:-1], 15  # [0, 15) now; its children start at 16


def _swap(layer: Callable[[Scene], int]) -> Callable[[Scene], None]:
    """One layer's snapshots swapped between [0, 16) and [16, 18): each ends elsewhere."""

    def damage(s: Scene) -> None:
        a, b, i = s.node(0, 16), s.node(16, 18), layer(s)
        a.snapshots[i], b.snapshots[i] = b.snapshots[i], a.snapshots[i]

    return damage


def _swapped(layer: Callable[[Scene], int], node_end: bool) -> SelfCheck:
    """Per kind: a recurrent layer's snapshot at the wrong offset is I10, any other I2; at the
    first node (offset 0) and at the page boundary (16)."""
    where = "[16, 18) ends at 16" if node_end else "[0, 16) ends at 18"
    position = "first" if layer is _first else "last"

    def run(kind: str) -> str | None:
        spec = KINDS[kind].layers[0 if layer is _first else -1]
        invariant = "I10" if spec.kind is LayerKind.RECURRENT else "I2"
        case = bad_state(
            "x",
            invariant,
            _swap(layer),
            f"{spec.kind.value} snapshot of node {where}",
            (kind,),
        )
        return case.run(kind)

    return SelfCheck(
        f"snapshot-swapped-{position}-layer-{'page-boundary' if node_end else 'offset-0'}",
        "checker",
        ALL,
        run,
        "I2 or I10",
    )


def _kv_start(s: Scene) -> None:
    """A KV snapshot ending right but starting at 0, not at its node's start (16)."""
    s.node(16, 18).snapshots[0] = _kv_from_zero(s)


def _kv_from_zero(s: Scene):
    fresh = s.backend.new_layers()[0]
    fresh.evaluate(np.asarray(PAGE + [17, 18], dtype=np.int32))
    return fresh.snapshot(0)


def _free(layer: Callable[[Scene], int]) -> Callable[[Scene], None]:
    return lambda s: s.layers[layer(s)].free()


def _offsets_text(layer: Callable[[Scene], int]) -> Callable[[Scene], str]:
    def expect(s: Scene) -> str:
        offsets = [layer_.offset for layer_ in s.layers]
        offsets[layer(s)] = 0
        return f"live layers at different offsets {offsets}"

    return expect


def _free_all(s: Scene) -> None:
    for layer in s.layers:
        layer.free()


def _open_session(s: Scene) -> None:
    s.session = s.cache.begin(np.asarray(PAGE + [17, 5]))


def _claim_more(s: Scene) -> None:
    a = s.session.account
    s.session.account = RequestAccount(a.prompt_tokens, a.cached_tokens - 1, a.cached_tokens)


def _claim_text(s: Scene) -> str:
    n = s.session.account.cached_tokens
    return f"cached {n} tokens, matched only {n - 1}"


def _other_prompt(s: Scene) -> None:
    s.session.prompt = s.session.prompt.copy()
    s.session.prompt[0] = 999


def _node_bytes_text(s: Scene) -> str:
    held = s.node(16, 19).snapshot_bytes
    return f"node [16, 19) counts {held + 1} B, holds {held} B"


def _ledger_text(s: Scene) -> str:
    total = s.cache.ledger.total
    return f"paged-out counter {total + 1} B, snapshots sum to {total} B"


def _incremental(s: Scene) -> list[Violation]:
    if "checker" not in s.memo:
        s.memo["checker"] = Checker(s.cache)
    return s.memo["checker"].check()


def _drift(s: Scene) -> None:
    s.cache.ledger.total += 1


def _hold_twice(s: Scene) -> None:
    s.node(16, 19).snapshots[0] = s.node(16, 18).snapshots[0]


def _drop_layer(s: Scene) -> None:
    node = s.node(16, 18)
    node.snapshots = node.snapshots[:-1]


def _layers_text(s: Scene) -> str:
    n = len(s.layers)
    return f"node [16, 18) has {n - 1} snapshots, {n} layers"


def _root_holds(s: Scene) -> None:
    s.cache.root.snapshots = [None] * (len(s.layers) - 1) + [s.node(16, 18).snapshots[-1]]


def _leak_tracker(s: Scene) -> list[Violation]:
    """The leak tracker as the runner asks it: the backend's open snapshots against the trie."""
    why = s.backend.unaccounted(s.held())
    return [] if why is None else [Violation("I5", why)]


def _leak(s: Scene) -> None:
    s.node(16, 18).take_snapshots(s.cache.ledger)  # detached, never closed


def _leak_text(s: Scene) -> str:
    held = s.held()
    return f"{held} snapshots are open but the trie holds {held - len(s.layers)}"


def _close_twice(s: Scene) -> None:
    for snap in s.node(16, 18).take_snapshots(s.cache.ledger):
        snap.close()
        snap.close()


def _squeeze(s: Scene) -> None:
    s.cache.budget_bytes = s.cache.ledger.total - 1  # set directly: nothing was evicted


def _evict_all_but_one(s: Scene) -> None:
    """Evicting the oldest leaf [16, 18) folds [0, 16) into [16, 19): one node is left."""
    s.cache.set_budget(s.cache.ledger.total - s.node(16, 18).snapshot_bytes)


def _audit(s: Scene):
    audit = s.runner.checker.audit
    audit.every_eviction = True
    return audit


def _page_out_probe(s: Scene) -> list[Violation]:
    audit = _audit(s)
    audit.paged_out(s.cache, s.node(16, 19))
    return audit.take()


def _page_out_text(s: Scene) -> str:
    total = s.cache.ledger.total
    return (
        f"paging out node [16, 19) took paged-out bytes to {total} B, over the budget {total - 1} B"
    )


def _detach_frontier(s: Scene) -> None:
    frontier = s.cache.active_path[-1]
    del frontier.parent.children[int(frontier.tokens[0])]


def _evict_probe(s: Scene) -> list[Violation]:
    audit = _audit(s)
    audit.evicting(s.cache, s.memo["victim"], set())
    return audit.take()


def _victim(pick: Callable[[Scene], Node]) -> Callable[[Scene], None]:
    return lambda s: s.memo.__setitem__("victim", pick(s))


def _same_age(s: Scene) -> None:
    """Every evictable node used at once: the deepest, [16, 19), must go first."""
    for node in (s.node(16, 18), s.node(16, 19), s.node(0, 16)):
        node.last_used = s.node(0, 16).last_used
    s.memo["victim"] = s.node(16, 19)


def _facts(node: Node) -> str:
    return f"{(node.last_used, node.end, node.snapshot_bytes)}"


def _order_text(wrong: tuple[int, int], right: tuple[int, int]) -> Callable[[Scene], str]:
    def expect(s: Scene) -> str:
        a, b = s.node(*wrong), s.node(*right)
        return f"evicted (last_used, end, bytes) = {_facts(a)} before {_facts(b)}"

    return expect


def _closed_session(s: Scene) -> None:
    """A request over [0, 16) -> [16, 19) extends the leaf in place to [16, 20)."""
    session = s.cache.begin(np.asarray(PAGE + [19, 20, 21, 22]))
    session.prefill(lambda tokens: s.backend.evaluate(s.layers, tokens))
    session.close([])
    s.session = session


def _age_shared(s: Scene) -> None:
    s.node(0, 16).last_used -= 1


def _path_times_text(s: Scene) -> str:
    t = s.node(0, 16).last_used
    return f"the closed path's nodes were used at times [{t - 1}, {t}]"


def _use_later(s: Scene) -> None:
    s.node(16, 18).last_used = s.node(0, 16).last_used + 5


def _later_text(s: Scene) -> str:
    t = s.node(0, 16).last_used
    return f"node [16, 18) used at {t + 5}, after the request that just closed ({t})"


def _account_probe(s: Scene) -> list[Violation]:
    return invariants.check_request(s.memo["account"])


def _account(prompt: int, matched: int, cached: int) -> Callable[[Scene], None]:
    return lambda s: s.memo.__setitem__("account", RequestAccount(prompt, matched, cached))


def _totals_text(s: Scene) -> str:
    stats = s.cache.stats
    return f"cached {stats.cached_tokens + 1} + computed {stats.computed_tokens} != prompt"


def _inflate_cached(s: Scene) -> None:
    s.cache.stats.cached_tokens += 1


# the oracle (I9): one live layer holding a state other than the prefix it claims


def _restored(s: Scene) -> None:
    s.session = s.cache.begin(np.asarray(PAGE + [17, 18, 5]))
    s.memo["prefix"] = s.session.prompt[: s.session.cached_tokens]


def _oracle_probe(s: Scene) -> list[Violation]:
    why = s.backend.mismatch(s.layers, s.memo["prefix"])
    return [] if why is None else [Violation("I9", why)]


def _wrong_state(layer: Callable[[Scene], int]) -> Callable[[Scene], None]:
    def damage(s: Scene) -> None:
        live = s.layers[layer(s)]
        live.free()
        live.evaluate(np.full(len(s.memo["prefix"]), 7, dtype=np.int32))

    return damage


def _oracle_text(layer: Callable[[Scene], int]) -> Callable[[Scene], str]:
    def expect(s: Scene) -> str:
        i = layer(s)
        n = len(s.memo["prefix"])
        return (
            f"layer {i} ({s.layers[i].kind.value}) at offset {n} differs from a fresh "
            f"prefill of {n} tokens"
        )

    return expect


def _digest_probe(s: Scene) -> list[Violation]:
    prompt = np.asarray(PAGE + [17, 5])
    logits = s.backend.evaluate(s.backend.new_layers(), prompt) + s.memo.get("skew", 0)
    why = s.backend.logits_mismatch(prompt, logits)
    return [] if why is None else [Violation("I9", why)]


# I11: a restore failure that no injected fault explains


def _one_injected(s: Scene) -> None:
    s.backend.faults.fail_next_restores(1)
    s.cache.stats.restore_failures += 1  # one failure, and it was injected
    s.memo["prompts"] = iter([[99, 5], [99, 6]])


def _serve_probe(s: Scene) -> list[Violation]:
    return s.runner.run(np.asarray(next(s.memo["prompts"])), []).violations


def _unexplained(s: Scene) -> None:
    s.cache.stats.restore_failures += 1


# REUSE: a cache that must lose nothing reused less than an infinite cache


def _reuse_prompts(s: Scene) -> None:
    s.memo["prompts"] = iter([[99, 5], PAGE + [17, 18, 6]])


def _forget_behind_back(s: Scene) -> None:
    s.node(16, 18).set_snapshots(None, s.cache.ledger)  # not evicted: dropped unseen


def _oracle_cases() -> list[SelfCheck]:
    first, last = _first, _last
    return [
        bad_state(
            f"live-state-wrong-{pos}-layer",
            "I9",
            _wrong_state(layer),
            _oracle_text(layer),
            probe=_oracle_probe,
            prepare=_restored,
        )
        for pos, layer in (("first", first), ("last", last))
    ] + [
        bad_state(
            "prefill-digest-wrong",
            "I9",
            lambda s: s.memo.__setitem__("skew", 1),
            f"state digest after {len(PAGE) + 2} prompt tokens differs from a fresh prefill",
            probe=_digest_probe,
        ),
        bad_state(
            "restore-failure-not-injected",
            "I11",
            _unexplained,
            "2 restores failed, only 1 failures were injected",
            probe=_serve_probe,
            prepare=_one_injected,
        ),
        bad_state(
            "reuse-lost-without-eviction",
            "REUSE",
            _forget_behind_back,
            "reused 16 of 19 prompt tokens where an infinite cache reuses 18",
            kinds=("attention",),
            probe=_serve_probe,
            prepare=_reuse_prompts,
            policy="kvtrie-improved",
        ),
    ]


def _checker_cases() -> list[SelfCheck]:
    first, last = _first, _last
    return [
        bad_state(
            "empty-edge",
            "I1",
            lambda s: _set(s.node(16, 18), "tokens", as_tokens([])),
            "has an empty edge",
        ),
        bad_state("child-under-wrong-token", "I1", _rekey, "is not its parent's child"),
        bad_state(
            "child-start-off-parent-end", "I2", _shorten_shared, "starts at 16, parent ends 15"
        ),
        bad_state(
            "root-not-at-zero", "I2", lambda s: _set(s.cache.root, "end", 1), "root must be [0, 0)"
        ),
        bad_state(
            "child-points-elsewhere",
            "I2",
            lambda s: _set(s.node(16, 18), "parent", s.cache.root),
            "node [16, 18) does not point back to its parent",
        ),
        _swapped(first, True),
        _swapped(first, False),
        _swapped(last, True),
        _swapped(last, False),
        bad_state(
            "kv-snapshot-from-offset-0",
            "I2",
            _kv_start,
            "kv snapshot of node [16, 18) starts at 0",
            kinds=("attention", "mixed"),
        ),
        bad_state(
            "active-path-not-from-root",
            "I3",
            lambda s: s.cache.active_path.__setitem__(0, s.node(0, 16)),
            "the active path does not start at the root",
        ),
        bad_state(
            "first-layer-elsewhere", "I4", _free(first), _offsets_text(first), kinds=("mixed",)
        ),
        bad_state("last-layer-elsewhere", "I4", _free(last), _offsets_text(last), kinds=("mixed",)),
        bad_state(
            "frontier-past-live", "I4", _free_all, "frontier ends at 1 past the live offset 0"
        ),
        bad_state(
            "cached-beyond-match",
            "I4",
            _claim_more,
            _claim_text,
            prepare=_open_session,
            kinds=("attention", "sliding", "mixed"),
        ),
        bad_state(
            "path-not-the-prompt",
            "I4",
            _other_prompt,
            "the active path's tokens are not the prompt's prefix",
            prepare=_open_session,
        ),
        bad_state(
            "node-bytes-drift",
            "I5",
            lambda s: _set(s.node(16, 19), "snapshot_bytes", s.node(16, 19).snapshot_bytes + 1),
            _node_bytes_text,
        ),
        bad_state("ledger-drift-full-walk", "I5", _drift, _ledger_text),
        bad_state("ledger-drift-incremental", "I5", _drift, _ledger_text, probe=_incremental),
        bad_state("snapshot-held-twice", "I5", _hold_twice, "one snapshot held by"),
        bad_state("snapshot-missing-a-layer", "I5", _drop_layer, _layers_text),
        bad_state("root-holds-snapshots", "I5", _root_holds, "the root holds snapshots"),
        bad_state("snapshot-leaked", "I5", _leak, _leak_text, probe=_leak_tracker),
        bad_state(
            "snapshot-closed-twice",
            "I5",
            _close_twice,
            lambda s: f"{len(s.layers)} snapshots were closed twice",
            probe=_leak_tracker,
        ),
        bad_state("over-budget-evictable-left", "I6", _squeeze, "over the budget"),
        bad_state(
            "over-budget-last-evictable-node",
            "I6",
            _squeeze,
            "with 1 evictable nodes left",
            prepare=_evict_all_but_one,
        ),
        bad_state(
            "page-out-over-the-ceiling",
            "I6",
            _squeeze,
            _page_out_text,
            probe=_page_out_probe,
        ),
        bad_state(
            "active-node-detached",
            "I7",
            _detach_frontier,
            "is not in the trie under",
        ),
        bad_state(
            "evicting-the-active-frontier",
            "I7",
            _victim(lambda s: s.cache.active_path[-1]),
            "evicting active node [0, 1)",
            probe=_evict_probe,
            prepare=_victim(lambda s: s.node(16, 18)),
        ),
        bad_state(
            "evict-newer-first",
            "EVICT",
            _victim(lambda s: s.node(16, 19)),
            _order_text((16, 19), (16, 18)),
            probe=_evict_probe,
            prepare=_victim(lambda s: s.node(16, 18)),
        ),
        bad_state(
            "evict-shallower-first",
            "EVICT",
            _victim(lambda s: s.node(16, 18)),
            _order_text((16, 18), (16, 19)),
            probe=_evict_probe,
            prepare=_same_age,
        ),
        bad_state(
            "lru-path-used-at-two-times",
            "LRU",
            _age_shared,
            _path_times_text,
            prepare=_closed_session,
        ),
        bad_state(
            "lru-node-used-after-close",
            "LRU",
            _use_later,
            _later_text,
            prepare=_closed_session,
        ),
        bad_state(
            "no-token-evaluated",
            "I8",
            _account(5, 5, 5),
            "no prompt token evaluated (prompt 5, cached 5)",
            probe=_account_probe,
            prepare=_account(5, 5, 4),
            kinds=("attention",),
        ),
        bad_state(
            "one-token-prompt-all-cached",
            "I8",
            _account(1, 1, 1),
            "no prompt token evaluated (prompt 1, cached 1)",
            probe=_account_probe,
            prepare=_account(1, 0, 0),
            kinds=("attention",),
        ),
        bad_state(
            "cached-outside-prompt",
            "I12",
            _account(5, 6, 6),
            "cached 6 outside [0, 5]",
            probe=_account_probe,
            prepare=_account(5, 5, 4),
            kinds=("attention",),
        ),
        bad_state("totals-do-not-add-up", "I12", _inflate_cached, _totals_text),
        *_oracle_cases(),
    ]


# ---- the replayer's own oracles, against brute force ---------------------------------------

CONVERSATIONS = ("agent", "branching", "system-prompt", "rag")  # prompts carry earlier outputs


SMALL = {
    "agent": dict(
        agents=3, steps=5, system_tokens=40, task_tokens=8, tool_tokens=12, output_tokens=4
    ),
    "branching": dict(chats=3, turns=4, system_tokens=24, message_tokens=6, output_tokens=4),
    "system-prompt": dict(users=4, turns=3, system_tokens=32, question_tokens=6, output_tokens=4),
    "rag": dict(
        requests=12,
        documents=5,
        document_tokens=20,
        per_request=2,
        system_tokens=10,
        question_tokens=5,
        output_tokens=3,
    ),
}


def _small_trace(name: str) -> traces.Trace:
    """A small generated conversation trace (prompts hold earlier prompts and outputs)."""
    header, lines = generate(name, seed=7, vocab_size=1000, **SMALL[name])
    return traces.trace_from_lines(f"<{name}>", header, lines)


def _brute_force(trace: Any, backend: FakeBackend) -> dict[str, int]:
    """The infinite cache's reuse by comparing each prompt with every sequence evaluated
    before it, outputs made by a fresh prefill: no trie, no cache."""
    history: dict[str, np.ndarray] = {}
    evaluated: list[np.ndarray] = []
    totals = {"requests": 0, "prompt": 0, "outputs": 0, "ideal": 0}
    for request in trace.requests:
        prompt = traces.resolve_prompt(request, history, backend.vocab_size)
        best = 0
        for seq in evaluated:
            n = min(len(seq), len(prompt))
            diff = np.flatnonzero(seq[:n] != prompt[:n])
            best = max(best, int(diff[0]) if len(diff) else n)
        layers = backend.new_layers()
        logits = backend.evaluate(layers, prompt)
        if isinstance(request.outputs, int):
            outputs = backend.generate(layers, logits, request.outputs)
        else:
            outputs = as_tokens(request.outputs)
        totals["requests"] += 1
        totals["prompt"] += len(prompt)
        totals["outputs"] += len(outputs)
        totals["ideal"] += min(best, len(prompt) - 1)
        evaluated.append(np.concatenate([prompt, outputs[:-1]]))
        history[request.id] = np.concatenate([prompt, outputs])
    return totals


def _replay_counts(trace_name: str) -> SelfCheck:
    def run(kind: str) -> str | None:
        trace = _small_trace(trace_name)
        backend = FakeBackend(KINDS[kind])
        expected = _brute_force(trace, FakeBackend(KINDS[kind]))
        cache = PrefixCache(backend.new_layers(), None, parse_policy("kvtrie-improved"))
        outcome = replay(trace, backend, cache, CheckMode(), progress=False)
        stats = cache.stats
        got = {
            "requests": outcome.requests,
            "prompt": stats.prompt_tokens,
            "outputs": outcome.output_tokens,
            "ideal": outcome.ideal_cached_tokens,
        }
        if outcome.violations:
            return f"the replay found {outcome.violations[0]}"
        if got != expected:
            return f"replay counted {got}, brute force {expected}"
        if stats.cached_tokens + stats.computed_tokens != stats.prompt_tokens:
            return "cached + computed != prompt"
        if kind == "attention" and stats.cached_tokens != expected["ideal"]:
            return (
                f"kvtrie-improved, unbounded, attention only, reused {stats.cached_tokens} "
                f"where the ideal is {expected['ideal']}: it must lose nothing"
            )
        return None

    return SelfCheck(f"replay-counts-{trace_name}", "replayer", ("attention", "mixed"), run)


def _ideal_peer_and_bound(trace_name: str) -> SelfCheck:
    """The ideal peer of the sweep and the bound ``kvtrie gen`` prints agree with brute force."""

    def run(kind: str) -> str | None:
        explicit = _small_trace(trace_name)  # generated traces give their outputs
        backend = FakeBackend(KINDS[kind])
        expected = _brute_force(explicit, FakeBackend(KINDS[kind]))["ideal"]
        bound, _ = ideal_module.ideal_reuse(explicit, backend.vocab_size)
        peer = peers.Ideal(None, peers.costs_of(KINDS[kind]))
        history: dict[str, np.ndarray] = {}
        served = 0
        for request in explicit.requests:
            prompt = traces.resolve_prompt(request, history, backend.vocab_size)
            outputs = as_tokens(request.outputs)
            served += peer.serve(prompt, np.concatenate([prompt, outputs[:-1]]))
            history[request.id] = np.concatenate([prompt, outputs])
        if (bound, served) != (expected, expected):
            return f"ideal_reuse {bound}, ideal peer {served}, brute force {expected}"
        return None

    return SelfCheck(f"ideal-bound-{trace_name}", "replayer", ("attention",), run)


def _report_fields(trace_name: str) -> SelfCheck:
    """The report's ratios and reuse lost, from the brute-force counts."""

    def run(kind: str) -> str | None:
        trace = _small_trace(trace_name)
        backend = FakeBackend(KINDS[kind])
        expected = _brute_force(trace, FakeBackend(KINDS[kind]))
        cache = PrefixCache(backend.new_layers(), 64 * 16, parse_policy("kvtrie-seed"))
        result = replay(trace, backend, cache, CheckMode(), progress=False)
        if result.violations:
            return f"the replay found {result.violations[0]}"
        fields = report.build_report(trace, result, cache, "fake", kind, "every", {})
        cached, prompt = cache.stats.cached_tokens, expected["prompt"]
        want = {
            "hit_ratio": cached / prompt,
            "ideal_hit_ratio": expected["ideal"] / prompt,
            "reuse_lost": expected["ideal"] - cached,
            "output_tokens": expected["outputs"],
        }
        got = {key: fields[key] for key in want}
        return None if got == want else f"report says {got}, brute force {want}"

    return SelfCheck(f"report-fields-{trace_name}", "replayer", ("attention",), run)


def _budget_that_never_binds(trace_name: str) -> SelfCheck:
    """Every policy reuses exactly what it reuses unbounded under a budget it never reaches."""

    def run(kind: str) -> str | None:
        for policy in ("kvtrie-seed", "kvtrie-improved"):
            counts = []
            for budget in (None, "peak"):
                backend = FakeBackend(KINDS[kind])
                limit = None if budget is None else counts[0][1]
                cache = PrefixCache(backend.new_layers(), limit, parse_policy(policy))
                outcome = replay(
                    _small_trace(trace_name), backend, cache, CheckMode(), progress=False
                )
                if outcome.violations:
                    return f"{policy}: {outcome.violations[0]}"
                counts.append((cache.stats.cached_tokens, max(cache.ledger.peak, 1)))
            if counts[0][0] != counts[1][0]:
                return (
                    f"{policy} reused {counts[0][0]} unbounded but {counts[1][0]} under a "
                    f"budget of its unbounded peak, {counts[0][1]} B"
                )
        return None

    return SelfCheck(f"budget-never-binds-{trace_name}", "replayer", ALL, run)


def _replayer_cases() -> list[SelfCheck]:
    return (
        [_replay_counts(name) for name in CONVERSATIONS]
        + [_ideal_peer_and_bound(name) for name in CONVERSATIONS]
        + [_report_fields(name) for name in ("agent", "rag")]
        + [_budget_that_never_binds(name) for name in ("agent", "branching")]
    )


# ---- strategies: hand-computed outcomes ----------------------------------------------------


def outcome(
    name: str,
    policy: str,
    kinds: tuple[str, ...],
    requests: tuple[list[int], ...],
    act: Callable[[Scene], Any],
    expected: Any,
    budget: int | None = None,
) -> SelfCheck:
    """After ``requests`` under ``policy``, ``act(scene)`` returns exactly ``expected``."""

    def run(kind: str) -> str | None:
        scene = Scene(kind, policy, budget, requests)
        got = act(scene)
        want = expected(kind) if callable(expected) else expected
        return None if got == want else f"expected {want}, got {got}"

    return SelfCheck(name, "strategies", kinds, run)


def _cached(prompt: list[int]) -> Callable[[Scene], int]:
    return lambda s: s.serve(prompt).cached_tokens


TWENTY = list(range(1, 21))
PARENT = [90, 91, 92, 93, 94]  # a five-token branch point: its children start off a page boundary


def _tokens(n: int, base: int) -> list[int]:
    return [base + i for i in range(n)]


# root -> [0, 5) -> leaf [5, 45) (40 tokens, 16 B each on the attention model) and [5, 7)
OFF_PAGE = (PARENT + _tokens(40, 100), PARENT + [300, 301], [99])


def _trim(excess: int) -> Callable[[Scene], list[tuple[int, int]]]:
    """Lower the budget ``excess`` bytes below what is paged out; the trie that is left."""

    def act(s: Scene) -> list[tuple[int, int]]:
        s.cache.set_budget(s.cache.ledger.total - excess)
        violations = s.runner.apply(traces.Event("budget", 0, budget_bytes=s.cache.budget_bytes))
        if violations:
            raise AssertionError(str(violations[0]))
        return s.ranges()

    return act


# root -> [0, 5) -> [5, 7) paged out, and the 32-token leaf [5, 37) live
LIVE_LEAF = (PARENT + [300, 301], [99], PARENT + _tokens(32, 500))


def _leave_leaf(room: int) -> Callable[[Scene], list[tuple[int, int]]]:
    """Switch away from the live leaf [5, 37) with room for ``room`` of its 32 tokens."""

    def act(s: Scene) -> list[tuple[int, int]]:
        s.cache.set_budget(s.cache.ledger.total + room * 16)
        s.serve([98])
        return s.ranges()

    return act


def _moves(s: Scene) -> int:
    """Paged-out bytes while the path [0, 16) -> [16, 18) is live again."""
    s.session = s.cache.begin(np.asarray(PAGE + [17, 18, 5]))
    return s.cache.ledger.total


def _extend_page_leaf(s: Scene) -> list[tuple[int, int]]:
    """A request extending the paged-out leaf [0, 16) by three tokens; the trie after it."""
    s.serve(PAGE + [17, 18, 19])
    return s.ranges()


def _evict_oldest_leaf(s: Scene) -> list[tuple[int, int]]:
    s.cache.set_budget(s.cache.ledger.total - 1)
    return s.ranges()


def _slow_disk(cached: int, prompt: int, disk_bytes: int) -> float:
    """A disk of one byte a second against a second a token of prefill: reading never pays."""
    return disk_bytes + (prompt - cached)


def _read_or_recompute(kind: str) -> str | None:
    """RAM budget 0: leaving [0, 20) moves it to the disk tier; extending it by a token must
    recompute all 21 (reading 20 tokens' bytes is estimated slower), counted as skipped."""
    scene = Scene(kind, "kvtrie-improved", 0, (TWENTY, [99]), estimate_seconds=_slow_disk)
    cached = scene.serve(TWENTY + [21]).cached_tokens
    got = (cached, scene.cache.stats.disk_reads_skipped, scene.cache.stats.disk_page_ins)
    return (
        None if got == (0, 1, 0) else f"expected (cached, skipped, page-ins) (0, 1, 0), got {got}"
    )


def _strategy_cases() -> list[SelfCheck]:
    base = (PAGE + [17, 18], PAGE + [19, 20, 21], [99])
    return [
        # partial edges: the match ends inside a 20-token leaf
        outcome(
            "partial-edge-attention",
            "kvtrie-improved",
            ("attention",),
            (TWENTY, [99]),
            _cached(TWENTY[:10] + [50]),
            10,
        ),
        outcome(
            "partial-edge-off-in-seed",
            "kvtrie-seed",
            ("attention",),
            (TWENTY, [99]),
            _cached(TWENTY[:10] + [50]),
            0,
        ),
        # a window of 4 rewinds only while nothing has rotated out: inside a 3-token leaf, not
        # inside a 20-token one
        outcome(
            "partial-edge-inside-window",
            "kvtrie-improved",
            ("sliding",),
            ([1, 2, 3],),
            _cached([1, 2, 50]),
            2,
        ),
        outcome(
            "partial-edge-past-window",
            "kvtrie-improved",
            ("sliding",),
            (TWENTY,),
            _cached(TWENTY[:18] + [50]),
            0,
        ),
        # recurrent: no partial edge; the split leaves a restore point for the next request
        outcome(
            "partial-edge-recurrent-restore-point",
            "kvtrie-improved",
            ("recurrent", "mixed"),
            (TWENTY, TWENTY[:10] + [50]),
            _cached(TWENTY[:10] + [60]),
            10,
        ),
        # trim-tail-pages on the leaf [5, 45): pages are absolute positions, so the leaf's
        # partial last page [32, 45) (13 tokens, 208 B) goes first
        outcome(
            "trim-one-byte-over",
            "kvtrie-improved",
            ("attention",),
            OFF_PAGE,
            _trim(1),
            [(0, 1), (0, 5), (5, 7), (5, 32)],
        ),
        outcome(
            "trim-exactly-the-partial-page",
            "kvtrie-improved",
            ("attention",),
            OFF_PAGE,
            _trim(13 * 16),
            [(0, 1), (0, 5), (5, 7), (5, 32)],
        ),
        outcome(
            "trim-one-byte-past-the-partial-page",
            "kvtrie-improved",
            ("attention",),
            OFF_PAGE,
            _trim(13 * 16 + 1),
            [(0, 1), (0, 5), (5, 7), (5, 16)],
        ),
        # past [5, 16) nothing whole is left: the leaf goes, the branch point stays
        outcome(
            "trim-below-a-branch-point-removes-the-leaf",
            "kvtrie-improved",
            ("attention",),
            OFF_PAGE,
            _trim(29 * 16 + 1),
            [(0, 1), (0, 5), (5, 7)],
        ),
        outcome(
            "trim-off-in-seed", "kvtrie-seed", ("attention",), OFF_PAGE, _trim(1), [(0, 1), (0, 7)]
        ),
        # whole pages: the leaf paged out over budget keeps [5, 32), its whole pages; with
        # room for all of it, all of it
        outcome(
            "whole-pages-under-pressure",
            "kvtrie-improved,-page-in-moves",
            ("attention",),
            LIVE_LEAF,
            _leave_leaf(30),
            [(0, 1), (0, 1), (0, 5), (5, 7), (5, 32)],
        ),
        outcome(
            "whole-leaf-with-room",
            "kvtrie-improved,-page-in-moves",
            ("attention",),
            LIVE_LEAF,
            _leave_leaf(32),
            [(0, 1), (0, 1), (0, 5), (5, 7), (5, 37)],
        ),
        # the seed pages the whole leaf out, evicting its older sibling [5, 7) to fit it
        outcome(
            "whole-pages-off-in-seed",
            "kvtrie-seed",
            ("attention",),
            LIVE_LEAF,
            _leave_leaf(30),
            [(0, 1), (0, 1), (0, 5), (5, 37)],
        ),
        # keep-restore-points: extending a paged-out leaf hangs a child under it (attention
        # only: a whole state per kept point cost more than it saved on the other kinds)
        outcome(
            "keep-restore-points",
            "kvtrie-improved",
            ("attention",),
            (PAGE, [99]),
            _extend_page_leaf,
            [(0, 1), (0, 16), (16, 19)],
        ),
        outcome(
            "extend-in-place-without-rewind",
            "kvtrie-improved",
            ("sliding", "recurrent", "mixed"),
            (PAGE, [99]),
            _extend_page_leaf,
            [(0, 1), (0, 19)],
        ),
        # the restore point before the last token stays when its request extends it
        outcome(
            "last-token-point-kept",
            "kvtrie-improved,+last-token-restore-point",
            ("recurrent", "mixed"),
            (TWENTY, [99]),
            lambda s: s.ranges(),
            [(0, 1), (0, 19), (19, 20)],
        ),
        outcome(
            "keep-restore-points-in-seed-too",
            "kvtrie-seed,+keep-restore-points",
            ("attention",),
            (PAGE, [99]),
            _extend_page_leaf,
            [(0, 1), (0, 16), (16, 19)],
        ),
        outcome(
            "extend-in-place-in-seed",
            "kvtrie-seed",
            ("attention", "mixed"),
            (PAGE, [99]),
            _extend_page_leaf,
            [(0, 1), (0, 19)],
        ),
        # page-in moves: with the path live, only [16, 19) (3 tokens) and [0, 1) stay paged out
        outcome(
            "page-in-moves", "kvtrie-improved", ("attention",), base, _moves, 4 * 16, budget=10**6
        ),
        outcome(
            "page-in-copies",
            "kvtrie-improved,-page-in-moves",
            ("attention",),
            base,
            _moves,
            (3 + 1 + 16 + 2) * 16,
            budget=10**6,
        ),
        # merge-lone-children: evicting the oldest leaf [16, 18) leaves [0, 16) one child
        outcome(
            "merge-lone-children-in-seed",
            "kvtrie-seed",
            ("attention", "mixed"),
            base,
            _evict_oldest_leaf,
            [(0, 1), (0, 19)],
        ),
        outcome(
            "no-merge-in-improved",
            "kvtrie-improved",
            ("attention", "mixed"),
            base,
            _evict_oldest_leaf,
            [(0, 1), (0, 16), (16, 19)],
        ),
        # a regenerate (the same prompt again) on a model that can't rewind: all but one
        # token with a restore point before the last prompt token, nothing without
        outcome(
            "last-token-restore-point",
            "kvtrie-improved,+last-token-restore-point",
            ("sliding", "recurrent", "mixed"),
            (TWENTY,),
            _cached(TWENTY),
            19,
        ),
        outcome(
            "no-last-token-point-in-improved",
            "kvtrie-improved",
            ("sliding", "recurrent", "mixed"),
            (TWENTY,),
            _cached(TWENTY),
            0,
        ),
        # snapshot-interval=8: restore points at 8 and 16 inside a 20-token prefill (kept as
        # nodes by keep-restore-points; the seed extends each stop's leaf in place)
        outcome(
            "snapshot-interval",
            "kvtrie-improved,snapshot-interval=8",
            ALL,
            (TWENTY,),
            lambda s: s.ranges(),
            [(0, 8), (8, 16), (16, 20)],
        ),
        SelfCheck("read-or-recompute", "strategies", ALL, _read_or_recompute),
        outcome(
            "snapshot-interval-restores",
            "kvtrie-improved,snapshot-interval=8",
            ALL,
            (TWENTY, [99]),
            _cached(TWENTY[:12] + [50]),
            lambda kind: 12 if kind in ("attention",) else 8,
        ),
    ]


# ---- the disk tier's store: what it promises across a restart and at every write ----------


def _store_cache(backend: FakeBackend, folder: str, **options: Any) -> PrefixCache:
    """RAM budget 0: every page-out goes straight to the store."""
    store = DirectoryStore(folder, FakeCodec(backend), **options)
    return PrefixCache(backend.new_layers(), 0, parse_policy("kvtrie-seed"), store=store)


def _serve(cache: PrefixCache, backend: FakeBackend, prompt: list[int]) -> None:
    """One request, its whole prompt evaluated, no outputs (no checks: a store case looks at
    the store)."""
    session = cache.begin(prompt)
    session.prefill(lambda tokens: backend.evaluate(cache.layers, tokens))
    session.close()


def _adopt_verifies(kind: str) -> str | None:
    """A file damaged while the store was closed is deleted on open, not adopted."""
    with tempfile.TemporaryDirectory() as folder:
        backend = FakeBackend(KINDS[kind])
        cache = _store_cache(backend, folder, background=False)
        for prompt in (PAGE, [40, 41, 42]):
            _serve(cache, backend, prompt)
        _serve(cache, backend, [60])  # pages [40, 41, 42] out, so two files in the store
        cache.store.close(cache)  # the manifest, without paging the live path out too
        path = sorted(Path(folder, "snapshots").iterdir())[0]
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
        reopened = DirectoryStore(folder, FakeCodec(FakeBackend(KINDS[kind])))
        report = reopened.report
        reopened.close()
        if report.adopted_files != 1 or report.deleted != {"corrupt": 1}:
            return f"reopened a store with one damaged file: {report.as_dict()}"
    return None


def _manifest_lists_written_files(kind: str) -> str | None:
    """A manifest written while a file is still queued does not list it."""
    with tempfile.TemporaryDirectory() as folder:
        backend = FakeBackend(KINDS[kind])
        cache = _store_cache(backend, folder)
        store = cache.store
        assert isinstance(store, DirectoryStore)
        with store.lock:  # the writer waits for it: the page-out below stays queued
            _serve(cache, backend, PAGE)
            _serve(cache, backend, [40, 41, 42])
            store.save(cache)
            manifest = json.loads(Path(folder, MANIFEST).read_text())["body"]
        store.close()
        if manifest["files"]:
            return f"a manifest lists {sorted(manifest['files'])}, still queued for writing"
    return None


class _WatchedDisk(SimulatedDisk):
    """A simulated disk that notes every write the disk budget did not have room for."""

    def __init__(self) -> None:
        super().__init__()
        self.cache: PrefixCache | None = None
        self.over: list[int] = []

    def put(self, layer: int, snapshot: Any) -> Any:
        cache = self.cache
        assert cache is not None
        budget = cache.disk_budget_bytes
        if budget is not None and cache.ledger.disk_total + snapshot.nbytes > budget:
            self.over.append(cache.ledger.disk_total + snapshot.nbytes)
        return super().put(layer, snapshot)


def _room_before_write(kind: str) -> str | None:
    """Room on disk is made before a write starts, so no write ever runs over the budget."""
    backend = FakeBackend(KINDS[kind])
    disk = _WatchedDisk()
    cache = PrefixCache(backend.new_layers(), 0, parse_policy("kvtrie-seed"), store=disk)
    disk.cache = cache
    cache.set_disk_budget(None)
    for first in (10, 30, 50):
        _serve(cache, backend, list(range(first, first + 8)))
    cache.set_disk_budget(cache.disk_bytes)  # room for exactly what is there
    for first in (70, 90):
        _serve(cache, backend, list(range(first, first + 8)))
    if disk.over:
        return f"writes started with {disk.over[0]} B on a disk of {cache.disk_budget_bytes} B"
    return None


def _live_counted(kind: str) -> str | None:
    """A budget that counts the live layers keeps paged-out and live bytes within it."""
    backend = FakeBackend(KINDS[kind])
    budget = 30 * 16  # 12-token conversations: the live one leaves room for one paged out
    cache = PrefixCache(
        backend.new_layers(), budget, parse_policy("kvtrie-seed"), budget_counts_live=True
    )
    for first in (10, 30, 50):
        _serve(cache, backend, list(range(first, first + 12)))
        if cache.paged_out_bytes + cache.live_bytes > budget:
            return (
                f"{cache.paged_out_bytes} B paged out and {cache.live_bytes} B live, over a "
                f"budget of {budget} B that counts both"
            )
    return None


def _store_cases() -> list[SelfCheck]:
    return [
        SelfCheck("store-adopt-verifies", "store", ("attention",), _adopt_verifies),
        SelfCheck(
            "store-manifest-lists-written-files",
            "store",
            ("attention",),
            _manifest_lists_written_files,
        ),
        SelfCheck("store-room-before-write", "store", ("attention", "mixed"), _room_before_write),
        SelfCheck("budget-counts-live", "strategies", ("attention",), _live_counted),
    ]


CASES: list[SelfCheck] = _checker_cases() + _replayer_cases() + _strategy_cases() + _store_cases()
