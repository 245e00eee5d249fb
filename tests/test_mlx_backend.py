"""The MLX backend on real mlx-lm models: a restored cache gives the logits of a fresh prefill.

Every request runs with the full checks: the layer arrays after ``begin`` and the last logits
after prefill are compared with a fresh full prefill (tolerance ``LOGIT_TOLERANCE``, float32).
Prompts stay at tens of tokens: MLX on a CPU is slow.
"""

from __future__ import annotations

import numpy as np
import pytest
from mlx_lm.models.cache import KVCache

from kvtrie.backends.mlx import LOGIT_TOLERANCE, TINY_MODELS, MLXBackend
from kvtrie.backends.mlx.contract import MLXContract
from kvtrie.core import PrefixCache, check
from kvtrie.core.prefix_cache import POLICIES
from kvtrie.core.protocols import LayerKind
from kvtrie.sim.runner import CheckMode, RequestRunner

MODELS = sorted(TINY_MODELS)
S = list(range(3, 23))  # a 20-token shared prefix, longer than tiny-swa's window (8)


@pytest.fixture(scope="module", params=MODELS)
def backend(request):
    return MLXBackend.from_name(request.param)


class TestMLXLayerContract(MLXContract):
    """The shared layer contract on mlx-lm's own caches: one tiny model per layer kind."""


class MLXRig:
    def __init__(self, backend, budget=None, policy="kvtrie-seed"):
        self.backend = backend
        self.cache = PrefixCache(backend.new_layers(), budget_bytes=budget, policy=POLICIES[policy])
        self.runner = RequestRunner(backend, self.cache, CheckMode(full=True))

    def run(self, prompt, outputs=3, marks=()):
        result = self.runner.run(np.asarray(prompt), outputs, marks)
        assert result.violations == [], [str(v) for v in result.violations]
        assert check(self.cache) == []
        return result


def no_cache_outputs(backend, prompt, count):
    layers = backend.new_layers()
    return backend.generate(layers, backend.evaluate(layers, np.asarray(prompt)), count)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_multi_conversation_requests_match_a_fresh_prefill(backend, policy):
    rig = MLXRig(backend, policy=policy)
    a1 = rig.run(S + [40, 41, 42])
    a_history = S + [40, 41, 42] + [int(t) for t in a1.outputs]
    b1 = rig.run(S + [50, 51], marks=[20])  # diverges inside A's edge
    rig.run(S + [60, 61, 62, 63])  # shares the branch point
    a2 = rig.run(a_history + [70, 71])  # back to the first conversation
    assert a2.account.cached_tokens >= 20
    edited = rig.run(S + [40, 41, 99])  # an edit of A's first message
    assert edited.account.cached_tokens >= 20
    assert b1.account.cached_tokens == 0 or policy == "kvtrie-improved"
    for prompt in (S + [40, 41, 99], a_history + [70, 71]):
        again = rig.run(prompt, outputs=4)
        assert list(again.outputs) == list(no_cache_outputs(backend, prompt, 4))
    assert backend.max_logit_diff <= LOGIT_TOLERANCE


@pytest.mark.parametrize("budget", [None, 1 << 20])
def test_shared_buffers_match_a_fresh_prefill(backend, budget, monkeypatch):
    """mlx-lm's buffers grown 4 positions at a time instead of 256: every attention snapshot
    from position 0 of more than 28 positions shares the live buffer, so the switches, the
    restores handing buffers back, and the writes that copy a shared buffer first all face
    the oracle (unbounded: the snapshots stay; under a budget, page-ins move them)."""
    monkeypatch.setattr(KVCache, "step", 4)
    rig = MLXRig(backend, budget=budget, policy="kvtrie-improved")
    a = S + list(range(30, 42))
    a1 = rig.run(a)
    a_history = a + [int(t) for t in a1.outputs]
    rig.run(list(range(200, 240)))  # another conversation: leaving A shares its buffer
    a2 = rig.run(a_history + [70, 71])  # back: the buffer is handed back, then written
    assert a2.account.cached_tokens >= len(a)
    rig.run(a[:25] + [80, 81])  # a partial restore of A's shared snapshot, written over
    again = rig.run(a_history + [70, 71], outputs=4)
    assert again.account.cached_tokens >= 25
    assert list(again.outputs) == list(no_cache_outputs(backend, a_history + [70, 71], 4))
    shared = [
        snap
        for node in rig.cache.nodes()
        for snap in node.snapshots or []
        if snap is not None and snap.buffers
    ]
    assert shared or budget is not None or backend.model_name == "tiny-swa"


