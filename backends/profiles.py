"""Model profiles: the layer kinds and cache sizes of a model, read from TOML data."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kvtrie.core.protocols import LayerKind

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["LayerSpec", "ModelProfile", "load_profiles", "get_profile"]


@dataclass(frozen=True)
class LayerSpec:
    """A group of ``count`` identical layers, simulated by one fake layer."""

    kind: LayerKind
    count: int = 1
    bytes_per_token: int = 0
    window: int = 0
    state_bytes: int = 0

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"count must be >= 1, got {self.count}")
        if self.kind is not LayerKind.RECURRENT and self.bytes_per_token < 1:
            raise ValueError(f"a {self.kind.value} layer needs bytes_per_token >= 1")
        if self.kind is LayerKind.ROTATING and self.window < 1:
            raise ValueError("a rotating layer needs window >= 1")
        if self.kind is LayerKind.RECURRENT and self.state_bytes < 1:
            raise ValueError("a recurrent layer needs state_bytes >= 1")


@dataclass(frozen=True)
class ModelProfile:
    name: str
    layers: tuple[LayerSpec, ...]
    vocab_size: int
    description: str = ""

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token adds to the attention layers (windows not counted)."""
        return sum(s.count * s.bytes_per_token for s in self.layers if s.kind is LayerKind.KV)


def _parse_profile(name: str, table: dict, source: str) -> ModelProfile:
    try:
        specs = []
        for i, layer in enumerate(table["layers"]):
            fields = dict(layer)
            kind = fields.pop("kind")
            try:
                specs.append(LayerSpec(kind=LayerKind(kind), **fields))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"layers[{i}]: {exc}") from None
        return ModelProfile(
            name=name,
            layers=tuple(specs),
            vocab_size=int(table["vocab_size"]),
            description=str(table.get("description", "")),
        )
    except KeyError as exc:
        raise ValueError(f"{source}: profile {name!r} lacks the key {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{source}: profile {name!r}: {exc}") from None


def load_profiles(path: Path | None = None) -> dict[str, ModelProfile]:
    """Profiles from ``path``, or the bundled ``profiles.toml``."""
    if path is None:
        text = resources.files("kvtrie.backends").joinpath("profiles.toml").read_text()
        source = "profiles.toml"
    else:
        text = Path(path).read_text()
        source = str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source}: {exc}") from None
    return {name: _parse_profile(name, t, source) for name, t in data.get("profiles", {}).items()}


def get_profile(name: str) -> ModelProfile:
    """A bundled profile by name, or the single profile of a TOML file at that path."""
    if name.endswith(".toml"):
        profiles = load_profiles(Path(name))
        if len(profiles) != 1:
            raise ValueError(f"{name}: expected exactly one [profiles.NAME], found {len(profiles)}")
        return next(iter(profiles.values()))
    profiles = load_profiles()
    if name not in profiles:
        raise ValueError(f"unknown model profile {name!r}; choose one of {', '.join(profiles)}")
    return profiles[name]
