"""PNG figures of the scale sweeps: one figure per sweep, four panels each (total
throughput, server throughput, inter-token latency, cost), one line per series.
Small on purpose (about 100 dpi, a few tens of kB) so they can live in the repository."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SWEEPS = {
    "nodes": ("edge nodes (100 verifiers; baselines: 100 servers)", True),
    "rtt_ms": ("mean node-verifier round trip (ms)", True),
    "acceptance": ("acceptance scale (1 = calibrated histogram)", False),
    "failures": ("fraction of verifiers dying mid-run", False),
}
PANELS = (
    ("throughput_tps", "tokens / s (all users)"),
    ("server_throughput_tps", "tokens / server-busy s (per verifier)"),
    ("itl_ms_p50", "inter-token latency per request, p50 (dashed: p95), ms"),
    ("cost_per_1m_tokens_usd", "cost, $ per 1M tokens"),
)
COLORS = {"specedge": "tab:blue", "server_only": "tab:orange", "autoregressive": "tab:green"}


def plot_sweep(rows: list[dict[str, Any]], sweep: str, path: Path, title: str) -> Path:
    label, log_x = SWEEPS[sweep]
    mine = [r for r in rows if r["sweep"] == sweep]
    series = list(dict.fromkeys(r["series"] for r in mine))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(15, 3.6), dpi=90)
    for ax, (key, ylabel) in zip(axes, PANELS, strict=True):
        for i, s in enumerate(series):
            pts = sorted((r["x"], r) for r in mine if r["series"] == s)
            xs = [x for x, _ in pts]
            ys = [r[key] for _, r in pts]
            color = COLORS.get(s, f"C{i + 3}")
            ax.plot(xs, ys, marker="o", ms=4, label=s, color=color)
            if key == "itl_ms_p50":
                ax.plot(xs, [r["itl_ms_p95"] for _, r in pts], ls="--", color=color, lw=1)
        if log_x:
            ax.set_xscale("log")
        values = [r[key] for r in mine if r[key] and r[key] > 0]
        if values and max(values) > 20 * min(values):
            ax.set_yscale("log")
        ax.set_xlabel(label, fontsize=8)
        ax.set_title(ylabel, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_all(rows: list[dict[str, Any]], out: Path, source: str) -> list[Path]:
    """One PNG per sweep present in `rows`."""
    written = []
    for sweep in SWEEPS:
        if any(r["sweep"] == sweep for r in rows):
            title = f"SpecEdge simulation: {sweep} sweep (calibration: {source})"
            written.append(plot_sweep(rows, sweep, out / f"scale_{sweep}.png", title))
    return written
