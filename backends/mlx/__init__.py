"""The MLX backend: the only package that imports ``mlx`` and ``mlx_lm``.

``adapters`` puts mlx-lm's caches behind the layer-cache contract, ``models`` builds tiny
seeded models or loads local directories, ``backend`` runs a model and its oracle, and
``prompt_cache`` is the drop-in prompt cache for mlx-lm generation.
"""

from __future__ import annotations

from .backend import LOGIT_TOLERANCE, MLXBackend
from .models import TINY_MODELS, build_tiny_model
from .prompt_cache import MLXPromptCache

__all__ = ["LOGIT_TOLERANCE", "TINY_MODELS", "MLXBackend", "MLXPromptCache", "build_tiny_model"]
