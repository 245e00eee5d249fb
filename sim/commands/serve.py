"""``kvtrie serve``: mlx_lm.server with kvtrie's prefix cache."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kvtrie.core.prefix_cache import DEFAULT_BUDGET_BYTES

from . import EXIT_OK, EXIT_VIOLATION, UsageError, common_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        parents=[common_options()],
        help="mlx_lm.server with kvtrie's cache in place of its prompt cache",
        description="Serve a local MLX model with mlx-lm's own OpenAI-compatible server "
        "(mlx_lm.server: its HTTP handler and batching) and kvtrie's prefix trie in place of "
        "its LRUPromptCache. Every mlx_lm.server option (--model, --host, --port, "
        "--max-tokens, ...; see mlx_lm.server --help) is passed through; these are kvtrie's. "
        "Responses report usage.prompt_tokens_details.cached_tokens. Ctrl-C stops it.",
    )
    serve.add_argument("--model", required=True, type=Path, metavar="DIR",
                       help="a local model directory (config.json, weights, tokenizer)")
    serve.add_argument("--budget", default=None,
                       help="most paged-out snapshot bytes, e.g. 8GiB, inf (default 8GiB)")
    serve.add_argument("--policy", default="kvtrie-improved",
                       help="a policy and changes, as for kvtrie replay (default kvtrie-improved)")
    serve.add_argument("--max-context", type=int, default=None, metavar="N",
                       help="answer 400 to a prompt longer than N tokens (default: the "
                       "model's max_position_embeddings when config.json gives it)")
    serve.add_argument("--record", type=Path, default=None, metavar="FILE",
                       help="append each request as a trace line (token ids and the tokens "
                       "generated, so kvtrie replay FILE meets the same prompts); FILE must "
                       "not exist")
    serve.add_argument("--record-hashed", action="store_true",
                       help="--record Mooncake lines of chained 512-token block hashes under "
                       "a secret drawn for the recording, no token ids")
    serve.set_defaults(func=run, passthrough=True)


def _model_dir(path: Path) -> dict:
    """The model directory's config.json, or one line naming what is wrong."""
    from kvtrie.backends.mlx.backend import read_config

    if not path.is_dir():
        raise UsageError(f"--model {path}: no such directory (weights are never downloaded)")
    try:
        return read_config(path)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from ..build import make_policy, parse_size
    from ..outputs import check_output
    from ..recording import TraceRecorder
    from ..serve import ServeSettings, context_of, serve

    config = _model_dir(args.model)
    try:
        budget = DEFAULT_BUDGET_BYTES if args.budget is None else parse_size(args.budget, "--budget")
        policy = make_policy(args.policy)
        if args.record is not None:
            check_output("--record", args.record)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.record is not None and (str(args.record) == "-" or args.record.exists()):
        raise UsageError(f"--record {args.record}: give a new file; a recording never replaces one")
    if args.record_hashed and args.record is None:
        raise UsageError("--record-hashed needs --record FILE")
    if args.max_context is not None and args.max_context < 1:
        raise UsageError(f"--max-context must be >= 1, got {args.max_context}")
    context = args.max_context or context_of(config)
    argv = ["--model", str(args.model), *getattr(args, "extra", [])]
    handle = open(args.record, "x", encoding="utf-8") if args.record is not None else None
    try:
        recorder = None
        if handle is not None:
            recorder = TraceRecorder(handle, int(config.get("vocab_size", 0)) or 1,
                                     {"server": "kvtrie serve", "model": str(args.model)},
                                     args.record_hashed)
            recorder.write_header()
        settings = ServeSettings(budget, policy, context, recorder)
        try:
            serve(argv, settings)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        except KeyboardInterrupt:
            pass
    finally:
        if handle is not None:
            handle.close()
    if recorder is not None:
        print(f"recorded {recorder.written} requests to {args.record}", file=sys.stderr)
    summary = settings.summary
    if not summary:
        return EXIT_OK
    print("kvtrie serve: " + json.dumps(summary), flush=True)
    code = EXIT_VIOLATION if summary["violations"] else EXIT_OK
    # mlx_lm.server's request threads are daemons that may still be inside MLX when the
    # interpreter tears down, which can abort the process ("terminate called without an
    # active exception"); everything is written and flushed, so leave without the teardown
    sys.stderr.flush()
    os._exit(code)
