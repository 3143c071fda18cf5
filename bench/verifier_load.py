"""Verifier throughput under 1, 2, 4, 8 concurrent sessions (issue 4's figures).

Starts a real `specedge-verifier serve` process and, per concurrency level, a client
process (`tests/verifier_client.py generate`) running that many sessions at once over
loopback libp2p. Figures come from the verifier's own Prometheus counters, diffed
around each level:

- committed tokens per busy second: tokens committed to sessions (accepted drafts plus
  bonus tokens) per second the engine spent in forward passes ("verified tokens per
  second of verifier busy time"); also drafted tokens and forwarded rows per busy second;
- busy fraction: engine busy time over the level's wall time (the rest is the engine
  waiting for requests, i.e. for drafting and the network);
- batch-size distribution: how many passes held 1, 2, ... verify requests.

Two client modes per level: "draft" sessions draft with the draft model (on this box
the client's drafting competes with the verifier for the same cores, so requests
rarely overlap), and "oracle" sessions send chains of the target's own continuation
with each token wrong with probability --oracle-miss (drafting costs nothing, so the
verifier is the bottleneck: its capacity under continuous batching).

    python bench/verifier_load.py                                   # tiny pair, float32
    python bench/verifier_load.py --pair demo --dtype bfloat16 --max-new-tokens 32 \
        --sessions 1 2 4 8 --modes oracle

`--engine` also times the batched engine alone, in this process (no network, no
drafting): median pass time for 1, 2, 4, 8 requests of the same tree shape, i.e. what a
pass costs when the verifier is saturated.

The client drafts on the same machine, so on a small CPU box drafting and verifying
compete for cores: figures are for comparing levels, not absolute hardware numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from netutil import (  # noqa: E402  (the generic process helpers the tests use)
    Proc,
    free_port,
    http_get,
    prometheus_values,
    python_script,
    script,
)

PAIRS = {"tiny": ("tiny-test", "tiny-test-draft"),
         "demo": ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b")}
PROMPTS = [
    "def quicksort(items):", "The capital of France is", "import numpy as np\n",
    "SELECT name FROM users WHERE", "Once upon a time", "class LinkedList:",
    "Q: what is 17 * 23?\nA:", "// binary search in C\nint search(",
]
SIZES = ("1.0", "2.0", "3.0", "4.0", "5.0", "6.0", "7.0", "8.0", "10.0", "12.0", "16.0")


def snapshot(url: str) -> dict[str, float]:
    return prometheus_values(http_get(url))


def batch_histogram(before: dict, after: dict) -> dict[str, int]:
    """Passes per verify-request count, from the cumulative histogram buckets."""
    out, prev = {}, 0
    for le in SIZES:
        key = f'specedge_batch_size_bucket{{le="{le}"}}'
        cum = int(after.get(key, 0) - before.get(key, 0))
        if cum - prev:
            out[str(int(float(le)))] = cum - prev
        prev = cum
    return out


def level(args: argparse.Namespace, addr: str, url: str, sessions: int, mode: str,
          workdir: Path) -> dict:
    before = snapshot(url)
    oracle = ["--oracle-miss", args.oracle_miss] if mode == "oracle" else []
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(sessions)]
    start = time.perf_counter()
    client = Proc(python_script(
        TESTS / "verifier_client.py", "generate", "--addr", addr, "--model-id", args.target,
        "--draft-model", args.draft, "--dtype", args.dtype, "--tree", args.tree,
        "--max-new-tokens", args.max_new_tokens, *oracle,
        *(a for p in prompts for a in ("--prompt", p)),
    ), workdir, f"client-{mode}-{sessions}")
    rc = client.wait(args.timeout)
    wall = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(client.describe())
    after = snapshot(url)

    def d(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    busy = d("specedge_engine_busy_seconds_total")
    requests = d("specedge_spec_decode_num_drafts_total")
    passes = d("specedge_batch_size_count")
    session_seconds = [s["seconds"] for s in json.loads(client.stdout().splitlines()[-1])
                       ["sessions"]]
    return {
        "mode": mode,
        "sessions": sessions,
        "requests": int(requests),
        "passes": int(passes),
        "mean_batch": round(requests / passes, 2) if passes else 0.0,
        "committed_tokens": int(d("specedge_committed_tokens_total")),
        "committed_per_busy_s": round(d("specedge_committed_tokens_total") / busy, 1),
        "drafted_per_busy_s": round(d("specedge_spec_decode_num_draft_tokens_total") / busy, 1),
        "rows_per_busy_s": round(d("specedge_batch_tokens_sum") / busy, 1),
        "acceptance": round(d("specedge_spec_decode_num_accepted_tokens_total")
                            / max(d("specedge_spec_decode_num_draft_tokens_total"), 1), 3),
        "busy_s": round(busy, 3),
        "mean_pass_ms": round(1000 * busy / max(d("specedge_pass_seconds_count"), 1), 2),
        "session_wall_s": round(max(session_seconds), 2),
        "client_wall_s": round(wall, 2),
        "batch_sizes": batch_histogram(before, after),
    }


def engine_levels(args: argparse.Namespace, repeats: int) -> list[dict]:
    """Median pass time of B verify requests (B = each --sessions level), in process."""
    import random

    import torch

    from specedge.models import load_model, vocab_size
    from specedge.sampling import SamplingParams
    from specedge.trees import TreeShape
    from specedge.verifier.engine import TargetEngine, VerifyJob

    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model, tok = load_model(args.target, dtype)
    engine = TargetEngine(model, prefill_chunk=256)
    states = [engine.new_state(tok(PROMPTS[i % len(PROMPTS)] * 4)["input_ids"],
                               SamplingParams()) for i in range(max(args.sessions))]
    while jobs := [j for s in states if (j := engine.next_prefill(s)) is not None]:
        engine.run(jobs)
    n = TreeShape.parse(args.tree).budget
    rng, vocab = random.Random(0), vocab_size(model)
    rows = []
    for b in args.sessions:
        times = []
        for _ in range(repeats):
            jobs = [VerifyJob(s, [rng.randrange(vocab) for _ in range(n)], list(range(-1, n - 1)))
                    for s in states[:b]]
            times.append(engine.run(jobs).seconds)
        ms = sorted(times)[len(times) // 2] * 1000
        rows.append({"requests": b, "pass_ms": round(ms, 2),
                     "requests_per_s": round(1000 * b / ms, 1),
                     "draft_tokens_per_s": round(1000 * b * n / ms, 1)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="tiny")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--tree", default="chain:4")
    parser.add_argument("--modes", nargs="+", choices=["draft", "oracle"],
                        default=["draft", "oracle"])
    parser.add_argument("--oracle-miss", type=float, default=0.15,
                        help="oracle mode: chance each chain token is wrong (default: "
                        "%(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the verifier (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--engine", action="store_true",
                        help="also time the engine alone, in process")
    parser.add_argument("--engine-repeats", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    args.target, args.draft = PAIRS[args.pair]
    workdir = Path(tempfile.mkdtemp(prefix="verifier-load-"))
    port = free_port()
    verifier = Proc([
        script("specedge-verifier"), "serve", "--model", args.target, "--dtype", args.dtype,
        "--listen", "/ip4/127.0.0.1/tcp/0", "--announce-file", str(workdir / "announce"),
        "--identity", str(workdir / "verifier.key"), "--no-ledger", "--no-dht",
        "--metrics-port", str(port), "--threads", str(args.threads),
    ], workdir, "verifier")
    try:
        addr = verifier.wait_for_file(workdir / "announce", 600)[0]
        url = f"http://127.0.0.1:{port}/metrics"
        rows = [level(args, addr, url, n, mode, workdir)
                for mode in args.modes for n in args.sessions]
    finally:
        verifier.stop()
    report = {"pair": args.pair, "dtype": args.dtype, "tree": args.tree,
              "max_new_tokens": args.max_new_tokens, "levels": rows}
    if args.engine:
        report["engine"] = engine_levels(args, args.engine_repeats)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{args.pair} pair, {args.dtype}, {args.tree}, {args.max_new_tokens} tokens/session")
    print("| mode | sessions | committed tok/busy s | drafted tok/busy s | mean batch | "
          "passes by batch size | mean pass ms | busy s | acceptance |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        dist = ", ".join(f"{k}:{v}" for k, v in r["batch_sizes"].items())
        print(f"| {r['mode']} | {r['sessions']} | {r['committed_per_busy_s']} | "
              f"{r['drafted_per_busy_s']} | "
              f"{r['mean_batch']} | {dist} | {r['mean_pass_ms']} | {r['busy_s']} | "
              f"{r['acceptance']} |")
    if args.engine:
        print("\nengine alone (in process, no network):")
        print("| requests per pass | pass ms | requests/s | draft tokens verified/s |")
        print("|---|---|---|---|")
        for r in report["engine"]:
            print(f"| {r['requests']} | {r['pass_ms']} | {r['requests_per_s']} | "
                  f"{r['draft_tokens_per_s']} |")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
