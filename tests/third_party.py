"""Third-party traces for the tests: read from the user's cache or ``shared/traces/`` beside
the checkout (CI has it there), never from the project; a test that needs one and finds none
is skipped, saying how to get it."""

from __future__ import annotations

from pathlib import Path

import pytest


def third_party(name: str) -> Path:
    from kvtrie.traces import MissingTrace, bundled_path

    try:
        path = bundled_path(name)
    except MissingTrace as exc:
        pytest.skip(str(exc))
    assert path is not None
    return path
