"""Ledger throughput: receipts ingested per second, and `verify` time for a big ledger.

    .venv/bin/python bench/ledger_throughput.py                  # SQLite and PostgreSQL
    .venv/bin/python bench/ledger_throughput.py --verify-n 100000 --keep /tmp/ledger100k
    .venv/bin/python -m specedge.ledger.cli --ledger /tmp/ledger100k/ledger.sqlite3 verify

Every receipt is real: a node's sealed VerifyRequest and a verifier's sealed Receipt,
so ingest pays for both signature checks, as in production. PostgreSQL runs use a
fresh schema that is dropped afterwards (--pg-url, default the test server).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from specedge.ledger import open_ledger
from specedge.ledger.checks import check_pair
from specedge.ledger.testing import (
    PG_TEST_URL,
    make_peers,
    make_workload,
    pg_available,
    pg_schema,
    writer_processes,
)


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else float("inf")


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ingest_modes(url: str, pairs: list, threads: int, processes: int) -> dict[str, float]:
    """Receipts/s for each way of writing; every mode gets its own slice of the workload."""
    out: dict[str, float] = {}
    k = len(pairs) // 5
    single, threaded, batched = pairs[:k], pairs[k : 2 * k], pairs[2 * k : 3 * k]
    fleet, shared = pairs[3 * k : 4 * k], pairs[4 * k :]
    with open_ledger(url) as led:
        cpu = time.process_time()
        out["single_ingest_per_s"] = rate(
            len(single), timed(lambda: [led.ingest(*p) for p in single])
        )
        # Client-side CPU per receipt (checks, SQLAlchemy, driver), whatever the load.
        out["single_ingest_client_cpu_ms"] = round(
            (time.process_time() - cpu) / len(single) * 1e3, 3
        )

        def threaded_run() -> None:
            def work(chunk: list) -> None:
                for p in chunk:
                    led.ingest(*p)

            ts = [
                threading.Thread(target=work, args=(threaded[i::threads],)) for i in range(threads)
            ]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

        out[f"ingest_{threads}_threads_group_commit_per_s"] = rate(
            len(threaded), timed(threaded_run)
        )
        cpu = time.process_time()
        out["ingest_many_batch500_per_s"] = rate(
            len(batched),
            timed(
                lambda: [led.ingest_many(batched[i : i + 500]) for i in range(0, len(batched), 500)]
            ),
        )
    out["ingest_many_client_cpu_ms"] = round((time.process_time() - cpu) / len(batched) * 1e3, 3)
    # Processes, each calling ingest() once per receipt; rate from the slowest one's time
    # after the common start (a barrier), so process start-up is not counted.
    by_verifier: dict[str, list] = {}
    for p in fleet:
        by_verifier.setdefault(check_pair(*p).verifier, []).append(p)
    counts = writer_processes(url, list(by_verifier.values()), [1] * len(by_verifier), 600)
    out[f"ingest_{len(by_verifier)}_processes_one_verifier_each_per_s"] = rate(
        len(fleet), max(c["ms"] for c in counts) / 1000
    )
    works = [shared[i::processes] for i in range(processes)]
    counts = writer_processes(url, works, [1] * processes, 600)
    out[f"ingest_{processes}_processes_all_verifiers_per_s"] = rate(
        len(shared), max(c["ms"] for c in counts) / 1000
    )
    with open_ledger(url) as led:
        rep = led.verify()
        assert rep.ok and rep.receipts == len(pairs), rep.problems[:3]
    return out


def verify_run(url: str, big: list, verify_jobs: int) -> dict[str, object]:
    """Ingest `big` in batches, then time `verify` (1 process, and `verify_jobs`)."""
    with open_ledger(url) as led:
        ingest_s = timed(
            lambda: [led.ingest_many(big[i : i + 2000]) for i in range(0, len(big), 2000)]
        )
        v: dict[str, object] = {
            "receipts": led.count_receipts(),
            "ingest_many_s": round(ingest_s, 1),
            "ingest_many_per_s": rate(len(big), ingest_s),
        }
        if url.endswith(".sqlite3"):
            v["ledger_file_mb"] = round(
                sum(os.path.getsize(f) for f in (url, url + "-wal") if os.path.exists(f)) / 2**20,
                1,
            )
            v["ledger"] = url
        for jobs in sorted({1, verify_jobs}):
            cpu = time.process_time()
            rep = led.verify(jobs=jobs)
            assert rep.ok and rep.receipts == len(big), rep.problems[:3]
            v[f"verify_s_jobs{jobs}"] = round(rep.seconds, 2)
            if jobs == 1:  # load-independent: this process did all the client-side work
                v["verify_cpu_s_jobs1"] = round(time.process_time() - cpu, 2)
    return v


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=4000, help="receipts per backend for ingest (4 modes)")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--verify-n", type=int, default=100_000, help="0 to skip the verify run")
    ap.add_argument("--verify-jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--pg-url", default=PG_TEST_URL)
    ap.add_argument("--no-pg", action="store_true")
    ap.add_argument("--keep", help="directory to keep the big SQLite ledger in")
    ap.add_argument("--verify-backend", choices=("sqlite", "postgresql", "both"), default="sqlite")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    results: dict[str, object] = {"cpus": os.cpu_count()}
    work = Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    verifiers, nodes = make_peers(work, 4, "verifier"), make_peers(work, 32, "node")

    if args.n:  # 0: only the verify run
        t = time.perf_counter()
        pairs = make_workload(verifiers, nodes, args.n, seed=1)
        results["generate_per_s"] = rate(len(pairs), time.perf_counter() - t)
        results["check_pair_only_per_s"] = rate(
            len(pairs), timed(lambda: [check_pair(*p) for p in pairs])
        )
        results["sqlite"] = ingest_modes(
            str(work / "ingest.sqlite3"), pairs, args.threads, args.processes
        )
        if not args.no_pg:
            if pg_available(args.pg_url):
                with pg_schema(args.pg_url, prefix="ledger_bench") as url:
                    results["postgresql"] = ingest_modes(url, pairs, args.threads, args.processes)
            else:
                results["postgresql"] = "unreachable"
    if not args.json:
        print(json.dumps(results, indent=2), flush=True)

    if args.verify_n:
        big = make_workload(verifiers, nodes, args.verify_n, seed=2)
        name = "verify_100k" if args.verify_n == 100_000 else f"verify_{args.verify_n}"
        backends = (
            ("sqlite", "postgresql") if args.verify_backend == "both" else (args.verify_backend,)
        )
        for backend in backends:
            if backend == "sqlite":
                big_dir = Path(args.keep) if args.keep else work
                big_dir.mkdir(parents=True, exist_ok=True)
                url = str(big_dir / "ledger.sqlite3")
                results[f"{name}_sqlite"] = verify_run(url, big, args.verify_jobs)
            elif pg_available(args.pg_url):
                with pg_schema(args.pg_url, prefix="ledger_bench") as url:
                    results[f"{name}_postgresql"] = verify_run(url, big, args.verify_jobs)
        if not args.json:
            print(json.dumps({k: results[k] for k in results if k.startswith("verify")}, indent=2))
    if args.json:
        print(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)  # identities and scratch ledgers (not --keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
