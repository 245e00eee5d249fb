"""The MLX backend: the layer-cache contract over mlx-lm's own cache objects.

The only module that imports ``mlx`` and ``mlx_lm``. The live caches are the objects mlx-lm's
models write into (``KVCache``, ``RotatingKVCache``, ``ArraysCache`` and its subclasses); the
adapters here snapshot, restore, split and merge them. Snapshots are fresh, evaluated arrays
of exactly their range, never views into a live preallocated buffer.

Models: no weights are downloaded. ``tiny-attention`` (llama), ``tiny-swa`` (gemma3_text,
sliding window 8) and ``tiny-hybrid`` (qwen3_next: gated-delta linear attention + attention)
are small seeded random-weight models built from mlx-lm's own model classes; any other name is
a local model directory loaded with ``mlx_lm.load``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from kvtrie.core.prefix_cache import DEFAULT_BUDGET_BYTES, CachePolicy, PrefixCache, Session
from kvtrie.core.protocols import LayerKind, Snapshot
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache, make_prompt_cache

from .base import CheckedRestore, Faults, RangeSnapshots, WholeStateSnapshots

__all__ = [
    "LOGIT_TOLERANCE",
    "TINY_MODELS",
    "MLXBackend",
    "MLXPromptCache",
    "mlxlm_prompt_cache_replay",
]

# Max |logit difference| accepted between a restored cache and a fresh full prefill (float32).
LOGIT_TOLERANCE = 1e-4
STATE_TOLERANCE = 1e-4
PREFILL_CHUNK = 2048

_VOCAB = 512
TINY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-attention": (
        "llama",
        {
            "model_type": "llama",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5,
            "vocab_size": _VOCAB,
            "tie_word_embeddings": False,
        },
    ),
    "tiny-swa": (
        "gemma3_text",
        {
            "model_type": "gemma3_text",
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vocab_size": _VOCAB,
            "sliding_window": 8,
            "sliding_window_pattern": 2,
            "rms_norm_eps": 1e-6,
        },
    ),
    "tiny-hybrid": (
        "qwen3_next",
        {
            "model_type": "qwen3_next",
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "linear_num_value_heads": 4,
            "linear_num_key_heads": 2,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "linear_conv_kernel_dim": 4,
            "num_experts": 0,
            "num_experts_per_tok": 0,
            "decoder_sparse_step": 1,
            "shared_expert_intermediate_size": 0,
            "mlp_only_layers": [],
            "moe_intermediate_size": 0,
            "rms_norm_eps": 1e-6,
            "vocab_size": _VOCAB,
            "num_key_value_heads": 2,
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "max_position_embeddings": 4096,
            "head_dim": 16,
            "full_attention_interval": 2,
        },
    ),
}

# Wider models for benchmarks, where compute must dominate the cache's own bookkeeping.
TINY_MODELS["small-attention"] = (
    "llama",
    {
        **TINY_MODELS["tiny-attention"][1],
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "intermediate_size": 512,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
)
TINY_MODELS["small-hybrid"] = (
    "qwen3_next",
    {
        **TINY_MODELS["tiny-hybrid"][1],
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_attention_heads": 8,
        "linear_num_value_heads": 8,
        "linear_num_key_heads": 4,
        "linear_key_head_dim": 32,
        "linear_value_head_dim": 32,
        "head_dim": 32,
    },
)


def _copy(array: mx.array) -> mx.array:
    """A fresh buffer of exactly ``array``'s size: an elementwise op never returns a view, so
    a slice of a live, preallocated cache buffer does not keep that whole buffer alive."""
    return array * 1


@dataclass(eq=False)
class MLXSnapshot:
    """Arrays paged out of one layer: a KV range, a window, or a recurrent state."""

    arrays: tuple[mx.array | None, ...]
    start: int
    end: int
    meta: tuple[int, ...] = ()
    is_closed: bool = False

    def __post_init__(self) -> None:
        mx.eval(*[a for a in self.arrays if a is not None])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays if a is not None)

    def close(self) -> None:
        self.arrays = ()
        self.is_closed = True


class _Adapter(CheckedRestore):
    """An mlx-lm cache object seen through the layer-cache contract."""

    def __init__(self, cache: Any, faults: Faults) -> None:
        self.cache = cache
        self.faults = faults

    @property
    def offset(self) -> int:
        return self.cache.offset

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    def advance(self, count: int) -> None:
        """Called after the model evaluated ``count`` tokens (it moved ``cache.offset``)."""


class MLXKVLayer(RangeSnapshots, _Adapter):
    """Attention (``KVCache``): a snapshot holds keys and values of its own range only."""

    kind = LayerKind.KV

    def snapshot(self, from_offset: int) -> Snapshot | None:
        cache = self.cache
        if cache.keys is None or cache.offset <= from_offset:
            return None
        start = max(0, from_offset)
        keys = _copy(cache.keys[..., start : cache.offset, :])
        values = _copy(cache.values[..., start : cache.offset, :])
        return MLXSnapshot((keys, values), start, cache.offset)

    def can_restore(self, snapshot: Snapshot | None, target: int) -> bool:
        if snapshot is None:
            return 0 <= target <= self.cache.offset
        assert isinstance(snapshot, MLXSnapshot) and not snapshot.is_closed
        return 0 <= target <= snapshot.end and self.cache.offset >= snapshot.start

    def _rewind(self, target: int) -> None:
        self.cache.offset = target

    def _load(self, snapshot: Snapshot, target: int) -> bool:
        assert isinstance(snapshot, MLXSnapshot)
        self.cache.offset = snapshot.start
        keys, values = snapshot.arrays
        self.cache.update_and_fetch(keys, values)
        mx.eval(self.cache.keys, self.cache.values)
        self.cache.offset = min(self.cache.offset, target)
        return True

    def _cut(self, snapshot: Snapshot, cut: int, at: int) -> tuple[Snapshot, Snapshot]:
        assert isinstance(snapshot, MLXSnapshot)
        keys, values = snapshot.arrays
        head = MLXSnapshot(
            (_copy(keys[..., :cut, :]), _copy(values[..., :cut, :])), snapshot.start, at
        )
        tail = MLXSnapshot(
            (_copy(keys[..., cut:, :]), _copy(values[..., cut:, :])), at, snapshot.end
        )
        return head, tail

    def _join(self, parent: Snapshot, child: Snapshot) -> Snapshot:
        assert isinstance(parent, MLXSnapshot) and isinstance(child, MLXSnapshot)
        arrays = tuple(mx.concatenate([a, b], axis=2) for a, b in zip(parent.arrays, child.arrays))
        return MLXSnapshot(arrays, parent.start, child.end)

    def free(self) -> None:
        self.cache.keys = self.cache.values = None
        self.cache.offset = 0


class MLXRotatingLayer(WholeStateSnapshots, _Adapter):
    """Sliding-window attention (``RotatingKVCache``): a snapshot holds the whole window."""

    kind = LayerKind.ROTATING

    def snapshot(self, from_offset: int) -> Snapshot | None:
        cache = self.cache
        if cache.keys is None or cache.offset <= from_offset:
            return None
        kept = min(cache.offset, cache.max_size)
        return MLXSnapshot(
            (_copy(cache.keys), _copy(cache.values)),
            cache.offset - kept,
            cache.offset,
            (cache.keep, cache.max_size, cache._idx),
        )

    def can_restore(self, snapshot: Snapshot | None, target: int) -> bool:
        # Rewinding is only safe while nothing has rotated out of the window.
        cache = self.cache
        if snapshot is None:
            return target == cache.offset or (0 <= target < cache.offset and cache.is_trimmable())
        assert isinstance(snapshot, MLXSnapshot) and not snapshot.is_closed
        return 0 <= target <= snapshot.end and (
            target == snapshot.end or snapshot.end < cache.max_size
        )

    def _rewind(self, target: int) -> None:
        if target < self.cache.offset:
            self.cache.trim(self.cache.offset - target)

    def _load(self, snapshot: Snapshot, target: int) -> bool:
        assert isinstance(snapshot, MLXSnapshot)
        keys, values = snapshot.arrays
        keep, max_size, idx = snapshot.meta
        self.cache.state = (_copy(keys), _copy(values), snapshot.end, keep, max_size, idx)
        mx.eval(self.cache.keys, self.cache.values)
        self._rewind(target)
        return True

    def free(self) -> None:
        self.cache.keys = self.cache.values = None
        self.cache.offset = 0
        self.cache._idx = 0


class MLXRecurrentLayer(WholeStateSnapshots, _Adapter):
    """Recurrent state (``ArraysCache``: conv and SSM / gated-delta state): never rewinds.

    mlx-lm keeps no offset for these caches, so the adapter counts the tokens evaluated.
    """

    kind = LayerKind.RECURRENT

    def __init__(self, cache: ArraysCache, faults: Faults) -> None:
        super().__init__(cache, faults)
        self._offset = 0

    @property
    def offset(self) -> int:
        return self._offset

    def advance(self, count: int) -> None:
        self._offset += count

    def snapshot(self, from_offset: int) -> Snapshot | None:
        if self._offset == 0 or all(a is None for a in self.cache.cache):
            return None
        arrays = tuple(_copy(a) if a is not None else None for a in self.cache.cache)
        return MLXSnapshot(arrays, self._offset, self._offset)

    def can_restore(self, snapshot: Snapshot | None, target: int) -> bool:
        if snapshot is None:
            return target == self._offset
        assert isinstance(snapshot, MLXSnapshot) and not snapshot.is_closed
        return target == snapshot.end

    def _rewind(self, target: int) -> None:
        """Nothing to do: ``can_restore`` allows only the current offset."""

    def _load(self, snapshot: Snapshot, target: int) -> bool:
        assert isinstance(snapshot, MLXSnapshot)
        self.cache.cache = [_copy(a) if a is not None else None for a in snapshot.arrays]
        self._offset = snapshot.end
        return True

    def free(self) -> None:
        self.cache.cache = [None] * len(self.cache.cache)
        self._offset = 0


MLXLayer = MLXKVLayer | MLXRotatingLayer | MLXRecurrentLayer


def _adapt(cache: Any, faults: Faults) -> MLXLayer:
    if isinstance(cache, RotatingKVCache):
        return MLXRotatingLayer(cache, faults)
    if isinstance(cache, KVCache):
        return MLXKVLayer(cache, faults)
    if isinstance(cache, ArraysCache):
        return MLXRecurrentLayer(cache, faults)
    raise ValueError(
        f"mlx-lm cache {type(cache).__name__} is not supported; kvtrie handles KVCache, "
        "RotatingKVCache and ArraysCache (recurrent) layers"
    )


def build_tiny_model(name: str, seed: int = 0) -> Any:
    """A seeded random-weight mlx-lm model from the registry, in float32."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")
    family, config = TINY_MODELS[name]
    module = importlib.import_module(f"mlx_lm.models.{family}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


class MLXBackend:
    """Runs an mlx-lm model over kvtrie's layer adapters."""

    name = "mlx"

    def __init__(self, model: Any, model_name: str, vocab_size: int) -> None:
        self.model = model
        self.model_name = model_name
        self.vocab_size = vocab_size
        self.max_logit_diff = 0.0  # the largest difference the oracle has measured
        self.faults = Faults()

    @classmethod
    def from_name(cls, name: str, seed: int = 0) -> MLXBackend:
        """A tiny registry model by name, or a local model directory."""
        if name in TINY_MODELS:
            return cls(build_tiny_model(name, seed), name, TINY_MODELS[name][1]["vocab_size"])
        path = Path(name)
        if not path.is_dir():
            raise ValueError(
                f"unknown MLX model {name!r}: use {', '.join(TINY_MODELS)} or a local model "
                "directory (weights are never downloaded)"
            )
        from mlx_lm import load

        model, tokenizer = load(str(path))
        return cls(model, str(path), int(getattr(tokenizer, "vocab_size", 0)) or _vocab_of(model))

    def new_layers(self) -> list[MLXLayer]:
        return [_adapt(cache, self.faults) for cache in make_prompt_cache(self.model)]

    def evaluate(self, layers: Sequence[MLXLayer], tokens: np.ndarray) -> mx.array | None:
        """Forward ``tokens`` through the model on the live caches; the last position's logits."""
        caches = [layer.cache for layer in layers]
        logits = None
        for start in range(0, len(tokens), PREFILL_CHUNK):
            chunk = np.asarray(tokens[start : start + PREFILL_CHUNK], dtype=np.int32)
            out = self.model(mx.array(chunk)[None], cache=caches)
            logits = out[0, -1].astype(mx.float32)
            mx.eval(logits, *[a for c in caches for a in _arrays(c)])
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
            diff = _state_difference(live, ref)
            if diff > STATE_TOLERANCE:
                return (
                    f"layer {index} ({live.kind.value}) differs from a fresh prefill by {diff:.3g}"
                )
        return None

    def unaccounted(self, held: int) -> str | None:
        """MLX arrays are freed by reference counting; there is no ledger to compare."""
        return None

    def logits_mismatch(self, prompt: np.ndarray, logits: mx.array | None) -> str | None:
        """I9 after prefill: the live logits equal a fresh full prefill's within tolerance."""
        fresh = self.fresh_logits(prompt)
        if logits is None:
            return "no logits: the request evaluated no token"
        diff = float(mx.abs(fresh - logits).max())
        self.max_logit_diff = max(self.max_logit_diff, diff)
        if diff > LOGIT_TOLERANCE:
            return f"logits differ from a fresh prefill by {diff:.3g} (tolerance {LOGIT_TOLERANCE})"
        return None


def _arrays(cache: Any) -> list[mx.array]:
    if isinstance(cache, ArraysCache):
        return [a for a in cache.cache if a is not None]
    return [a for a in (cache.keys, cache.values) if a is not None]


def _ordered_window(cache: RotatingKVCache, array: mx.array) -> mx.array:
    """The kept positions in time order (mlx-lm stores the window as a ring)."""
    return cache._temporal_order(array)[..., -min(cache.offset, cache.max_size) :, :]


def _state_difference(live: MLXLayer, ref: MLXLayer) -> float:
    if isinstance(live, MLXRecurrentLayer):
        pairs = list(zip(live.cache.cache, ref.cache.cache))
    elif isinstance(live, MLXRotatingLayer):
        if live.offset == 0:
            return 0.0
        pairs = [
            (_ordered_window(live.cache, a), _ordered_window(ref.cache, b))
            for a, b in ((live.cache.keys, ref.cache.keys), (live.cache.values, ref.cache.values))
        ]
    else:
        n = live.offset
        if n == 0:
            return 0.0
        pairs = [
            (live.cache.keys[..., :n, :], ref.cache.keys[..., :n, :]),
            (live.cache.values[..., :n, :], ref.cache.values[..., :n, :]),
        ]
    worst = 0.0
    for a, b in pairs:
        if (a is None) != (b is None):
            return float("inf")
        if a is not None:
            if a.shape != b.shape:
                return float("inf")
            worst = max(worst, float(mx.abs(a - b).max()))
    return worst


def _vocab_of(model: Any) -> int:
    args = getattr(model, "args", None)
    return int(getattr(args, "vocab_size", 0))


def mlxlm_prompt_cache_replay(
    backend: MLXBackend, requests: Sequence[tuple[np.ndarray, np.ndarray]], max_bytes: int | None
) -> dict[str, int]:
    """Serve ``(prompt, outputs)`` requests through mlx-lm's own ``LRUPromptCache`` (the
    server's prompt cache) at ``max_bytes``, counting what it reuses and recomputes. As in
    kvtrie, the sequence just served is live and does not count against ``max_bytes``, and at
    least one prompt token is evaluated: an exact hit on a trimmable cache gives its last token
    back; on a cache that can't trim it is recomputed from scratch.
    """
    from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

    store = LRUPromptCache(
        max_size=1 << 30, max_bytes=(1 << 62) if max_bytes is None else max_bytes
    )
    counts = {"prompt_tokens": 0, "cached_tokens": 0, "computed_tokens": 0}
    for prompt, outputs in requests:
        caches, rest = store.fetch_nearest_cache(backend.model_name, [int(t) for t in prompt])
        if caches is not None and not rest:
            if can_trim_prompt_cache(caches):
                trim_prompt_cache(caches, 1)
                rest = [int(prompt[-1])]
            else:
                caches, rest = None, list(prompt)
        if caches is None:
            caches, rest = make_prompt_cache(backend.model), [int(t) for t in prompt]
        layers = [_adapt(cache, backend.faults) for cache in caches]
        backend.evaluate(layers, np.asarray(rest, dtype=np.int32))
        if len(outputs) > 1:
            backend.evaluate(layers, outputs[:-1])
        evaluated = np.concatenate([prompt, outputs[:-1]])
        if max_bytes is not None:
            store.max_bytes = max_bytes + sum(cache.nbytes for cache in caches)
        store.insert_cache(backend.model_name, [int(t) for t in evaluated], caches)
        counts["prompt_tokens"] += len(prompt)
        counts["computed_tokens"] += len(rest)
        counts["cached_tokens"] += len(prompt) - len(rest)
    return counts


class MLXPromptCache:
    """kvtrie as the prompt cache of mlx-lm generation, shared across conversations.

    ``fetch`` restores the longest cached prefix and evaluates all but the prompt's last token
    (taking kvtrie's snapshots on the way); hand its caches and remaining token to
    ``mlx_lm.generate_step`` / ``stream_generate`` as ``prompt_cache`` and ``prompt``; then
    ``store`` the generated tokens. mlx-lm feeds every token it yields back into the model, so
    the live state covers prompt + generated tokens.
    """

    def __init__(
        self,
        model: Any,
        budget_bytes: int | None = DEFAULT_BUDGET_BYTES,
        policy: CachePolicy | None = None,
        name: str = "model",
    ) -> None:
        self.backend = MLXBackend(model, name, _vocab_of(model))
        self.cache = PrefixCache(self.backend.new_layers(), budget_bytes, policy)
        self._session: Session | None = None

    def fetch(self, prompt: Sequence[int] | np.ndarray) -> tuple[list[Any], list[int]]:
        """The live mlx-lm caches and the prompt tokens mlx-lm still has to evaluate (one)."""
        layers = self.cache.layers
        self._session = session = self.cache.begin(prompt)
        session.prefill(lambda t: self.backend.evaluate(layers, t), until=len(session.prompt) - 1)
        return [layer.cache for layer in layers], [int(session.prompt[-1])]

    def store(self, generated: Sequence[int]) -> None:
        """Record what mlx-lm generated (and fed back) after ``fetch``."""
        session, self._session = self._session, None
        if session is None:
            raise RuntimeError("store() without a fetch()")
        evaluated = 1 + len(generated)  # the last prompt token and every yielded token
        for layer in self.cache.layers:
            layer.advance(evaluated)
        session.close(list(generated))


class _CountedEntry:
    """Stands in for one layer's mlx-lm cache inside LRUPromptCache when only its size and
    trimming matter (the workload is simulated): nbytes, is_trimmable, trim."""

    def __init__(self, tokens: int, per_token: int, fixed: int, trimmable: bool) -> None:
        self.offset, self.per_token, self.fixed, self.trimmable = (
            tokens,
            per_token,
            fixed,
            trimmable,
        )

    @property
    def nbytes(self) -> int:
        return self.offset * self.per_token + self.fixed

    def is_trimmable(self) -> bool:
        return self.trimmable

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n


def lru_prompt_cache_counts(
    workload: Sequence[tuple[np.ndarray, np.ndarray]],
    per_token: int,
    per_sequence: int,
    recurrent: bool,
    budget: int | None,
) -> tuple[int, int]:
    """(cached tokens, peak bytes) of mlx-lm's own LRUPromptCache class over a simulated
    workload: the real class decides what it keeps and reuses; entries only carry sizes. As
    for every peer, the sequence just served is live and does not count against the budget."""
    from mlx_lm.models.cache import LRUPromptCache

    store = LRUPromptCache(max_size=1 << 30, max_bytes=(1 << 62) if budget is None else budget)
    cached = peak = 0
    for prompt, evaluated in workload:
        tokens = prompt.tolist()
        entry, rest = store.fetch_nearest_cache("model", tokens)
        reuse = 0 if entry is None else len(tokens) - len(rest)
        if entry is not None and not rest and recurrent:
            reuse = 0  # an exact hit can't give its last token back
        cached += min(reuse, len(tokens) - 1)
        live = _CountedEntry(len(evaluated), per_token, per_sequence, not recurrent)
        if budget is not None:
            store.max_bytes = budget + live.nbytes
        store.insert_cache("model", evaluated.tolist(), [live])
        peak = max(peak, store.nbytes - live.nbytes)
    return cached, peak
