"""Faults with real processes on loopback: verifiers killed and frozen mid-generation,
nodes killed mid-session, the ledger database gone mid-run, a verifier restarted with
the same identity. Each test checks that nothing was lost: the output equals the
no-failure output, and every receipt is where it must be, once.

Every process is started by its test (or its module fixture) and killed on teardown;
every wait is bounded.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from faultutil import (
    LOOPBACK,
    Bootstrap,
    Verifier,
    check_rounds_cover,
    child_env,
    json_result,
    ledger_rows,
    mib,
    node_generate,
    settled_rss,
    start_verifiers,
)
from netutil import Proc, free_port, script, wait_until

from specedge.engine import autoregressive_generate
from specedge.models import build_tiny
from specedge.text import encode_prompt, eos_ids

pytestmark = pytest.mark.timeout(300)

# Prompts whose target-only greedy output runs at least LONG tokens without an end of
# sequence (most short prompts end within a few hundred tokens on the tiny pair).
LONG_PROMPTS = ["x", "y", "a"]
LONG = 1700


@pytest.fixture(scope="module")
def greedy():
    """Target-only greedy output, the no-failure reference (float32, so bit-exact)."""
    target, tok = build_tiny()
    eos = eos_ids(tok, target.generation_config)

    def run(prompt: str, n: int) -> list[int]:
        return autoregressive_generate(target, encode_prompt(tok, prompt), n,
                                       eos_ids=eos).token_ids

    return run


def _in_use(verifiers: list[Verifier], avoid: set[str], timeout: float = 120.0) -> Verifier:
    """The verifier that holds the node's session and has answered a few rounds."""

    def find() -> Verifier | None:
        for v in verifiers:
            if v.name in avoid or not v.proc.alive():
                continue
            m = v.metrics()
            if m.get("specedge_sessions_open", 0) >= 1 and m.get(
                    "specedge_spec_decode_num_drafts_total", 0) >= 5:
                return v
        return None

    return wait_until(find, timeout, "a verifier serving the node", interval=0.02)


def _check_receipts(node_db: str, verifiers: list[Verifier], token_ids: list[int],
                    faulty: set[str]) -> dict:
    """Nothing lost, nothing doubled, across the node's ledger and the verifiers'.

    - The node's own receipts cover every generated token exactly once, in order.
    - Each of them is in the ledger of the verifier that signed it (none lost).
    - A verifier's ledger holds no receipt the node lacks, except at most one from a
      verifier that failed: the round it answered as it died (the work was done and
      recorded; the node never saw the answer and sent that tree elsewhere).
    """
    node_rows = ledger_rows(node_db)
    assert node_rows, "the node kept no receipts"
    node_id = node_rows[0].node
    check_rounds_cover(node_rows, token_ids)
    assert len({r.key for r in node_rows}) == len(node_rows), "a receipt kept twice"
    held = {r.key for r in node_rows}
    by_verifier = {}
    for v in verifiers:
        rows = ledger_rows(v.ledger, node=node_id)
        keys = [r.key for r in rows]
        assert len(set(keys)) == len(keys), f"{v.name}: a receipt stored twice"
        by_verifier[v.name] = set(keys)
    stored = set().union(*by_verifier.values())
    lost = held - stored
    assert not lost, f"receipts the node holds but no verifier ledger has: {sorted(lost)}"
    extra = {name: keys - held for name, keys in by_verifier.items() if keys - held}
    for name, keys in extra.items():
        assert name in faulty and len(keys) == 1, f"{name} holds receipts the node lacks: {keys}"
    return {"node_receipts": len(node_rows), "answered_as_it_died": sum(map(len, extra.values())),
            "per_verifier": {k: len(v & held) for k, v in by_verifier.items()}}


# ---------------------------------------------------------------------------- verifier faults


