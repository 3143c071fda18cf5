"""`specedge bench`: autoregressive vs server-only speculative vs SpecEdge, one machine, one run.

For K concurrent streams (1, 2, 4, 8; `--quick`: 1 and 4) over the committed prompt set:

- autoregressive: the target decodes every stream on the server, batched;
- server_only: draft and target both on the server, batched (`bench.serving`), drafting
  the same shape as SpecEdge's node (`--tree`);
- assisted: transformers' `generate(assistant_model=...)` on the server cores, K=1 only
  (it serves one stream): the speculative decoding a user would run instead;
- specedge: a real `specedge-verifier` process on the server cores and a real
  `specedge-node join` process on the node cores, driven through the node's
  OpenAI-compatible API by K concurrent clients.

Server work and node work are pinned to separate cores (`--server-cores`, `--node-cores`;
torch uses as many threads as the process has cores). Server throughput is tokens per
second of server busy time: the engine's pass time (the verifier's
`engine_busy_seconds`, or the in-process pass times), so it does not depend on what the
node cores are doing. Cost per 1M tokens uses the ledger's price table: server busy
hours at the server price plus edge drafting hours (the receipts' draft_micros) at the
edge price.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import httpx

from bench.latency import delayed_addr
from bench.prompts import prompt_set
from specedge.demo import Processes, free_port
from specedge.ledger.accounting import Prices
from specedge.protocol.limits import BATCH_WAIT
from specedge.treeshape import DEFAULT_TREE

MODES = ("autoregressive", "server_only", "assisted", "specedge")
PLOT_MODES = ("autoregressive", "server_only", "specedge")
REPO = Path(__file__).resolve().parents[1]


def parse_cores(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def pinned(cores: list[int]) -> list[str]:
    """The command prefix that pins a child process to `cores` (none without taskset)."""
    if shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", ",".join(map(str, cores))]


def thread_env(cores: list[int]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(len(cores)), MKL_NUM_THREADS=str(len(cores)),
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    pos = (len(values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def cost_per_million(server_s: float, edge_s: float, tokens: int, prices: Prices) -> float:
    dollars = (server_s * prices.server_usd_per_hour + edge_s * prices.edge_usd_per_hour) / 3600
    return round(dollars / max(tokens, 1) * 1e6, 4)


# -- server-side baselines --------------------------------------------------------------

def _fixed_engine(args: argparse.Namespace) -> str:
    """The engine every mode runs on; `--engine auto` is settled once (`main`)."""
    return args.engine if args.engine != "auto" else args.chosen_engine


def settle_engine(args: argparse.Namespace) -> str:
    """`--engine auto`: the engine the verifier measures fastest for the target here."""
    from specedge.verifier import engines

    probe = argparse.Namespace(
        engine="auto", dtype=args.dtype, model=args.target_model, device=args.device,
        prefill_chunk=256, max_batch_tokens=1024, kv_cache_gb=0.25, threads=None, verbose=0,
        model_id=None, no_prefix_cache=True, kv_host_gb=0.0, kv_disk_dir=None, kv_disk_gb=1.0)
    name = engines.build(probe).name
    print(f"--engine auto: {name} measured fastest here", file=sys.stderr)
    return name.split("/")[0]


def run_server_mode(mode: str, k: int, args: argparse.Namespace, prompts_file: Path) -> dict:
    argv = [sys.executable, "-m", "bench.serving", "--mode", mode, "--streams", str(k),
            "--target-model", args.target_model, "--draft-model", args.draft_model,
            "--dtype", args.dtype, "--device", args.device, "--chain", str(args.chain),
            "--tree", args.tree,
            "--max-new-tokens", str(args.max_new_tokens), "--prompts", str(prompts_file),
            "--engine", _fixed_engine(args)]
    res = subprocess.run([*pinned(args.server_cores), *argv], capture_output=True, text=True,
                         cwd=REPO, env=thread_env(args.server_cores), timeout=args.timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{mode} K={k} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# -- SpecEdge: real verifier and node processes -------------------------------------------

class Network:
    """A verifier process and a node process on loopback, stopped on exit.

    Prefix reuse is off unless `reuse`: the main bench measures speculative decoding,
    and its K runs repeat the same prompts (the multi-turn bench measures reuse)."""

    def __init__(self, args: argparse.Namespace, workdir: Path, reuse: bool = False) -> None:
        self.args = args
        self.workdir = workdir
        self.reuse = reuse
        self.procs = Processes(workdir)
        self.ledger_url = f"sqlite:///{workdir / 'verifier-ledger.sqlite3'}"
        self.metrics_port = free_port()
        self.api_port = free_port()

    def __enter__(self) -> Network:
        a = self.args
        announce = self.workdir / "verifier.addrs"
        reach = self._relay() if a.via_relay else ["--no-dht"]
        v = self.procs.start("verifier", [
            "specedge-verifier", "serve", "--model", a.target_model, "--dtype", a.dtype,
            "--engine", _fixed_engine(a),
            "--device", a.device, "--listen", "/ip4/127.0.0.1/tcp/0",
            "--announce-file", str(announce), "--identity", str(self.workdir / "verifier.key"),
            "--ledger", self.ledger_url, "--metrics-port", str(self.metrics_port),
            "--batch-wait", str(a.batch_wait), *([] if self.reuse else ["--no-prefix-cache"]),
            *reach,
        ], pinned(a.server_cores), thread_env(a.server_cores))
        addrs = self.procs.wait_file(announce, v, a.timeout).splitlines()
        addr = addrs[0]
        if a.via_relay:
            addr = next((x for x in addrs if "/p2p-circuit/" in x), "")
            if not addr:
                raise RuntimeError(f"--via-relay: the verifier got no relay slot: {addrs}")
        if a.rtt_ms:  # round trip added on the node's first hop (bench/latency.py)
            addr = delayed_addr(self.procs, self.workdir, addr, a.rtt_ms, a.timeout)
        node_announce = self.workdir / "node.addrs"
        node_args = [
            "specedge-node", "join", "--verifier", addr, "--target-model", a.target_model,
            "--draft-model", a.draft_model, "--dtype", a.dtype, "--engine", _fixed_engine(a),
            "--api", f"127.0.0.1:{self.api_port}", "--no-status",
            "--identity", str(self.workdir / "node.key"),
            "--ledger", str(self.workdir / "node-ledger.sqlite3"),
            "--tree", a.tree, "--bets", str(a.bets), "--announce-file", str(node_announce),
            "--kv-disk-dir", str(self.workdir / "draft-kv"),
            *([] if self.reuse else ["--no-prefix-cache"]),
        ]
        if a.no_proactive:
            node_args.append("--no-proactive")
        n = self.procs.start("node", node_args, pinned(a.node_cores), thread_env(a.node_cores))
        self.procs.wait_file(node_announce, n, a.timeout)
        return self

    def __exit__(self, *exc: object) -> None:
        self.procs.__exit__(*exc)

    def _relay(self) -> list[str]:
        """--via-relay: a relay process; the verifier keeps a slot there and is used
        through it (no hole punching), as a verifier behind NAT is."""
        f = self.workdir / "relay.addrs"
        r = self.procs.start("relay", ["specedge", "bootstrap", "--relay", "--listen",
                                       "/ip4/127.0.0.1/tcp/0", "--announce-file", str(f),
                                       "--identity", str(self.workdir / "relay.key")],
                             pinned(self.args.server_cores), thread_env(self.args.server_cores))
        relay = self.procs.wait_file(f, r, self.args.timeout).splitlines()[0]
        return ["--bootstrap", relay, "--reachability", "private", "--no-hole-punch"]

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                key = s.name + "".join(f"|{k}={v}" for k, v in sorted(s.labels.items()))
                out[key] = s.value
        return out


def metric(m: dict[str, float], name: str) -> float:
    return sum(v for k, v in m.items() if k.split("|")[0] == name)


def run_specedge(net: Network, k: int, messages: list[list[dict]], args: argparse.Namespace,
                 prices: Prices) -> dict:
    from specedge.ledger import open_ledger

    before = net.metrics()
    since_ms = int(time.time() * 1000)
    todo: queue.Queue = queue.Queue()
    for i, m in enumerate(messages):
        todo.put((i, m))
    results: dict[int, dict] = {}
    errors: list[str] = []
    url = f"http://127.0.0.1:{net.api_port}/v1/chat/completions"

    def client() -> None:
        with httpx.Client(timeout=args.timeout) as http:
            while True:
                try:
                    i, m = todo.get_nowait()
                except queue.Empty:
                    return
                r = http.post(url, json={"model": args.target_model, "messages": m,
                                         "max_tokens": args.max_new_tokens, "temperature": 0})
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:300]}")
                    continue
                results[i] = r.json()["specedge"]

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"specedge K={k}: {len(errors)} of {len(messages)} requests "
                           f"failed: {errors[0]}")
    # Receipts: one per drafted round, plus one per request whose first token came
    # with the verifier's prefill (an empty tree).
    rounds = sum(r["rounds"] + bool(r.get("first_token_from_prefill")) for r in results.values())
    # The verifier hands receipts to its ledger off the hot path: wait for all of them.
    ledger = open_ledger(net.ledger_url)
    deadline = time.monotonic() + 60
    while True:
        rows = ledger.receipts(since_ms=since_ms - 1000, limit=10**7)
        if len(rows) >= rounds or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    ledger.close()
    after = net.metrics()
    d = {name: metric(after, name) - metric(before, name) for name in (
        "specedge_engine_busy_seconds_total",
        "specedge_spec_decode_num_drafts_total",
        "specedge_spec_decode_num_draft_tokens_total",
        "specedge_spec_decode_num_accepted_tokens_total",
        "specedge_pass_seconds_sum", "specedge_pass_seconds_count",
        "specedge_batch_tokens_sum", "specedge_batch_size_sum",
        "specedge_gather_seconds_total")}
    passes = d["specedge_pass_seconds_count"]
    busy = d["specedge_engine_busy_seconds_total"]
    tokens = sum(len(r["token_ids"]) for r in results.values())
    edge_s = sum(r.draft_micros for r in rows) / 1e6
    hits = sum(r["proactive_hits"] for r in results.values())
    bets = sum(r["proactive_bets"] for r in results.values())
    drafted = d["specedge_spec_decode_num_draft_tokens_total"]
    accepted = d["specedge_spec_decode_num_accepted_tokens_total"]
    drafts = d["specedge_spec_decode_num_drafts_total"]
    ttft = [r["time_to_first_token_ms"] for r in results.values() if r["time_to_first_token_ms"]]
    opens = [r["open_wait_ms"] for r in results.values() if r.get("open_wait_ms") is not None]
    itl = [r["inter_token_latency_ms"] for r in results.values() if r["inter_token_latency_ms"]]
    return {
        "mode": "specedge", "streams": k, "requests": len(results), "tokens": tokens,
        "server_busy_s": round(busy, 4), "wall_s": round(wall, 4),
        "edge_draft_s": round(edge_s, 4),
        "server_throughput_tps": round(tokens / busy, 3) if busy else None,
        "throughput_tps": round(tokens / wall, 3),
        "itl_ms_p50": percentile(itl, 0.5), "itl_ms_p95": percentile(itl, 0.95),
        "ttft_ms_p50": percentile(ttft, 0.5), "ttft_ms_p95": percentile(ttft, 0.95),
        # Asking for a session until a verifier admitted it (BUSY waits included).
        "open_wait_ms": {"p50": percentile(opens, 0.5), "p95": percentile(opens, 0.95),
                         "max": max(opens) if opens else None},
        "first_token_from_prefill": sum(bool(r.get("first_token_from_prefill"))
                                        for r in results.values()),
        "acceptance": round(accepted / drafted, 4) if drafted else None,
        "mean_accepted_length": round(accepted / drafts, 4) if drafts else None,
        "proactive_hit_rate": round(hits / bets, 4) if bets else None,
        "cost_per_1m_tokens_usd": cost_per_million(busy, edge_s, tokens, prices),
        "draft_tree_ms": round(edge_s * 1000 / max(len(rows), 1), 3),
        # The verifier's own passes in this run: what the network costs it per pass.
        "verifier_passes": int(passes),
        "verifier_pass_ms_mean": round(d["specedge_pass_seconds_sum"] * 1000 / passes, 3)
        if passes else None,
        "verifier_pass_rows_mean": round(d["specedge_batch_tokens_sum"] / passes, 3)
        if passes else None,
        "verifier_requests_per_pass": round(d["specedge_batch_size_sum"] / passes, 3)
        if passes else None,
        # Engine held for due requests to join a pass (idle, not busy; see --batch-wait).
        "verifier_gather_s": round(d["specedge_gather_seconds_total"], 4),
        "round_ms": round_breakdown(results.values()),
        "token_ids": {str(i): r["token_ids"] for i, r in results.items()},
    }


def round_breakdown(results: Iterable[dict]) -> dict | None:
    """Where a drafted round's time went, mean ms per round, from the node's own clocks:
    drafting it waited for (critical), drafting a winning bet did meanwhile (hidden),
    the verifier's compute (receipts), the rest of the round trip (network, the
    verifier's queue and hold), waiting with the verdict in hand for the bet's draft pass
    to stop (bet_wait), and the rest: the first token's prefill and session opening, and
    the node's own work between rounds (other)."""
    rows = [r for r in results if r.get("round_time_s")]
    rounds = sum(r["rounds"] for r in rows)
    if not rounds:
        return None
    total = {key: sum(r["round_time_s"][key] for r in rows) for key in rows[0]["round_time_s"]}
    wall = sum(r["wall_s"] for r in rows)
    per = lambda s: round(s * 1000 / rounds, 2)  # noqa: E731
    return {"rounds": rounds, "draft_critical": per(total["draft_critical"]),
            "draft_hidden": per(total["draft_hidden"]), "verify": per(total["verify"]),
            "network_and_queue": per(total["round_trip"] - total["verify"]),
            "bet_wait": per(total.get("bet_wait", 0.0)),
            "other": per(wall - total["round_trip"] - total["draft_critical"]
                         - total.get("bet_wait", 0.0)),
            "round": per(wall)}


