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


LAYER_KEYS = {"kind", "count", "bytes_per_token", "window", "state_bytes"}
PROFILE_KEYS = {"description", "vocab_size", "layers"}


def _positive_int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: expected an integer >= 1, got {value!r}")
    return value


def toml_table(value: object, where: str, keys: set[str]) -> dict:
    """``value`` as a TOML table holding only ``keys`` (profiles, cost figures); errors start
    with ``where``."""
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a table, got {value!r}")
    unknown = sorted(set(value) - keys)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key; keys are {', '.join(sorted(keys))}")
    return value


def _parse_profile(name: str, table: object, source: str) -> ModelProfile:
    """One ``[profiles.NAME]`` table; every error names the file and the key."""
    where = f"{source}: profiles.{name}"
    table = toml_table(table, where, PROFILE_KEYS)
    for key in ("vocab_size", "layers"):
        if key not in table:
            raise ValueError(f"{where}: lacks the key {key!r}")
    vocab = _positive_int(table["vocab_size"], f"{where}.vocab_size")
    if vocab < 2:
        raise ValueError(f"{where}.vocab_size: a vocabulary needs at least 2 tokens, got {vocab}")
    layers = table["layers"]
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"{where}.layers: expected a non-empty list of layer tables")
    specs = []
    for i, layer in enumerate(layers):
        at = f"{where}.layers[{i}]"
        layer = toml_table(layer, at, LAYER_KEYS)
        kinds = [k.value for k in LayerKind]
        if layer.get("kind") not in kinds:
            raise ValueError(f"{at}.kind: expected one of {', '.join(kinds)}, got {layer.get('kind')!r}")
        fields = {k: v for k, v in layer.items() if k != "kind"}
        for key, value in fields.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{at}.{key}: expected an integer >= 0, got {value!r}")
        try:
            specs.append(LayerSpec(kind=LayerKind(layer["kind"]), **fields))
        except ValueError as exc:
            raise ValueError(f"{at}: {exc}") from None
    description = table.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f"{where}.description: expected a string, got {description!r}")
    return ModelProfile(name=name, layers=tuple(specs), vocab_size=vocab, description=description)


def read_toml(path: Path | None, bundled: str) -> tuple[dict, str]:
    """The tables of the TOML file ``path``, or of the file ``bundled`` shipped in this
    package, and the name its errors go by; a ValueError names the file."""
    if path is None:
        text = resources.files("kvtrie.backends").joinpath(bundled).read_text()
        source = bundled
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{source}: not UTF-8 text (byte {exc.start})") from None
        except OSError as exc:
            raise ValueError(f"{source}: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text), source
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source}: {exc}") from None


def load_profiles(path: Path | None = None) -> dict[str, ModelProfile]:
    """Profiles from ``path``, or the bundled ``profiles.toml``."""
    data, source = read_toml(path, "profiles.toml")
    profiles = data.get("profiles", {})
    if not isinstance(profiles, dict):
        raise ValueError(f"{source}: profiles: expected [profiles.NAME] tables, got {profiles!r}")
    return {name: _parse_profile(name, t, source) for name, t in profiles.items()}


def get_profile(name: str) -> ModelProfile:
    """A bundled profile by name, or the single profile of a TOML file at that path."""
    if not isinstance(name, str):
        raise ValueError(f"a model profile is named by a string, got {name!r}")
    if name.endswith(".toml"):
        profiles = load_profiles(Path(name))
        if len(profiles) != 1:
            raise ValueError(f"{name}: expected exactly one [profiles.NAME], found {len(profiles)}")
        return next(iter(profiles.values()))
    profiles = load_profiles()
    if name not in profiles:
        raise ValueError(f"unknown model profile {name!r}; choose one of {', '.join(profiles)}")
    return profiles[name]
