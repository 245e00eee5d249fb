"""Traces bundled with kvtrie, found by name from anywhere kvtrie is installed."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["BUNDLED", "bundled_path"]

BUNDLED = {
    "mooncake": "mooncake/conversation_trace.jsonl",
    "system-prompt": "system-prompt.jsonl",
    "agent": "agent.jsonl",
    "rag": "rag.jsonl",
    "branching": "branching.jsonl",
    "shared-prefix": "shared-prefix.jsonl",
}


def bundled_path(name: str) -> Path | None:
    """The file of a bundled trace, or None when ``name`` is not one."""
    relative = BUNDLED.get(name)
    if relative is None:
        return None
    return Path(str(resources.files(__name__).joinpath(relative)))