# -- report ---------------------------------------------------------------------------------

def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"cpu": cpu, "cores": os.cpu_count(), "device": device, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}


def agreement(modes: dict[str, dict[str, dict]]) -> dict[str, str]:
    """How many prompts each mode answered exactly as autoregressive did (per K)."""
    out = {}
    for mode in ("server_only", "assisted", "specedge"):
        for k, row in modes.get(mode, {}).items():
            ref = modes.get("autoregressive", {}).get(k, {}).get("token_ids", {})
            ids = row.get("token_ids", {})
            if not ref:
                continue
            same = sum(1 for i, t in ids.items() if ref.get(i) == t)
            out[f"{mode}/K={k}"] = f"{same}/{len(ids)}"
    return out


def divergences(modes: dict[str, dict[str, dict]]) -> dict[str, list[dict]]:
    """Where each mode's output first left autoregressive's, per prompt that differs: in
    bf16, batched kernels of different shapes round differently, and a near-tie between
    the top two logits can flip; float32 outputs are equal (the test suite proves it)."""
    out: dict[str, list[dict]] = {}
    for mode in ("server_only", "assisted", "specedge"):
        for k, row in modes.get(mode, {}).items():
            ref = modes.get("autoregressive", {}).get(k, {}).get("token_ids", {})
            found = []
            for i, ids in sorted(row.get("token_ids", {}).items(), key=lambda x: int(x[0])):
                want = ref.get(i)
                if want is None or want == ids:
                    continue
                pairs = zip(want, ids, strict=False)  # lengths may differ
                at = next((j for j, (a, b) in enumerate(pairs) if a != b),
                          min(len(want), len(ids)))
                found.append({"prompt": int(i), "position": at,
                              "autoregressive": want[at] if at < len(want) else None,
                              mode: ids[at] if at < len(ids) else None})
            if found:
                out[f"{mode}/K={k}"] = found
    return out