def test_a_shared_snapshot_never_changes_whatever_the_live_layer_writes():
    backend = MLXBackend.from_name("tiny-attention")
    layers = backend.new_layers()
    backend.evaluate(layers, np.arange(1, 251))  # 250 of a 256-position buffer
    kv = layers[0]
    expected = np.array(kv.cache.keys[..., :250, :])
    snap = kv.snapshot(0)
    assert snap.buffers and snap.nbytes == kv.cache.nbytes  # the whole buffer, counted
    for layer in layers:
        layer.restore(None, 200)
    backend.evaluate(layers, np.arange(300, 340))  # writes over 200..249 and grows the buffer
    assert np.array_equal(np.array(snap.arrays[0]), expected)
    assert kv.restore(snap, 250)  # handed back whole, then written: copied first
    backend.evaluate(layers, np.arange(400, 410))
    assert np.array_equal(np.array(kv.cache.keys[..., :250, :]), expected)
    assert np.array_equal(np.array(snap.arrays[0]), expected)
    for layer in layers:  # handed back in part, written over inside its range, in place
        layer.restore(snap if layer is kv else None, 200)
    backend.evaluate(layers, np.arange(500, 510))
    assert kv.restore(snap, 250)  # the buffer it hands back is still the snapshot's
    assert np.array_equal(np.array(kv.cache.keys[..., :250, :]), expected)


def test_tiny_budget_takes_no_snapshot_and_stays_exact(backend):
    rig = MLXRig(backend, budget=1)  # no snapshot fits: none is taken, all is recomputed
    for tail in ([1, 2], [3, 4, 5], [1, 2, 6], [7]):
        rig.run(S + tail)
    assert rig.cache.stats.snapshots_skipped > 0 and rig.cache.ledger.peak == 0


def test_failed_restore_recomputes(backend):
    rig = MLXRig(backend)
    rig.run(S + [1])
    rig.run(S + [2])
    rig.run([400, 401])  # leave, so coming back needs snapshots
    backend.faults.fail_next_restores(1)
    result = rig.run(S + [3])
    assert rig.cache.stats.restore_failures == 1 and result.account.cached_tokens == 0
    assert rig.run(S + [4]).account.cached_tokens == 20


def test_a_snapshot_of_a_buffer_a_rewind_left_far_larger_is_a_copy():
    backend = MLXBackend.from_name("tiny-attention")
    layers = backend.new_layers()
    backend.evaluate(layers, np.arange(1, 601))  # a 768-position buffer
    for layer in layers:
        assert layer.restore(None, 10) or layer.kind is not LayerKind.KV  # cut back to 10
    kv = layers[0]
    expected = np.array(kv.cache.keys[..., :10, :])
    snap = kv.snapshot(0)
    assert not snap.buffers
    assert snap.nbytes == expected.nbytes * 2  # keys and values of 10 positions, no more
    for layer in layers:
        layer.restore(None, 5)
    backend.evaluate(layers, np.arange(100, 110))  # writes over positions 5..9
    assert kv.restore(snap, 10)
    assert np.array_equal(np.array(kv.cache.keys[..., :10, :]), expected)


def test_a_short_snapshot_from_position_0_shares_its_buffer_within_one_growth_step():
    backend = MLXBackend.from_name("tiny-attention")
    layers = backend.new_layers()
    backend.evaluate(layers, np.arange(1, 11))  # 10 positions of a 256-position buffer
    kv = layers[0]
    snap = kv.snapshot(0)
    assert snap.buffers and snap.nbytes == kv.cache.nbytes  # held and counted whole
    assert snap.copied_nbytes == 0
    compact = kv.compact(snap)  # what a tight budget asks for: the 10 positions alone
    assert snap.is_closed and not compact.buffers
    assert compact.nbytes == compact.copied_nbytes == 2 * kv.cache.keys[..., :10, :].nbytes


