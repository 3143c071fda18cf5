"""Hostile peers against a real `specedge-verifier serve` process.

A raw libp2p test peer (`hostile_peer`, in this process) sends what no honest node
sends: random bytes, huge or over-long length prefixes, truncated frames, forged and
misdirected signatures, another peer's session id, replayed and skipped sequence
numbers, out-of-vocabulary ids, cyclic and oversized trees, floods of OpenSession and
of streams beyond the limits, slow-loris streams that never finish a frame, streams
that dump a frame's worth of bytes and reset. Each must get its Error or a closed
stream within a bounded time, while honest sessions in other processes run at the same
time and produce exactly the target's greedy tokens, and the daemon's memory stays
bounded. (`test_verifier_network.py` already covers one of each basic refusal from a
client that is otherwise honest; this suite is the adversary.)
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Awaitable, Callable

import hostile_peer as hp
import pytest
import trio
from faultutil import Verifier, mib, settled_rss
from netutil import TESTS, Proc, python_script

from specedge.engine import autoregressive_generate
from specedge.models import build_tiny
from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.envelopes import PAYLOAD_RECEIPT
from specedge.protocol.framing import encode_frame
from specedge.protocol.limits import MAX_FRAME_BYTES, MAX_TREE_TOKENS
from specedge.protocol.varint import encode_uvarint
from specedge.text import encode_prompt

pytestmark = pytest.mark.timeout(300)

CLIENT = TESTS / "verifier_client.py"
IDLE = 4.0  # --idle-timeout of the daemon under attack (seconds)
MAX_SESSIONS, PER_PEER = 12, 4
PROMPT = [72, 101, 108, 108, 111]  # any in-vocabulary prompt
HONEST = ["def fibonacci(n):", "The quick brown fox", "import numpy as np\n"]


@pytest.fixture(scope="module")
def verifier(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hostile")
    v = Verifier(workdir, "target", "--no-dht", "--idle-timeout", str(IDLE),
                 "--max-sessions", str(MAX_SESSIONS), "--max-sessions-per-peer", str(PER_PEER))
    try:
        yield v.ready()
    finally:
        v.kill()


@pytest.fixture(scope="module")
def greedy():
    target, tok = build_tiny()
    return lambda text, n: autoregressive_generate(target, encode_prompt(tok, text), n).token_ids


def honest_client(workdir, name: str, addr: str, n: int, prompts: list[str]) -> Proc:
    args = [a for p in prompts for a in ("--prompt", p)]
    return Proc(python_script(CLIENT, "generate", "--addr", addr, "--max-new-tokens", n,
                              "--tree", "chain:4", *args), workdir, name)


def honest_result(proc: Proc) -> list[dict]:
    assert proc.wait(240) == 0, proc.describe()
    return json.loads(proc.stdout().strip().splitlines()[-1])["sessions"]


# ---------------------------------------------------------------------------- the attacks
#
# Each attack returns {name: Outcome}. `EXPECT` says which outcomes are acceptable and
# within how many seconds: an exact Error code where the protocol names one, else an
# Error or a closed stream.

ANY = "error or closed"
EXPECT: dict[str, tuple[str, float]] = {
    "random_bytes": (ANY, 5),
    "huge_length_prefix": ("error:TOO_LARGE", 5),
    "frame_over_max_size": ("error:TOO_LARGE", 5),
    "overlong_varint": ("error:MALFORMED", 5),
    "non_minimal_varint": ("error:MALFORMED", 5),
    "zero_length_frame": ("error:MALFORMED", 5),
    "unknown_frame_field": ("error:MALFORMED", 5),
    "truncated_open_then_eof": ("closed", 5),
    "truncated_verify_then_eof": ("closed", 5),
    "advert_garbage": (ANY, 5),
    "advert_oversized": ("error:TOO_LARGE", 5),
    "verify_before_open": ("error:UNEXPECTED_MESSAGE", 5),
    "open_with_oov_prompt": ("error:TOKEN_OUT_OF_VOCAB", 5),
    "open_with_huge_max_new_tokens": ("error:INVALID_PARAMETER", 5),
    "open_without_prompt": ("error:MALFORMED", 5),
    "signature_bit_flipped": ("error:BAD_SIGNATURE", 5),
    "signature_zeroed": ("error:BAD_SIGNATURE", 5),
    "signature_truncated": ("error:BAD_SIGNATURE", 5),
    "signature_by_other_key": ("error:BAD_SIGNATURE", 5),
    "signed_by_another_peer": ("error:WRONG_PEER", 5),
    "receipt_as_request": ("error:WRONG_PAYLOAD_TYPE", 5),
    "signed_garbage_payload": ("error:MALFORMED", 5),
    "non_canonical_envelope": ("frame:result", 5),
    "not_an_ed25519_key": ("error:BAD_KEY", 5),
    "verify_frame_over_its_limit": ("error:TOO_LARGE", 5),
    "other_peers_session_id": ("error:UNKNOWN_SESSION", 5),
    "other_peers_request_replayed": ("error:WRONG_PEER", 5),
    "close_naming_other_session": ("closed", 5),
    "replayed_seq_first": ("error:REPLAYED_SEQUENCE", 5),
    "replayed_seq_last": ("error:REPLAYED_SEQUENCE", 5),
    "seq_zero": ("error:REPLAYED_SEQUENCE", 5),
    "skipped_seq": ("error:SKIPPED_SEQUENCE", 5),
    "seq_max_uint64": ("error:SKIPPED_SEQUENCE", 5),
    "token_equal_to_vocab": ("error:TOKEN_OUT_OF_VOCAB", 5),
    "token_max_uint32": ("error:TOKEN_OUT_OF_VOCAB", 5),
    "tree_self_parent": ("error:BAD_TREE", 5),
    "tree_forward_parent": ("error:BAD_TREE", 5),
    "tree_cycle": ("error:BAD_TREE", 5),
    "tree_parent_below_root": ("error:BAD_TREE", 5),
    "tree_lengths_differ": ("error:BAD_TREE", 5),
    "tree_over_budget": ("error:TREE_TOO_LARGE", 5),
    "tree_over_protocol_max": ("error:TREE_TOO_LARGE", 5),
    "open_flood_one_peer": ("error:OVERLOADED", 10),
    "open_flood_many_peers": ("error:BUSY", 10),  # the host is full: come back later
    "stream_flood_many_peers": ("error:OVERLOADED", 10),
    "slow_loris_in_session": ("error:TIMEOUT", IDLE + 3),
    "trickle_in_session": ("error:TIMEOUT", IDLE + 3),
    "pipelined_requests_then_eof": ("closed", 10),
}


def _check(name: str, out: hp.Outcome) -> str | None:
    """A problem with this outcome, or None."""
    want, bound = EXPECT[name]
    ok_kind = (out.kind.startswith("error:") or out.kind == "closed") if want == ANY else (
        out.kind == want)
    if not ok_kind:
        return f"{name}: got {out.kind}, want {want}"
    if out.seconds > bound:
        return f"{name}: took {out.seconds:.1f} s > {bound} s"
    return None


def _envelope_with(session: hp.Session, **fields: object) -> bytes:
    env = pb.Envelope.FromString(session.envelope([1], [-1]))
    for k, v in fields.items():
        setattr(env, k, v)
    return env.SerializeToString()


def _raw_verify_frame(envelope: bytes) -> bytes:
    """A verify frame around exact envelope bytes (no re-encoding)."""
    body = b"\x1a" + encode_uvarint(len(envelope)) + envelope  # field 3, length-delimited
    return encode_uvarint(len(body)) + body


async def raw_stream_attacks(peer: hp.Peer, rng: random.Random) -> dict[str, hp.Outcome]:
    """Bytes that are no frame, on fresh streams (before any session)."""
    out: dict[str, hp.Outcome] = {}
    open_frame = encode_frame(pb.Frame(open=hp.open_msg(PROMPT)))
    verify_frame = encode_frame(pb.Frame(verify=pb.Envelope.FromString(
        hp.Session(None, peer, pb.SessionOpened(session_id=b"s" * 16)).envelope([1], [-1]))))
    cases: dict[str, bytes] = {
        "huge_length_prefix": encode_uvarint((1 << 63) - 1),
        "frame_over_max_size": encode_uvarint(MAX_FRAME_BYTES + 1) + b"\x00" * 64,
        "overlong_varint": b"\xff" * 12,
        "non_minimal_varint": b"\x85\x00" + b"\x00" * 5,
        "zero_length_frame": b"\x00",
        "unknown_frame_field": encode_uvarint(3) + b"\xfa\x06\x00",  # field 95, empty
        "truncated_open_then_eof": open_frame[:-3],
        "truncated_verify_then_eof": verify_frame[: len(verify_frame) // 2],
        "verify_before_open": verify_frame,
    }
    for i in range(6):
        cases[f"random_bytes#{i}"] = rng.randbytes(rng.choice([1, 7, 64, 1000, 70_000]))

    # One peer may have PER_PEER streams waiting for a first frame; more are refused
    # at once (OVERLOADED), which `stream_flood_many_peers` tests on purpose.
    limit = trio.CapacityLimiter(PER_PEER - 1)

    async def one(name: str, data: bytes) -> None:
        async with limit:
            out[name] = await hp.probe(await peer.stream(), data, timeout=15)

    async def advert(name: str, data: bytes) -> None:
        from specedge.protocol.ids import ADVERT_PROTOCOL

        async with limit:
            out[name] = await hp.probe(await peer.stream(ADVERT_PROTOCOL), data, timeout=15)

    async def bad_open(name: str, msg: pb.OpenSession) -> None:
        async with limit:
            out[name] = await hp.probe(await peer.stream(), encode_frame(pb.Frame(open=msg)),
                                       timeout=15, close_after=False)

    async with trio.open_nursery() as nursery:
        for name, data in cases.items():
            nursery.start_soon(one, name, data)
        nursery.start_soon(advert, "advert_garbage", rng.randbytes(500))
        nursery.start_soon(advert, "advert_oversized", encode_uvarint(4096) + b"\x00" * 100)
        nursery.start_soon(bad_open, "open_with_oov_prompt", hp.open_msg([1, 1 << 20]))
        bad = hp.open_msg(PROMPT)
        bad.max_new_tokens = 1 << 30
        nursery.start_soon(bad_open, "open_with_huge_max_new_tokens", bad)
        nursery.start_soon(bad_open, "open_without_prompt", hp.open_msg([]))
    return out


async def envelope_attacks(peer: hp.Peer, other: hp.Peer) -> dict[str, hp.Outcome]:
    """Forged, misdirected and malformed signatures on one live session; after each
    refusal the session must still answer a correct request."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    out: dict[str, hp.Outcome] = {}
    s = await peer.session(PROMPT)
    receipt = (await s.good_round()).receipt
    stranger = create_new_key_pair()
    sig = pb.Envelope.FromString(s.envelope([1], [-1])).signature
    cases: dict[str, bytes] = {
        "signature_bit_flipped": _envelope_with(s, signature=sig[:-1] + bytes([sig[-1] ^ 1])),
        "signature_zeroed": _envelope_with(s, signature=b"\x00" * 64),
        "signature_truncated": _envelope_with(s, signature=sig[:63]),
        "signature_by_other_key": _envelope_with(
            s, signature=pb.Envelope.FromString(s.envelope([1], [-1], key_pair=stranger))
            .signature),
        "signed_by_another_peer": s.envelope([1], [-1], key_pair=other.key_pair),
        "receipt_as_request": bytes(receipt),
        "signed_garbage_payload": _signed_garbage(peer),
        "not_an_ed25519_key": _envelope_with(s, public_key=b"\x08\x00\x12\x20" + b"k" * 32),
    }
    assert pb.Envelope.FromString(bytes(receipt)).payload_type == PAYLOAD_RECEIPT
    for name, env in cases.items():
        out[name] = await s.send_envelope(env, timeout=15)
        await s.good_round()  # the refusal changed nothing
    # Envelope bytes that parse but are not canonical (a field repeated with its own
    # value): the verifier works on the parsed frame, so it re-encodes them canonically,
    # checks the signature over the exact payload, and answers; its receipt names the
    # canonical bytes, which verify. Nothing to exploit: answered like the original.
    env = s.envelope([1], [-1])
    ptype = pb.Envelope.FromString(env).payload_type
    start = time.monotonic()
    await s.stream.write(_raw_verify_frame(env + b"\x12" + encode_uvarint(len(ptype)) + ptype))
    out["non_canonical_envelope"] = await hp.next_outcome(s.stream, 15)
    out["non_canonical_envelope"].seconds = time.monotonic() - start
    s.seq += out["non_canonical_envelope"].kind == "frame:result"
    await s.good_round()
    # Bigger than a verify frame may be (but under the largest frame): refused by kind;
    # the stream is out of sync afterwards, so the verifier ends the session.
    big = pb.Envelope.FromString(env)
    big.payload = b"\x00" * 20_000
    out["verify_frame_over_its_limit"] = await hp.probe(
        s.stream, encode_uvarint(len(pb.Frame(verify=big).SerializeToString()))
        + pb.Frame(verify=big).SerializeToString(), timeout=15, close_after=False)
    await hp.hang_up(s.stream)
    return out


