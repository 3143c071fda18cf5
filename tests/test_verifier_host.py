"""The verifier's stream handling in one process: limits, timeouts, receipts, shutdown.

A `Verifier` and a client host run in one trio loop on loopback (real libp2p, no
subprocesses), so the paths that are slow to reach with processes stay cheap to test.
"""

from __future__ import annotations

import contextlib

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from verifier_client import Client

from specedge.engine import autoregressive_generate
from specedge.ledger import SpoolingLedger, check_pair, open_ledger
from specedge.models import build_tiny
from specedge.protocol import hosts
from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.errors import ErrorCode, RemoteError
from specedge.protocol.framing import read_frame, write_frame
from specedge.protocol.ids import ADVERT_PROTOCOL, PROTOCOL_VERSION
from specedge.trees import TreeShape
from specedge.verifier.engine import TargetEngine
from specedge.verifier.host import Verifier, VerifierConfig

PROMPT = [71, 68, 75, 75, 78, 220, 86, 78]
CHAIN = TreeShape.chain(4)


@pytest.fixture(scope="module")
def models():
    return build_tiny()[0], build_tiny(draft=True)[0]


class SlowEngine(TargetEngine):
    """Passes take `delay` seconds longer, or raise, on demand."""

    delay = 0.0
    fail = False

    def run(self, jobs):
        if self.fail:
            raise RuntimeError("injected")
        if self.delay:
            import time

            time.sleep(self.delay)
        return super().run(jobs)


def run_with_verifier(models, body, ledger=None, clients: int = 1, **overrides) -> Verifier:
    """Serve a verifier, connect `clients` client hosts, run `body(verifier, *clients)`."""
    target, draft = models
    engine = SlowEngine(target, prefill_chunk=32)
    config = VerifierConfig(model_id="tiny-test", vocab_size=259, max_context_tokens=4096,
                            listen=["/ip4/127.0.0.1/tcp/0"], dht=False, max_batch_tokens=128,
                            max_tree_tokens=16, drain_timeout=5.0, **overrides)
    verifier = Verifier(engine, create_new_key_pair(), config, ledger)

    async def main() -> None:
        with trio.fail_after(60):
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                addrs = await nursery.start(verifier.serve, stop)
                async with contextlib.AsyncExitStack() as stack:
                    made = []
                    for _ in range(clients):
                        key = create_new_key_pair()
                        host = await stack.enter_async_context(
                            hosts.running_host(key, ["/ip4/127.0.0.1/tcp/0"]))
                        await hosts.connect(host, addrs[0])
                        made.append(Client(host, key, addrs[0], "tiny-test", draft))
                    await body(verifier, *made)
                stop.set()

    trio.run(main)
    return verifier


def test_rounds_match_target_greedy_and_receipts_reach_the_ledger(models, tmp_path):
    ledger = open_ledger(str(tmp_path / "ledger.sqlite3"))
    out = {}

    async def body(verifier: Verifier, client: Client) -> None:
        conn = await client.session(PROMPT, 30)
        out["tokens"] = await client.generate(conn, PROMPT, 30, CHAIN)
        out["receipts"] = conn.receipts
        await conn.close()

    run_with_verifier(models, body, ledger)
    assert out["tokens"] == autoregressive_generate(models[0], PROMPT, 30).token_ids
    assert ledger.count_receipts() == out["receipts"] > 0
    ledger.close()


def test_database_outage_spools_every_receipt(models, tmp_path):
    spool = tmp_path / "spool"
    ledger = SpoolingLedger("postgresql://nobody@127.0.0.1:1/none", spool, retry_interval=60)
    out = {}

    async def body(verifier: Verifier, client: Client) -> None:
        conn = await client.session(PROMPT, 12)
        await client.generate(conn, PROMPT, 12, CHAIN)
        out["receipts"] = conn.receipts

    verifier = run_with_verifier(models, body, ledger)
    files = sorted(spool.glob("*.rcpt"))
    assert len(files) == out["receipts"] > 0
    assert verifier.metrics.receipts.labels(status="spooled")._value.get() == out["receipts"]
    from specedge.ledger.spool import _decode

    for f in files:
        check_pair(*_decode(f.read_bytes()))  # both signatures and the digest hold
    ledger.close()


