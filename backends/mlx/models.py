"""Models for the MLX backend: tiny seeded random-weight mlx-lm models, and local directories.

No weights are downloaded. ``tiny-attention`` (llama), ``tiny-swa`` (gemma3_text, sliding
window 8) and ``tiny-hybrid`` (qwen3_next: gated-delta linear attention + attention) are small
models built from mlx-lm's own model classes, as is ``tiny-mamba`` (nemotron_h: Mamba2 +
attention); the ``small-*`` ones are wider, for benchmarks. ``NAME@bfloat16`` (or
``@float16``) builds one in that precision, as hub checkpoints ship.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx

__all__ = [
    "save_model_directory",
    "TINY_DTYPES",
    "TINY_MODELS",
    "build_tiny_model",
    "tiny_model",
    "vocab_of",
]

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

# nemotron_h: Mamba2 and attention layers; in bf16 its chunked and one-shot prefills differ by
# about 0.008 in the logits (the SSD scan's rounding), the case the measured tolerance is for.
TINY_MODELS["tiny-mamba"] = (
    "nemotron_h",
    {
        "model_type": "nemotron_h",
        "vocab_size": _VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "max_position_embeddings": 4096,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "attention_bias": False,
        "mamba_num_heads": 4,
        "mamba_head_dim": 16,
        "mamba_proj_bias": False,
        "ssm_state_size": 16,
        "conv_kernel": 4,
        "n_groups": 1,
        "mlp_bias": False,
        "layer_norm_epsilon": 1e-5,
        "use_bias": False,
        "use_conv_bias": True,
        "hybrid_override_pattern": ["M", "*", "M", "-"],
        "head_dim": 16,
    },
)

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
# A cache as heavy as a long context's in a real model: 16 KiB a token (Llama 3 8B in bf16:
# 128 KiB) for a tiny model's compute, so copying a conversation's cache costs about a
# quarter of a hit's time to first token, and a hit that copies less shows it.
TINY_MODELS["wide-attention"] = (
    "llama",
    {
        **TINY_MODELS["tiny-attention"][1],
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "head_dim": 64,
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


TINY_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def tiny_model(name: str) -> tuple[str, str] | None:
    """``(model, dtype)`` for a tiny model's name (``tiny-hybrid``, ``tiny-mamba@bfloat16``),
    None for a name that is no tiny model's; a bad precision is a ValueError."""
    base, _, precision = name.partition("@")
    if base not in TINY_MODELS:
        return None
    if precision not in ("", *TINY_DTYPES):
        raise ValueError(f"{name}: choose a precision of {', '.join(TINY_DTYPES)}")
    return base, precision or "float32"


def build_tiny_model(name: str, seed: int = 0, dtype: str = "float32") -> Any:
    """A seeded random-weight mlx-lm model from the registry, in ``dtype`` (as hub
    checkpoints ship in bfloat16)."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")
    family, config = TINY_MODELS[name]
    module = importlib.import_module(f"mlx_lm.models.{family}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    model.set_dtype(TINY_DTYPES[dtype])
    mx.eval(model.parameters())
    return model


SPECIAL_TOKENS = ("<unk>", "<eos>", "<user>", "<assistant>", "<end>")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' <end> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)


def save_model_directory(
    name: str, path: Path | str, dtype: str = "float32", seed: int = 0
) -> Path:
    """Write a tiny model as a local model directory laid out like a hub download
    (``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``),
    with mlx-lm's own save utilities and an offline word-level tokenizer made with the
    ``tokenizers`` package: the path a user's ``mlx_lm.load(DIR)`` takes, with no download.
    The tokenizer's words are ``w5`` ... ``w{vocab-1}``, one id each, after five special
    tokens, and it carries a chat template."""
    from mlx_lm.utils import save_config, save_model
    from tokenizers import Tokenizer, models, pre_tokenizers

    family, config = TINY_MODELS[name]
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, build_tiny_model(name, seed, dtype))
    save_config({**config, "model_type": family, "torch_dtype": dtype}, out / "config.json")
    words = [*SPECIAL_TOKENS, *(f"w{i}" for i in range(len(SPECIAL_TOKENS), config["vocab_size"]))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(out / "tokenizer.json"))
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "eos_token": "<eos>",
        "additional_special_tokens": list(SPECIAL_TOKENS[2:]),
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    return out


def vocab_of(model: Any) -> int:
    args = getattr(model, "args", None)
    return int(getattr(args, "vocab_size", 0))