def _signed_garbage(peer: hp.Peer) -> bytes:
    from specedge.protocol.envelopes import (
        DOMAIN_VERIFY_REQUEST,
        PAYLOAD_VERIFY_REQUEST,
        seal,
    )

    return seal(peer.key_pair, DOMAIN_VERIFY_REQUEST, PAYLOAD_VERIFY_REQUEST, b"\xff\xff\xff")


async def session_attacks(peer: hp.Peer, victim_peer: hp.Peer) -> dict[str, hp.Outcome]:
    """Sequence numbers, vocabulary, trees, and another peer's session, on live
    sessions; each refusal leaves the session usable."""
    out: dict[str, hp.Outcome] = {}
    victim = await victim_peer.session(PROMPT)
    await victim.good_round()
    s = await peer.session(PROMPT)
    for _ in range(3):
        await s.good_round()
    vocab, budget = s.opened.vocab_size, s.opened.max_tree_tokens
    cases: dict[str, Callable[[], bytes]] = {
        "other_peers_session_id": lambda: s.envelope([1], [-1], session_id=victim.id),
        "other_peers_request_replayed": lambda: victim.envelope([1], [-1]),
        "replayed_seq_first": lambda: s.envelope([1], [-1], seq=1),
        "replayed_seq_last": lambda: s.envelope([1], [-1], seq=s.seq),
        "seq_zero": lambda: s.envelope([1], [-1], seq=0),
        "skipped_seq": lambda: s.envelope([1], [-1], seq=s.seq + 2),
        "seq_max_uint64": lambda: s.envelope([1], [-1], seq=(1 << 64) - 1),
        "token_equal_to_vocab": lambda: s.envelope([1, vocab], [-1, 0]),
        "token_max_uint32": lambda: s.envelope([(1 << 32) - 1], [-1]),
        "tree_self_parent": lambda: s.envelope([1], [0]),
        "tree_forward_parent": lambda: s.envelope([1, 2], [1, -1]),
        "tree_cycle": lambda: s.envelope([1, 2, 3], [-1, 2, 1]),
        "tree_parent_below_root": lambda: s.envelope([1], [-2]),
        "tree_lengths_differ": lambda: s.envelope([1, 2], [-1]),
        "tree_over_budget": lambda: s.envelope([1] * (budget + 1), [-1, *range(budget)]),
        "tree_over_protocol_max": lambda: s.envelope([1] * (MAX_TREE_TOKENS + 1),
                                                     [-1] * (MAX_TREE_TOKENS + 1)),
    }
    for name, make in cases.items():
        out[name] = await s.send_envelope(make(), timeout=15)
        await s.good_round()
    await s.good_round([5] * budget, [-1, *range(budget - 1)])  # exactly the budget: fine
    # A close naming the victim's session ends only the sender's own session.
    start = time.monotonic()
    await s.stream.write(encode_frame(pb.Frame(close=pb.CloseSession(session_id=victim.id))))
    out["close_naming_other_session"] = await hp.next_outcome(s.stream, 15)
    out["close_naming_other_session"].seconds = time.monotonic() - start
    await hp.hang_up(s.stream)
    # The victim saw none of it.
    await victim.good_round()
    await victim.close()
    return out


