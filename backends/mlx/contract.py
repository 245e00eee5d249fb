"""The layer-cache contract on mlx-lm's own caches: one tiny model per layer kind."""

from __future__ import annotations

from typing import Any

import numpy as np

from kvtrie.core.protocols import LayerCache, LayerKind

from ..contract import LayerContract
from .adapters import state_arrays
from .backend import MLXBackend

__all__ = ["MLXContract"]

CONTRACT_MODELS = {
    LayerKind.KV: "tiny-attention",
    LayerKind.ROTATING: "tiny-swa",  # sliding window 8
    LayerKind.RECURRENT: "tiny-hybrid",
}


class MLXContract(LayerContract):
    """Each tiny model is built once per class and its faults reset for each test."""

    backends: dict[str, MLXBackend] = {}

    def layers_with(self, kind: LayerKind) -> tuple[Any, list[LayerCache], LayerCache]:
        name = CONTRACT_MODELS[kind]
        if name not in self.backends:
            self.backends[name] = MLXBackend.from_name(name)
        backend = self.backends[name]
        backend.faults = type(backend.faults)()
        layers = backend.new_layers()
        return backend, layers, next(layer for layer in layers if layer.kind is kind)

    def state(self, layer: Any) -> Any:
        return tuple(np.array(a) for a in state_arrays(layer))