def test_session_limits_per_peer_and_per_host(models):
    codes = []

    async def body(verifier: Verifier, a: Client, b: Client) -> None:
        held = [await a.session(PROMPT, 8), await a.session(PROMPT, 8)]
        for who in (a, b):
            try:
                held.append(await who.session(PROMPT, 8))
                codes.append("OPENED")
            except RemoteError as exc:
                codes.append(exc.code.name)
        try:
            await b.session(PROMPT, 8)
        except RemoteError as exc:
            codes.append(exc.code.name)
            assert exc.retry_after is not None and exc.retry_after > 0  # when to come back
        assert len(verifier.table) == 3
        for conn in held:
            await conn.close()

    run_with_verifier(models, body, clients=2, max_sessions=3, max_sessions_per_peer=2)
    # This peer's share is spent: OVERLOADED (go elsewhere). The host is full: BUSY.
    assert codes == ["OVERLOADED", "OPENED", "BUSY"]


def test_idle_session_times_out_and_is_freed(models):
    async def body(verifier: Verifier, client: Client) -> None:
        conn = await client.session(PROMPT, 64)
        await client.generate(conn, PROMPT, 4, CHAIN)  # a few rounds: it has a rhythm
        assert len(verifier.table) == 1 and len(verifier.scheduler._rhythms) == 1
        frame = await read_frame(conn.stream, timeout=10)
        assert frame.error.code == ErrorCode.TIMEOUT
        await trio.sleep(0.1)
        assert len(verifier.table) == 0 and verifier.table.free_slots == 64
        assert not verifier.scheduler._rhythms  # never held for again

    run_with_verifier(models, body, idle_timeout=0.5)


def test_limit_reached_after_max_new_tokens_and_close_frees(models):
    async def body(verifier: Verifier, client: Client) -> None:
        conn = await client.session(PROMPT, 3)
        await client.generate(conn, PROMPT, 3, CHAIN)
        assert await conn.refused(*conn.request([1], [-1])) == "LIMIT_REACHED"
        await conn.close()
        with trio.fail_after(5):
            while len(verifier.table):
                await trio.sleep(0.02)

    verifier = run_with_verifier(models, body)
    assert verifier.metrics.sessions_closed.labels(reason="closed")._value.get() == 1


def test_failed_pass_answers_internal_and_the_session_goes_on(models):
    async def body(verifier: Verifier, client: Client) -> None:
        conn = await client.session(PROMPT, 20)
        verifier.engine.fail = True
        assert await conn.refused(*conn.request([1, 2], [-1, 0])) == "INTERNAL"
        verifier.engine.fail = False
        tokens = await client.generate(conn, PROMPT, 20, CHAIN)
        assert tokens == autoregressive_generate(verifier.engine.model, PROMPT, 20).token_ids

    run_with_verifier(models, body)


def test_shutdown_finishes_the_round_in_flight_then_refuses(models):
    seen = []

    async def body(verifier: Verifier, client: Client) -> None:
        conn = await client.session(PROMPT, 50)
        verifier.engine.delay = 0.5
        req, env = conn.request([1, 2], [-1, 0])
        await write_frame(conn.stream, pb.Frame(verify=pb.Envelope.FromString(env)))
        await trio.sleep(0.1)  # the request is in a pass now
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(verifier._shutdown)
                frame = await read_frame(conn.stream, timeout=10)
                seen.append(frame.WhichOneof("body"))
                frame = await read_frame(conn.stream, timeout=10)
                seen.append(ErrorCode(frame.error.code).name)
                await conn.stream.close()
                scope.cancel()

    run_with_verifier(models, body)
    assert seen == ["result", "SHUTTING_DOWN"]