async def flood_attacks(addr: str) -> dict[str, hp.Outcome]:
    """More sessions and more unfinished streams than the limits allow."""
    out: dict[str, hp.Outcome] = {}
    async with hp.peers(addr, 4) as peers:
        # One peer: PER_PEER sessions, then refusals.
        held = [await peers[0].session(PROMPT) for _ in range(PER_PEER)]
        extra = await peers[0].stream()
        out["open_flood_one_peer"] = await hp.probe(
            extra, encode_frame(pb.Frame(open=hp.open_msg(PROMPT))), 15, close_after=False)
        # Many peers, round robin, until the host is full (other sessions may come and
        # go meanwhile, so count nothing in advance): at most MAX_SESSIONS open at once.
        for i in range(3 * PER_PEER):
            got = await peers[1 + i % 3].try_session(PROMPT)
            if isinstance(got, hp.Outcome):
                out["open_flood_many_peers"] = got
                assert "session slot" in got.error.message, got.error  # the host limit
                break
            held.append(got)
        assert len(held) <= MAX_SESSIONS
        for h in held:
            await h.close()
    # Streams that never finish their first frame, each holding most of a frame's worth
    # of bytes: beyond the bound they are refused at once instead of buffered.
    async with hp.peers(addr, 6) as peers:
        streams, refused = [], []
        start = time.monotonic()
        for p in peers:
            for _ in range(2 * PER_PEER):
                st = await p.stream()
                await st.write(encode_uvarint(200_000) + b"\x0a" * 150_000)
                streams.append(st)

        async def answer(st: object) -> None:
            o = await hp.next_outcome(st, 1.0)
            if o.kind != "timeout":
                refused.append(o)

        async with trio.open_nursery() as nursery:
            for st in streams:
                nursery.start_soon(answer, st)
        kinds = {o.kind for o in refused}
        out["stream_flood_many_peers"] = hp.Outcome(
            kinds.pop() if len(kinds) == 1 else f"mixed:{sorted(kinds)}",
            time.monotonic() - start)
        # At most MAX_SESSIONS streams may be left waiting; the rest were refused.
        assert len(streams) - len(refused) <= MAX_SESSIONS, (len(streams), len(refused))
        for st in streams:
            await hp.hang_up(st)
    return out