def _faults_mid_generation(tmp_path, greedy, faults: list[str]) -> dict:
    """One generation over len(faults) + 1 verifiers; each fault hits the verifier that
    holds the session once it has answered a few rounds: SIGKILL, or SIGSTOP (frozen:
    neither answers nor closes). The node fails over each time and finishes on the last
    one. Then: same tokens as target-only greedy, one failover per fault, and each
    accepted token has exactly one receipt across the node's ledger and the verifiers'."""
    prompt, n = "import numpy as np\n", 400
    ids = greedy(prompt, n)
    assert len(ids) == n  # no early end: the faults land mid-generation
    verifiers = start_verifiers(tmp_path, [f"v{i}" for i in range(len(faults) + 1)],
                                "--no-dht")
    victims: list[Verifier] = []
    try:
        node = node_generate(tmp_path, "node", prompt, n,
                             verifiers=[v.addr for v in verifiers],
                             extra=["--silence-timeout", "5", "-v"])
        try:
            t0 = time.monotonic()
            for fault in faults:
                victim = _in_use(verifiers, {v.name for v in victims})
                victims.append(victim)
                if fault == "sigkill":
                    victim.proc.kill()
                else:
                    victim.proc.send_signal(signal.SIGSTOP)
            out = json_result(node)
            took = time.monotonic() - t0
        finally:
            node.kill()
        assert out["token_ids"] == ids, node.describe()
        assert out["stats"]["failovers"] == len(faults), node.describe()
        assert out["stats"]["verifiers"][: len(victims)] == [v.peer for v in victims]
        for v in verifiers:
            if v.proc.alive():
                # Thawed, a frozen verifier answers what it had (to nobody), writes its
                # receipts and stops cleanly; then its ledger is complete.
                v.proc.send_signal(signal.SIGCONT)
                assert v.proc.stop(30) == 0, v.proc.describe()
        summary = _check_receipts(str(tmp_path / "node.sqlite3"), verifiers, ids,
                                  {v.name for v in victims})
        for v in victims:  # it had answered 5 rounds; the node had read at least 4
            assert summary["per_verifier"][v.name] >= 4
        print(f"{'+'.join(faults)}: done {took:.1f} s after the first fault; {summary}")
        return summary
    finally:
        for v in verifiers:
            v.proc.send_signal(signal.SIGCONT)
            v.kill()


@pytest.mark.slow
def test_verifier_killed_then_next_frozen_mid_generation_loses_nothing(tmp_path, greedy):
    _faults_mid_generation(tmp_path, greedy, ["sigkill", "sigstop"])


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["sigkill", "sigstop"])
def test_verifier_fault_mid_generation_loses_nothing(tmp_path, greedy, fault):
    _faults_mid_generation(tmp_path, greedy, [fault])


@pytest.mark.slow
def test_verifier_sigkill_repeated_loses_no_receipt(tmp_path, greedy):
    """Before receipts were durable before answered, a SIGKILL lost the receipt of the
    last round the node had been answered (on the first try): run it a few times."""
    for i in range(4):
        _faults_mid_generation(tmp_path / f"run{i}", greedy, ["sigkill"])


# ---------------------------------------------------------------------------- node faults


def _kill_nodes_mid_session(v: Verifier, workdir, cycle: int) -> None:
    """Two real nodes generate on `v`; once both hold a session and have had rounds
    answered, one is SIGKILLed and the other SIGSTOPped (frozen: only the connection's
    health check can tell). Both sessions must be reaped."""
    base = v.metric("specedge_sessions_open")
    nodes = [node_generate(workdir, f"doomed{cycle}-{i}", prompt, LONG, verifiers=[v.addr])
             for i, prompt in enumerate(LONG_PROMPTS[:2])]
    try:
        wait_until(lambda: v.metric("specedge_sessions_open") >= base + 2, 120,
                   "both nodes hold a session")
        drafts = v.metric("specedge_spec_decode_num_drafts_total")
        wait_until(lambda: v.metric("specedge_spec_decode_num_drafts_total") >= drafts + 6, 60,
                   "rounds answered")
        assert v.metric("specedge_kv_cache_bytes") > 0
        nodes[0].kill()
        nodes[1].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        wait_until(lambda: v.metric("specedge_sessions_open") == base, 30,
                   "killed and frozen nodes' sessions reaped")
        reaped_s = time.monotonic() - t0
    finally:
        for n in nodes:
            n.send_signal(signal.SIGCONT)
            n.kill()
    m = v.metrics()
    closed = {k: val for k, val in m.items() if k.startswith("specedge_sessions_closed_total")}
    print(f"cycle {cycle}: reaped in {reaped_s:.1f} s; {closed}")


