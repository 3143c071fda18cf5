"""The GPU roofline (sims/roofline.py) and the SpecEdge paper's setting (sims/paper.py):
hand-checked arithmetic, the calibration it builds, and short simulated runs."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from sims import paper
from sims import roofline as rl
from sims.__main__ import main
from sims.calibration import Calibration
from sims.network import Scenario, simulate

# An engine with nothing but the roofline: full efficiency, no host work, no KV.
BARE = rl.Engine("bare", 1.0, 1.0, 0.0, 0.0, 0.0, None, False, "test")


def test_model_sizes_match_the_published_counts():
    assert rl.QWEN3_14B.params() / 1e9 == pytest.approx(14.8, abs=0.05)
    assert rl.QWEN3_1_7B.params() / 1e9 == pytest.approx(1.72, abs=0.01)
    # 2 (K, V) x layers x kv heads x head dim x 2 bytes
    assert rl.QWEN3_14B.kv_bytes_per_token() == 2 * 40 * 8 * 128 * 2 == 160 * 1024
    assert rl.QWEN3_1_7B.kv_bytes_per_token() == 2 * 28 * 8 * 128 * 2
    # The input embedding is a lookup: an untied model reads one vocab x hidden less.
    assert rl.QWEN3_14B.params() - rl.QWEN3_14B.matmul_params() == 151936 * 5120


def test_pass_cost_is_the_roofline_by_hand():
    dev, model = rl.A100_80GB_SXM, rl.QWEN3_14B
    # bf16 weights and one cached token's K/V at 2,039 GB/s
    weights_ms = (2 * model.matmul_params() + model.kv_bytes_per_token()) / 2039e9 * 1e3
    one = rl.pass_cost(dev, model, BARE, 1, context=1)
    assert one.memory_ms == pytest.approx(weights_ms)
    assert one.total_ms == pytest.approx(weights_ms) and one.bound == "memory"
    big = rl.pass_cost(dev, model, BARE, 4096, context=1)
    assert big.compute_ms == pytest.approx(2 * model.matmul_params() * 4096 / 312e12 * 1e3,
                                           rel=1e-3)  # + attention over one cached token
    assert big.bound == "compute"
    assert dev.ridge_rows(BARE) == pytest.approx(312e12 / 2039e9)  # FLOP/s over bytes/s


def test_flat_until_the_ridge_then_proportional():
    dev, model, eng = rl.A100_80GB_SXM, rl.QWEN3_14B, rl.PROJECT_GRAPH
    ridge = dev.ridge_rows(eng)
    assert 100 < ridge < 200
    cost = [rl.pass_ms(dev, model, eng, r, 1, 128) for r in (1, 33, 64, 4096, 8192)]
    assert cost[1] == pytest.approx(cost[0], rel=0.01)
    assert cost[2] == pytest.approx(cost[0], rel=0.01)
    assert cost[4] / cost[3] == pytest.approx(2.0, rel=0.01)


def test_eager_passes_are_launch_bound_and_kv_traffic_counts():
    dev, model = rl.A100_80GB_SXM, rl.QWEN3_14B
    eager = rl.pass_cost(dev, model, rl.REFERENCE_EAGER, 33)
    assert eager.bound == "launch"
    assert eager.launch_ms == pytest.approx(40 * 83 * rl.US_PER_EAGER_OP / 1e3)
    graph = rl.pass_cost(dev, model, rl.REFERENCE_GRAPH, 33)
    assert graph.bound == "memory" and graph.total_ms < eager.total_ms / 2
    # Static 2048-token cache, K/V copied out to 40 heads: read + write + read of 5x.
    per_seq = 2048 * model.kv_bytes_per_token() * (1 + 2 * 40 / 8)
    two = rl.pass_cost(dev, model, rl.REFERENCE_GRAPH, 66, seqs=2)
    assert two.memory_ms - graph.memory_ms == pytest.approx(
        per_seq / (2039e9 * rl.BW_EFF) * 1e3)


def test_gpu_calibration_has_the_cpu_structure():
    setting = paper.paper_setting()
    cal = rl.gpu_calibration(setting)
    assert isinstance(cal, Calibration)
    assert cal.tree_tokens == 32 and cal.depth == 4
    assert sum(cal.accepted_pmf()) == pytest.approx(1.0)
    assert cal.mean_accepted() == pytest.approx(sum(0.8 ** k for k in range(1, 5)))
    assert cal.draft_step_ms() == pytest.approx(setting.edge_step_ms())
    assert cal.hit_given_full() == pytest.approx(0.76)
    assert cal.verify_ms(33) == pytest.approx(setting.verify_ms(33))
    assert cal.baseline_pass_ms(33) > 2 * cal.pass_ms(33)  # eager server-only target
    assert cal.server_draft_ms(4) > cal.server_draft_ms(1)
    assert cal.ar_step_ms(8) == pytest.approx(cal.ar_step_ms(1), rel=0.05)
    assert cal.prefill_ms_per_token > 0 and cal.rtt_ms == 14.07
    same = rl.gpu_calibration(paper.paper_setting(baseline=rl.REFERENCE_GRAPH))
    assert same.baseline is None and same.baseline_pass_ms(33) == same.pass_ms(33)


def test_cpu_and_gpu_part_ways_in_pass_cost_by_rows():
    curves = paper.pass_curves(paper.default_cpu())
    cpu, a100 = list(curves.values())[0], curves["A100, Qwen3-14B, CUDA graph"]
    at = paper.PASS_ROWS.index(132)
    assert cpu[at] / cpu[0] > 4  # roughly proportional to rows
    assert a100[at] / a100[0] < 1.05  # flat below the compute roof
    assert a100[-1] / a100[0] > 4  # and proportional past it


def test_static_batching_waits_for_the_batch():
    """`min_batch` as the reference server batches: passes of two trees, never fewer
    while two sessions are open; every token still delivered."""
    sc = Scenario(mode="specedge", nodes=4, verifiers=1, requests_per_node=2, batch_wait=0,
                  max_batch_tokens=10, prompt_tokens=1, seed=2)
    free = simulate(sc)
    static = simulate(replace(sc, min_batch=2))
    assert static.per_request_tokens == free.per_request_tokens == [64] * 8
    assert static.mean_batch_tokens > free.mean_batch_tokens


def test_server_only_drafts_trees_in_depth_passes():
    cal = replace(Calibration.default(), tree_tokens=8, depth=4, server_draft_pass=10.0,
                  accepted_hist=(1.0, 1.0, 1.0, 1.0, 1.0))
    r = simulate(Scenario(mode="server_only", nodes=1, requests_per_node=1, prompt_tokens=1,
                          max_new_tokens=40, jitter=0.0), cal)
    rounds = r.tokens / (cal.mean_accepted() + 1)
    # Per round: depth draft passes and one verify pass (plus the start's prefill passes).
    assert r.mean_batch_tokens == pytest.approx((8 + 9) / 5, rel=0.25)
    assert r.tokens == 40 and rounds > 5


def test_paper_scenario_runs_and_keeps_its_shape():
    rows = paper.paper_rows(batches=(1,), duration_s=6.0, warmup_s=1.0, seeds=1, workers=1)
    head, same = rows[0], rows[1]
    assert head["label"].startswith("reference harness")
    assert head["server_throughput"] > 1.5  # the verifier does no drafting
    assert head["cost_efficiency"] < head["server_throughput"]  # edges cost something
    assert head["specedge_itl_ms"] < head["server_only_itl_ms"]
    # With the server-only target in CUDA graphs too, most of the advantage goes.
    assert same["server_throughput"] < head["server_throughput"] - 0.4
    assert [c[0] for c in paper.comparison(head)] == list(paper.PAPER)


def test_paper_cli_writes_the_table_json_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["paper", "--duration", "4", "--warmup", "1", "--seeds", "1", "--batches", "1",
                 "--scale-nodes", "2", "--cpu-duration", "60", "--gpu-duration", "3",
                 "--jobs", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "within 15%" in text and "server throughput vs server-only" in text
    doc = json.loads((out / "paper.json").read_text())
    assert doc["paper"] == paper.PAPER and math.isfinite(doc["headline"]["server_throughput"])
    assert {r["calibration"] for r in doc["scale"]} == {"cpu 1.5B", "gpu 1.5B", "gpu 14B"}
    assert sorted(p.name for p in out.glob("*.png")) == ["paper_pass_cost.png",
                                                       "paper_scale.png"]
