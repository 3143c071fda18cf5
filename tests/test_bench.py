"""The benchmark's arithmetic, and (slow) a whole `specedge bench` run on the tiny pair
whose JSON the simulator must accept as calibration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.prompts import KINDS, prompt_set
from bench.run import (
    accepted_hist,
    agreement,
    cost_per_million,
    divergences,
    parse_cores,
    percentile,
    ratios,
    tie_gaps,
)
from specedge.ledger.accounting import Prices

REPO = Path(__file__).resolve().parents[1]


def test_prompt_set_covers_specbench_kinds():
    assert set(KINDS) == {"multi_turn", "translation", "summarisation", "qa", "maths",
                          "retrieval"}
    quick = prompt_set(quick=True)
    assert [k for k, _ in quick] == list(KINDS)
    full = prompt_set()
    assert len(full) == sum(len(v) for v in KINDS.values())
    assert all(m[-1]["role"] == "user" for _, m in full)
    assert any(len(m) > 1 for _, m in full)  # multi-turn present


def test_cores_and_percentiles():
    assert parse_cores("0") == [0] and parse_cores("0-2,5") == [0, 1, 2, 5]
    assert percentile([], 0.5) is None
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([1.0, 2.0, 3.0], 0.0) == 1.0 and percentile([1.0, 2.0, 3.0], 1.0) == 3.0


def test_cost_uses_the_ledger_prices():
    prices = Prices()
    # One server hour and ten edge hours for one million tokens.
    assert cost_per_million(3600, 36000, 10**6, prices) == pytest.approx(5.05 + 3.5)
    assert cost_per_million(3600, 0, 2 * 10**6, Prices(server_usd_per_hour=2.0)) == 1.0


def test_ratios_and_agreement():
    def row(tps, cost, itl, ids):
        return {"server_throughput_tps": tps, "cost_per_1m_tokens_usd": cost, "itl_ms_p50": itl,
                "token_ids": ids}

    modes = {
        "autoregressive": {"1": row(10.0, 8.0, 100.0, {"0": [1, 2], "1": [3]})},
        "server_only": {"1": row(20.0, 4.0, 50.0, {"0": [1, 2], "1": [3]})},
        "specedge": {"1": row(50.0, 2.0, 40.0, {"0": [1, 2], "1": [9]})},
    }
    r = ratios(modes)
    assert r["specedge_vs_server_only"] == {"1": 2.5}
    assert r["specedge_vs_autoregressive"] == {"1": 5.0}
    assert r["cost_efficiency_vs_server_only"] == {"1": 2.0}
    assert r["itl_reduction_vs_server_only"] == {"1": 0.2}
    assert agreement(modes) == {"server_only/K=1": "2/2", "specedge/K=1": "1/2"}
    assert divergences(modes) == {"specedge/K=1": [
        {"prompt": 1, "position": 0, "autoregressive": 3, "specedge": 9}]}
    modes["server_only"]["1"]["token_ids"]["0"] = [1, 2, 5]  # longer: differs at its end
    assert divergences(modes)["server_only/K=1"] == [
        {"prompt": 0, "position": 2, "autoregressive": None, "server_only": 5}]


def test_accepted_length_histogram_from_per_position_counters():
    # 10 rounds; 6 accepted >= 1 draft, 3 accepted >= 2, 1 accepted 3.
    m = {"specedge_spec_decode_num_drafts_total": 10.0,
         "specedge_spec_decode_num_accepted_tokens_per_pos_total|position=0": 6.0,
         "specedge_spec_decode_num_accepted_tokens_per_pos_total|position=1": 3.0,
         "specedge_spec_decode_num_accepted_tokens_per_pos_total|position=2": 1.0}
    assert accepted_hist(m) == [4, 3, 2, 1]


@pytest.mark.slow
def test_bench_runs_end_to_end_and_calibrates_the_simulator(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "-m", "specedge.cli", "bench", "--quick", "--target-model", "tiny-test",
         "--draft-model", "tiny-test-draft", "--dtype", "float32", "--max-new-tokens", "16",
         "--json", str(out), "--plot", str(tmp_path / "bench.png")],
        capture_output=True, text=True, timeout=900, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"autoregressive", "server_only", "assisted", "specedge"}
    for name, mode in report["modes"].items():
        assert set(mode) == ({"1"} if name == "assisted" else {"1", "4"})
    assert report["ratios"]["specedge_vs_assisted_k1"]["tokens_per_s"] > 0
    assert report["modes"]["specedge"]["1"]["round_ms"]["verify"] > 0
    assert report["ratios"]["specedge_vs_server_only"].keys() == {"1", "4"}
    # Float32 greedy: every mode answers every prompt exactly as autoregressive does.
    assert all(v.split("/")[0] == v.split("/")[1]
               for v in report["outputs_equal_to_autoregressive"].values())
    assert (tmp_path / "bench.png").stat().st_size > 1000

    from sims.calibration import Calibration

    cal = Calibration.from_bench_json(out)
    assert cal is not None


def test_tie_gaps_measure_the_float32_margin_at_a_divergence():
    """A mode that took the target's second choice: the gap is the fp32 logit margin."""
    import torch

    from specedge.models import build_tiny

    target = build_tiny()[0]
    prompt = [5, 17, 42, 99]
    with torch.no_grad():
        logits = target(torch.tensor([prompt])).logits[0, -1]
    first, second = (int(t) for t in logits.topk(2).indices)
    modes = {"autoregressive": {"1": {"token_ids": {"0": [first]}}},
             "specedge": {"1": {"token_ids": {"0": [second]}}}}
    found = divergences(modes)
    tie_gaps(found, modes, [prompt], target)
    gap = found["specedge/K=1"][0]["fp32_logit_gap"]
    assert gap == pytest.approx(float(logits[first] - logits[second]), abs=1e-4)
    assert gap > 0