def _warm_up(v: Verifier) -> None:
    """A few sessions and rounds from this process (no new process to start): the
    daemon's first passes, thread pools and allocator arenas, before the baseline."""
    import hostile_peer as hp
    import trio

    async def main() -> None:
        async with hp.peers(v.addr, 1) as (p,):
            async def one(prompt: list[int]) -> None:
                s = await p.session(prompt, max_new_tokens=400)
                for _ in range(40):
                    await s.good_round([7, 8, 9, 10], [-1, 0, 1, 2])
                await s.close()

            async with trio.open_nursery() as nursery:
                for k in range(2):
                    nursery.start_soon(one, list(range(40 + k, 90)))

    hp.run(main)


def _node_kill_cycles(tmp_path, cycles: int) -> None:
    v = Verifier(tmp_path, "reaper", "--no-dht").ready()
    try:
        _warm_up(v)
        rss = [settled_rss(v.proc.pid)]
        for cycle in range(cycles):
            _kill_nodes_mid_session(v, tmp_path, cycle)
            m = v.metrics()
            assert m["specedge_sessions_open"] == 0
            assert m["specedge_kv_cache_bytes"] == 0
            rss.append(settled_rss(v.proc.pid))
        # After the warm-up, memory must come back to where it was after each cycle.
        grown = max(rss) - rss[0]
        print(f"verifier RSS warm, then after each cycle (MiB): {[mib(r) for r in rss]}")
        assert grown < 24 * 2**20, f"RSS grew {mib(grown)} MiB over {cycles} cycles"
        assert v.proc.alive()
    finally:
        v.kill()


@pytest.mark.slow
def test_killed_and_frozen_nodes_are_reaped_and_memory_returns(tmp_path):
    _node_kill_cycles(tmp_path, 1)


@pytest.mark.slow
def test_killed_and_frozen_nodes_are_reaped_soak(tmp_path):
    _node_kill_cycles(tmp_path, 8)


# ---------------------------------------------------------------------------- ledger outage


