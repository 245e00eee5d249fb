"""Backends: the same layer-cache contract over a deterministic fake and over real MLX models."""
