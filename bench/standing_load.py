"""Credit-ranked scheduling under overload: what standing buys, and what ranking costs.

One `specedge-verifier` (tiny pair) whose passes hold 40 rows (8 chains of 4 plus
their roots), and two load processes (`tests/load_client.py`: chains of the target's own
continuation, 20% wrong, so drafting costs nothing and the verifier is the bottleneck):
a node with earned standing (its receipts seeded into the verifier's ledger, about 100x
the starting grant) and a fresh identity, each with half the sessions. At 2x and 4x the
verifier's capacity, with ranking on and off (`--no-standing`), in one run:

- per standing class: p50 / p95 inter-token latency (per round, time to the answer over
  the tokens it committed), queue wait (the verifier's histogram), tokens per second;
- throughput: tokens committed per second of the run (ranking only reorders, so it
  should cost nothing).

    python bench/standing_load.py --json out.json [--duration 20] [--factors 2 4]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from faultutil import Verifier  # noqa: E402  (the tests' process helpers)
from netutil import Proc, python_script  # noqa: E402

CAPACITY = 8  # sessions whose chains fill one 40-row pass


def seed(url: str, verifier_key: Path, node_key: Path, receipts: int = 250) -> None:
    """Receipts crediting the node ~12,500 accepted tokens (class "high"), signed by both."""
    from specedge.ledger import open_ledger
    from specedge.ledger.testing import Peer, make_pair

    rng = random.Random(1)
    v, n = Peer(verifier_key), Peer(node_key)
    with open_ledger(url) as led:
        for _ in range(receipts):
            led.ingest(*make_pair(v, n, rng.randbytes(16), 1, drafted=54, accepted=50,
                                  rng=rng))


def truths(path: Path, length: int) -> None:
    from specedge.engine import autoregressive_generate
    from specedge.models import build_tiny
    from specedge.text import encode_prompt

    target, tok = build_tiny()
    data = []
    for text in ["def fibonacci(n):", "The quick brown fox", "import numpy as np\n", "x",
                 "Once upon a time", "class Node:", "y", "SELECT * FROM"]:
        ids = encode_prompt(tok, text)
        data.append({"prompt": ids, "truth": autoregressive_generate(target, ids,
                                                                     length).token_ids})
    path.write_text(json.dumps(data))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return round(s[lo] + (s[hi] - s[lo]) * (k - lo), 2)


def hist_percentile(m: dict[str, float], name: str, label: str, q: float) -> float | None:
    """A percentile from a Prometheus histogram's cumulative buckets (upper bounds)."""
    buckets = []
    for key, value in m.items():
        if key.startswith(f"{name}_bucket{{") and f'standing="{label}"' in key:
            le = key.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), value))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    for le, count in buckets:
        if count >= q * total:
            return round(le * 1000, 1)
    return None


def one_run(work: Path, factor: int, ranked: bool, duration: float) -> dict:
    vkey, hkey = work / "v.key", work / "high.key"
    url = f"sqlite:///{work / 'ledger.sqlite3'}"
    seed(url, vkey, hkey)
    truth_file = work / "truths.json"
    truths(truth_file, 140)
    per_class = CAPACITY * factor // 2
    extra = [] if ranked else ["--no-standing"]
    v = Verifier(work, "v", "--no-dht", "--max-batch-tokens", "40", "--prefill-chunk", "32",
                 "--test-pass-delay", "0.03", "--max-sessions-per-peer", "64", *extra,
                 ledger=url, identity=vkey).ready()
    start = work / "start"
    clients = {}
    try:
        for i, name in enumerate(("high", "fresh")):
            clients[name] = Proc(python_script(
                TESTS / "load_client.py", "--addr", v.addr, "--truth-file", truth_file,
                "--sessions", per_class, "--offset", i * per_class, "--duration", duration,
                "--start-file", start, "--miss", 0.2, "--segment", 120,
                *(["--identity", hkey] if name == "high" else [])), work, name)
        for c in clients.values():
            c.wait_for_output("OPEN", 180)
        start.write_text(str(time.time() + 0.5))
        results = {}
        for name, c in clients.items():
            if c.wait(duration + 180) != 0:
                raise RuntimeError(c.describe())
            results[name] = json.loads(c.stdout().strip().splitlines()[-1])
        m = v.metrics()
    finally:
        for c in clients.values():
            c.kill()
        v.kill()
    return summarise(results, m, duration)


def summarise(results: dict, m: dict, duration: float) -> dict:
    out: dict = {"classes": {}}
    total = 0
    for name, res in results.items():
        sessions = res["sessions"]
        itl = [x for s in sessions for x in s["itl_ms"]]
        tokens = sum(s["tokens"] for s in sessions)
        total += tokens
        label = name  # load process "high" has standing class "high"; "fresh" is fresh
        out["classes"][name] = {
            "sessions": len(sessions), "tokens": tokens,
            "itl_ms_p50": percentile(itl, 0.5), "itl_ms_p95": percentile(itl, 0.95),
            "queue_wait_ms_p50": hist_percentile(m, "specedge_queue_wait_seconds", label, 0.5),
            "queue_wait_ms_p95": hist_percentile(m, "specedge_queue_wait_seconds", label, 0.95),
            "min_session_tokens": min(s["tokens"] for s in sessions),
            "errors": res["errors"][:3], "wrong": len(res["wrong"]),
        }
    out["tokens_per_s"] = round(total / duration, 1)
    out["passes"] = m.get("specedge_pass_seconds_count")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factors", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    report: dict = {"duration_s": args.duration, "runs": {}}
    for factor in args.factors:
        for ranked in (True, False):
            key = f"{factor}x/{'ranked' if ranked else 'fifo'}"
            print(f"{key} ...", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix="specedge-standing-") as tmp:
                report["runs"][key] = one_run(Path(tmp), factor, ranked, args.duration)
            print(json.dumps(report["runs"][key]), flush=True)
    for factor in args.factors:
        r, f = report["runs"][f"{factor}x/ranked"], report["runs"][f"{factor}x/fifo"]
        report[f"{factor}x_ranking_throughput_cost"] = round(
            1 - r["tokens_per_s"] / f["tokens_per_s"], 4) if f["tokens_per_s"] else None
        report[f"{factor}x_itl_p50_high_over_fresh"] = round(
            r["classes"]["high"]["itl_ms_p50"] / r["classes"]["fresh"]["itl_ms_p50"], 3)
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
