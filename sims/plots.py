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


def plot_pass_cost(rows: tuple[int, ...], curves: dict[str, list[float]], path: Path) -> Path:
    """Pass cost against rows: absolute, and relative to a one-row pass (where the CPU and
    GPU cases part: proportional to rows on a CPU, flat up to the compute roof on a GPU)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), dpi=90)
    for i, (name, ys) in enumerate(curves.items()):
        style = dict(marker="o", ms=3, label=name, color=f"C{i}")
        axes[0].plot(rows, ys, **style)
        axes[1].plot(rows, [y / ys[0] for y in ys], **style)
    axes[1].plot(rows, [r / rows[0] for r in rows], ls=":", color="gray", label="proportional")
    for ax, title in zip(axes, ("ms per pass", "pass cost / one-row pass"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rows in the pass (tokens of all its sequences)", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("Target pass cost by rows: CPU measured vs GPU roofline", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_paper_scale(rows: list[dict[str, Any]], path: Path) -> Path:
    """Server tokens per busy second against nodes per verifier, one panel per
    calibration, one line per mode."""
    cals = list(dict.fromkeys(r["calibration"] for r in rows))
    fig, axes = plt.subplots(1, len(cals), figsize=(5 * len(cals), 4), dpi=90, squeeze=False)
    for ax, cal in zip(axes[0], cals, strict=True):
        mine = [r for r in rows if r["calibration"] == cal]
        for i, series in enumerate(dict.fromkeys(r["series"] for r in mine)):
            pts = sorted((r["nodes"], r["server_throughput_tps"]) for r in mine
                         if r["series"] == series)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=4, label=series,
                    color=COLORS.get(series, f"C{i + 3}"),
                    ls="--" if "hold" in series else "-")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("edge nodes (users) per verifier (server)", fontsize=8)
        ax.set_title(f"{cal}: server tokens per busy second", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