def tie_gaps(found: dict[str, list[dict]], modes: dict, prompts: list[list[int]],
             model: object) -> None:
    """Add to each divergence the float32 target's logit gap between autoregressive's
    token and the mode's, after their common prefix. A gap near zero is a near-tie that
    bf16 rounding can flip; a large one would be a bug."""
    import torch

    for key, rows in found.items():
        mode, k = key.split("/K=")
        ref = modes["autoregressive"][k]["token_ids"]
        for row in rows:
            if row["autoregressive"] is None or row[mode] is None:
                continue  # one output ended early (an end-of-sequence tie)
            seq = prompts[row["prompt"]] + ref[str(row["prompt"])][: row["position"]]
            with torch.no_grad():
                logits = model(torch.tensor([seq])).logits[0, -1].float()  # [vocab]
            row["fp32_logit_gap"] = round(
                float(logits[row["autoregressive"]] - logits[row[mode]]), 4)


def calibration(modes: dict, args: argparse.Namespace, prices: Prices, prompt_tokens: float,
                samples: dict) -> dict:
    spec = modes.get("specedge", {})
    so = modes.get("server_only", {})
    hist = samples.get("accepted_length_hist", [])
    draft_tree = [row["draft_tree_ms"] for row in spec.values() if row.get("draft_tree_ms")]
    so_draft = [row["server_draft_busy_s"] * 1000 / max(row.get("rounds", 1), 1)
                for row in so.values() if row.get("rounds")]
    return {
        "draft_forward_ms": round(min(draft_tree) / args.chain, 3) if draft_tree else None,
        "draft_tree_ms": round(min(draft_tree), 3) if draft_tree else None,
        "server_draft_tree_ms": round(min(so_draft), 3) if so_draft else None,
        "verify_ms": samples["verify_ms"],
        "ar_step_ms": samples["ar_step_ms"],
        "rtt_ms": samples.get("rtt_ms", 1.0),
        "accepted_length_hist": hist,
        "proactive_hit_rate": next((r["proactive_hit_rate"] for r in spec.values()
                                    if r.get("proactive_hit_rate") is not None), 0.0),
        "tree_tokens": args.chain,
        "prompt_tokens": round(prompt_tokens, 1),
        "prefill_ms_per_token": samples.get("prefill_ms_per_token"),
        "prices_usd_per_hour": {"server": prices.server_usd_per_hour,
                                "edge": prices.edge_usd_per_hour},
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({int(k) for rows in report["modes"].values() for k in rows})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, field, label in zip(axes, ["server_throughput_tps", "itl_ms_p50",
                                       "cost_per_1m_tokens_usd"],
                                ["server throughput (tokens / server-busy s)",
                                 "inter-token latency p50 (ms)", "cost ($ / 1M tokens)"],
                                strict=True):
        width = 0.27
        for j, mode in enumerate(PLOT_MODES):
            rows = report["modes"].get(mode, {})
            vals = [rows.get(str(k), {}).get(field) or 0 for k in ks]
            ax.bar([i + (j - 1) * width for i in range(len(ks))], vals, width, label=mode)
        ax.set_xticks(range(len(ks)), [f"K={k}" for k in ks])
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=8)
    cfg = report["config"]
    fig.suptitle(f"{cfg['target_model']} / {cfg['draft_model']} ({cfg['dtype']}) on "
                 f"{report['machine']['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="specedge bench")
    for col in ["mode", "K", "tokens", "server busy s", "server tok/s", "wall tok/s",
                "ITL p50 ms", "ITL p95 ms", "TTFT p50 ms", "accept", "acc len", "hits",
                "$/1M"]:
        table.add_column(col, justify="right")
    fmt = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for mode in MODES:
        for k, r in sorted(report["modes"].get(mode, {}).items(), key=lambda x: int(x[0])):
            if r.get("failed"):
                table.add_row(mode, k, "failed: " + r["error"][:60], *["-"] * 10)
                continue
            table.add_row(mode, k, str(r["tokens"]), fmt(r["server_busy_s"], 2),
                          fmt(r["server_throughput_tps"], 2), fmt(r["throughput_tps"], 2),
                          fmt(r["itl_ms_p50"]), fmt(r["itl_ms_p95"]), fmt(r["ttft_ms_p50"]),
                          fmt(r["acceptance"], 3), fmt(r["mean_accepted_length"], 2),
                          fmt(r["proactive_hit_rate"], 3), fmt(r["cost_per_1m_tokens_usd"], 2))
    console = Console(width=max(Console().width, 150))
    console.print(table)
    for name, per_k in report["ratios"].items():
        console.print(f"{name}: " + ", ".join(f"{k if name.endswith('_k1') else f'K={k}'}: "
                                              f"{v:.2f}x" for k, v in per_k.items()))
    for k, r in sorted(report["modes"].get("specedge", {}).items(), key=lambda x: int(x[0])):
        if r.get("round_ms"):
            console.print(f"specedge K={k}: a round's time, mean ms: {r['round_ms']}")
    console.print(f"outputs equal to autoregressive: {report['outputs_equal_to_autoregressive']}")
    for k, r in sorted(report["modes"].get("specedge", {}).items(), key=lambda x: int(x[0])):
        if r.get("open_wait_ms"):
            console.print(f"specedge K={k}: session open wait {r['open_wait_ms']}, first token "
                          f"from the prefill in {r.get('first_token_from_prefill')} requests")
    gaps = [abs(r["fp32_logit_gap"]) for rows in report.get("divergences", {}).values()
            for r in rows if "fp32_logit_gap" in r]
    if gaps:
        import statistics

        console.print(f"divergences: {len(gaps)}, float32 logit gap at each: max {max(gaps):.4f}"
                      f", median {statistics.median(gaps):.4f} (bf16 flips only near-ties)")


def ratios(modes: dict) -> dict:
    out: dict[str, dict[str, float]] = {}
    spec = modes.get("specedge", {})
    for base in ("server_only", "autoregressive"):
        per_k = {}
        for k, row in spec.items():
            other = modes.get(base, {}).get(k)
            if other and other.get("server_throughput_tps") and row.get("server_throughput_tps"):
                per_k[k] = round(row["server_throughput_tps"] / other["server_throughput_tps"], 3)
        out[f"specedge_vs_{base}"] = per_k
    cost = {}
    itl = {}
    for k, row in spec.items():
        other = modes.get("server_only", {}).get(k)
        if other:
            cost[k] = round(other["cost_per_1m_tokens_usd"] / row["cost_per_1m_tokens_usd"], 3)
            if other.get("itl_ms_p50") and row.get("itl_ms_p50"):
                itl[k] = round(1 - row["itl_ms_p50"] / other["itl_ms_p50"], 4)
    out["cost_efficiency_vs_server_only"] = cost
    out["itl_reduction_vs_server_only"] = itl
    ttft = {}
    for k, row in spec.items():
        other = modes.get("autoregressive", {}).get(k)
        if other and other.get("ttft_ms_p50") and row.get("ttft_ms_p50"):
            ttft[k] = round(row["ttft_ms_p50"] / other["ttft_ms_p50"], 3)
    out["ttft_vs_autoregressive"] = ttft
    # Single stream against the user's alternative: tokens per wall second and ITL.
    row, other = spec.get("1"), modes.get("assisted", {}).get("1")
    if row and other and other.get("throughput_tps") and other.get("itl_ms_p50"):
        out["specedge_vs_assisted_k1"] = {
            "tokens_per_s": round(row["throughput_tps"] / other["throughput_tps"], 3),
            "itl": round(row["itl_ms_p50"] / other["itl_ms_p50"], 3)}
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="specedge bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one prompt per kind, K = 1 and 4")
    ap.add_argument("--streams", default=None, help="comma-separated K values (default 1,2,4,8)")
    ap.add_argument("--prompts", type=int, default=None, metavar="N",
                    help="only the first N prompts of the set (a quicker run)")
    ap.add_argument("--json", type=Path, help="write the full report here")
    ap.add_argument("--plot", type=Path, help="write a PNG of the main figures here")
    ap.add_argument("--target-model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--draft-model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (for every process)")
    ap.add_argument("--engine", default="torch", choices=["torch", "llama.cpp", "auto"],
                    help="engine of every mode (autoregressive, server-only and SpecEdge run "
                    "on the same one, so their ratios compare like with like); auto: the "
                    "one the verifier measures fastest here, decided once at the start")
    ap.add_argument("--chain", type=int, default=None,
                    help="draft chain length (short for --tree chain:N)")
    ap.add_argument("--tree", default=None, metavar="SHAPE",
                    help="draft shape for SpecEdge and server-only alike: chain:N, "
                    "tree:BUDGET,DEPTH,WIDTH or dynamic:BUDGET[,WIDTH] (default: the node's, "
                    f"{DEFAULT_TREE})")
    ap.add_argument("--bets", type=int, default=2, metavar="N",
                    help="the node's proactive bets per round (specedge-node --bets)")
    ap.add_argument("--sweep", action="store_true",
                    help="instead: the draft shapes side by side in one process (accepted "
                    "tokens per round, verify pass and drafting cost, server throughput; "
                    "bench/trees.py), and the best one")
    ap.add_argument("--shapes", default=None,
                    help="--sweep: comma-free list separated by spaces, e.g. 'chain:4 "
                    "tree:16,6,4 dynamic:32' (default: bench/trees.py's list)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--server-cores", type=parse_cores, default=None,
                    help="cores for server work, e.g. 0 or 0-7 (default: first half)")
    ap.add_argument("--node-cores", type=parse_cores, default=None,
                    help="cores for node work (default: second half)")
    ap.add_argument("--modes", default=",".join(MODES), help="subset of " + ",".join(MODES))
    ap.add_argument("--no-proactive", action="store_true", help="nodes draft only on demand")
    ap.add_argument("--rtt-ms", type=float, default=0.0, metavar="MS",
                    help="specedge mode: add this round trip between node and verifier with a "
                    "delaying TCP forwarder (bench/latency.py; default 0)")
    ap.add_argument("--via-relay", action="store_true",
                    help="specedge mode: the node reaches the verifier through a circuit "
                    "relay (a `specedge bootstrap --relay` process), as behind NAT")
    ap.add_argument("--batch-wait", type=float, default=BATCH_WAIT, metavar="PASSES",
                    help="the verifier's hold for due sessions (specedge-verifier "
                    "--batch-wait; 0 never holds; default %(default)s)")
    ap.add_argument("--timeout", type=float, default=1800, help="per-run limit in seconds")
    ap.add_argument("--multi-turn", action="store_true",
                    help="instead: conversations of 5 turns with a shared system prompt, "
                    "with and without prefix KV reuse (bench/multiturn.py)")
    ap.add_argument("--conversations", type=int, default=4,
                    help="--multi-turn: conversations side by side (default: %(default)s)")
    return ap


