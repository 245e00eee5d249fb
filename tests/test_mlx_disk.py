"""The disk tier on real MLX models: snapshots written as safetensors files come back bit for
bit, and a new process on the same directory serves each conversation's next turn computing
only its new tokens, with the greedy outputs of no cache."""

from __future__ import annotations

import numpy as np
import pytest

from kvtrie.core import check
from kvtrie.core.store import StoreError

S = list(range(3, 23))  # a 20-token shared prefix, longer than tiny-swa's window (8)


def generate(model, prompt_cache, prompt, count=3):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    caches, rest = prompt_cache.fetch(prompt)
    out = [
        t for t, _ in generate_step(mx.array(rest), model, max_tokens=count, prompt_cache=caches)
    ]
    prompt_cache.store(out)
    return out


def fresh(model, prompt, count=3):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=count)]


@pytest.mark.parametrize(
    "name", ["tiny-attention", "tiny-swa", "tiny-hybrid", "tiny-attention@bfloat16"]
)
def test_a_restart_serves_each_next_turn_computing_only_its_new_tokens(name, tmp_path):
    from kvtrie.backends.mlx import MLXPromptCache, build_tiny_model
    from kvtrie.backends.mlx.models import tiny_model

    base, dtype = tiny_model(name)
    model = build_tiny_model(base, 0, dtype)
    first = MLXPromptCache(model, budget_bytes=0, disk_dir=tmp_path)  # every page-out to disk
    histories = {}
    for user in (1, 2, 3):
        prompt = S + [30 + user, 40 + user]
        out = generate(model, first, prompt)
        assert out == fresh(model, prompt)
        histories[user] = prompt + out
    first.close()

    again = build_tiny_model(base, 0, dtype)  # the same checkpoint, loaded anew
    second = MLXPromptCache(again, budget_bytes=0, disk_dir=tmp_path)
    assert second.cache.store.report.adopted_nodes >= 3
    for user in (3, 1, 2):
        prompt = histories[user] + [50, 51]
        computed = second.cache.stats.computed_tokens
        out = generate(again, second, prompt)
        assert second.cache.stats.computed_tokens - computed == 2  # the two new tokens
        assert out == fresh(again, prompt)
        assert check(second.cache) == []
    assert second.cache.stats.disk_page_ins >= 3
    second.close()


def test_another_checkpoint_of_the_same_architecture_is_refused(tmp_path):
    from kvtrie.backends.mlx import MLXPromptCache, build_tiny_model

    model = build_tiny_model("tiny-attention", seed=0)
    first = MLXPromptCache(model, budget_bytes=0, disk_dir=tmp_path)
    generate(model, first, S + [1])
    first.close()
    with pytest.raises(StoreError, match="holds states of another model"):
        MLXPromptCache(build_tiny_model("tiny-attention", seed=1), disk_dir=tmp_path)


def test_stored_snapshots_come_back_bit_for_bit(tmp_path):
    """Through the files, for every layer kind and bfloat16: a sliding window's values are a
    strided view, which a tensor file must not scramble."""
    import mlx.core as mx

    from kvtrie.backends.mlx import MLXBackend, build_tiny_model
    from kvtrie.backends.mlx.models import tiny_model
    from kvtrie.core.store import DirectoryStore

    for name in ("tiny-swa", "tiny-hybrid", "tiny-attention@bfloat16"):
        base, dtype = tiny_model(name)
        backend = MLXBackend(build_tiny_model(base, 0, dtype), name, 100)
        layers = backend.new_layers()
        backend.evaluate(layers, np.asarray(S, dtype=np.int32))
        store = DirectoryStore(tmp_path / name, backend.snapshot_codec(), background=False)
        for index, layer in enumerate(layers):
            snapshot = layer.snapshot(0)
            stored = store.put(index, layer.snapshot(0))  # put takes (and closes) its copy
            with stored.opened() as back:
                # a file holds the range alone, where a snapshot from position 0 of an
                # attention layer shares the live buffer in RAM and counts all of it
                range_bytes = sum(
                    a.nbytes for a in _leaves(snapshot.arrays) if hasattr(a, "nbytes")
                )
                assert (back.start, back.end, back.nbytes) == (
                    snapshot.start,
                    snapshot.end,
                    range_bytes,
                )
                assert snapshot.nbytes >= range_bytes
                for a, b in zip(_leaves(snapshot.arrays), _leaves(back.arrays)):
                    if isinstance(a, mx.array):
                        assert a.dtype == b.dtype and mx.array_equal(a, b).item()
                    else:
                        assert a == b
        store.close()


def _leaves(value):
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]