def test_under_pressure_a_page_out_holds_its_data_not_the_buffer_it_shares():
    backend = MLXBackend.from_name("tiny-attention")
    layers = backend.new_layers()
    backend.evaluate(layers, np.asarray(S + [1]))
    shared = [layer.snapshot(0) for layer in layers]
    whole = sum(s.nbytes for s in shared)
    data = sum(layer.compact(s).nbytes for layer, s in zip(layers, shared))
    assert whole > 4 * data  # 21 positions of 256
    for budget, held in ((None, whole), (2 * data, data)):
        rig = MLXRig(backend, budget=budget)
        rig.run(S + [1], outputs=0)
        rig.run([400, 401])  # leaves it: its page-out shares the buffer or, tight, copies
        assert rig.cache.stats.snapshots_skipped == 0
        assert rig.cache.stats.page_out_bytes == (0 if budget is None else data)
        assert rig.cache.ledger.total >= held
        assert rig.run(S + [1, 2]).account.cached_tokens == len(S) + 1


def test_sliding_window_restored_past_its_edge():
    backend = MLXBackend.from_name("tiny-swa")
    rig = MLXRig(backend)
    rig.run(S + [1])
    rig.run(S + [2])
    kinds = {layer.kind for layer in rig.cache.layers}
    assert LayerKind.ROTATING in kinds
    assert rig.run(S + [3]).account.cached_tokens == 20  # 20 > window 8, restored exactly
    rotating = next(layer for layer in rig.cache.layers if layer.kind is LayerKind.ROTATING)
    assert not rotating.can_restore(None, rotating.offset - 1)


@pytest.mark.parametrize("name", ["tiny-attention", "tiny-hybrid"])
def test_drop_in_prompt_cache_for_mlx_lm_generation(name):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from kvtrie.backends.mlx import MLXPromptCache, build_tiny_model

    model = build_tiny_model(name)
    prompt_cache = MLXPromptCache(model, budget_bytes=None)
    for tail in ([1, 2, 3], [4, 5], [1, 2, 3, 9]):
        prompt = S + tail
        caches, rest = prompt_cache.fetch(prompt)
        out = [
            t for t, _ in generate_step(mx.array(rest), model, max_tokens=4, prompt_cache=caches)
        ]
        prompt_cache.store(out)
        fresh = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=4)]
        assert out == fresh
        assert check(prompt_cache.cache) == []
    assert prompt_cache.cache.stats.cached_tokens >= 20


@pytest.mark.parametrize(
    ("policy", "reused"), [("improved", 0), ("improved,+last-token-restore-point", 21)]
)
def test_regenerate_on_a_hybrid_model_reuses_all_but_one_token_with_the_restore_point(
    policy, reused
):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from kvtrie.backends.mlx import MLXPromptCache, build_tiny_model
    from kvtrie.core.policy import parse_policy

    model = build_tiny_model("tiny-hybrid")
    prompt_cache = MLXPromptCache(model, budget_bytes=None, policy=parse_policy(policy))
    prompt = S + [1, 2]  # 22 tokens
    fresh = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=3)]
    for _ in range(2):  # the same prompt twice: a regenerate
        caches, rest = prompt_cache.fetch(prompt)
        out = [
            t for t, _ in generate_step(mx.array(rest), model, max_tokens=3, prompt_cache=caches)
        ]
        prompt_cache.store(out)
        assert out == fresh
    assert prompt_cache.cache.stats.cached_tokens == reused


