"""Peer prompt-cache policies, simulated over the same workload and byte budget as kvtrie.

Each peer serves ``(prompt, evaluated)`` pairs (evaluated = prompt + outputs but the last) and
returns the prompt tokens it reuses, keeping at least one token to evaluate. Bytes are the
model profile's attention bytes per token; a peer that stores whole sequences (single entry,
mlx-lm, llama.cpp) also pays the recurrent state once per stored sequence.

The accounting is kvtrie's: the budget bounds what is kept beyond the live sequence. kvtrie's
live layers hold the request just served outside its paged-out budget, so every peer keeps the
sequence it just served for free too, and counts (and reports as peak bytes) the rest.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Container, Sequence
from dataclasses import dataclass

import numpy as np

from kvtrie.backends.profiles import ModelProfile
from kvtrie.core.protocols import LayerKind
from kvtrie.core.trie import (
    ByteLedger,
    Node,
    as_tokens,
    common_prefix_length,
    descend,
    insert,
    remove_leaf,
    walk,
)

from .build import DiskTier
from .costs import CostModel
from .ideal import IdealPrefixes

__all__ = [
    "BLOCK",
    "KVTRIE_PEERS",
    "PEERS",
    "KvtriePeer",
    "Peer",
    "PeerUnavailable",
    "Workload",
    "block_hashes",
    "costs_of",
    "make_peer",
]

Workload = Sequence[tuple[np.ndarray, np.ndarray]]
BLOCK = 16  # vLLM's default block size, also the granularity of the Belady bound


@dataclass
class Costs:
    """What one stored token and one stored sequence cost, from the model profile."""

    per_token: int
    per_sequence: int = 0
    recurrent: bool = False


def costs_of(profile: ModelProfile) -> Costs:
    recurrent = [s for s in profile.layers if s.kind is LayerKind.RECURRENT]
    return Costs(
        per_token=max(1, profile.bytes_per_token),
        per_sequence=sum(s.count * s.state_bytes for s in recurrent),
        recurrent=bool(recurrent),
    )


class PeerUnavailable(Exception):
    """A peer that can't run here or on this workload; the message says why."""


class Peer:
    """One prompt-cache policy over a workload: ``serve`` each request in turn and get the
    prompt tokens it reused; ``bytes`` and ``peak_bytes`` are what it keeps beyond the live
    sequence. ``tracks_timeline``: the sweep plots its bytes over the trace."""

    name = ""
    tracks_timeline = False

    def __init__(self, budget: int | None, costs: Costs) -> None:
        self.budget = budget
        self.costs = costs
        self.bytes = 0
        self.peak_bytes = 0
        self.disk_peak_bytes = 0  # kvtrie's own with a disk tier: the most it held there

    def fits(self, nbytes: int) -> bool:
        return self.budget is None or nbytes <= self.budget

    def account(self, nbytes: int) -> None:
        self.bytes = nbytes
        self.peak_bytes = max(self.peak_bytes, nbytes)

    def serve(self, prompt: np.ndarray, evaluated: np.ndarray) -> int:
        raise NotImplementedError


def _reusable(stored: np.ndarray, prompt: np.ndarray, recurrent: bool) -> int:
    """Prompt tokens a stored sequence gives back: its common prefix with the prompt, or, for
    a recurrent state that can't be trimmed, all of it or nothing."""
    common = common_prefix_length(stored, prompt)
    return 0 if recurrent and common < len(stored) else common


class NoCache(Peer):
    name = "none"

    def serve(self, prompt: np.ndarray, evaluated: np.ndarray) -> int:
        return 0


class Ideal(Peer):
    """Unbounded: the longest prefix any earlier request evaluated."""

    name = "ideal"

    def __init__(self, budget: int | None, costs: Costs) -> None:
        super().__init__(None, costs)
        self.trie = IdealPrefixes()

    def serve(self, prompt: np.ndarray, evaluated: np.ndarray) -> int:
        cached = self.trie.cached(prompt)
        self.trie.insert(evaluated)
        return cached


class SingleEntry(Peer):
    """The design the trie replaced: one sequence, trimmed to the common prefix, freed on a
    miss. That sequence is the live one, so it costs nothing against the budget."""

    name = "single-entry"

    def __init__(self, budget: int | None, costs: Costs) -> None:
        super().__init__(budget, costs)
        self.tokens = np.empty(0, dtype=np.int32)

    def serve(self, prompt: np.ndarray, evaluated: np.ndarray) -> int:
        cached = min(_reusable(self.tokens, prompt, self.costs.recurrent), len(prompt) - 1)
        self.tokens = evaluated
        return cached


