"""``kvtrie gen chat``: chat traffic shaped after the Mooncake conversation trace, written in
the Mooncake format (hash ids of 512-token blocks), so kvtrie ships a production-like trace of
its own instead of someone else's.

Every figure below was measured on Mooncake's ``conversation_trace.jsonl`` (FAST'25 release,
sha256 b8cbb061...; 12,031 requests over 3,537 s), walking its prefix-chained hash ids:

- arrivals: 3.40 requests a second (12,031 an hour);
- every request starts with the same 512-token block (hash id 0): the shared system prompt;
- 61.3 % of requests reuse only that block (a conversation's first turn); the other 38.7 %
  continue an earlier prompt, so a conversation goes on with probability 0.387 a turn;
- a first turn holds a median of 11 blocks, a mean of 21.5 (lognormal, sigma 1.16);
- a next turn adds a median of 2 blocks, a mean of 6.8 (sigma 1.56): the answer and the
  user's new message, which the trace hashes as input;
- it comes a median of 123 s after the turn it continues (10 % within 42 s, 90 % within 483 s:
  lognormal, sigma 1.07);
- outputs: quantiles 10/25/50/75/90/99 % at 24/156/350/472/597/1118 tokens (mean 343);
- the longest prompt is 126,195 tokens.

The rate is the one thing scaled: ``requests`` over ``minutes`` (default 2,000 over 60, a sixth
of Mooncake's rate over the same hour), so conversations keep their shape and their turns the
time to come back; a shorter window would cut most later turns off.

A next turn keeps the full blocks of the prompt it continues; its partial last block is
re-hashed with the new tokens, as in the real trace.
"""

from __future__ import annotations

import numpy as np

__all__ = ["chat_lines", "block_ideal"]

BLOCK = 512
CONTINUE = 0.387
FIRST_MEDIAN, FIRST_SIGMA = 11 * BLOCK, 1.16
NEXT_MEDIAN, NEXT_SIGMA = 2 * BLOCK, 1.56
GAP_MEDIAN_S, GAP_SIGMA = 123.0, 1.07
MAX_PROMPT = 126_195
OUTPUT_QUANTILES = ((0.0, 1), (0.10, 24), (0.25, 156), (0.50, 350), (0.75, 472), (0.90, 597),
                    (0.99, 1118), (1.0, 2000))


def _output(rng: np.random.Generator) -> int:
    points, values = zip(*OUTPUT_QUANTILES)
    return int(round(np.interp(rng.random(), points, values)))


def chat_lines(seed: int, requests: int = 2000, minutes: int = 60) -> list[dict]:
    """Mooncake lines (with ``session_id``) of about ``requests`` requests in ``minutes``:
    conversations arrive by a Poisson process; turns that fall past the end are cut, as a
    recording window cuts them."""
    rng = np.random.default_rng(seed)
    duration_s = minutes * 60.0
    conversation_rate = requests / duration_s * (1 - CONTINUE)
    next_id = 1  # id 0 is the system prompt's block
    lines: list[dict] = []
    start = rng.exponential(1 / conversation_rate)
    session = 0
    while start < duration_s:
        length = int(min(MAX_PROMPT, max(BLOCK + 1, rng.lognormal(np.log(FIRST_MEDIAN), FIRST_SIGMA))))
        blocks = -(-length // BLOCK)
        ids = [0, *range(next_id, next_id + blocks - 1)]
        next_id += blocks - 1
        at = start
        while at < duration_s:
            lines.append({"timestamp": int(at * 1000), "input_length": length,
                          "output_length": _output(rng), "hash_ids": ids, "session_id": session})
            if rng.random() >= CONTINUE:
                break
            grown = length + max(1, int(rng.lognormal(np.log(NEXT_MEDIAN), NEXT_SIGMA)))
            if grown > MAX_PROMPT:
                break
            kept = ids[: length // BLOCK]
            fresh = -(-grown // BLOCK) - len(kept)
            ids = [*kept, *range(next_id, next_id + fresh)]
            next_id += fresh
            length = grown
            at += rng.lognormal(np.log(GAP_MEDIAN_S), GAP_SIGMA)
        session += 1
        start += rng.exponential(1 / conversation_rate)
    lines.sort(key=lambda line: line["timestamp"])
    return lines


def block_ideal(lines: list[dict]) -> tuple[int, int]:
    """(cached, prompt) tokens of an infinite cache over hashed lines: the longest run of
    leading blocks seen before, at most the prompt less one token."""
    seen: set[tuple[int, int]] = set()
    cached = total = 0
    for line in lines:
        ids, length = line["hash_ids"], line["input_length"]
        k = 0
        while k < len(ids) and (k, ids[k]) in seen:
            k += 1
        cached += min(k * BLOCK, length - 1)
        total += length
        seen.update(enumerate(ids))
    return cached, total
