"""``kvtrie gen``: a generated workload trace and its ideal reuse."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..chatgen import chat_lines
from ..generators import GENERATORS
from . import EXIT_OK, UsageError, common_options

KINDS = {**GENERATORS, "chat": chat_lines}


def add_parser(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser(
        "gen",
        parents=[common_options()],
        help="write a generated workload trace",
        description="Write a deterministic trace of a common prefix-sharing workload and "
        "print its ideal (infinite-cache) reuse. Sizes are the generator's keyword arguments. "
        "chat writes Mooncake lines (hash ids of 512-token blocks) shaped after the Mooncake "
        "conversation trace's statistics (kvtrie/sim/chatgen.py says which and where from); "
        "the others write kvtrie JSONL with explicit tokens.",
    )
    gen.add_argument("kind", choices=sorted(KINDS))
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument(
        "--out", type=Path, required=True, help="the trace file to write ('-': standard output)"
    )
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


MAX_SIZE = 1_000_000  # a larger generated trace is a typo, and would take hours to write


def run(args: argparse.Namespace) -> int:
    import inspect
    import json

    from ..chatgen import block_ideal
    from ..generators import generate
    from ..ideal import ideal_reuse
    from ..outputs import check_output, write_output
    from ..traces import trace_from_lines, write_trace

    try:
        check_output("--out", args.out)
        if args.vocab_size < 2:
            raise UsageError(f"--vocab-size must be >= 2, got {args.vocab_size}")
        known = [
            name
            for name, param in inspect.signature(KINDS[args.kind]).parameters.items()
            if param.annotation in (int, "int")
        ]
        sizes: dict[str, int] = {}
        for item in args.set:
            name, sep, value = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or not value.strip().lstrip("-").isdigit():
                raise UsageError(f"--set takes NAME=INTEGER, got {item!r}")
            if name not in known:
                raise UsageError(f"--set {name}: {args.kind} has no such size; sizes: {', '.join(known)}")
            if not 1 <= int(value) <= MAX_SIZE:
                raise UsageError(f"--set {name}={value}: must be in [1, {MAX_SIZE:,}]")
            sizes[name] = int(value)
        if args.kind != "chat":
            header, lines = generate(args.kind, args.seed, args.vocab_size, **sizes)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.kind == "chat":
        lines = chat_lines(args.seed, **sizes)
        cached, prompt = block_ideal(lines)
        write_output(args.out, "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines))
    else:
        trace = trace_from_lines(str(args.out), header, lines)
        cached, prompt = ideal_reuse(trace, args.vocab_size)
        write_trace(args.out, header, lines)
    print(
        f"wrote {args.out}: {len(lines)} requests, {prompt:,} prompt tokens, "
        f"ideal reuse {cached / prompt:.1%} ({cached:,} tokens)",
        file=sys.stderr if str(args.out) == "-" else sys.stdout,
    )
    return EXIT_OK
