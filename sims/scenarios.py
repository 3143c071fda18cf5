"""The scale study: up to 10,000 edge nodes on 100 verifiers, swept one factor at a time
around a base point (10,000 nodes, 100 verifiers, the paper's 14 ms mean round trip,
the calibrated acceptance, no failures, least-loaded choice, greedy batching). The RTT
sweep also runs at the smallest node count, where the nodes, not the verifiers, are the
bottleneck and every millisecond of round trip shows.

Each point is a fixed stretch of simulated time measured after a warm-up (nodes start at
random times over the warm-up, so the start-up prefill burst is over before measuring).
Points are independent, so they run in parallel processes.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any

from sims.calibration import Calibration
from sims.network import MODES, Scenario, simulate

NODES = (100, 300, 1000, 3000, 10_000)
RTTS_MS = (1.0, 14.0, 50.0, 100.0)
ACCEPTANCE_SCALES = (0.6, 0.8, 1.0, 1.2, 1.4)
FAIL_FRACTIONS = (0.0, 0.01, 0.1)
CHOICES = ("least_loaded", "random")


@dataclass(frozen=True)
class Point:
    """One scenario placed on a sweep: `x` on the sweep's axis, `series` its line."""

    sweep: str
    x: float
    series: str
    scenario: Scenario


def base_scenario(duration_s: float, warmup_s: float, nodes: int = 10_000,
                  verifiers: int = 100, seed: int = 7) -> Scenario:
    return Scenario(
        mode="specedge", nodes=nodes, verifiers=verifiers, requests_per_node=None,
        duration_s=duration_s, warmup_s=warmup_s, rtt_ms=14.0, rtt_spread=0.5,
        net_jitter=0.1, start_spread_s=warmup_s, user_rtt=True, seed=seed,
        fail_at_s=warmup_s + (duration_s - warmup_s) / 2,
    )


def scale_points(duration_s: float, warmup_s: float, nodes: tuple[int, ...] = NODES,
                 verifiers: int = 100) -> list[Point]:
    """Every point of every sweep. The base point appears in several sweeps; it runs once."""
    base = base_scenario(duration_s, warmup_s, max(nodes), verifiers)
    pts: list[Point] = []
    for n in nodes:
        for mode in MODES:
            pts.append(Point("nodes", n, mode, replace(base, mode=mode, nodes=n)))
    for rtt in RTTS_MS:  # where the verifiers are the bottleneck, and where the nodes are
        for n in sorted({max(nodes), min(nodes)}, reverse=True):
            pts.append(Point("rtt_ms", rtt, f"specedge, {n} nodes",
                             replace(base, rtt_ms=rtt, nodes=n)))
    for scale in ACCEPTANCE_SCALES:
        for mode in ("specedge", "server_only"):
            pts.append(Point("acceptance", scale, mode,
                             replace(base, mode=mode, acceptance_scale=scale)))
    for frac in FAIL_FRACTIONS:
        pts.append(Point("failures", frac, "specedge", replace(base, fail_fraction=frac)))
    for i, choice in enumerate(CHOICES):
        pts.append(Point("choice", i, choice, replace(base, choice=choice)))
    return pts


def _run(args: tuple[Scenario, Calibration]) -> dict[str, Any]:
    scenario, cal = args
    return simulate(scenario, cal).as_dict()


def run_points(points: list[Point], cal: Calibration, jobs: int | None = None,
               progress: bool = True) -> list[dict[str, Any]]:
    """Simulate each distinct scenario once (in `jobs` processes), one row per point."""
    unique = list(dict.fromkeys(p.scenario for p in points))
    # Biggest first, so the pool is not left waiting on one long run at the end.
    unique.sort(key=lambda s: -s.nodes)
    jobs = jobs or os.cpu_count() or 1
    results: dict[Scenario, dict[str, Any]] = {}
    t0 = time.perf_counter()
    if jobs == 1:
        for i, s in enumerate(unique):
            results[s] = _run((s, cal))
            if progress:
                _report(i + 1, len(unique), s, results[s], t0)
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for i, (s, res) in enumerate(zip(unique, pool.map(_run, [(s, cal) for s in unique]),
                                             strict=True)):
                results[s] = res
                if progress:
                    _report(i + 1, len(unique), s, res, t0)
    rows = []
    for p in points:
        row = {"sweep": p.sweep, "x": p.x, "series": p.series}
        row.update(results[p.scenario])
        row["scenario"] = {k: v for k, v in asdict(p.scenario).items()}
        rows.append(row)
    return rows


