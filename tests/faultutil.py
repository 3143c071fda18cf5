"""Shared pieces of the fault, hostile-peer and load tests (importable as `faultutil`).

Real `specedge-verifier`, `specedge-node` and bootstrap processes on 127.0.0.1, built on
`netutil` (output to files, bounded waits, killed on teardown); ledgers read back
receipt by receipt; memory read from the metrics and from the process (psutil).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from netutil import (
    Proc,
    free_port,
    http_get,
    prometheus_values,
    script,
)

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
START_TIMEOUT = 120.0  # cold processes import torch and libp2p; the machine is shared


def child_env(workdir: Path) -> dict[str, str]:
    """Children keep their default files (identities, ledgers) inside the test's folder."""
    return {"XDG_DATA_HOME": str(workdir / "data"), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


class Verifier:
    """A `specedge-verifier serve` process: its address, metrics, ledger and memory."""

    def __init__(self, workdir: Path, name: str, *extra: str, ledger: str | None = None,
                 identity: Path | None = None, listen: str = LOOPBACK,
                 program: str | None = None) -> None:
        self.workdir = workdir
        self.name = name
        self.metrics_port = free_port()
        self.announce = workdir / f"{name}.announce"
        self.announce.unlink(missing_ok=True)
        self.identity = identity or workdir / f"{name}.key"
        self.ledger = ledger or str(workdir / f"{name}.sqlite3")
        self.spool = workdir / f"{name}.spool"
        args = [
            program or script("specedge-verifier"), "serve", "--model", "tiny-test",
            "--listen", listen,
            "--announce-file", str(self.announce), "--identity", str(self.identity),
            "--ledger", self.ledger, "--spool-dir", str(self.spool),
            "--metrics-port", str(self.metrics_port), "--threads", "1",
            "--max-batch-tokens", "256", "--prefill-chunk", "64", "--max-tree-tokens", "32",
            *extra,
        ]
        self.proc = Proc(args, workdir, name, child_env(workdir))
        self.addrs: list[str] = []

    def ready(self, timeout: float = START_TIMEOUT) -> Verifier:
        self.addrs = self.proc.wait_for_file(self.announce, timeout)
        return self

    @property
    def addr(self) -> str:
        return self.addrs[0]

    @property
    def peer(self) -> str:
        return self.addr.rsplit("/p2p/", 1)[1]

    def metrics(self) -> dict[str, float]:
        return prometheus_values(http_get(f"http://127.0.0.1:{self.metrics_port}/metrics"))

    def metric(self, name: str) -> float:
        return self.metrics().get(name, 0.0)

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def kill(self) -> None:
        self.proc.kill()


def start_verifiers(workdir: Path, names: Sequence[str], *extra: str) -> list[Verifier]:
    """Start several verifiers at once (startup is mostly imports: overlap them)."""
    started = [Verifier(workdir, n, *extra) for n in names]
    try:
        return [v.ready() for v in started]
    except BaseException:
        for v in started:
            v.kill()
        raise


class Bootstrap:
    """A DHT-only bootstrap peer (`specedge bootstrap`)."""

    def __init__(self, workdir: Path, name: str = "bootstrap") -> None:
        self.announce = workdir / f"{name}.announce"
        self.proc = Proc([script("specedge"), "bootstrap", "--listen", LOOPBACK,
                          "--identity", str(workdir / f"{name}.key"),
                          "--announce-file", str(self.announce)], workdir, name,
                         child_env(workdir))
        self.addr = ""

    def ready(self, timeout: float = START_TIMEOUT) -> Bootstrap:
        self.addr = self.proc.wait_for_file(self.announce, timeout)[0]
        return self


def node_generate(workdir: Path, name: str, prompt: str, n: int, *,
                  verifiers: Iterable[str] = (), bootstrap: Iterable[str] = (),
                  extra: Sequence[str] = ()) -> Proc:
    """`specedge-node generate --json` as a background process with its own identity and
    receipt ledger (`<name>.key`, `<name>.sqlite3` in `workdir`)."""
    args = [script("specedge-node"), "generate", "--listen", LOOPBACK, "--prompt", prompt,
            "--max-new-tokens", str(n), "--json", "--identity", str(workdir / f"{name}.key"),
            "--ledger", str(workdir / f"{name}.sqlite3"), *extra]
    for a in verifiers:
        args += ["--verifier", a]
    for a in bootstrap:
        args += ["--bootstrap", a]
    return Proc(args, workdir, name, child_env(workdir))


class Join:
    """A `specedge-node join` process (its own identity and ledger) and its API."""

    def __init__(self, workdir, name: str, *verifiers: str, extra: tuple[str, ...] = ()) -> None:
        self.url_file = workdir / f"{name}.url"
        args = [script("specedge-node"), "join", "--listen", "/ip4/127.0.0.1/tcp/0",
                "--api", f"127.0.0.1:{free_port()}", "--no-status", "--announce-file",
                str(self.url_file), "--identity", str(workdir / f"{name}.key"), "--ledger",
                str(workdir / f"{name}.sqlite3"), *extra]
        for v in verifiers:
            args += ["--verifier", v]
        self.proc = Proc(args, workdir, name, child_env(workdir))
        self.url = ""

    def ready(self) -> Join:
        self.url = self.proc.wait_for_file(self.url_file, START_TIMEOUT)[0]
        return self

    def complete(self, prompt: str, n: int) -> httpx.Response:
        body = {"model": "tiny-test", "prompt": prompt, "max_tokens": n, "temperature": 0}
        return httpx.post(f"{self.url}/v1/completions", json=body, timeout=500)


def json_result(proc: Proc, timeout: float = 180.0) -> dict:
    rc = proc.wait(timeout)
    assert rc == 0, proc.describe()
    return json.loads(proc.stdout().strip().splitlines()[-1])


# ---------------------------------------------------------------------------- ledgers


@dataclass(frozen=True)
class Row:
    """One receipt as a ledger holds it, with the request it answers."""

    verifier: str
    node: str
    session: bytes
    seq: int
    drafted: int
    accepted: int
    tokens: tuple[int, ...]  # the request's tree tokens (a chain: in order)

    @property
    def key(self) -> tuple[str, bytes, int]:
        return (self.verifier, self.session, self.seq)


def ledger_rows(url: str, node: str | None = None) -> list[Row]:
    """Every receipt in a ledger (optionally only `node`'s), in ledger order."""
    from specedge.ledger import open_ledger
    from specedge.protocol.envelopes import open_receipt, open_request

    out = []
    with open_ledger(url) as ledger:
        for receipt_env, request_env in ledger.iter_receipt_pairs():
            _, r = open_receipt(receipt_env)
            _, req = open_request(request_env)
            if node is None or r.node_peer_id == node:
                out.append(Row(r.verifier_peer_id, r.node_peer_id, bytes(r.session_id), r.seq,
                               r.drafted, r.accepted, tuple(req.tokens)))
    return out


def check_rounds_cover(rows: Sequence[Row], token_ids: Sequence[int]) -> None:
    """The node's receipts, in order, account for every generated token exactly once:
    each round's accepted chain tokens are the next generated tokens, then its bonus."""
    pos = 0
    for row in rows:
        want = list(token_ids[pos : pos + row.accepted])
        assert list(row.tokens[: row.accepted])[: len(want)] == want, (pos, row)
        pos += row.accepted + 1
    assert pos >= len(token_ids), f"receipts cover {pos} of {len(token_ids)} tokens"
    last = rows[-1]
    assert pos - (last.accepted + 1) < len(token_ids), "a receipt after the last token"


# ---------------------------------------------------------------------------- memory


def settled_rss(pid: int, seconds: float = 1.0) -> int:
    """RSS once it stops moving (largest of a few samples over `seconds`)."""
    proc = psutil.Process(pid)
    samples = []
    for _ in range(5):
        samples.append(proc.memory_info().rss)
        time.sleep(seconds / 5)
    return max(samples)


def mib(n: float) -> float:
    return round(n / 2**20, 1)
