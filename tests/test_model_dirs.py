"""Local model directories laid out like hub downloads (config.json, model.safetensors,
tokenizer.json), written with mlx-lm's own save utilities and an offline tokenizer, then used
the way a user does: ``mlx_lm.load(DIR)``, ``kvtrie replay --backend mlx --model DIR`` and the
drop-in prompt cache in a chat. The quick pair runs by default; the rest with ``-m nightly``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvtrie.sim.cli import main
from kvtrie.sim.traces import write_trace

QUICK = [("tiny-attention", "float32"), ("tiny-hybrid", "bfloat16")]
NIGHTLY = [
    ("tiny-attention", "bfloat16"),
    ("tiny-swa", "float32"),
    ("tiny-swa", "bfloat16"),
    ("tiny-hybrid", "float32"),
    ("tiny-mamba", "float32"),
    ("tiny-mamba", "bfloat16"),
]
DIRS = [pytest.param(*d, id=f"{d[0]}@{d[1]}") for d in QUICK] + [
    pytest.param(*d, id=f"{d[0]}@{d[1]}", marks=pytest.mark.nightly) for d in NIGHTLY
]


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    from kvtrie.backends.mlx.models import save_model_directory

    made: dict[tuple[str, str], Path] = {}

    def get(name: str, dtype: str) -> Path:
        if (name, dtype) not in made:
            path = tmp_path_factory.mktemp("models") / f"{name}-{dtype}"
            made[(name, dtype)] = save_model_directory(name, path, dtype)
        return made[(name, dtype)]

    return get


@pytest.mark.parametrize(("name", "dtype"), DIRS)
def test_a_saved_directory_loads_as_the_model_it_was_made_from(directories, name, dtype):
    import mlx.core as mx
    from mlx_lm import load

    from kvtrie.backends.mlx import build_tiny_model

    path = directories(name, dtype)
    assert {p.name for p in path.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    model, tokenizer = load(str(path))
    prompt = mx.array([tokenizer.encode("w5 w6 w7 w8 w9")])
    loaded = model(prompt)
    built = build_tiny_model(name, 0, dtype)(prompt)
    assert loaded.dtype == built.dtype == getattr(mx, dtype)
    assert mx.array_equal(loaded, built).item()


@pytest.mark.parametrize(("name", "dtype"), DIRS)
def test_replay_on_a_model_directory_is_clean(directories, name, dtype, tmp_path):
    rng = np.random.default_rng(3)
    system = rng.integers(5, 512, 24).tolist()
    lines = []
    for c in range(3):  # three conversations of two turns behind one system prompt
        first = f"c{c}t0"
        lines.append(
            {"id": first, "prompt": system + rng.integers(5, 512, 4).tolist(), "output_length": 3}
        )
        lines.append(
            {
                "id": f"c{c}t1",
                "prefix_of": first,
                "prefix_length": 31,
                "prompt": [7, 8],
                "output_length": 3,
            }
        )
    trace = tmp_path / "chat.jsonl"
    write_trace(trace, {}, lines)
    report = tmp_path / "report.json"
    path = str(directories(name, dtype))
    code = main(
        [
            "replay",
            str(trace),
            "--backend",
            "mlx",
            "--model",
            path,
            "--budget",
            "inf",
            "-q",
            "--report",
            str(report),
        ]  # fmt: skip
    )
    result = json.loads(report.read_text())
    assert code == 0, result["violations"]
    assert result["model"] == path and result["cached_tokens"] > 0
    # the oracle says which bound it used: strict for float32, measured for bfloat16
    assert ("strict" in result["oracle"]["basis"]) == (dtype == "float32")


@pytest.mark.parametrize(("name", "dtype"), DIRS)
def test_the_drop_in_serves_a_chat_exactly(directories, name, dtype):
    """Three users, two turns each, one system message: with the chat template of the
    directory's tokenizer, greedy outputs equal those of no cache."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from kvtrie.backends.mlx import MLXPromptCache

    model, tokenizer = load(str(directories(name, dtype)))
    prompt_cache = MLXPromptCache(model, budget_bytes=None)
    system = {"role": "system", "content": " ".join(f"w{i}" for i in range(20, 44))}
    for user in range(3):
        messages = [system]
        for turn in range(2):
            messages.append({"role": "user", "content": f"w{100 + user} w{200 + turn}"})
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            caches, rest = prompt_cache.fetch(prompt)
            out = [
                t
                for t, _ in generate_step(mx.array(rest), model, max_tokens=3, prompt_cache=caches)
            ]
            prompt_cache.store(out)
            fresh = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=3)]
            assert out == fresh
            messages.append({"role": "assistant", "content": tokenizer.decode(out)})
    assert prompt_cache.cache.stats.cached_tokens > 0