@pytest.mark.parametrize("name", ["tiny-attention", "tiny-swa", "tiny-hybrid"])
@pytest.mark.parametrize("wrong", [-1, +1])
def test_store_with_a_wrong_count_is_an_error_and_nothing_wrong_is_served(name, wrong):
    """store() one token short (say without the EOS) or long: on a hybrid model the recurrent
    layers would otherwise be left at the wrong offset and a later turn restored wrong."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from kvtrie.backends.mlx import MLXPromptCache, build_tiny_model

    model = build_tiny_model(name)
    prompt_cache = MLXPromptCache(model, budget_bytes=None)
    first = S + [1, 2, 3]
    caches, rest = prompt_cache.fetch(first)
    out = [t for t, _ in generate_step(mx.array(rest), model, max_tokens=4, prompt_cache=caches)]
    given = out[:-1] if wrong < 0 else out + [7]
    with pytest.raises(ValueError, match=rf"store\(\) was given {len(given)} generated tokens"):
        prompt_cache.store(given)
    assert check(prompt_cache.cache) == []
    nxt = first + out + [9, 10]
    caches, rest = prompt_cache.fetch(nxt)
    again = [t for t, _ in generate_step(mx.array(rest), model, max_tokens=4, prompt_cache=caches)]
    prompt_cache.store(again)
    assert again == [t for t, _ in generate_step(mx.array(nxt), model, max_tokens=4)]


def test_fetch_without_store_names_the_missing_call():
    from kvtrie.backends.mlx import MLXPromptCache, build_tiny_model

    prompt_cache = MLXPromptCache(build_tiny_model("tiny-hybrid"), budget_bytes=None)
    prompt_cache.fetch(S + [1])
    with pytest.raises(ValueError, match=r"fetch\(\) again without store\(\)"):
        prompt_cache.fetch(S + [2])
    caches, rest = prompt_cache.fetch(S + [2])  # the cache went on, from a clean state
    assert rest and rest == (S + [2])[-len(rest):] and check(prompt_cache.cache) == []


def test_bf16_models_get_a_measured_tolerance_that_still_catches_a_wrong_state():
    """Hub checkpoints ship in bf16, where a chunked and a one-shot prefill differ by rounding;
    the oracle's bound is measured from the model, and a state from another prefix is still far
    outside it."""
    backend = MLXBackend.from_name("tiny-mamba@bfloat16")
    tolerance = backend.tolerance
    assert tolerance.dtype == "bfloat16" and tolerance.logits > 10 * LOGIT_TOLERANCE
    assert "one-shot and a chunked prefill" in tolerance.basis
    rig = MLXRig(backend, policy="kvtrie-improved")
    for tail in ([1, 2, 3], [4, 5], [1, 2, 3, 9], [4, 5, 6]):
        rig.run(S + tail)  # every request checked against a fresh prefill: clean
    assert rig.cache.stats.cached_tokens > 0
    layers = backend.new_layers()
    backend.evaluate(layers, np.asarray([7] * 12 + S[12:], dtype=np.int32))  # another prefix
    why = backend.mismatch(layers, np.asarray(S, dtype=np.int32))
    assert why is not None and "bfloat16" in why
    assert MLXBackend.from_name("tiny-mamba").tolerance.logits == LOGIT_TOLERANCE  # float32


def test_the_report_says_which_tolerance_the_oracle_used(tmp_path):
    import json

    from kvtrie.sim.cli import main

    trace = tmp_path / "t.jsonl"
    assert main(["gen", "system-prompt", "--vocab-size", "512", "--set", "users=2",
                 "--set", "turns=2", "--set", "system_tokens=24", "--set", "question_tokens=4",
                 "--set", "output_tokens=2", "--out", str(trace)]) == 0
    report = tmp_path / "r.json"
    argv = ["replay", str(trace), "--backend", "mlx", "-q", "--report", str(report)]
    assert main([*argv, "--model", "tiny-mamba@bfloat16"]) == 0
    oracle = json.loads(report.read_text())["oracle"]
    assert oracle["dtype"] == "bfloat16" and oracle["logits"] > 10 * LOGIT_TOLERANCE
    assert main([*argv, "--model", "tiny-mamba"]) == 0
    assert json.loads(report.read_text())["oracle"]["basis"] == "float32: strict"


def test_the_drop_in_defaults_to_the_improved_policy():
    from kvtrie.backends.mlx import MLXPromptCache, build_tiny_model
    from kvtrie.core.policy import parse_policy

    model = build_tiny_model("tiny-attention")
    assert MLXPromptCache(model).cache.policy.name == "kvtrie-improved"
    chosen = MLXPromptCache(model, policy=parse_policy("seed"))
    assert chosen.cache.policy.name == "kvtrie-seed"