class WholeSequences(Peer):
    """mlx-lm's server prompt cache: whole evaluated sequences, LRU by sequence. A trimmable
    (attention) cache reuses the common prefix with any stored sequence; a recurrent one only
    a stored sequence that is a prefix of the prompt. Storing a sequence drops its stored
    prefixes (attention models). Each sequence pays for all its tokens: nothing is shared.
    A radix tree of the stored sequences (with counts) finds the best one in one walk."""

    name = "mlx-lm"

    def __init__(self, budget: int | None, costs: Costs) -> None:
        super().__init__(budget, costs)
        self.root = Node(tokens=as_tokens([]), end=0)
        self.ledger = ByteLedger()
        self.passing: dict[Node, int] = {}  # stored sequences passing through each node
        self.ending: dict[Node, int] = {}  # stored sequences ending at each node
        self.entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.total = 0

    def _split(self, head: Node, tail: Node) -> None:
        self.passing[head] = self.passing.get(tail, 0)

    def _walk(self, tokens: np.ndarray) -> tuple[list[Node], int]:
        return descend(self.root, tokens, self.ledger, self._split)

    def size(self, tokens: np.ndarray) -> int:
        return len(tokens) * self.costs.per_token + self.costs.per_sequence

    def _stored_prefixes(self, tokens: np.ndarray) -> list[int]:
        """Lengths of the stored sequences that are prefixes of ``tokens``."""
        path, _ = self._walk(tokens)
        return [node.end for node in path[1:] if self.ending.get(node)]

    def _remove(self, tokens: np.ndarray) -> None:
        path, _ = self._walk(tokens)
        self.ending[path[-1]] -= 1
        for node in path[1:]:
            self.passing[node] -= 1
            if self.passing[node] == 0:
                del node.parent.children[int(node.tokens[0])]
                for gone in walk(node):
                    self.passing.pop(gone, None)
                    self.ending.pop(gone, None)
                break
        del self.entries[tokens.tobytes()]
        self.total -= self.size(tokens)

    def best_reuse(self, prompt: np.ndarray) -> int:
        """Prompt tokens the best stored sequence gives back. Like mlx-lm, a fetch does not
        refresh the sequence's place in the LRU order; storing the new sequence does."""
        if self.costs.recurrent:
            ends = self._stored_prefixes(prompt)
            return ends[-1] if ends else 0
        return self._walk(prompt)[1]

    def store(self, tokens: np.ndarray, live: bool = False) -> None:
        """Keep ``tokens`` as a sequence (dropping its stored prefixes), then fit the budget;
        a ``live`` sequence (the one just served) does not count against it."""
        if not self.costs.recurrent:
            for end in self._stored_prefixes(tokens):
                if end < len(tokens):
                    self._remove(tokens[:end])
        if tokens.tobytes() not in self.entries:
            path, _ = insert(self.root, tokens, self.ledger, self._split)
            for node in path[1:]:
                self.passing[node] = self.passing.get(node, 0) + 1
            self.ending[path[-1]] = self.ending.get(path[-1], 0) + 1
            self.total += self.size(tokens)
        self.entries[tokens.tobytes()] = tokens
        self.entries.move_to_end(tokens.tobytes())
        self.fit(self.size(tokens) if live else 0)

    def fit(self, live_bytes: int = 0) -> None:
        """Drop the least recently used sequences until all but ``live_bytes`` fit the budget;
        the most recent sequence stays when it is the live one."""
        keep = 1 if live_bytes else 0
        while not self.fits(self.total - live_bytes) and len(self.entries) > keep:
            self._remove(next(iter(self.entries.values())))
        self.account(self.total - live_bytes)

    def serve(self, prompt: np.ndarray, evaluated: np.ndarray) -> int:
        best = self.best_reuse(prompt)
        self.store(evaluated, live=True)
        return min(best, len(prompt) - 1)


class RadixCache(Peer):
    """SGLang's RadixCache: a radix tree of tokens; leaves evicted least recently used first;
    the request being served is locked, and is the live sequence."""

    name = "sglang-radix"

    def __init__(self, budget: int | None, costs: Costs) -> None:
        super().__init__(budget, costs)
        self.root = Node(tokens=as_tokens([]), end=0)
        self.ledger = ByteLedger()
        self.tokens = 0
        self.clock = 0

    def serve(self, prompt: np.ndarray, evaluated: np.ndarray) -> int:
        self.clock += 1
        _, matched = descend(self.root, prompt, self.ledger)
        path, added = insert(self.root, evaluated, self.ledger)
        self.tokens += added
        for node in path:
            node.last_used = self.clock
        self._evict({id(n) for n in path}, len(evaluated))
        self.account((self.tokens - len(evaluated)) * self.costs.per_token)
        return min(matched, len(prompt) - 1)

    def _evict(self, locked: set[int], live: int) -> None:
        if self.fits((self.tokens - live) * self.costs.per_token):
            return
        leaves = [(n.last_used, id(n), n) for n in walk(self.root) if not n.children and n.parent]
        heapq.heapify(leaves)
        while leaves and not self.fits((self.tokens - live) * self.costs.per_token):
            _, _, leaf = heapq.heappop(leaves)
            if id(leaf) in locked:
                continue
            parent = leaf.parent
            assert parent is not None
            remove_leaf(leaf, self.ledger)
            self.tokens -= len(leaf.tokens)
            if parent.parent is not None and not parent.children:
                heapq.heappush(leaves, (parent.last_used, id(parent), parent))