def test_a_failed_run_is_reported_and_nothing_measured_is_lost(tmp_path):
    """A mode that fails at some K is recorded with its error, the bench goes on, and the
    JSON on disk holds every run finished so far after each one."""
    from bench.run import build_parser, measure

    out = tmp_path / "report.json"
    args = build_parser().parse_args(["--json", str(out)])
    report = {"machine": {}, "config": {}, "modes": {}}
    samples = {"verify_ms": {"batch_tokens": [], "ms": []},
               "ar_step_ms": {"batch": [], "ms": []}, "accepted_length_hist": []}
    ids = [[1, 2, 3]]
    row = {"mode": "autoregressive", "streams": 1, "tokens": 10, "server_busy_s": 1.0,
           "server_throughput_tps": 10.0, "cost_per_1m_tokens_usd": 2.0, "itl_ms_p50": 50.0,
           "token_ids": {"0": [4, 5]}}
    measure(report, "autoregressive", 1, lambda: dict(row), args, ids, samples)
    on_disk = json.loads(out.read_text())
    assert on_disk["modes"]["autoregressive"]["1"]["tokens"] == 10
    assert "token_ids" not in on_disk["modes"]["autoregressive"]["1"]  # figures only

    def boom() -> dict:
        raise RuntimeError("specedge K=4: 6 of 6 requests failed: 503")

    measure(report, "specedge", 4, boom, args, ids, samples)
    on_disk = json.loads(out.read_text())
    failed = on_disk["modes"]["specedge"]["4"]
    assert failed["failed"] is True and "6 of 6 requests failed" in failed["error"]
    assert on_disk["modes"]["autoregressive"]["1"]["tokens"] == 10  # still there
    assert on_disk["ratios"]["specedge_vs_autoregressive"] == {}  # no figures invented


def test_multi_turn_summary_compares_reuse_with_none():
    from bench.multiturn import summarise

    def turns(ttfts, busy, prefill):
        return [{"turn": i + 1, "ttft_ms_p50": t, "verifier_busy_s": b, "prefill_tokens": p}
                for i, (t, b, p) in enumerate(zip(ttfts, busy, prefill, strict=True))]

    configs = {
        "reuse": {"turns": turns([500, 120, 110, 100, 100], [2, 0.5, 0.5, 0.5, 0.5],
                                 [400, 40, 40, 40, 40]), "kv_bytes_per_session": 2**20},
        "no_reuse": {"turns": turns([500, 600, 700, 800, 900], [2, 2, 2, 2, 2],
                                    [400, 500, 600, 700, 800]),
                     "kv_bytes_per_session": 2**21},
    }
    s = summarise(configs)
    assert s["turn5_ttft_ratio"] == 9.0 and s["busy_ratio"] == 2.5
    assert s["prefill_tokens"] == {"reuse": 560, "no_reuse": 3000}
    assert s["sessions_per_gib"] == {"reuse": 1024.0, "no_reuse": 512.0}
