"""One module a subcommand: each holds its argparse setup (``add_parser``) beside its
handler (``run``), which returns the exit code."""

from __future__ import annotations

EXIT_OK, EXIT_VIOLATION, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
MUTATION_KILL_TARGET = 0.9
