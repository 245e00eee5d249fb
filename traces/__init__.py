"""Traces kvtrie knows by name: the generated ones it ships, and the third-party ones it
fetches (``kvtrie traces get``) but never ships.

A shipped name is a file of this package. A third-party name resolves to the user's cache
(``kvtrie traces get NAME`` put it there, checked against the sha256 recorded here), then to a
``shared/traces/`` folder beside the checkout (where CI keeps them), else to an error that
names the command to run.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = [
    "BUNDLED",
    "EMBEDDED",
    "THIRD_PARTY",
    "MissingTrace",
    "ThirdParty",
    "bundled_path",
    "cache_dir",
    "shared_dirs",
]

EMBEDDED = {
    "chat": "chat.jsonl",
    "system-prompt": "system-prompt.jsonl",
    "agent": "agent.jsonl",
    "rag": "rag.jsonl",
    "branching": "branching.jsonl",
    "shared-prefix": "shared-prefix.jsonl",
}


@dataclass(frozen=True)
class ThirdParty:
    """A published trace: where it comes from, under which license, its files and their
    sha256, and the path a name resolves to (a file, or a folder of files)."""

    name: str
    what: str
    license: str
    base_url: str
    folder: str
    files: tuple[tuple[str, str], ...]  # (file name, sha256)
    target: str  # relative to the folder: "" for the folder itself

    def url(self, file: str) -> str:
        return self.base_url + file


THIRD_PARTY = {
    "mooncake": ThirdParty(
        name="mooncake",
        what="Mooncake's production conversation trace: 12,031 requests, 144.8 M input tokens",
        license="Apache-2.0, kvcache-ai/Mooncake",
        base_url="https://raw.githubusercontent.com/kvcache-ai/Mooncake/main/FAST25-release/traces/",
        folder="mooncake",
        files=(
            ("conversation_trace.jsonl",
             "b8cbb061a85206d729d91cdc2981f43c9e0d99209dce588d3af5f7934408b9df"),
        ),
        target="conversation_trace.jsonl",
    ),
    "agentic": ThirdParty(
        name="agentic",
        what="24 recorded coding-agent conversations: 1,224 requests, 116.3 M input tokens",
        license="Apache-2.0, callanjfox/kv-cache-tester",
        base_url="https://raw.githubusercontent.com/callanjfox/kv-cache-tester/"
        "94f6046dfd9c0c8bc0cdb24a5aa6579bac8669bf/traces/",
        folder="agentic",
        files=(
        ("trace_0006.json", "e3d2094b48590c556fa5908b8edeca0446ca45543b1b5dfb04eee9245d0cfc7a"),
        ("trace_0016.json", "e5ce2bfcb0a976737fb1f93a01b1a578ca01f7f9e90f0369359d8e8ba112c026"),
        ("trace_0100.json", "af212002fa3507bac5e8806da86a426197458d2502228df861f584d7eedb89ab"),
        ("trace_0118.json", "327d2d9fbc183d4d04a78d1394161ac0388e258417b14fe4c4943555381add13"),
        ("trace_0125.json", "57e7045993c450d535db43e0b64cfe7f3feb22cfc11a6cd272677b26caec384e"),
        ("trace_0133.json", "1e27a43426a6c2c8e293c17174d0c4890a041d50abea73a78b3d0fb81c002608"),
        ("trace_0143.json", "1cd840aca2fd5e2d32d2c3551889ee5ba0d6c1c15718d02f074d1b412f64ccf7"),
        ("trace_0260.json", "1c6ad2f979c5e2e26c7bd899cdda93ef2d437c92fa7f09f7d6c964357872afcd"),
        ("trace_0283.json", "5586ac5f03fc5a86fe47dac446019fa04e1596212b6ca9c7c74e9d639539e550"),
        ("trace_0335.json", "3b616585fa20612cd4488162d6deed3cbe324355b48f2c6abc9704e14a622071"),
        ("trace_0362.json", "e14503d0bea806dc3a9b42ceba17b3a7eb7e7b8feb61927a5134c1189aa21c73"),
        ("trace_0369.json", "91f908579cf9d96bdfa21a9a29f21f9ed7d8c79e71b1b700344faa39f64d3836"),
        ("trace_0525.json", "36860be04d5014917681cfb257239b2800fbf45d440e44273703c1696471e767"),
        ("trace_0548.json", "44cbc8ae5fb9734692a5f320b45fb2f86f71f172abff6eda85ca5cb3706cdd4c"),
        ("trace_0557.json", "177bc418ed91ac7b490d2724b53c47f5211006c96d06d4e164acee03d5b8baf5"),
        ("trace_0600.json", "ccb40f310745d91adee0260d4391533fc9124ac05c714737ff84a899931889ad"),
        ("trace_0613.json", "3cb1f17143b37378a8aee5f758ecb4a4fac161601b64dc800ce897d8084a2e6f"),
        ("trace_0624.json", "249100e53e39de1fd4302f21f1e71a7c4ceef65e04264876f1d785c108459a03"),
        ("trace_0663.json", "cea6c9d1e07c8206a4ba57f52977734688a63d33fce997cd7ba711f9019ea803"),
        ("trace_0674.json", "ddb9e34730cf030efbf9d4e8559535170ee9a56daeba64482beec6a61e7c6fa2"),
        ("trace_0692.json", "8f7030ffc8b4c957f04f688acb829bd655b58f9eb037081fff72ce6e967edad6"),
        ("trace_0706.json", "b7e9801c202ee72467be6829bc164c5265d6e7e871f4243d1550ef256c5d73af"),
        ("trace_0722.json", "2e3b1a0efc19791e6f8f5b831d3bea04b7b156e28d1803d639faba7194f86529"),
        ("trace_0735.json", "78757078becfa12bf8dac4fab23b768729432133f8bc6e54d66b7b27a8719d45"),
        ),
        target="",
    ),
}
BUNDLED = (*EMBEDDED, *THIRD_PARTY)


class MissingTrace(ValueError):
    """A third-party trace that is neither in the cache nor beside the checkout."""


def cache_dir() -> Path:
    """Where ``kvtrie traces get`` keeps traces: ``$KVTRIE_CACHE_DIR``, else the platform's
    user cache folder."""
    if os.environ.get("KVTRIE_CACHE_DIR"):
        return Path(os.environ["KVTRIE_CACHE_DIR"]) / "traces"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "kvtrie" / "traces"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvtrie" / "traces"


def shared_dirs() -> list[Path]:
    """``shared/traces/`` folders beside the checkout: ``$KVTRIE_SHARED_TRACES`` when set,
    that of the working directory, and that of the source tree of an editable install."""
    here = Path(__file__).resolve().parent
    named = [Path(os.environ["KVTRIE_SHARED_TRACES"])] if os.environ.get("KVTRIE_SHARED_TRACES") else []
    return [*named, Path.cwd().parent / "shared" / "traces", here.parent.parent / "shared" / "traces"]


def _complete(trace: ThirdParty, folder: Path) -> bool:
    return all((folder / file).is_file() for file, _ in trace.files)


def bundled_path(name: str) -> Path | None:
    """The file (or folder) of a trace name, None when ``name`` is not one; a MissingTrace
    when it is third-party and not here."""
    if name in EMBEDDED:
        return Path(str(resources.files(__name__).joinpath(EMBEDDED[name])))
    trace = THIRD_PARTY.get(name)
    if trace is None:
        return None
    for root in [cache_dir(), *shared_dirs()]:
        folder = root / trace.folder
        if _complete(trace, folder):
            return folder / trace.target if trace.target else folder
    raise MissingTrace(
        f"trace {name!r} is third-party data kvtrie does not ship ({trace.license}): "
        f"run `kvtrie traces get {name}` once, or pass the path of your copy"
    )
