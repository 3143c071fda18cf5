"""The bench's tree sweep, server-only with trees, the assisted-generation mode and the
round-time breakdown, on the tiny pair (float32: every output equals the target's)."""

from __future__ import annotations

import argparse

import pytest

from bench.run import ratios, round_breakdown
from bench.serving import Totals, assisted, autoregressive, server_only_trees
from bench.trees import best_shape, sweep
from specedge.costs import CostCurve
from specedge.trees import TreeShape
from specedge.verifier.engine import TargetEngine


@pytest.mark.slow
def test_sweep_measures_each_shape_and_names_the_best():
    args = argparse.Namespace(target_model="tiny-test", draft_model="tiny-test-draft",
                              dtype="float32", device="cpu", quick=True, max_new_tokens=12,
                              shapes="chain:4 tree:8,4,2 dynamic:16", server_cores=[0],
                              prompts=None)
    import os

    cores = os.sched_getaffinity(0)
    try:
        report = sweep(args)
    finally:
        os.sched_setaffinity(0, cores)
    rows = {r["shape"]: r for r in report["shapes"]}
    assert set(rows) == {"chain:4", "tree:8,4,2", "dynamic:16"}
    for r in rows.values():
        assert r["outputs_equal_to_first"] == "3/3"
        assert r["verify_ms_per_round"] > 0 and r["draft_ms_per_round"] > 0
        assert 0 <= r["accepted_per_round"] <= r["tree_tokens_per_round"]
        cover = list(r["bet_coverage"].values())
        assert cover == sorted(cover) and 0 < cover[0] <= 1
    assert rows["chain:4"]["tree_tokens_per_round"] == 4.0
    assert rows["dynamic:16"]["tree_tokens_per_round"] <= 16
    assert report["best"] in rows and list(report["pass_cost_ms"]) == [1, 2, 4, 8, 16, 17]


def test_best_shape_trades_throughput_for_pace():
    rows = [{"shape": "a", "serial_ms_per_token": 10.0, "server_throughput_tps": 5.0},
            {"shape": "b", "serial_ms_per_token": 10.5, "server_throughput_tps": 8.0},
            {"shape": "c", "serial_ms_per_token": 20.0, "server_throughput_tps": 50.0}]
    assert best_shape(rows) == "b"  # c serves more but doubles the time per token


@pytest.mark.slow
def test_server_only_trees_and_assisted_equal_autoregressive(tiny_pair, tiny_prompts):
    draft, target, tok = tiny_pair
    stop = {tok.eos_token_id}
    prompts = [list(p) for p in tiny_prompts[:3]]
    ref: list = []
    autoregressive(TargetEngine(target), prompts, 2, 20, stop, ref, Totals())
    want = {r.index: r.tokens for r in ref}
    cost = CostCurve.of([(1, 0.01), (33, 0.02)])
    for shape in ("tree:8,4,2", "dynamic:16"):
        got: list = []
        totals = Totals()
        server_only_trees(TargetEngine(target), draft, prompts, 2, 20,
                          TreeShape.parse(shape), cost, stop, got, totals)
        assert {r.index: r.tokens for r in got} == want, shape
        assert totals.draft_busy_s > 0 and totals.accepted > 0
    got, totals = [], Totals()
    assisted(target, draft, prompts, 20, stop, got, totals)
    assert {r.index: r.tokens for r in got} == want
    assert all(len(r.token_times) == len(r.tokens) for r in got) and totals.busy_s > 0


def test_round_breakdown_and_the_assisted_ratio():
    results = [{"rounds": 10, "wall_s": 3.0, "round_time_s": {
        "draft_critical": 0.5, "draft_hidden": 0.8, "round_trip": 2.0, "verify": 1.5,
        "bet_wait": 0.2}},
        {"rounds": 0, "wall_s": 0.1, "round_time_s": None}]
    b = round_breakdown(results)
    assert b == {"rounds": 10, "draft_critical": 50.0, "draft_hidden": 80.0, "verify": 150.0,
                 "network_and_queue": 50.0, "bet_wait": 20.0, "other": 30.0, "round": 300.0}
    assert round_breakdown([]) is None
    modes = {"specedge": {"1": {"throughput_tps": 6.0, "itl_ms_p50": 80.0}},
             "assisted": {"1": {"throughput_tps": 3.0, "itl_ms_p50": 100.0}}}
    assert ratios(modes)["specedge_vs_assisted_k1"] == {"tokens_per_s": 2.0, "itl": 0.8}