def _report(i: int, n: int, s: Scenario, res: dict[str, Any], t0: float) -> None:
    rate = res["events"] / res["runtime_s"] if res["runtime_s"] else 0.0
    print(f"  [{i:>2}/{n}] {s.mode:<14} nodes={s.nodes:<6} rtt={s.rtt_ms or 0:<5g} "
          f"acc_scale={s.acceptance_scale:<4g} fail={s.fail_fraction:<5g} {s.choice:<12} "
          f"wait={s.batch_wait:<4g} "
          f"{res['runtime_s']:6.1f} s, {rate / 1000:5.0f}k events/s "
          f"(elapsed {time.perf_counter() - t0:5.0f} s)", flush=True)


def headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The biggest point of the nodes sweep: SpecEdge against both baselines."""
    top = max(r["x"] for r in rows if r["sweep"] == "nodes")
    at = {r["series"]: r for r in rows if r["sweep"] == "nodes" and r["x"] == top}
    se, so, ar = at["specedge"], at["server_only"], at["autoregressive"]

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 3) if b else None

    return {
        "nodes": top,
        "verifiers": se["verifiers"],
        "specedge": {k: se[k] for k in ("server_throughput_tps", "throughput_tps", "itl_ms_p50",
                                        "itl_ms_mean", "itl_ms_p95", "ttft_ms_p50",
                                        "cost_per_1m_tokens_usd")},
        "server_throughput_vs_server_only": ratio(se["server_throughput_tps"],
                                                  so["server_throughput_tps"]),
        "server_throughput_vs_autoregressive": ratio(se["server_throughput_tps"],
                                                     ar["server_throughput_tps"]),
        "cost_efficiency_vs_server_only": ratio(so["cost_per_1m_tokens_usd"],
                                                se["cost_per_1m_tokens_usd"]),
        # ITL as the bench defines it: per request (last - first) / (tokens - 1).
        "itl_p50_change_vs_server_only": round(se["itl_ms_p50"] / so["itl_ms_p50"] - 1, 4),
        "itl_mean_change_vs_server_only": round(se["itl_ms_mean"] / so["itl_ms_mean"] - 1, 4),
    }


def table(rows: list[dict[str, Any]]) -> str:
    cols = [("sweep", 11, "s"), ("x", 8, "g"), ("series", 21, "s"), ("nodes", 6, "d"),
            ("tokens", 9, "d"), ("server_throughput_tps", 10, ".1f"),
            ("throughput_tps", 10, ".1f"), ("itl_ms_p50", 9, ".0f"), ("itl_ms_p95", 9, ".0f"),
            ("ttft_ms_p50", 9, ".0f"), ("cost_per_1m_tokens_usd", 9, ".2f"),
            ("acceptance", 6, ".3f"), ("failovers", 6, "d")]
    names = {"server_throughput_tps": "srv tok/s", "throughput_tps": "tok/s",
             "itl_ms_p50": "ITL p50", "itl_ms_p95": "ITL p95", "ttft_ms_p50": "TTFT p50",
             "cost_per_1m_tokens_usd": "$/1M", "acceptance": "acc", "failovers": "fover"}
    head = " ".join(f"{names.get(c, c):>{w}}" for c, w, _ in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for c, w, f in cols:
            v = r.get(c)
            cells.append(f"{'-':>{w}}" if v is None else f"{v:>{w}{f}}")
        lines.append(" ".join(cells))
    return "\n".join(lines)