def new_report(args: argparse.Namespace, ks: list[int], prompts: list, ids: list) -> dict:
    return {
        "machine": machine(),
        "config": {"draft_model": args.draft_model, "target_model": args.target_model,
                   "dtype": args.dtype, "tree": args.tree, "bets": args.bets,
                   "engine": getattr(args, "chosen_engine", args.engine),
                   "max_new_tokens": args.max_new_tokens, "prompts": len(ids),
                   "prompt_kinds": sorted({k for k, _ in prompts}),
                   "server_cores": args.server_cores, "node_cores": args.node_cores,
                   "streams": ks, "proactive": not args.no_proactive,
                   "rtt_ms": args.rtt_ms, "via_relay": args.via_relay,
                   "batch_wait": args.batch_wait},
        "modes": {},
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    half = max(len(cores) // 2, 1)
    args.server_cores = args.server_cores or cores[:half]
    args.node_cores = args.node_cores or (cores[half:] or cores[:1])
    args.tree = tree_spec(args)
    if args.sweep:
        from bench.trees import sweep_main

        return sweep_main(args)
    args.chosen_engine = settle_engine(args) if args.engine == "auto" else args.engine
    if args.multi_turn:
        return multi_turn(args)
    ks = [int(x) for x in (args.streams or ("1,4" if args.quick else "1,2,4,8")).split(",")]
    modes_wanted = [m for m in args.modes.split(",") if m]
    prices = Prices()

    from specedge.models import load_model

    print(f"preparing {args.target_model} / {args.draft_model} ...", file=sys.stderr)
    _, tok = load_model(args.draft_model, dtype=getattr(__import__("torch"), args.dtype))
    load_model(args.target_model, dtype=getattr(__import__("torch"), args.dtype))
    prompts = prompt_set(args.quick)[: args.prompts]
    messages = [m for _, m in prompts]
    ids = [list(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]) for m in messages]
    report = new_report(args, ks, prompts, ids)
    samples: dict = {"verify_ms": {"batch_tokens": [], "ms": []},
                     "ar_step_ms": {"batch": [], "ms": []}, "accepted_length_hist": []}
    with tempfile.TemporaryDirectory(prefix="specedge-bench-") as tmp:
        work = Path(tmp)
        prompts_file = work / "prompts.json"
        prompts_file.write_text(json.dumps(ids))
        for mode in ("autoregressive", "server_only", "assisted"):
            if mode not in modes_wanted:
                continue
            for k in ks if mode != "assisted" else [k for k in ks if k == 1]:
                measure(report, mode, k,
                        lambda mode=mode, k=k: server_row(mode, k, args, prompts_file, prices,
                                                          samples), args, ids, samples)
        if "specedge" in modes_wanted:
            run_network_modes(report, ks, messages, args, prices, work, ids, samples)
    finish_report(report, args, ids, samples, final=True)
    print_table(report)
    if args.plot:
        plot(report, args.plot)
    failed = [f"{m}/K={k}" for m, rows in report["modes"].items() for k, r in rows.items()
              if r.get("failed")]
    if failed:
        print(f"failed: {', '.join(failed)} (errors in the report)", file=sys.stderr)
    return 1 if failed else 0


def tree_spec(args: argparse.Namespace) -> str:
    """The draft shape as text (`--tree`, else a chain of `--chain`); refuses a bad one."""
    from specedge.trees import TreeShape

    try:
        shape = TreeShape.parse(args.tree or (f"chain:{args.chain}" if args.chain
                                              else DEFAULT_TREE))
    except ValueError as exc:
        raise SystemExit(f"specedge bench: {exc}") from None
    args.chain = shape.budget  # tokens per tree, for the calibration
    return shape.spec()


def multi_turn(args: argparse.Namespace) -> int:
    """`--multi-turn`: see bench/multiturn.py. Writes --json, prints the table."""
    from bench.multiturn import print_report, run_multiturn

    if args.max_new_tokens == build_parser().get_default("max_new_tokens"):
        args.max_new_tokens = 64  # the setting: up to 64 tokens per turn
    with tempfile.TemporaryDirectory(prefix="specedge-bench-") as tmp:
        report = run_multiturn(args, Network, Path(tmp))
    report["machine"] = machine()
    report["config"] = {"draft_model": args.draft_model, "target_model": args.target_model,
                        "dtype": args.dtype, "tree": args.tree}
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def server_row(mode: str, k: int, args: argparse.Namespace, prompts_file: Path, prices: Prices,
               samples: dict) -> dict:
    """One server-side baseline run, with its pass-time samples kept for calibration."""
    row = run_server_mode(mode, k, args, prompts_file)
    row["cost_per_1m_tokens_usd"] = cost_per_million(row["server_busy_s"], 0.0, row["tokens"],
                                                     prices)
    if mode == "assisted":  # no passes of its own to calibrate from
        row.pop("verify_samples")
        return row
    key, col = ("verify_ms", "batch_tokens") if mode == "server_only" else ("ar_step_ms", "batch")
    for rows, ms in row.pop("verify_samples"):
        samples[key][col].append(rows)
        samples[key]["ms"].append(round(ms, 3))
    return row


def run_network_modes(report: dict, ks: list[int], messages: list, args: argparse.Namespace,
                      prices: Prices, work: Path, ids: list[list[int]], samples: dict) -> None:
    """SpecEdge at each K on one verifier and one node process; a network that cannot
    start, or dies, fails the remaining K values (recorded, not raised)."""
    try:
        with Network(args, work) as net:
            for k in ks:
                measure(report, "specedge", k,
                        lambda k=k: run_specedge(net, k, messages, args, prices),
                        args, ids, samples)
            samples["accepted_length_hist"] = accepted_hist(net.metrics())
    except Exception as exc:  # the processes did not start or their metrics went away
        for k in ks:
            report["modes"].setdefault("specedge", {}).setdefault(
                str(k), failed_row("specedge", k, exc))
        finish_report(report, args, ids, samples)


def failed_row(mode: str, k: int, exc: BaseException) -> dict:
    return {"mode": mode, "streams": k, "failed": True, "error": f"{type(exc).__name__}: {exc}"}


def measure(report: dict, mode: str, k: int, run: Callable[[], dict], args: argparse.Namespace,
            ids: list[list[int]], samples: dict) -> None:
    """Run one mode at one K; a failure is recorded with its error and the bench goes on.
    The report is written after every run, so nothing measured is lost."""
    print(f"{mode} K={k} ...", file=sys.stderr)
    try:
        row = run()
    except Exception as exc:
        print(f"{mode} K={k} failed: {exc}", file=sys.stderr)
        row = failed_row(mode, k, exc)
    report["modes"].setdefault(mode, {})[str(k)] = row
    finish_report(report, args, ids, samples)


def done_rows(modes: dict) -> dict:
    """The modes' rows that completed (failed ones carry no figures)."""
    return {m: {k: r for k, r in rows.items() if not r.get("failed")} for m, rows in modes.items()}


def finish_report(report: dict, args: argparse.Namespace, ids: list[list[int]], samples: dict,
                  final: bool = False) -> None:
    """Derive the comparisons from what has completed and write the JSON (if asked)."""
    modes = done_rows(report["modes"])
    report["ratios"] = ratios(modes)
    report["outputs_equal_to_autoregressive"] = agreement(modes)
    report["divergences"] = divergences(modes)
    if final and report["divergences"] and "autoregressive" in modes:
        import torch

        from specedge.models import load_model

        fp32, _ = load_model(args.target_model, dtype=torch.float32)
        tie_gaps(report["divergences"], modes, ids, fp32)
        del fp32
    report["calibration"] = calibration(modes, args, Prices(), sum(map(len, ids)) / len(ids),
                                        samples)
    if args.json:
        out = json.loads(json.dumps(report))
        for rows in out["modes"].values():
            for row in rows.values():
                row.pop("token_ids", None)
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, args.json)
    if final:
        for rows in report["modes"].values():
            for row in rows.values():
                row.pop("token_ids", None)


def accepted_hist(m: dict[str, float]) -> list[int]:
    """Rounds with 0, 1, 2, ... accepted drafts, from the per-position acceptance counter."""
    drafts = int(metric(m, "specedge_spec_decode_num_drafts_total"))
    per_pos: dict[int, int] = {}
    for key, v in m.items():
        name, *labels = key.split("|")
        if name == "specedge_spec_decode_num_accepted_tokens_per_pos_total":
            pos = int(dict(lbl.split("=", 1) for lbl in labels)["position"])
            per_pos[pos] = int(v)
    at_least = [drafts] + [per_pos.get(i, 0) for i in range(max(per_pos, default=-1) + 1)]
    return [at_least[i] - (at_least[i + 1] if i + 1 < len(at_least) else 0)
            for i in range(len(at_least))]


if __name__ == "__main__":
    sys.exit(main())