def test_advert_reports_live_figures_and_refuses_another_model(models):
    async def body(verifier: Verifier, client: Client) -> None:
        verifier.config.pass_costs = [(1, 900), (5, 1200)]  # as the CLI's probe sets
        conn = await client.session(PROMPT, 8)
        await client.generate(conn, PROMPT, 8, CHAIN)
        stream = await client.stream(ADVERT_PROTOCOL)
        await write_frame(stream, pb.Frame(advert_query=pb.AdvertQuery(model_id="other")))
        frame = await read_frame(stream, timeout=10)
        assert frame.error.code == ErrorCode.UNSUPPORTED_MODEL
        stream = await client.stream(ADVERT_PROTOCOL)
        await write_frame(stream, pb.Frame(advert_query=pb.AdvertQuery()))
        a = (await read_frame(stream, timeout=10)).advert
        assert (a.model_id, a.free_slots, a.queue_depth) == ("tiny-test", 63, 0)
        assert (a.max_batch_tokens, a.max_tree_tokens, a.vocab_size) == (128, 16, 259)
        assert a.protocol_version == PROTOCOL_VERSION and a.mean_verify_micros > 0
        # Measured speed and load (1.1): what nodes rank by and derive waits from.
        assert a.prefill_tokens_per_s > 0 and a.mean_pass_micros > 0
        assert (a.sessions_open, a.max_sessions, a.queued_prefill_tokens) == (1, 64, 0)
        assert a.engine == "torch/float32"
        # The pass-cost curve measured at start (verifier/costprobe.py) goes out.
        assert [(p.rows, p.micros) for p in a.pass_costs] == [(1, 900), (5, 1200)]

    run_with_verifier(models, body)


def test_config_refuses_trees_as_large_as_the_batch(models):
    with pytest.raises(ValueError):
        Verifier(TargetEngine(models[0]), create_new_key_pair(),
                 VerifierConfig(model_id="m", vocab_size=259, max_context_tokens=64,
                                max_batch_tokens=16, max_tree_tokens=16))



def test_audit_protocol_answers_signed_and_refuses_what_it_must(models):
    """An audit replays the transcript and signs the target's choices; a request signed by
    someone else, for another model, out of the vocabulary or garbage gets its error, and
    the verifier keeps serving."""
    from specedge.protocol.audits import new_audit_request, open_audit_answer
    from specedge.protocol.envelopes import request_digest, request_envelope
    from specedge.protocol.identity import peer_id_of
    from specedge.protocol.ids import AUDIT_PROTOCOL

    target = models[0]
    want = autoregressive_generate(target, PROMPT, 6).token_ids
    sampling = pb.Sampling()

    async def ask(client: Client, frame: pb.Frame) -> pb.Frame:
        stream = await client.stream(AUDIT_PROTOCOL)
        await write_frame(stream, frame)
        return await read_frame(stream, timeout=30)

    def audit(key, model="tiny-test", committed=want) -> pb.Frame:
        env = new_audit_request(key, peer_id_of(key), model, PROMPT, sampling, committed)
        return pb.Frame(audit_request=request_envelope(env)), env

    async def body(verifier: Verifier, client: Client) -> None:
        frame, env = audit(client.key_pair)
        got = await ask(client, frame)
        _, answer = open_audit_answer(got.audit_answer.SerializeToString(),
                                      expected_peer=verifier.peer_id)
        assert answer.request_sha256 == request_digest(env)
        assert [p.token for p in answer.positions] == want
        assert all(p.deficit == 0 for p in answer.positions)
        wrong = [(audit(create_new_key_pair())[0], ErrorCode.WRONG_PEER),
                 (audit(client.key_pair, model="other")[0], ErrorCode.UNSUPPORTED_MODEL),
                 (audit(client.key_pair, committed=[9999])[0], ErrorCode.TOKEN_OUT_OF_VOCAB),
                 (pb.Frame(audit_request=pb.Envelope(payload=b"x")), ErrorCode.BAD_KEY),
                 (pb.Frame(advert_query=pb.AdvertQuery()), ErrorCode.UNEXPECTED_MESSAGE)]
        for bad, code in wrong:
            assert (await ask(client, bad)).error.code == code
        assert verifier.metrics.audits_served._value.get() == 1
        conn = await client.session(PROMPT, 6)  # still serving
        await client.generate(conn, PROMPT, 6, CHAIN)

    run_with_verifier(models, body)
