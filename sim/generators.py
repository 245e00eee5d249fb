"""Deterministic workload generators: the shapes of traffic that share prefixes.

Every generator returns kvtrie trace lines; a conversation's next turn extends the previous
request (its prompt and outputs) with ``prefix_of``, so files stay small. Outputs are explicit
tokens, so a trace means the same on every backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["GENERATORS", "TraceBuilder", "generate"]


@dataclass
class TraceBuilder:
    """Collects request lines and remembers each request's length with its outputs."""

    rng: np.random.Generator
    vocab_size: int
    lines: list[dict[str, Any]] = field(default_factory=list)
    lengths: dict[str, int] = field(default_factory=dict)
    clock_ms: int = 0

    def tokens(self, n: int) -> list[int]:
        return [int(t) for t in self.rng.integers(0, self.vocab_size, size=n)]

    def add(
        self,
        conversation: str,
        own: list[int],
        output_tokens: int,
        prefix_of: str | None = None,
        prefix_length: int | None = None,
        user_snapshots: list[int] | None = None,
    ) -> str:
        rid = f"r{len(self.lines)}"
        self.clock_ms += int(self.rng.integers(1, 2000))
        line: dict[str, Any] = {
            "id": rid,
            "conversation": conversation,
            "arrival_ms": self.clock_ms,
        }
        base = 0
        if prefix_of is not None:
            base = self.lengths[prefix_of] if prefix_length is None else prefix_length
            line["prefix_of"] = prefix_of
            line["prefix_length"] = base
        line["prompt"] = own
        line["output"] = self.tokens(output_tokens)
        if user_snapshots:
            line["user_snapshots"] = user_snapshots
        self.lines.append(line)
        self.lengths[rid] = base + len(own) + output_tokens
        return rid


def _interleave(builder: TraceBuilder, streams: list[list[Callable[[], None]]]) -> None:
    """Run each stream's steps in order, picking the next stream at random."""
    cursors = [0] * len(streams)
    live = [i for i, s in enumerate(streams) if s]
    while live:
        i = live[int(builder.rng.integers(len(live)))]
        streams[i][cursors[i]]()
        cursors[i] += 1
        if cursors[i] == len(streams[i]):
            live.remove(i)


def system_prompt(
    b: TraceBuilder,
    users: int = 16,
    turns: int = 4,
    system_tokens: int = 1024,
    question_tokens: int = 64,
    output_tokens: int = 128,
) -> None:
    """Many users behind one shared system prompt, each a multi-turn chat."""
    system = b.tokens(system_tokens)

    def conversation(user: int) -> list[Callable[[], None]]:
        last: list[str | None] = [None]

        def turn() -> None:
            own = b.tokens(question_tokens)
            if last[0] is None:
                last[0] = b.add(f"u{user}", system + own, output_tokens)
            else:
                last[0] = b.add(f"u{user}", own, output_tokens, prefix_of=last[0])

        return [turn] * turns

    _interleave(b, [conversation(u) for u in range(users)])


def agent(
    b: TraceBuilder,
    agents: int = 8,
    steps: int = 12,
    system_tokens: int = 1536,
    task_tokens: int = 256,
    tool_tokens: int = 384,
    output_tokens: int = 64,
) -> None:
    """Agent loops: a shared tool-definition prompt, then a context that grows by each tool
    call (the model's output) and its result."""
    system = b.tokens(system_tokens)

    def loop(a: int) -> list[Callable[[], None]]:
        last: list[str | None] = [None]

        def step() -> None:
            if last[0] is None:
                last[0] = b.add(f"agent{a}", system + b.tokens(task_tokens), output_tokens)
            else:
                last[0] = b.add(
                    f"agent{a}", b.tokens(tool_tokens), output_tokens, prefix_of=last[0]
                )

        return [step] * steps

    _interleave(b, [loop(a) for a in range(agents)])