PG_TOKENS = 700


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_outage_mid_run_spools_then_flushes_everything(tmp_path, greedy):
    """The verifier's PostgreSQL ledger goes away mid-run (a TCP proxy between them drops
    every connection and refuses new ones; the shared server is never touched) and comes
    back. Generation never stops; receipts written meanwhile wait in the spool and are
    flushed; `specedge-ledger verify` passes; the ledger holds exactly the receipts the
    nodes hold, no more, no fewer."""
    import sqlalchemy as sa
    from test_ledger_spool import OutageProxy

    from specedge.ledger.testing import PG_TEST_URL, pg_available, pg_schema

    if not pg_available():
        pytest.skip("PostgreSQL on 127.0.0.1:5432 is not reachable")
    target = sa.make_url(PG_TEST_URL)
    proxy = OutageProxy((target.host or "127.0.0.1", target.port or 5432))
    try:
        with pg_schema() as direct:
            via = sa.make_url(direct).set(host="127.0.0.1", port=proxy.port)
            url = via.update_query_dict({"connect_timeout": "2"}).render_as_string(False)
            v = Verifier(tmp_path, "pgv", "--no-dht", ledger=url).ready()
            nodes = [node_generate(tmp_path, f"pgnode{i}", p, PG_TOKENS, verifiers=[v.addr])
                     for i, p in enumerate(LONG_PROMPTS[:2])]
            try:
                wait_until(lambda: v.metric("specedge_receipts_total{status=\"stored\"}") >= 10,
                           120, "receipts stored before the outage")
                proxy.down()
                wait_until(lambda: v.metric("specedge_receipts_total{status=\"spooled\"}") >= 20
                           or not any(n.alive() for n in nodes), 60, "receipts spooled")
                spooled_files = len(list(v.spool.glob("*.rcpt")))
                proxy.restore()
                outs = [json_result(n) for n in nodes]
                wait_until(lambda: not list(v.spool.glob("*.rcpt")), 60, "the spool flushed")
                m = v.metrics()
                assert v.proc.stop(30) == 0, v.proc.describe()
            finally:
                for n in nodes:
                    n.kill()
                v.kill()
            for out, p in zip(outs, LONG_PROMPTS, strict=False):
                assert out["token_ids"] == greedy(p, PG_TOKENS)
            spooled = m.get('specedge_receipts_total{status="spooled"}', 0)
            assert spooled >= 1 and spooled_files >= 1, m
            assert m.get('specedge_receipts_total{status="failed"}', 0) == 0, m
            check = subprocess.run([script("specedge-ledger"), "--ledger", direct, "verify",
                                    "--json"], capture_output=True, text=True, timeout=120)
            assert check.returncode == 0, check.stdout + check.stderr
            report = json.loads(check.stdout)
            node_rows = [r for i in range(2)
                         for r in ledger_rows(str(tmp_path / f"pgnode{i}.sqlite3"))]
            pg_rows = ledger_rows(direct)
            assert sorted(r.key for r in pg_rows) == sorted(r.key for r in node_rows)
            assert sum(r.accepted for r in pg_rows) == sum(r.accepted for r in node_rows)
            print(f"outage: {int(spooled)} receipts spooled and flushed; ledger holds "
                  f"{len(pg_rows)} receipts = the nodes' {len(node_rows)}; verify: "
                  f"{ {k: report[k] for k in ('ok', 'receipts', 'chains') if k in report} }")
    finally:
        proxy.close()


# ---------------------------------------------------------------------------- restart


# A request whose every known verifier fails to open looks again (DHT and probes) and
# lifts libp2p's one-minute refusal to redial a failed peer; the restarted verifier
# must serve the next request or the one after.
REDISCOVERY_S = 10.0


def _complete(url: str, prompt: str, n: int, timeout: float = 60) -> tuple[int, dict]:
    import httpx

    r = httpx.post(url + "/v1/completions", timeout=timeout, json={
        "model": "tiny-test", "prompt": prompt, "max_tokens": n, "temperature": 0})
    return r.status_code, r.json()


def _served_again(url: str, prompt: str, n: int) -> tuple[int, dict, list[int], float]:
    """Ask every 0.5 s until served or REDISCOVERY_S have passed: (last status, its body,
    every status, seconds taken)."""
    t0, tries = time.monotonic(), []
    while True:
        status, body = _complete(url, prompt, n)
        tries.append(status)
        if status == 200 or time.monotonic() - t0 > REDISCOVERY_S:
            return status, body, tries, time.monotonic() - t0
        time.sleep(0.5)


def _join(tmp_path, *network: str):  # noqa: ANN202
    url_file = tmp_path / "api.url"
    proc = Proc([script("specedge-node"), "join", *network, "--listen", LOOPBACK, "--api",
                 "127.0.0.1:0", "--announce-file", str(url_file), "--identity",
                 str(tmp_path / "node.key"), "--ledger", str(tmp_path / "node.sqlite3"),
                 "--no-status"], tmp_path, "join", child_env(tmp_path))
    return proc, url_file