def block_hashes(tokens: np.ndarray) -> list[int]:
    """Chained hashes of the full 16-token blocks: each names its whole prefix."""
    from kvtrie.backends.fake import prefix_hashes  # the same vectorised rolling hash

    full = len(tokens) // BLOCK * BLOCK
    if not full:
        return []
    return [int(h) for h in prefix_hashes(0, tokens[:full], salt=0x5151)[BLOCK - 1 :: BLOCK]]


def _leading_hits(prompt: np.ndarray, held: Container[int]) -> int:
    """How many of the prompt's full blocks, from the first, are held; the last prompt token
    is always recomputed, so it never completes a block."""
    hits = 0
    for h in block_hashes(prompt[:-1]):
        if h not in held:
            break
        hits += 1
    return hits


class BlockLRU(Peer):
    """vLLM prefix caching: full blocks keyed by chained hashes, an LRU queue of free blocks
    (a finished request's blocks are queued tail first), the last prompt token recomputed. The
    blocks of the request just served are the live ones, queued last."""

    name = "vllm-blocks"

    def __init__(self, budget: int | None, costs: Costs) -> None:
        super().__init__(budget, costs)
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self.capacity = None if budget is None else budget // (BLOCK * costs.per_token)

    def serve(self, prompt: np.ndarray, evaluated: np.ndarray) -> int:
        hits = _leading_hits(prompt, self.blocks)
        live = block_hashes(evaluated)
        for h in reversed(live):  # tail blocks queue first, go first
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        if self.capacity is not None:
            while len(self.blocks) - len(live) > self.capacity:
                self.blocks.popitem(last=False)
        self.account((len(self.blocks) - len(live)) * BLOCK * self.costs.per_token)
        return hits * BLOCK


class Slots(Peer):
    """llama.cpp's server: a few slots each holding one sequence (the most similar is picked,
    else the least recently used), and a host prompt cache of the sequences slots gave up. The
    budget holds the host cache and every slot but the live one."""

    name = "llamacpp-slots"
    SLOTS = 4

    def __init__(self, budget: int | None, costs: Costs) -> None:
        super().__init__(budget, costs)
        self.slots = [np.empty(0, dtype=np.int32) for _ in range(self.SLOTS)]
        self.used = [0] * self.SLOTS
        self.host = WholeSequences(budget, costs)
        self.clock = 0

    def serve(self, prompt: np.ndarray, evaluated: np.ndarray) -> int:
        self.clock += 1
        scores = [_reusable(s, prompt, self.costs.recurrent) for s in self.slots]
        slot = int(np.argmax(scores)) if max(scores) > 0 else int(np.argmin(self.used))
        cached = max(scores[slot], self.host.best_reuse(prompt))
        if scores[slot] == 0 and len(self.slots[slot]):
            self.host.store(self.slots[slot])  # the slot's sequence moves to host memory
        self.slots[slot], self.used[slot] = evaluated, self.clock
        self._fit(slot)
        return min(cached, len(prompt) - 1)

    def _fit(self, live: int) -> None:
        """While the other slots and the host cache exceed the budget, the least recently used
        other slot gives its sequence to the host cache, which evicts to what is left."""
        while True:
            others = [i for i, s in enumerate(self.slots) if i != live and len(s)]
            held = sum(self.host.size(self.slots[i]) for i in others)
            self.host.budget = None if self.budget is None else max(0, self.budget - held)
            self.host.fit()
            if not others or self.fits(held + self.host.total):
                break
            oldest = min(others, key=lambda i: self.used[i])
            self.host.store(self.slots[oldest])
            self.slots[oldest] = np.empty(0, dtype=np.int32)
        self.account(held + self.host.total)


