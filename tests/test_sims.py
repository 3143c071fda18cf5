"""The discrete-event simulation (sims/): calibration loading, determinism, conservation of
tokens, the relations between modes that must hold, failover, and validation against a
bench made by the simulation itself. All scenarios are small: the whole file runs in
seconds."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sims.__main__ import main
from sims.calibration import Calibration, CalibrationError, Curve
from sims.network import MODES, Scenario, simulate
from sims.validation import fake_bench, validate

MODE_FIXTURE = {"streams": 1, "tokens": 128, "server_busy_s": 10.0, "wall_s": 20.0,
                "server_throughput_tps": 12.8, "throughput_tps": 6.4, "itl_ms_p50": 0.0,
                "itl_ms_p95": 400.0, "ttft_ms_p50": 900.0, "acceptance": 0.5,
                "mean_accepted_length": 2.0, "proactive_hit_rate": 0.2,
                "cost_per_1m_tokens_usd": 100.0}

BENCH_FIXTURE = {
    "machine": {"cpu": "test cpu", "cores": 4, "device": "cpu", "torch": "2.13.0"},
    "config": {"draft_model": "d", "target_model": "t", "dtype": "bfloat16", "tree": "chain:4",
               "max_new_tokens": 32, "prompts": 4, "server_cores": [0, 1], "node_cores": [2, 3]},
    "modes": {
        "autoregressive": {"1": {**MODE_FIXTURE, "acceptance": None}},
        "server_only": {"1": MODE_FIXTURE},
        "specedge": {"1": MODE_FIXTURE, "16": {**MODE_FIXTURE, "streams": 16}},
    },
    "ratios": {"specedge_vs_server_only": {"1": 2.0}, "specedge_vs_autoregressive": {"1": 2.5}},
    "calibration": {
        "draft_forward_ms": 50.0,
        "draft_tree_ms": 210.0,
        "server_draft_tree_ms": 180.0,
        "verify_ms": {"batch_tokens": [20, 5, 10], "ms": [400.0, 250.0, 300.0]},
        "ar_step_ms": {"batch": [1, 4], "ms": [200.0, 260.0]},
        "rtt_ms": 3.0,
        "accepted_length_hist": [10, 20, 30, 20, 20],
        "proactive_hit_rate": 0.1,
        "tree_tokens": 4,
        "prefill_ms_per_token": 5.0,
        "prices_usd_per_hour": {"server": 4.0, "edge": 0.5},
    },
}


def write(tmp_path, doc, name="bench.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


# -- calibration ------------------------------------------------------------------------

def test_loader_reads_every_field(tmp_path):
    cal = Calibration.from_bench_json(write(tmp_path, BENCH_FIXTURE))
    assert cal.draft_tree_ms == 210.0 and cal.server_draft_tree_ms == 180.0
    assert cal.verify.xs == (5.0, 10.0, 20.0)  # sorted
    assert cal.verify_ms(10) == 300.0 and cal.verify_ms(15) == 350.0
    assert cal.ar_step_ms(1) == 200.0 and cal.ar_step_ms(4) == 260.0
    assert cal.rtt_ms == 3.0 and cal.tree_tokens == 4 and cal.depth == 4
    assert cal.accepted_pmf() == [0.1, 0.2, 0.3, 0.2, 0.2]
    assert cal.mean_accepted() == pytest.approx(2.2)
    assert cal.proactive_hit_rate == 0.1 and cal.hit_given_full() == pytest.approx(0.5)
    assert (cal.price_server_usd_h, cal.price_edge_usd_h) == (4.0, 0.5)
    assert cal.max_new_tokens == 32 and cal.prompts == 4
    assert cal.prompt_tokens == 64 and any("prompt_tokens" in n for n in cal.notes)
    assert cal.draft_prefill_ms_per_token == pytest.approx(5.0 * 50.0 / 200.0)


def test_loader_defaults_optional_fields(tmp_path):
    doc = copy.deepcopy(BENCH_FIXTURE)
    for key in ("draft_forward_ms", "server_draft_tree_ms", "rtt_ms", "proactive_hit_rate",
                "tree_tokens", "prefill_ms_per_token", "prices_usd_per_hour"):
        del doc["calibration"][key]
    cal = Calibration.from_bench_json(write(tmp_path, doc))
    assert cal.server_draft_tree_ms == cal.draft_tree_ms
    assert cal.draft_forward_ms == pytest.approx(210.0 / 4)
    assert cal.proactive_hit_rate == 0.2  # from modes.specedge
    assert cal.tree_tokens == 4  # from config.tree
    assert cal.prefill_ms_per_token == pytest.approx(cal.verify.slope)
    assert (cal.price_server_usd_h, cal.price_edge_usd_h) == (5.05, 0.35)
    assert any("rtt_ms" in n for n in cal.notes)


@pytest.mark.parametrize("key", ["draft_tree_ms", "verify_ms", "ar_step_ms",
                                 "accepted_length_hist"])
def test_loader_names_a_missing_required_field(tmp_path, key):
    doc = copy.deepcopy(BENCH_FIXTURE)
    del doc["calibration"][key]
    with pytest.raises(CalibrationError, match=f"calibration.{key}"):
        Calibration.from_bench_json(write(tmp_path, doc))


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("calibration"), "'calibration'"),
    (lambda d: d["calibration"].update(verify_ms={"batch_tokens": [1, 2], "ms": [3.0]}),
     "equally many"),
    (lambda d: d["calibration"].update(ar_step_ms=[1, 2]), "ar_step_ms must be"),
    (lambda d: d["calibration"].update(accepted_length_hist=[0, 0]), "not all 0"),
    (lambda d: d["calibration"].update(accepted_length_hist=[1] * 7), "beyond the tree depth"),
    (lambda d: d["calibration"].update(rtt_ms="fast"), "rtt_ms must be a number"),
])
def test_loader_rejects_malformed(tmp_path, mutate, message):
    doc = copy.deepcopy(BENCH_FIXTURE)
    mutate(doc)
    with pytest.raises(CalibrationError, match=message):
        Calibration.from_bench_json(write(tmp_path, doc))


def test_loader_rejects_missing_and_non_json_files(tmp_path):
    with pytest.raises(CalibrationError, match="no such bench JSON"):
        Calibration.from_bench_json(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CalibrationError, match="not JSON"):
        Calibration.from_bench_json(bad)


def test_curve_interpolates_inside_and_extends_with_fitted_slope():
    c = Curve.from_samples([1, 2, 4], [10.0, 20.0, 20.0], "c")
    assert [c(1), c(2), c(3), c(4)] == [10.0, 20.0, 20.0, 20.0]
    assert c(0.5) == 10.0
    assert c(14) == pytest.approx(20.0 + c.slope * 10) and c.slope > 0


def test_acceptance_scale_keeps_a_distribution_and_moves_acceptance():
    cal = Calibration.default()
    assert cal.with_acceptance_scale(1.0) is cal
    lo, hi = cal.with_acceptance_scale(0.5), cal.with_acceptance_scale(1.3)
    for c in (lo, hi):
        assert sum(c.accepted_pmf()) == pytest.approx(1.0)
        assert c.hit_given_full() == pytest.approx(cal.hit_given_full())
    assert lo.acceptance() < cal.acceptance() < hi.acceptance()
    assert lo.proactive_hit_rate < cal.proactive_hit_rate < hi.proactive_hit_rate


# -- the model --------------------------------------------------------------------------

def test_same_seed_same_result_other_seed_other_result():
    sc = Scenario(mode="specedge", nodes=6, verifiers=2, requests_per_node=2,
                  rtt_ms=14, rtt_spread=0.5)
    a, b = simulate(sc).as_dict(), simulate(sc).as_dict()
    c = simulate(replace(sc, seed=1)).as_dict()
    for d in (a, b, c):
        d.pop("runtime_s")
    assert a == b
    assert a != c


@pytest.mark.parametrize("mode", MODES)
def test_every_token_counted_once(mode):
    sc = Scenario(mode=mode, nodes=5, verifiers=2, requests_per_node=3, max_new_tokens=40)
    r = simulate(sc)
    assert r.requests_done == 15
    assert r.per_request_tokens == [40] * 15
    assert r.tokens == r.tokens_total == 15 * 40


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(MODES), nodes=st.integers(1, 6), verifiers=st.integers(1, 3),
       requests=st.integers(1, 3), max_new=st.integers(1, 30),
       scale=st.sampled_from([0.3, 1.0, 1.5]), budget=st.sampled_from([8, 64, 4096]),
       chunk=st.sampled_from([4, 512]), proactive=st.booleans(),
       wait=st.sampled_from([0.0, 1.5, 4.0]),
       fail=st.sampled_from([0.0, 0.5]), fail_at=st.floats(0.0, 20.0),
       shared=st.booleans(), min_batch=st.sampled_from([0, 0, 2, 5]),
       seed=st.integers(0, 1000))
def test_conservation_holds_for_any_small_scenario(mode, nodes, verifiers, requests, max_new,
                                                   scale, budget, chunk, proactive, wait,
                                                   fail, fail_at, shared, min_batch, seed):
    """Every request gets exactly its tokens, whatever the batching, acceptance, proactive
    drafting or verifier deaths (SpecEdge) do along the way."""
    sc = Scenario(mode=mode, nodes=nodes, verifiers=verifiers, requests_per_node=requests,
                  max_new_tokens=max_new, acceptance_scale=scale, max_batch_tokens=budget,
                  prefill_chunk=chunk, proactive=proactive, batch_wait=wait, fail_fraction=fail,
                  fail_at_s=fail_at, shared_draft_core=shared, min_batch=min_batch, seed=seed,
                  prompt_tokens=16)
    r = simulate(sc)
    assert r.per_request_tokens == [max_new] * (nodes * requests)
    assert r.tokens_total == r.tokens == nodes * requests * max_new


@pytest.mark.parametrize("streams", [1, 4, 8])
def test_server_only_keeps_the_server_busier_than_specedge(streams):
    """Same workload, with the verifier gathering due sessions into shared passes (its
    default, close to the server-only baseline's lockstep): SpecEdge spends no server
    time drafting. With one stream there is nothing to gather, hold or not."""
    common = dict(nodes=streams, verifiers=1, requests_per_node=4, seed=3)
    so = simulate(Scenario(mode="server_only", **common))
    se = simulate(Scenario(mode="specedge", **common))
    assert so.tokens_total == se.tokens_total
    assert so.server_busy_s > 1.3 * se.server_busy_s
    assert se.server_throughput_tps > 1.3 * so.server_throughput_tps
    assert so.edge_draft_s == 0 and se.edge_draft_s > 0
    if streams == 1:
        greedy = simulate(Scenario(mode="specedge", batch_wait=0, **common))
        assert greedy.server_busy_s == pytest.approx(se.server_busy_s, rel=0.02)


def test_gathering_due_sessions_batches_bigger():
    """The verifier's hold (as `verifier.scheduler` does it) against none, edges on
    their own devices: passes twice as big, a quarter less server time."""
    common = dict(mode="specedge", nodes=8, verifiers=1, requests_per_node=4, seed=3)
    greedy = simulate(Scenario(batch_wait=0, **common))
    held = simulate(Scenario(**common))
    assert held.mean_batch_tokens > 1.5 * greedy.mean_batch_tokens
    assert held.server_busy_s < 0.8 * greedy.server_busy_s


def test_more_verifiers_more_throughput_until_nodes_are_the_bottleneck():
    """Without the hold, so that a verifier runs whenever anyone waits (with it, a lone
    verifier of 32 nodes settles into lockstep and idles between passes by design)."""
    def run(v):
        return simulate(Scenario(nodes=32, verifiers=v, requests_per_node=None,
                                 duration_s=120, warmup_s=30, batch_wait=0))

    runs = {v: run(v) for v in (1, 2, 4, 8, 32)}
    tps = {v: r.throughput_tps for v, r in runs.items()}
    assert tps[1] < tps[2] < tps[4] < tps[8] < tps[32]
    busy = {v: r.server_busy_s / (v * r.wall_s) for v, r in runs.items()}
    assert busy[1] > 0.95  # one verifier: it is the bottleneck
    assert busy[32] < 0.7  # one verifier per node: the nodes are
    # The node-bound ceiling: each node at most one round per draft + verify of its tree.
    cal = Calibration.default()
    ceiling = 32 * (cal.mean_accepted() + 1) / ((cal.draft_tree_ms + cal.verify_ms(5)) / 1000)
    assert tps[32] < 1.2 * ceiling
    more = simulate(Scenario(nodes=32, verifiers=64, requests_per_node=None,
                             duration_s=120, warmup_s=30, batch_wait=0))
    assert more.throughput_tps == pytest.approx(tps[32], rel=0.1)


def test_failover_loses_no_tokens():
    sc = Scenario(nodes=16, verifiers=4, requests_per_node=3, max_new_tokens=48,
                  fail_fraction=0.5, fail_at_s=20.0, detect_timeout_s=1.0)
    r = simulate(sc)
    assert r.failovers > 0
    assert r.per_request_tokens == [48] * 48
    assert r.tokens_total == 48 * 48
    clean = simulate(replace(sc, fail_fraction=0.0))
    assert clean.failovers == 0 and clean.wall_s < r.wall_s


def test_random_choice_is_a_parameter_and_balances_worse():
    # Near the verifiers' capacity, where an unlucky pile-up costs throughput.
    common = dict(nodes=60, verifiers=8, requests_per_node=None, duration_s=120, warmup_s=30)
    least = simulate(Scenario(choice="least_loaded", **common))
    rand = simulate(Scenario(choice="random", **common))
    assert least.throughput_tps > rand.throughput_tps


def test_scenario_rejects_nonsense():
    for bad in (Scenario(mode="gpu"), Scenario(choice="closest"), Scenario(nodes=0),
                Scenario(fail_fraction=1.0), Scenario(requests_per_node=None, duration_s=1,
                                                      warmup_s=2)):
        with pytest.raises(ValueError):
            simulate(bad)


# -- validation -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake():
    return fake_bench(seed=11, noise=0.03, prompts=64)


def test_validate_passes_on_a_bench_the_simulation_made(fake):
    rows = validate(fake, repeats=5, seed=0)
    assert len(rows) == 3 * 4 * 3  # modes x K x figures
    worst = max(rows, key=lambda r: r.error)
    assert worst.error < 0.15, worst


def test_validate_fails_when_the_bench_is_perturbed_by_30_percent():
    rows = validate(fake_bench(seed=11, noise=0.03, prompts=64, perturb=0.3), repeats=5)
    assert max(r.error for r in rows) > 0.15
    assert sum(r.error > 0.15 for r in rows if r.metric == "server_throughput_tps") >= 10


@pytest.mark.slow
def test_validate_cli_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.json"
    bad = tmp_path / "bad.json"
    assert main(["fake-bench", "--out", str(good), "--seed", "11"]) == 0
    assert main(["fake-bench", "--out", str(bad), "--seed", "11", "--perturb", "0.3"]) == 0
    assert main(["validate", "--bench", str(good)]) == 0
    out = capsys.readouterr().out
    assert "OK (0 of 36" in out and "specedge" in out
    assert main(["validate", "--bench", str(bad), "--json", str(tmp_path / "rows.json")]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "rows.json").read_text())) == 36
    doc = json.loads(good.read_text())
    del doc["calibration"]["verify_ms"]
    good.write_text(json.dumps(doc))
    assert main(["validate", "--bench", str(good)]) == 2
    assert "calibration.verify_ms" in capsys.readouterr().err


def test_validate_skips_streams_beyond_max_k(tmp_path):
    rows = validate(BENCH_FIXTURE, max_streams=8, repeats=1)
    assert {(r.mode, r.streams) for r in rows} == {("autoregressive", 1), ("server_only", 1),
                                                   ("specedge", 1)}
    assert all(math.isfinite(r.simulated) for r in rows)


# -- scale ------------------------------------------------------------------------------

def test_scale_cli_writes_json_table_and_pngs(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["scale", "--nodes", "8,16", "--verifiers", "2", "--duration", "60",
                 "--warmup", "20", "--out", str(out), "--jobs", "1"]) == 0
    doc = json.loads((out / "scale.json").read_text())
    assert {p["sweep"] for p in doc["points"]} == {"nodes", "rtt_ms", "acceptance", "failures",
                                                  "choice"}
    assert doc["headline"]["nodes"] == 16
    assert doc["settings"]["events_per_s_at_largest"] > 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["scale_acceptance.png", "scale_failures.png", "scale_nodes.png",
                    "scale_rtt_ms.png"]
    assert all((out / p).stat().st_size < 200_000 for p in pngs)
    assert "headline" in capsys.readouterr().out


REAL_BENCH = Path(__file__).resolve().parents[1] / "sims" / "bench_cpu_quick.json"


def test_validate_runs_on_the_real_cpu_bench():
    """The committed CPU bench: validate reports every figure it holds (whether or not
    each is within tolerance: that machine was loaded, see the README)."""
    doc = json.loads(REAL_BENCH.read_text())
    rows = validate(doc, repeats=2)
    want = {(mode, int(k), m) for mode, by_k in doc["modes"].items() for k in by_k
            for m in ("server_throughput_tps", "itl_ms_p50", "ttft_ms_p50")}
    assert {(r.mode, r.streams, r.metric) for r in rows} == want
    for r in rows:
        assert r.measured == doc["modes"][r.mode][str(r.streams)][r.metric]
        assert math.isfinite(r.simulated) and r.simulated > 0
        assert r.metric != "itl_ms_p50" or r.simulated > 50  # per request, never 0


def test_itl_is_per_request_as_the_bench_measures_it():
    r = simulate(Scenario(mode="server_only", nodes=2, requests_per_node=2, max_new_tokens=30))
    assert r.itl_ms_p50 > 0 and r.itl_ms_p50 <= r.itl_ms_p95
