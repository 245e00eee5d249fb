"""``kvtrie traces``: the traces kvtrie knows by name, and ``get`` for the third-party ones."""

from __future__ import annotations

import argparse
import sys

from . import EXIT_BAD_INPUT, EXIT_OK, EXIT_VIOLATION, common_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    traces = sub.add_parser(
        "traces",
        parents=[common_options()],
        help="list the trace names; get a third-party trace into the cache",
        description="Trace names kvtrie resolves: the generated traces it ships, and "
        "third-party traces (mooncake, agentic) it never ships. 'get' downloads one from its "
        "authors' published location, checks the sha256 kvtrie records, and keeps it in your "
        "cache folder ($KVTRIE_CACHE_DIR, else the platform's user cache). A name then "
        "resolves to the cache, then to shared/traces/ beside the checkout.",
    )
    verbs = traces.add_subparsers(dest="verb", required=True, metavar="VERB")
    listing = verbs.add_parser("list", help="every trace name and where it resolves")
    listing.set_defaults(func=run_list)
    get = verbs.add_parser("get", help="download a third-party trace into the cache")
    get.add_argument("name", choices=["mooncake", "agentic"])
    get.add_argument("--force", action="store_true", help="download again even when cached")
    get.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    get.set_defaults(func=run_get)


def run_list(args: argparse.Namespace) -> int:
    from kvtrie.traces import EMBEDDED, THIRD_PARTY, MissingTrace, bundled_path

    for name in EMBEDDED:
        print(f"{name:14} shipped      {bundled_path(name)}")
    for name, trace in THIRD_PARTY.items():
        try:
            where = str(bundled_path(name))
        except MissingTrace:
            where = f"not here: kvtrie traces get {name}"
        print(f"{name:14} third-party  {where}\n{'':14} {trace.what}; {trace.license}")
    return EXIT_OK


def run_get(args: argparse.Namespace) -> int:
    from kvtrie.traces import THIRD_PARTY

    from ..download import ChecksumMismatch, DownloadError, download, manual_steps

    trace = THIRD_PARTY[args.name]
    try:
        folder = download(trace, force=args.force, progress=not args.quiet and sys.stderr.isatty())
    except DownloadError as exc:
        print(f"kvtrie traces: {exc}\n{manual_steps(trace)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ChecksumMismatch as exc:
        print(f"kvtrie traces: {exc}", file=sys.stderr)
        return EXIT_VIOLATION
    print(f"{args.name}: {len(trace.files)} file(s) checked in {folder}")
    return EXIT_OK
