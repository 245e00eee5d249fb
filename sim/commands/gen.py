"""``kvtrie gen``: a generated workload trace and its ideal reuse."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..generators import GENERATORS
from . import EXIT_BAD_INPUT, EXIT_OK


def add_parser(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser(
        "gen",
        help="write a generated workload trace",
        description="Write a deterministic kvtrie trace of a common prefix-sharing workload and "
        "print its ideal (infinite-cache) reuse. Sizes are the generator's keyword arguments.",
    )
    gen.add_argument("kind", choices=sorted(GENERATORS))
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument("--out", type=Path, required=True, help="the trace file to write")
    gen.add_argument("--vocab-size", type=int, default=32000, help="token ids are below this")
    gen.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=N",
        help="a size, e.g. --set users=32 --set turns=8 (see each generator's "
        "defaults in kvtrie/sim/generators.py)",
    )
    gen.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..generators import generate
    from ..ideal import ideal_reuse
    from ..traces import load_trace, write_trace

    sizes: dict[str, int] = {}
    try:
        for item in args.set:
            name, sep, value = item.partition("=")
            if not sep or not value.strip().lstrip("-").isdigit():
                raise ValueError(f"--set takes NAME=INTEGER, got {item!r}")
            sizes[name.strip().replace("-", "_")] = int(value)
        header, lines = generate(args.kind, args.seed, args.vocab_size, **sizes)
    except ValueError as exc:
        print(f"kvtrie gen: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    write_trace(args.out, header, lines)
    cached, prompt = ideal_reuse(load_trace(args.out), args.vocab_size)
    print(
        f"wrote {args.out}: {len(lines)} requests, {prompt:,} prompt tokens, "
        f"ideal reuse {cached / prompt:.1%} ({cached:,} tokens)"
    )
    return EXIT_OK
