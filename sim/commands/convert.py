"""``kvtrie convert``: a trace in any format kvtrie reads, written as kvtrie or Mooncake."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import EXIT_OK, UsageError, common_options, read_options, trace_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser(
        "convert",
        parents=[common_options(), trace_options()],
        help="write a trace in kvtrie's or Mooncake's format",
        description="Read a trace in any format kvtrie reads (the reading options say how) "
        "and write it as a kvtrie trace (tokens, each request extending the earlier one it "
        "shares most with) or a Mooncake trace (prefix-chained hash ids of --block-size "
        "blocks, session_id for conversations). Replaying both gives the same hit ratio, "
        "to the block granularity. A trace whose prompts extend outputs it leaves to the "
        "backend, or (to Mooncake) that holds events or user restore points, is refused.",
    )
    convert.add_argument("input", help="a trace file, a folder of agentic files, or a name")
    convert.add_argument("output", type=Path, help="the trace to write ('-': standard output)")
    convert.add_argument("--to", required=True, choices=["kvtrie", "mooncake"])
    convert.add_argument(
        "--model",
        default="llama-8b",
        help="--to kvtrie from a hashed trace: expand hash ids into the tokens a replay on "
        "this fake profile (or profiles TOML file) draws, its vocabulary in the header "
        "(default llama-8b, the replay's default)",
    )
    convert.add_argument(
        "--out-block-size",
        type=int,
        default=512,
        metavar="N",
        help="--to mooncake: tokens a hash id stands for (default 512)",
    )
    convert.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvtrie.backends.profiles import get_profile

    from ..build import trace_inputs, trace_path
    from ..convert import to_kvtrie, to_mooncake
    from ..outputs import check_output, write_output
    from ..traces import load_trace, write_trace

    try:
        vocab = get_profile(args.model).vocab_size
        if not 1 <= args.out_block_size <= 1 << 20:
            raise UsageError(f"--out-block-size must be in [1, 1048576], got {args.out_block_size}")
        path = trace_path(args.input)
        check_output("output", args.output, trace_inputs(path))
        trace = load_trace(path, vocab_size=vocab, options=read_options(args))
        if args.to == "kvtrie":
            header, lines = to_kvtrie(trace, vocab)
        else:
            moon = to_mooncake(trace, vocab, args.out_block_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.to == "kvtrie":
        write_trace(args.output, header, lines)
    else:
        text = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in moon)
        write_output(args.output, text)
    if str(args.output) != "-":
        print(f"wrote {args.output}: {len(trace.requests)} requests as {args.to}")
    return EXIT_OK
