"""The MLX backend: an mlx-lm model run over kvtrie's layer adapters, and its oracle."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from ..base import Faults
from .adapters import MLXLayer, adapt, arrays_of, state_difference
from .codec import MLXCodec
from .models import TINY_MODELS, build_tiny_model, tiny_model, vocab_of
from .tolerance import STRICT, Tolerance, measure_tolerance

__all__ = ["LOGIT_TOLERANCE", "MLXBackend", "PREFILL_CHUNK", "read_config"]

# Max |logit difference| accepted in float32 (lower precision: measured, see tolerance.py).
LOGIT_TOLERANCE = STRICT
PREFILL_CHUNK = 2048

def read_config(path: Path) -> dict[str, Any]:
    """A local model directory's config.json, or a ValueError naming the file: checked
    before mlx-lm loads it, whose own errors name no file."""
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{config}: missing; an MLX model directory holds config.json")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{config}: expected a JSON object")
    return data


class MLXBackend:
    """Runs an mlx-lm model over kvtrie's layer adapters."""

    name = "mlx"
    measures_time = True

    def __init__(self, model: Any, model_name: str, vocab_size: int) -> None:
        self.model = model
        self.model_name = model_name
        self.vocab_size = vocab_size
        self.max_logit_diff = 0.0  # the largest difference the oracle has measured
        self.faults = Faults()
        self._tolerance: Tolerance | None = None

    @property
    def tolerance(self) -> Tolerance:
        """The oracle's bounds for this model (measured once, on first use)."""
        if self._tolerance is None:
            self._tolerance = measure_tolerance(self)
        return self._tolerance

    def oracle(self) -> dict[str, Any]:
        """What the oracle compares and within what, for the report."""
        return {"comparison": "within tolerance", **self.tolerance.as_dict()}

    @classmethod
    def from_name(cls, name: str, seed: int = 0) -> MLXBackend:
        """A tiny registry model by name, or a local model directory."""
        tiny = tiny_model(name)
        if tiny is not None:
            base, dtype = tiny
            return cls(build_tiny_model(base, seed, dtype), name, TINY_MODELS[base][1]["vocab_size"])
        path = Path(name)
        if not path.is_dir():
            raise ValueError(
                f"unknown MLX model {name!r}: use {', '.join(TINY_MODELS)} or a local model "
                "directory (weights are never downloaded)"
            )
        read_config(path)
        from mlx_lm import load

        try:
            model, tokenizer = load(str(path))
        except Exception as exc:  # mlx-lm's own errors name no file; this names the directory
            raise ValueError(
                f"{path}: mlx-lm could not load it: {type(exc).__name__}: {exc}"
            ) from exc
        return cls(model, str(path), int(getattr(tokenizer, "vocab_size", 0)) or vocab_of(model))

    def new_layers(self) -> list[MLXLayer]:
        return [adapt(cache, self.faults) for cache in make_prompt_cache(self.model)]

    def evaluate(self, layers: Sequence[MLXLayer], tokens: np.ndarray) -> mx.array | None:
        """Forward ``tokens`` through the model on the live caches; the last position's logits."""
        caches = [layer.cache for layer in layers]
        logits = None
        for start in range(0, len(tokens), PREFILL_CHUNK):
            chunk = np.asarray(tokens[start : start + PREFILL_CHUNK], dtype=np.int32)
            out = self.model(mx.array(chunk)[None], cache=caches)
            logits = out[0, -1].astype(mx.float32)
            mx.eval(logits, *[a for c in caches for a in arrays_of(c)])
            for layer in layers:
                layer.advance(len(chunk))
        return logits

    def generate(
        self, layers: Sequence[MLXLayer], logits: mx.array | None, count: int
    ) -> np.ndarray:
        """Greedy decoding: every token but the last is evaluated, as a server does."""
        out = np.empty(max(count, 0) if logits is not None else 0, dtype=np.int32)
        for i in range(len(out)):
            out[i] = int(mx.argmax(logits).item())
            if i < len(out) - 1:
                logits = self.evaluate(layers, out[i : i + 1])
        return out

    def fresh_logits(self, tokens: np.ndarray) -> mx.array | None:
        return self.evaluate(self.new_layers(), tokens)

    def mismatch(self, layers: Sequence[MLXLayer], prefix: np.ndarray) -> str | None:
        """I9 after begin: every layer's arrays equal a fresh prefill's within tolerance."""
        fresh = self.new_layers()
        if len(prefix):
            self.evaluate(fresh, prefix)
        for index, (live, ref) in enumerate(zip(layers, fresh)):
            if live.offset != ref.offset:
                return f"layer {index} at offset {live.offset}, fresh prefill at {ref.offset}"
            diff = state_difference(live, ref)
            if diff > self.tolerance.state:
                return (
                    f"layer {index} ({live.kind.value}) differs from a fresh prefill by "
                    f"{diff:.3g} (tolerance {self.tolerance.state:.3g}, {self.tolerance.dtype})"
                )
        return None

    def unaccounted(self, held: int) -> str | None:
        """MLX arrays are freed by reference counting; there is no ledger to compare."""
        return None

    def snapshot_codec(self) -> MLXCodec:
        return MLXCodec(self.model)

    def logits_mismatch(self, prompt: np.ndarray, logits: mx.array | None) -> str | None:
        """I9 after prefill: the live logits equal a fresh full prefill's within tolerance."""
        fresh = self.fresh_logits(prompt)
        if logits is None:
            return "no logits: the request evaluated no token"
        diff = float(mx.abs(fresh - logits).max())
        self.max_logit_diff = max(self.max_logit_diff, diff)
        if diff > self.tolerance.logits:
            return (
                f"logits differ from a fresh prefill by {diff:.3g} (tolerance "
                f"{self.tolerance.logits:.3g}, {self.tolerance.dtype})"
            )
        return None


