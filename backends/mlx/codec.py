"""MLX snapshots as tensors and back, for a directory store.

An MLX snapshot holds a nested state (a KV range's keys and values, a rotating cache's six
public fields, a recurrent layer's arrays with ``None`` gaps). Each array becomes one tensor;
bfloat16, which numpy lacks, is stored as its raw 16-bit pattern and viewed back, so a
restored state is bit for bit the one paged out; the nesting and the non-array values (a
rotating cache's offset and index) go in the file's metadata as JSON.

The fingerprint names the model by its config and a digest of its weights (shapes, dtypes
and the leading values of every parameter), so a store of one checkpoint never serves another,
even a same-architecture model with other weights or another dtype.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from kvtrie.core.protocols import Snapshot

from .adapters import MLXSnapshot

__all__ = ["MLXCodec", "model_fingerprint"]

_RAW_BITS = {mx.bfloat16: mx.uint16}  # dtypes numpy has no type for: stored as their bits
_BY_NAME = {str(dtype): dtype for dtype in _RAW_BITS}


def model_fingerprint(model: Any) -> str:
    """A digest of ``model``'s architecture and weights (the leading 64 values of each
    parameter: two checkpoints of one architecture differ there)."""
    digest = hashlib.sha256()
    digest.update(type(model).__module__.encode())
    args = getattr(model, "args", None)
    if args is not None:
        digest.update(json.dumps(vars(args), sort_keys=True, default=str).encode())
    for name, weight in tree_flatten(model.parameters()):
        digest.update(f"{name}:{weight.shape}:{weight.dtype}".encode())
        head = weight.reshape(-1)[:64]
        digest.update(np.array(head.view(_RAW_BITS.get(head.dtype, head.dtype))).tobytes())
    return f"mlx:{digest.hexdigest()[:32]}"


def _flatten(value: Any, arrays: list[mx.array]) -> Any:
    """The nesting of ``value`` as JSON, its arrays appended to ``arrays`` by index."""
    if isinstance(value, mx.array):
        arrays.append(value)
        return {"array": len(arrays) - 1}
    if isinstance(value, (tuple, list)):
        return {type(value).__name__: [_flatten(item, arrays) for item in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"an MLX snapshot holds a {type(value).__name__}, which can't be stored")


def _unflatten(shape: Any, arrays: list[mx.array]) -> Any:
    if "array" in shape:
        return arrays[shape["array"]]
    if "tuple" in shape:
        return tuple(_unflatten(item, arrays) for item in shape["tuple"])
    if "list" in shape:
        return [_unflatten(item, arrays) for item in shape["list"]]
    return shape["value"]


def _to_numpy(array: mx.array) -> np.ndarray:
    raw = _RAW_BITS.get(array.dtype)
    return np.array(array.view(raw) if raw is not None else array)


def _from_numpy(data: np.ndarray, dtype: str) -> mx.array:
    array = mx.array(data)
    return array.view(_BY_NAME[dtype]) if dtype in _BY_NAME else array


class MLXCodec:
    """A model's MLX snapshots as safetensors tensors and back."""

    def __init__(self, model: Any) -> None:
        self.fingerprint = model_fingerprint(model)

    def encode(
        self, layer: int, snapshot: Snapshot
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        assert isinstance(snapshot, MLXSnapshot)
        arrays: list[mx.array] = []
        shape = _flatten(snapshot.arrays, arrays)
        tensors = {f"a{i}": _to_numpy(array) for i, array in enumerate(arrays)}
        meta = {"shape": json.dumps(shape), "dtypes": json.dumps([str(a.dtype) for a in arrays])}
        return tensors, meta

    def decode(self, layer: int, tensors: dict[str, np.ndarray], meta: dict[str, str]) -> Snapshot:
        dtypes = json.loads(meta["dtypes"])
        arrays = [_from_numpy(tensors[f"a{i}"], dtype) for i, dtype in enumerate(dtypes)]
        return MLXSnapshot(
            _unflatten(json.loads(meta["shape"]), arrays), int(meta["start"]), int(meta["end"])
        )
