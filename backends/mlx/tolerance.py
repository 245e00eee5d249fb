"""How close a restored MLX state must be to a fresh prefill: strict in float32, and in lower
precision measured from the model itself.

A bf16 model does not give bit-equal results for one prompt evaluated in one call and in
chunks: the rounding of each matmul depends on the shapes it runs over. The oracle compares a
restored state (built chunk by chunk, across requests) with a fresh one-shot prefill, so the
bound it may demand is what the model itself shows between a chunked and a one-shot prefill of
the same tokens, with a margin. A wrong restore (another prefix's state, a stale recurrent
state) differs by the size of the activations themselves, orders of magnitude more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

__all__ = ["STRICT", "Tolerance", "float_dtypes", "measure_tolerance"]

STRICT = 1e-4  # float32: a restored state and a fresh prefill agree to rounding noise
MARGIN = 4.0  # times the model's own chunked-vs-one-shot difference
PROBE_TOKENS = 48  # the probe prompt: longer than the tiny models' sliding window (8)
PROBE_CHUNK = 5  # the chunked prefill's chunk size


@dataclass(frozen=True)
class Tolerance:
    """The oracle's bounds on |logit| and |state| differences, and why they are what they are."""

    logits: float
    state: float
    dtype: str
    basis: str

    def as_dict(self) -> dict[str, Any]:
        return {"logits": self.logits, "state": self.state, "dtype": self.dtype, "basis": self.basis}


def float_dtypes(model: Any) -> set[str]:
    """The floating-point dtypes of the model's parameters (quantized weights' scales too)."""
    return {
        str(value.dtype).removeprefix("mlx.core.")
        for _, value in tree_flatten(model.parameters())
        if mx.issubdtype(value.dtype, mx.floating)
    }


def measure_tolerance(backend: Any) -> Tolerance:
    """STRICT for a float32 model; otherwise MARGIN times the largest difference between a
    one-shot and a chunked prefill of a probe prompt (in the last logits, and in any layer's
    state), never below STRICT."""
    from .adapters import state_difference

    dtypes = float_dtypes(backend.model)
    if dtypes <= {"float32"}:
        return Tolerance(STRICT, STRICT, "float32", "float32: strict")
    rng = np.random.default_rng(0)
    probe = rng.integers(1, max(2, backend.vocab_size), size=PROBE_TOKENS).astype(np.int32)
    whole = backend.new_layers()
    whole_logits = backend.evaluate(whole, probe)
    chunked = backend.new_layers()
    for start in range(0, PROBE_TOKENS, PROBE_CHUNK):
        chunked_logits = backend.evaluate(chunked, probe[start : start + PROBE_CHUNK])
    logits = float(mx.abs(whole_logits - chunked_logits).max())
    state = max(state_difference(a, b) for a, b in zip(chunked, whole))
    dtype = ",".join(sorted(dtypes))
    basis = (
        f"{MARGIN:g} x this model's own difference between a one-shot and a chunked prefill of "
        f"{PROBE_TOKENS} tokens ({dtype}): logits {logits:.3g}, state {state:.3g}"
    )
    return Tolerance(max(STRICT, MARGIN * logits), max(STRICT, MARGIN * state), dtype, basis)