@pytest.mark.parametrize("port", ["new", pytest.param("same", marks=pytest.mark.slow)])
def test_verifier_restarted_with_same_identity_is_rediscovered(tmp_path, greedy, port):
    """A long-running node (`join`) knows the verifier only through a bootstrap peer
    and the DHT. The verifier is killed in the middle of a generation (which fails:
    there is no other verifier), then restarted with the same identity, on a new port
    or the same one. The node's next request must be served by it at once, with the
    target's greedy tokens. Before the fixes in protocol.hosts.find_providers the node
    kept finding the old address (py-libp2p answers a lookup from its local provider
    cache once it has one, and keeps refusing to dial a peer that failed for 60 s) and
    never used the restarted verifier."""
    import threading

    listen = LOOPBACK if port == "new" else f"/ip4/127.0.0.1/tcp/{free_port()}"
    boot = Bootstrap(tmp_path).ready()
    v1 = v2 = join = None
    try:
        # Started together (startup is mostly imports); the node looks again on demand.
        v1 = Verifier(tmp_path, "v1", "--bootstrap", boot.addr, listen=listen)
        join, url_file = _join(tmp_path, "--bootstrap", boot.addr)
        v1.ready()
        url = join.wait_for_file(url_file, 120)[0]
        prompt, n = "def fibonacci(n):", 24
        status, body = _complete(url, prompt, n)
        assert status == 200, body
        assert body["specedge"]["token_ids"] == greedy(prompt, n)
        assert body["specedge"]["verifiers"] == [v1.peer]

        cut: list = []
        long = threading.Thread(target=lambda: cut.append(_complete(url, "x", LONG, 120)))
        long.start()
        drafts = v1.metric("specedge_spec_decode_num_drafts_total")
        wait_until(lambda: v1.metric("specedge_spec_decode_num_drafts_total") >= drafts + 5,
                   60, "the long generation under way")
        v1.kill()
        long.join(120)
        assert cut and cut[0][0] >= 500, cut  # no verifier left: a clear error

        v2 = Verifier(tmp_path, "v2", "--bootstrap", boot.addr, identity=v1.identity,
                      listen=listen).ready()
        assert v2.peer == v1.peer
        if port == "new":
            assert v2.addr != v1.addr
        status, body, tries, took = _served_again(url, prompt, n)
        assert status == 200, (tries, body, join.describe())
        assert body["specedge"]["token_ids"] == greedy(prompt, n)
        assert body["specedge"]["verifiers"] == [v2.peer]
        print(f"rediscovered {took:.1f} s after the restart ({tries})")
    finally:
        for p in (join, v1 and v1.proc, v2 and v2.proc, boot.proc):
            if p is not None:
                p.kill()


@pytest.mark.slow
def test_direct_verifier_restarted_on_its_port_is_used_again(tmp_path, greedy):
    """`join --verifier ADDR` (no DHT): the verifier dies, a request fails, the verifier
    comes back on the same address with the same identity; requests must be served
    again at once. Before node.discovery lifted libp2p's negative cache (a peer whose
    dial failed is refused for 60 s) and looked again when every verifier failed, the
    node's requests failed for up to a minute."""
    listen = f"/ip4/127.0.0.1/tcp/{free_port()}"
    v1 = Verifier(tmp_path, "v1", "--no-dht", listen=listen).ready()
    v2 = join = None
    try:
        join, url_file = _join(tmp_path, "--verifier", v1.addr)
        url = join.wait_for_file(url_file, 120)[0]
        prompt, n = "def fibonacci(n):", 16
        assert _complete(url, prompt, n)[0] == 200
        v1.kill()
        gap = []
        for _ in range(3):  # the first fails on the dead connection, later ones dial
            status, body = _complete(url, prompt, n)
            gap.append(body.get("error", {}).get("message", "")[-80:])
            assert status >= 500
            time.sleep(0.5)
        print("gap:", gap)
        v2 = Verifier(tmp_path, "v2", "--no-dht", identity=v1.identity, listen=listen).ready()
        assert v2.addr == v1.addr
        status, body, tries, took = _served_again(url, prompt, n)
        print(f"direct restart: {status} after {took:.1f} s")
        assert status == 200, (tries, body)
        assert body["specedge"]["token_ids"] == greedy(prompt, n)
    finally:
        for p in (join, v1.proc, v2 and v2.proc):
            if p is not None:
                p.kill()