async def slow_attacks(peer: hp.Peer) -> dict[str, hp.Outcome]:
    """Frames that never finish, on live sessions: the idle timeout ends them."""
    out: dict[str, hp.Outcome] = {}

    async def loris() -> None:
        s = await peer.session(PROMPT)
        out["slow_loris_in_session"] = await hp.probe(
            s.stream, encode_uvarint(300) + b"\x1a\x10", timeout=IDLE + 10, close_after=False)

    async def trickle() -> None:
        s = await peer.session(PROMPT)
        start = time.monotonic()
        await s.stream.write(encode_uvarint(5000))
        result: list[hp.Outcome] = []

        async def drip() -> None:  # one byte every 0.2 s: always sending, never done
            for _ in range(200):
                try:
                    await s.stream.write(b"\x00")
                except Exception:
                    return
                await trio.sleep(0.2)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drip)
            result.append(await hp.next_outcome(s.stream, IDLE + 10))
            nursery.cancel_scope.cancel()
        out["trickle_in_session"] = result[0]
        out["trickle_in_session"].seconds = time.monotonic() - start

    async def pipelined() -> None:
        # Many correct and incorrect requests written at once without reading, then EOF.
        s = await peer.session(PROMPT)
        data = b"".join(encode_frame(pb.Frame(verify=pb.Envelope.FromString(
            s.envelope([1], [-1], seq=k)))) for k in range(1, 60))
        start = time.monotonic()
        await s.stream.write(data)
        await s.stream.close()
        seen = []
        while True:
            o = await hp.next_outcome(s.stream, 10)
            if o.kind in ("closed", "timeout"):
                break
            seen.append(o.kind)
        o.seconds = time.monotonic() - start
        assert seen[:3] == ["frame:result"] * 3 and set(seen) == {"frame:result"}, seen
        out["pipelined_requests_then_eof"] = o

    async with trio.open_nursery() as nursery:
        for fn in (loris, trickle, pipelined):
            nursery.start_soon(fn)
    return out