class Belady(Peer):
    """The offline bound: 16-token blocks, evicting the block whose next use is farthest in
    the future (blocks named by chained hashes, so a block is only useful after its prefix)."""

    name = "belady"

    def __init__(self, budget: int | None, costs: Costs, workload: Workload) -> None:
        super().__init__(budget, costs)
        self.capacity = None if budget is None else budget // (BLOCK * costs.per_token)
        self.uses: dict[int, list[int]] = {}
        for index, (prompt, _) in enumerate(workload):
            for h in block_hashes(prompt[:-1]):
                self.uses.setdefault(h, []).append(index)
        for times in self.uses.values():
            times.reverse()  # pop() gives the next use
        self.cached: dict[int, int] = {}  # hash -> block position (depth)
        # (-next use, -depth, hash), lazily stale. A block's next use is never after its
        # children's (they need it), and ties go deeper first, so prefixes outlive suffixes.
        self.heap: list[tuple[int, int, int]] = []
        self.index = 0

    def _next_use(self, h: int) -> int:
        times = self.uses.get(h)
        while times and times[-1] <= self.index:
            times.pop()
        return times[-1] if times else 1 << 62

    def serve(self, prompt: np.ndarray, evaluated: np.ndarray) -> int:
        hits = _leading_hits(prompt, self.cached)
        blocks = block_hashes(evaluated)
        live = set(blocks)  # the request just served: live, kept, not counted
        self.index += 1
        for depth, h in enumerate(blocks):
            self.cached[h] = depth
            heapq.heappush(self.heap, (-self._next_use(h), -depth, h))
        if self.capacity is not None:
            held_back = []
            while len(self.cached) - len(live) > self.capacity and self.heap:
                entry = heapq.heappop(self.heap)
                negative, depth, h = entry
                if h not in self.cached:
                    continue
                if h in live:
                    held_back.append(entry)
                elif -negative == self._next_use(h):
                    del self.cached[h]
                else:  # its next use moved on: queue it again with the right one
                    heapq.heappush(self.heap, (-self._next_use(h), depth, h))
            for entry in held_back:
                heapq.heappush(self.heap, entry)
        self.account((len(self.cached) - len(live)) * BLOCK * self.costs.per_token)
        return hits * BLOCK


PEERS = {
    cls.name: cls
    for cls in (NoCache, SingleEntry, WholeSequences, RadixCache, BlockLRU, Slots, Ideal, Belady)
}


class KvtriePeer(Peer):
    """kvtrie itself, a policy bundle on the fake backend of ``profile``, served through the
    same request loop as a replay (checks off: the sweep measures, replays verify)."""

    tracks_timeline = True

    def __init__(
        self,
        policy: str,
        budget: int | None,
        profile: ModelProfile,
        marks: Sequence[tuple[int, ...]] | None = None,
        disk: DiskTier | None = None,
        time_cost: CostModel | None = None,
    ) -> None:
        super().__init__(budget, costs_of(profile))
        from kvtrie.backends.fake import FakeBackend

        from .build import make_cache, make_policy
        from .runner import CheckMode, RequestRunner

        self.name = policy
        backend = FakeBackend(profile)
        self.cache = make_cache(backend, budget, make_policy(policy), disk, cost=time_cost)
        self.runner = RequestRunner(backend, self.cache, CheckMode(every=0))
        self.marks = marks
        self.index = 0

    def serve(self, prompt: np.ndarray, evaluated: np.ndarray) -> int:
        marks = self.marks[self.index] if self.marks else ()
        self.index += 1
        # forced outputs: the evaluated ones, then a last one that is never evaluated
        result = self.runner.run(prompt, np.append(evaluated[len(prompt) :], 0), marks)
        self.bytes = self.cache.paged_out_bytes
        self.peak_bytes = self.cache.ledger.peak
        self.disk_peak_bytes = self.cache.ledger.disk_peak
        return result.account.cached_tokens


KVTRIE_PEERS = ("kvtrie-seed", "kvtrie-improved")


def make_peer(
    name: str,
    budget: int | None,
    costs: Costs,
    workload: Workload,
    profile: ModelProfile | None = None,
    marks: Sequence[tuple[int, ...]] | None = None,
    disk: DiskTier | None = None,
    time_cost: CostModel | None = None,
) -> Peer:
    """The named peer; kvtrie's own policies need the model ``profile`` (and take each
    request's user restore points as ``marks``, a simulated ``disk`` tier and the time
    model's figures, ``time_cost``), mlx-lm's real class needs mlx-lm."""
    if name in KVTRIE_PEERS:
        if profile is None:
            raise ValueError(f"{name} runs on a model profile; none was given")
        return KvtriePeer(name, budget, profile, marks, disk, time_cost)
    if name == "mlx-lm-real":
        try:
            from .mlxlm import LRUPromptCachePeer
        except ImportError:
            raise PeerUnavailable("mlx-lm not importable") from None
        return LRUPromptCachePeer(budget, costs, workload)
    if name == "belady":
        return Belady(budget, costs, workload)
    return PEERS[name](budget, costs)
