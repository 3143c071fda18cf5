"""Engine choice by measurement, and the pieces that need no llama.cpp: the choice rule,
GGUF tensor names, weight-type names, and the torch engine's measured curve."""

from __future__ import annotations

import argparse

import pytest

from specedge import passcost


def test_choice_takes_the_fastest_by_its_rows_and_says_why():
    slow = passcost.Measured("torch/bfloat16", {1: 0.4, 5: 1.6, 16: 4.9})
    fast = passcost.Measured("llama.cpp/Q4_K_M", {1: 0.1, 5: 0.13, 16: 0.3})
    broken = passcost.Measured("llama.cpp", {}, error="not installed")
    best, why = passcost.choose([slow, broken, fast], passcost.VERIFIER_ROWS)
    assert best is fast
    assert why.startswith("chose llama.cpp/Q4_K_M, the fastest by the cost of 5+16-row")
    assert "llama.cpp: unavailable (not installed)" in why
    # A drafter scores 1-row passes only.
    decode_fast = passcost.Measured("torch/bfloat16", {1: 0.05})
    assert passcost.choose([fast, decode_fast], passcost.DRAFTER_ROWS)[0] is decode_fast
    with pytest.raises(RuntimeError, match="no engine could run here"):
        passcost.choose([broken], passcost.VERIFIER_ROWS)


def test_gguf_names_and_weight_types():
    from specedge.ggufs import gguf_name
    from specedge.llama import _weight_type
    from specedge.models import ModelError

    assert gguf_name("model.layers.3.self_attn.q_proj.bias") == "blk.3.attn_q.bias"
    assert gguf_name("model.layers.0.post_attention_layernorm.weight") == "blk.0.ffn_norm.weight"
    assert gguf_name("lm_head.weight") == "output.weight"
    with pytest.raises(ModelError):
        gguf_name("model.layers.0.self_attn.rotary.inv_freq")
    assert _weight_type("qwen2 1.5B Q4_K - Medium") == "Q4_K_M"
    assert _weight_type("qwen2 ?B all F32") == "F32"
    assert _weight_type("llama 7B Q8_0") == "Q8_0"


def test_one_engine_is_built_without_a_choice_and_probed_after():
    """Nothing to choose: no choice measurement at build; the verifier's cost probe
    (what it advertises) measures the engine it serves with."""
    from specedge.verifier import engines
    from specedge.verifier.costprobe import measure_pass_costs

    args = argparse.Namespace(
        engine="torch", dtype="float32", model="tiny-test", device="cpu", prefill_chunk=64,
        max_batch_tokens=256, kv_cache_gb=0.01, threads=1, verbose=0, model_id=None,
        no_prefix_cache=True, kv_host_gb=0.0, kv_disk_dir=None, kv_disk_gb=1.0)
    engine = engines.build(args)
    assert engine.name == "torch/float32" and engine.exact
    assert engine.vocab_size == 259
    assert not hasattr(engine, "pass_costs")
    costs = measure_pass_costs(engine, engine.vocab_size, 5)
    assert [r for r, _ in costs] == [1, 2, 4, 5] and all(us > 0 for _, us in costs)
