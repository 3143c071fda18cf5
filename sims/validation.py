"""Simulated against measured: the three modes at each stream count K the bench ran.

The simulation earns its scale results only if, calibrated from a bench, it reproduces
that same bench's end-to-end figures. `fake_bench` writes a bench-shaped JSON from the
simulation itself (plus noise), so the comparison can be tested before a real bench exists.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sims.calibration import Calibration, CalibrationError
from sims.network import MODES, Result, Scenario, server_draft_pass_ms, simulate

METRICS = ("server_throughput_tps", "itl_ms_p50", "ttft_ms_p50")
# Below these, a relative error means nothing (an ITL p50 of 0 ms happens: most tokens of
# a speculative round arrive together with the round's first).
FLOORS = {"server_throughput_tps": 1e-6, "itl_ms_p50": 1.0, "ttft_ms_p50": 1.0}


@dataclass
class Row:
    mode: str
    streams: int
    metric: str
    measured: float
    simulated: float

    @property
    def error(self) -> float:
        floor = FLOORS[self.metric]
        diff = abs(self.simulated - self.measured)
        return 0.0 if diff <= floor else diff / max(abs(self.measured), floor)


def bench_scenario(mode: str, streams: int, cal: Calibration, tokens: int | None = None,
                   seed: int = 0) -> Scenario:
    """The bench's workload as a scenario: `cal.prompts` requests (at least one per
    stream) taken from one queue by `streams` concurrent streams on one server (the
    bench's K clients, whose nodes all draft on the one node core), each request
    generating `tokens / requests` tokens when the bench says how many it generated
    (so early end-of-sequence is matched), else `max_new_tokens`."""
    requests = max(streams, cal.prompts)
    per_request = cal.max_new_tokens
    if tokens:
        per_request = max(1, round(tokens / requests))
    return Scenario(mode=mode, nodes=streams, verifiers=1,
                    requests_per_node=math.ceil(requests / streams), requests_total=requests,
                    max_new_tokens=per_request, shared_draft_core=True, seed=seed)


def simulate_bench(mode: str, streams: int, cal: Calibration, tokens: int | None = None,
                   repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """The three compared figures, averaged over `repeats` seeds."""
    runs = [simulate(bench_scenario(mode, streams, cal, tokens, seed + i), cal)
            for i in range(repeats)]
    return {m: sum(getattr(r, m) for r in runs) / len(runs) for m in METRICS}


def measured_modes(doc: dict[str, Any], source: str = "bench") -> dict[str, dict[int, dict]]:
    """modes -> {K: MODE} for the modes the simulation knows, with K as an int."""
    modes = doc.get("modes")
    if not isinstance(modes, dict) or not modes:
        raise CalibrationError(f"{source}: missing required object 'modes'")
    out: dict[str, dict[int, dict]] = {}
    for mode in MODES:
        rows = modes.get(mode)
        if not isinstance(rows, dict):
            continue
        for k, row in rows.items():
            try:
                streams = int(k)
            except ValueError:
                raise CalibrationError(f"{source}: modes.{mode} key {k!r} is not a K") from None
            missing = [m for m in METRICS if not isinstance(row, dict) or row.get(m) is None]
            if missing:
                raise CalibrationError(f"{source}: modes.{mode}.{k} lacks {', '.join(missing)}")
            out.setdefault(mode, {})[streams] = row
    if not out:
        raise CalibrationError(f"{source}: modes has none of {', '.join(MODES)}")
    return out


def validate(doc: dict[str, Any], max_streams: int = 8, repeats: int = 3, seed: int = 0,
             source: str = "bench") -> list[Row]:
    """Simulate every (mode, K <= max_streams) the bench measured, calibrated from it."""
    cal = Calibration.from_bench(doc, source=source)
    rows: list[Row] = []
    for mode, by_k in measured_modes(doc, source).items():
        for k in sorted(by_k):
            if k > max_streams:
                continue
            meas = by_k[k]
            sim = simulate_bench(mode, k, cal, meas.get("tokens"), repeats, seed)
            rows += [Row(mode, k, m, float(meas[m]), sim[m]) for m in METRICS]
    return rows


def table(rows: list[Row], tolerance: float) -> str:
    """One line per (mode, K): measured, simulated and relative error of each figure."""
    head = f"{'mode':<15}{'K':>3}"
    for m in METRICS:
        head += f" | {m:>21} {'sim':>9} {'err':>6}"
    lines = [head, "-" * len(head)]
    keys: list[tuple[str, int]] = []
    for r in rows:
        if (r.mode, r.streams) not in keys:
            keys.append((r.mode, r.streams))
    for mode, k in keys:
        line = f"{mode:<15}{k:>3}"
        for m in METRICS:
            r = next(x for x in rows if (x.mode, x.streams, x.metric) == (mode, k, m))
            flag = "!" if r.error > tolerance else " "
            line += f" | {r.measured:>21.2f} {r.simulated:>9.2f} {r.error:>5.1%}{flag}"
        lines.append(line)
    worst = max(rows, key=lambda r: r.error)
    lines.append(f"worst: {worst.mode} K={worst.streams} {worst.metric} {worst.error:.1%} "
                 f"(tolerance {tolerance:.0%}; '!' marks figures beyond it)")
    return "\n".join(lines)


# -- a bench made by the simulation itself ----------------------------------------------

def calibration_json(cal: Calibration) -> dict[str, Any]:
    """The bench JSON's `calibration` object for `cal` (what `from_bench` reads back)."""
    counts = [round(p * 10000) for p in cal.accepted_pmf()]
    out: dict[str, Any] = {
        "draft_forward_ms": cal.draft_forward_ms,
        "draft_tree_ms": cal.draft_tree_ms,
        "server_draft_tree_ms": cal.server_draft_tree_ms,
        "verify_ms": {"batch_tokens": list(cal.verify.xs), "ms": list(cal.verify.ys)},
        "ar_step_ms": {"batch": list(cal.ar_step.xs), "ms": list(cal.ar_step.ys)},
        "rtt_ms": cal.rtt_ms,
        "accepted_length_hist": counts,
        "proactive_hit_rate": cal.proactive_hit_rate,
        "tree_tokens": cal.tree_tokens,
        "prefill_ms_per_token": cal.prefill_ms_per_token,
        "draft_prefill_ms_per_token": cal.draft_prefill_ms_per_token,
        "prompt_tokens": cal.prompt_tokens,
        "prices_usd_per_hour": {"server": cal.price_server_usd_h, "edge": cal.price_edge_usd_h},
    }
    if cal.server_draft_pass is not None:
        out["server_draft_pass_ms"] = cal.server_draft_pass
    if cal.server_draft is not None:
        out["server_draft_tree_ms_batch"] = {"batch": list(cal.server_draft.xs),
                                             "ms": list(cal.server_draft.ys)}
    return out


def mode_json(r: Result, streams: int) -> dict[str, Any]:
    """A bench MODE object from a simulated run."""
    return {
        "streams": streams, "tokens": r.tokens, "server_busy_s": round(r.server_busy_s, 4),
        "wall_s": round(r.wall_s, 4),
        "server_throughput_tps": r.server_throughput_tps, "throughput_tps": r.throughput_tps,
        "itl_ms_p50": r.itl_ms_p50, "itl_ms_p95": r.itl_ms_p95, "ttft_ms_p50": r.ttft_ms_p50,
        "acceptance": r.acceptance, "mean_accepted_length": r.mean_accepted_length,
        "proactive_hit_rate": r.proactive_hit_rate,
        "cost_per_1m_tokens_usd": r.cost_per_1m_tokens_usd,
    }


def fake_bench(cal: Calibration | None = None, streams: tuple[int, ...] = (1, 2, 4, 8),
               noise: float = 0.03, perturb: float = 0.0, seed: int = 1234,
               prompts: int = 32, repeats: int = 3) -> dict[str, Any]:
    """A bench JSON whose `modes` come from the simulation: `prompts` requests, each
    figure the mean of `repeats` seeds (other seeds than `validate` uses) times a uniform
    (1 +- noise), then the compared figures times (1 + perturb)."""
    cal = replace(cal or Calibration.default(), prompts=prompts, bench_streams=tuple(streams))
    cal = replace(cal, server_draft_pass=server_draft_pass_ms(cal))
    rng = random.Random(seed)
    modes: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        modes[mode] = {}
        for k in streams:
            rows = [mode_json(simulate(bench_scenario(mode, k, cal, seed=seed + 100 * i + k),
                                       cal), k) for i in range(repeats)]
            row = dict(rows[0])
            for key, value in row.items():
                if isinstance(value, float):
                    row[key] = sum(r[key] for r in rows) / len(rows)
            for key in ("server_throughput_tps", "throughput_tps", "itl_ms_p50", "itl_ms_p95",
                        "ttft_ms_p50", "cost_per_1m_tokens_usd"):
                row[key] = row[key] * (1 + rng.uniform(-noise, noise))
                if key in METRICS:
                    row[key] *= 1 + perturb
            modes[mode][str(k)] = row

    def ratio(a: str, b: str) -> dict[str, float]:
        return {str(k): round(modes[a][str(k)]["server_throughput_tps"]
                              / modes[b][str(k)]["server_throughput_tps"], 4) for k in streams}

    tree = (f"chain:{cal.tree_tokens}" if cal.depth == cal.tree_tokens
            else f"tree:{cal.tree_tokens},{cal.depth},2")
    return {
        "machine": {"cpu": "simulated", "cores": 0, "device": "cpu", "torch": "none"},
        "config": {"draft_model": "sim-draft", "target_model": "sim-target", "dtype": "sim",
                   "tree": tree, "max_new_tokens": cal.max_new_tokens, "prompts": cal.prompts,
                   "streams": list(streams),
                   "server_cores": [], "node_cores": [], "fake": True, "noise": noise,
                   "perturb": perturb},
        "modes": modes,
        "ratios": {"specedge_vs_server_only": ratio("specedge", "server_only"),
                   "specedge_vs_autoregressive": ratio("specedge", "autoregressive")},
        "calibration": calibration_json(cal),
    }


def write_json(doc: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")