async def all_attacks(addr: str, seed: int) -> dict[str, hp.Outcome]:
    rng = random.Random(seed)
    results: dict[str, hp.Outcome] = {}

    async def run(fn: Callable[..., Awaitable[dict]], *args: object) -> None:
        results.update(await fn(*args))

    async with hp.peers(addr, 4) as (a, b, c, d):
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, raw_stream_attacks, a, rng)
                nursery.start_soon(run, envelope_attacks, b, c)
                nursery.start_soon(run, session_attacks, c, d)
                nursery.start_soon(run, slow_attacks, d)
            # Floods last: they fill every slot for a moment.
            results.update(await flood_attacks(addr))
    return results


def _problems(results: dict[str, hp.Outcome]) -> list[str]:
    problems = []
    for name, out in sorted(results.items()):
        p = _check(name.split("#")[0], out)
        if p:
            problems.append(p)
    missing = set(EXPECT) - {n.split("#")[0] for n in results}
    problems += [f"{m}: not run" for m in sorted(missing)]
    return problems


def _table(results: dict[str, hp.Outcome]) -> str:
    return "\n".join(f"  {n:34s} {o.kind:30s} {o.seconds:6.2f} s"
                     for n, o in sorted(results.items()))


# ---------------------------------------------------------------------------- tests


