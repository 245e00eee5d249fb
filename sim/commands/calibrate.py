"""``kvtrie calibrate``: cost figures measured on this machine and model."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import EXIT_OK, UsageError, common_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    calibrate = sub.add_parser(
        "calibrate",
        parents=[common_options()],
        help="measure the time model's cost figures on this machine and model",
        description="Time the model's prefill over a grid of (cached context, new tokens), "
        "in rounds (every point once a round, its median over the rounds, so a slow spell of "
        "a shared machine weighs on one round, not on one point), "
        "fit a + b*n + c*(context attended) by least squares, time decode, snapshot "
        "page-in and page-out and the disk tier's reads and writes, and write the figures "
        "as a [costs.NAME] table that kvtrie replay --cost "
        "reads, with the grid, the fitted seconds and their relative error beside them.",
    )
    calibrate.add_argument("--backend", choices=["mlx"], default="mlx")
    calibrate.add_argument(
        "--model", required=True, help="an MLX model name (tiny-attention, ...) or directory"
    )
    calibrate.add_argument("--out", type=Path, required=True, help="the TOML file to write")
    calibrate.add_argument(
        "--disk-dir",
        type=Path,
        metavar="DIR",
        help="time the disk tier's writes and reads in this directory (default: the system's "
        "temporary folder); a store is made in a new folder there and removed after",
    )
    calibrate.add_argument(
        "--quick", action="store_true", help="a 3 x 3 grid of short prompts (for CI)"
    )
    calibrate.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    calibrate.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..build import make_backend
    from ..calibrate import calibrate, calibration_toml, grid_steps
    from ..costs import load_costs
    from ..outputs import check_output, write_output

    grid = "quick" if args.quick else "full"
    try:
        check_output("--out", args.out)
        make_backend(args.backend, args.model)  # a bad name fails here, before any timing
        if args.disk_dir is not None and not args.disk_dir.is_dir():
            raise ValueError(f"--disk-dir: {args.disk_dir} is not a directory")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    with tqdm(
        total=grid_steps(grid),
        desc="calibrate",
        unit="timing",
        disable=True if args.quiet else None,
    ) as bar:
        result = calibrate(args.model, grid, tick=bar.update, disk_dir=args.disk_dir)
    write_output(args.out, calibration_toml(result))
    load_costs(args.out)  # what --cost will read: it must read back
    cost = result.cost
    median, largest = result.fit_error
    print(
        f"{cost.name}: prefill {cost.prefill_fixed_seconds:.3g} s + {cost.prefill_seconds_per_token:.3g} s/token "
        f"+ {cost.prefill_seconds_per_token_context:.3g} s/(token x context); decode "
        f"{cost.decode_seconds_per_token * 1000:.2f} ms/token; page-in "
        f"{cost.page_in_bytes_per_second / 1e9:.2f} GB/s; disk read "
        f"{cost.disk_read_bytes_per_second / 1e9:.2f} GB/s, write "
        f"{cost.disk_write_bytes_per_second / 1e9:.2f} GB/s; fit error median "
        f"{median:.1%}, max {largest:.1%} over {len(result.points)} points"
    )
    print(f"wrote {args.out}")
    return EXIT_OK