def rag(
    b: TraceBuilder,
    requests: int = 96,
    documents: int = 24,
    document_tokens: int = 512,
    per_request: int = 3,
    system_tokens: int = 256,
    question_tokens: int = 48,
    output_tokens: int = 96,
) -> None:
    """Retrieval: a system prompt, then a few documents from a shared pool, then a question.
    Popular documents come first more often (Zipf-like), so prefixes repeat."""
    system = b.tokens(system_tokens)
    pool = [b.tokens(document_tokens) for _ in range(documents)]
    weights = 1.0 / np.arange(1, documents + 1)
    weights /= weights.sum()
    for i in range(requests):
        chosen = b.rng.choice(documents, size=per_request, replace=False, p=weights)
        docs = [t for d in sorted(chosen) for t in pool[d]]
        b.add(f"q{i}", system + docs + b.tokens(question_tokens), output_tokens)


def branching(
    b: TraceBuilder,
    chats: int = 8,
    turns: int = 6,
    system_tokens: int = 512,
    message_tokens: int = 96,
    output_tokens: int = 96,
    branch_probability: float = 0.35,
) -> None:
    """Chats whose users edit an earlier message or regenerate an answer: a request that
    branches from the middle of its own conversation's history."""
    system = b.tokens(system_tokens)
    for c in range(chats):
        history: list[tuple[str, int]] = []  # (request id, prompt length)
        for _ in range(turns):
            if history and b.rng.random() < branch_probability:
                rid, prompt_length = history[int(b.rng.integers(len(history)))]
                if b.rng.random() < 0.5:  # regenerate: the same prompt again
                    new = b.add(
                        f"c{c}", [], output_tokens, prefix_of=rid, prefix_length=prompt_length
                    )
                else:  # edit: the last message rewritten
                    keep = prompt_length - message_tokens
                    new = b.add(
                        f"c{c}",
                        b.tokens(message_tokens),
                        output_tokens,
                        prefix_of=rid,
                        prefix_length=keep,
                    )
                history.append((new, prompt_length))
            elif history:
                rid, _ = history[-1]
                new = b.add(f"c{c}", b.tokens(message_tokens), output_tokens, prefix_of=rid)
                history.append((new, b.lengths[rid] + message_tokens))
            else:
                new = b.add(
                    f"c{c}",
                    system + b.tokens(message_tokens),
                    output_tokens,
                    user_snapshots=[system_tokens],
                )
                history.append((new, system_tokens + message_tokens))


def shared_prefix(
    b: TraceBuilder,
    groups: int = 64,
    prompts_per_group: int = 16,
    system_tokens: int = 2048,
    question_tokens: int = 128,
    output_tokens: int = 256,
) -> None:
    """SGLang's generated-shared-prefix benchmark: groups of questions behind one long system
    prompt each, all sent at once (shuffled)."""
    order = [(g, p) for g in range(groups) for p in range(prompts_per_group)]
    b.rng.shuffle(order)
    systems = [b.tokens(system_tokens) for _ in range(groups)]
    first: dict[int, str] = {}
    for g, _ in order:
        question = b.tokens(question_tokens)
        if g not in first:
            first[g] = b.add(f"g{g}", systems[g] + question, output_tokens)
        else:
            b.add(f"g{g}", question, output_tokens, prefix_of=first[g], prefix_length=system_tokens)


GENERATORS: dict[str, Callable[..., None]] = {
    "system-prompt": system_prompt,
    "agent": agent,
    "rag": rag,
    "branching": branching,
    "shared-prefix": shared_prefix,
}


def generate(kind: str, seed: int, vocab_size: int = 32000, **sizes: int) -> tuple[dict, list]:
    """The header and request lines of a generated trace."""
    if kind not in GENERATORS:
        raise ValueError(f"unknown generator {kind!r}; choose one of {', '.join(GENERATORS)}")
    builder = TraceBuilder(np.random.default_rng(seed), vocab_size)
    try:
        GENERATORS[kind](builder, **sizes)
    except TypeError as exc:
        raise ValueError(f"{kind}: {exc}") from None
    header = {"vocab_size": vocab_size, "generator": kind, "seed": seed, "sizes": sizes}
    return header, builder.lines