def test_every_attack_gets_its_answer_while_honest_sessions_run_unchanged(
        verifier, greedy, tmp_path):
    n = 800
    honest = honest_client(tmp_path, "honest", verifier.addr, n, HONEST[:2])
    try:
        base_open = verifier.metric("specedge_sessions_open")
        from netutil import wait_until

        wait_until(lambda: verifier.metric("specedge_sessions_open") >= base_open + 2, 120,
                   "honest sessions open")
        rss_before = settled_rss(verifier.proc.pid, 0.5)
        results = hp.run(all_attacks, verifier.addr, 1)
        sessions = honest_result(honest)
    finally:
        honest.kill()
    print("\n" + _table(results))
    assert not _problems(results), "\n".join(_problems(results)) + "\n" + _table(results)
    for text, s in zip(HONEST, sessions, strict=False):
        assert s["tokens"] == greedy(text, n), text
    # Afterwards: every attacker's session is gone, and a new honest client is served.
    from netutil import wait_until

    wait_until(lambda: verifier.metric("specedge_sessions_open") == 0, 30, "sessions reaped")
    assert verifier.metric("specedge_kv_cache_bytes") == 0
    after = honest_client(tmp_path, "after", verifier.addr, 64, HONEST[2:])
    try:
        s = honest_result(after)[0]
    finally:
        after.kill()
    assert s["tokens"] == greedy(HONEST[2], 64)
    rss_after = settled_rss(verifier.proc.pid, 0.5)
    print(f"verifier RSS {mib(rss_before)} -> {mib(rss_after)} MiB")
    assert rss_after - rss_before < 48 * 2**20
    assert verifier.proc.alive()


def test_reset_flood_leaves_no_buffered_bytes_behind(verifier):
    """Streams that each deliver most of a frame and reset, thousands of times over one
    connection. py-libp2p kept every such stream's unread bytes for the connection's
    lifetime after the verifier closed it (250 MB for 12,000 streams) until the
    verifier released them (`protocol.hosts.close_stream`)."""
    n = 600
    rss = _reset_flood(verifier, n)
    print(f"reset flood of {n} x 150 KB: verifier RSS {mib(rss[0])} -> {mib(rss[1])} MiB")
    assert rss[1] - rss[0] < 24 * 2**20


def _reset_flood(verifier: Verifier, n: int, body: int = 150_000) -> tuple[int, int]:
    before = settled_rss(verifier.proc.pid, 0.5)

    async def main() -> None:
        async with hp.peers(verifier.addr, 1) as (p,):
            for _ in range(n):
                st = await p.stream()
                await st.write(encode_uvarint(200_000) + os.urandom(16) + b"\x0a" * body)
                await st.reset()
            # While the connection lives on, the verifier must still answer it.
            s = await p.session(PROMPT)
            await s.good_round()
            await s.close()
            await trio.sleep(1)

    hp.run(main)
    return before, settled_rss(verifier.proc.pid, 0.5)


@pytest.mark.slow
def test_many_attack_rounds_keep_memory_bounded(verifier, greedy, tmp_path):
    """The whole catalogue eight times over, a long reset flood and slow-loris streams
    that sit out the handshake timeout; memory after the first round must not grow."""
    from specedge.protocol.limits import HANDSHAKE_TIMEOUT

    rss = []
    for seed in range(8):
        results = hp.run(all_attacks, verifier.addr, seed)
        assert not _problems(results), _problems(results)
        rss.append(settled_rss(verifier.proc.pid, 0.5))
    flood = _reset_flood(verifier, 4000)
    rss.append(flood[1])

    async def handshake_loris() -> list[hp.Outcome]:
        async with hp.peers(verifier.addr, 2) as peers:
            outs: list[hp.Outcome] = []

            async def one(p: hp.Peer) -> None:
                outs.append(await hp.probe(await p.stream(), encode_uvarint(100) + b"\x0a",
                                           HANDSHAKE_TIMEOUT + 10, close_after=False))

            async with trio.open_nursery() as nursery:
                for p in peers:
                    for _ in range(PER_PEER):
                        nursery.start_soon(one, p)
            return outs

    outs = hp.run(handshake_loris)
    assert {o.kind for o in outs} == {"error:TIMEOUT"}
    assert max(o.seconds for o in outs) < HANDSHAKE_TIMEOUT + 5
    rss.append(settled_rss(verifier.proc.pid, 0.5))
    print(f"verifier RSS per round (MiB): {[mib(r) for r in rss]}")
    assert max(rss[1:]) - rss[0] < 48 * 2**20
    n = 200
    honest = honest_client(tmp_path, "honest-after", verifier.addr, n, HONEST[:2])
    try:
        for text, s in zip(HONEST, honest_result(honest), strict=False):
            assert s["tokens"] == greedy(text, n)
    finally:
        honest.kill()
