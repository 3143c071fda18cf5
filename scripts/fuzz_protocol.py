#!/usr/bin/env python3
"""Feed random and mutated bytes into every SpecEdge protocol decoder and validator.

Each target takes one byte string from a stranger. It must either accept it or raise
the protocol's own error type (ProtocolError; IdentityError for key files), and it
must answer quickly. Anything else is a bug: the script prints it and exits 1.

Inputs come from a seeded RNG: a third purely random bytes, the rest mutations
(bit flips, byte edits, inserts, deletes, splices, over-long varints) of valid
encodings. Signed targets also get "re-signed" mutants, where the payload is mutated
and then properly signed again, so the validators behind the signature check see
hostile content with a valid signature.

    .venv/bin/python scripts/fuzz_protocol.py --per-target 100000
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio
from google.protobuf.message import DecodeError
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.pb import crypto_pb2

from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.envelopes import (
    DOMAIN_RECEIPT,
    DOMAIN_STANDING,
    DOMAIN_VERIFY_REQUEST,
    PAYLOAD_RECEIPT,
    PAYLOAD_STANDING,
    PAYLOAD_VERIFY_REQUEST,
    frame_envelope_bytes,
    open_receipt,
    open_request,
    open_statement,
    request_digest,
    seal,
    seal_receipt,
    seal_request,
    seal_statement,
)
from specedge.protocol.errors import ErrorCode, ProtocolError, from_error
from specedge.protocol.framing import FrameDecoder, encode_frame, parse_frame, read_frame
from specedge.protocol.identity import IdentityError, _decode_key, peer_id_of
from specedge.protocol.ids import check_version, negotiate, parse_protocol_id
from specedge.protocol.validation import (
    validate_advert_query,
    validate_advertisement,
    validate_close_session,
    validate_error,
    validate_frame,
    validate_open_session,
    validate_progress,
    validate_receipt,
    validate_session_opened,
    validate_statement,
    validate_verify_request,
    validate_verify_result,
)
from specedge.protocol.varint import decode_uvarint, encode_uvarint

NODE = create_new_key_pair(seed=b"fuzz-node".ljust(32, b"."))
VERIFIER = create_new_key_pair(seed=b"fuzz-verifier".ljust(32, b"."))
NODE_ID, VERIFIER_ID = peer_id_of(NODE), peer_id_of(VERIFIER)
SID = b"F" * 16
VOCAB = 512
SLOW_INPUT_S = 2.0  # one input taking longer than this counts as a hang

REQUEST = pb.VerifyRequest(session_id=SID, seq=3, tokens=[1, 2, 3, 4, 5],
                           parents=[-1, 0, 1, 0, 3], proactive=True, draft_micros=1500)
REQUEST_ENV = seal_request(NODE, REQUEST)
RESULT_MSG = pb.VerifyResult(session_id=SID, seq=3, accepted=[0, 1], bonus_token=9)
RECEIPT = pb.Receipt(
    verifier_peer_id=VERIFIER_ID, node_peer_id=NODE_ID, session_id=SID, seq=3,
    request_sha256=request_digest(REQUEST_ENV), drafted=5, accepted=2, verify_micros=800,
    unix_ms=1_700_000_000_000, model_id="tiny-test", draft_micros=1500,
)
RECEIPT_ENV = seal_receipt(VERIFIER, RECEIPT)
STATEMENT = pb.StandingStatement(issuer_peer_id=VERIFIER_ID, node_peer_id=NODE_ID,
                                 earned=1234.5, as_of_unix_ms=1_700_000_000_000,
                                 half_life_s=604800.0)
STATEMENT_ENV = seal_statement(VERIFIER, STATEMENT)
RESULT_MSG.receipt = RECEIPT_ENV
OPEN = pb.OpenSession(model_id="tiny-test", revision="main", prompt=[1, 2, 300, 511],
                      sampling=pb.Sampling(temperature=0.7, top_p=0.9, top_k=40, seed=3),
                      client_version="1.0.0", max_new_tokens=64)
OPENED = pb.SessionOpened(session_id=SID, verifier_peer_id=VERIFIER_ID, vocab_size=VOCAB,
                          max_tree_tokens=64)
ADVERT = pb.Advertisement(model_id="tiny-test", revision="main", max_batch_tokens=4096,
                          free_slots=4, queue_depth=1, mean_verify_micros=2000,
                          protocol_version="1.1.0", max_tree_tokens=64, vocab_size=VOCAB,
                          prefill_tokens_per_s=900.0, mean_pass_micros=30_000,
                          sessions_open=2, max_sessions=64, queued_prefill_tokens=100,
                          pass_costs=[pb.PassCost(rows=1, micros=700),
                                      pb.PassCost(rows=8, micros=900)],
                          engine="torch/float32")
PROGRESS = pb.Progress(session_id=SID, seq=3, state=pb.Progress.QUEUED, queue_position=2,
                       done=10, total=100, eta_ms=1500)
FRAMES = [
    pb.Frame(open=OPEN), pb.Frame(opened=OPENED), pb.Frame(verify=pb.Envelope.FromString(
        REQUEST_ENV)), pb.Frame(result=RESULT_MSG),
    pb.Frame(close=pb.CloseSession(session_id=SID, reason="bye")),
    pb.Frame(error=pb.Error(code=pb.BAD_TREE, message="no", session_id=SID, seq=3)),
    pb.Frame(advert=ADVERT), pb.Frame(advert_query=pb.AdvertQuery(model_id="tiny-test")),
    pb.Frame(progress=PROGRESS),
    pb.Frame(error=pb.Error(code=pb.BUSY, message="full", retry_after_ms=2500)),
]
FRAME_BYTES = [encode_frame(f) for f in FRAMES]


def _parse(cls, data: bytes):
    # Parsing untrusted bytes as a message is itself a decoder: MALFORMED on failure.
    try:
        return cls.FromString(data)
    except (DecodeError, ValueError) as exc:
        raise ProtocolError(ErrorCode.MALFORMED, "does not parse") from exc


# ---- targets: each takes untrusted bytes ----------------------------------------------

def t_uvarint(data: bytes) -> None:
    decode_uvarint(data)


def _check_frame(frame: pb.Frame) -> None:
    # Everything a verifier or node would do with a frame it received.
    validate_frame(frame)
    kind = frame.WhichOneof("body")
    if kind == "verify":
        _, req = open_request(frame_envelope_bytes(frame), expected_peer=NODE_ID)
        validate_verify_request(req, VOCAB, 64, req.seq - 1 if req.seq else 0, session_id=SID)
    elif kind == "result":
        validate_verify_result(frame.result, REQUEST, VOCAB)
        _, receipt = open_receipt(frame.result.receipt, expected_peer=VERIFIER_ID)
        validate_receipt(receipt, request_envelope=REQUEST_ENV, result=frame.result)
    elif kind == "error":
        from_error(frame.error)
    elif kind == "progress":
        validate_progress(frame.progress, session_id=SID, seq=3)


def t_parse_frame(data: bytes) -> None:
    _check_frame(parse_frame(data))


def t_frame_decoder(data: bytes) -> None:
    decoder = FrameDecoder()
    # Split deterministically by content so short reads are exercised too.
    step = 1 + (data[0] % 13 if data else 0)
    for i in range(0, len(data), step):
        for frame in decoder.feed(data[i : i + step]):
            _check_frame(frame)
    decoder.finish()


def t_open_request(data: bytes) -> None:
    _, req = open_request(data, expected_peer=NODE_ID)
    validate_verify_request(req, VOCAB, 64, 2, session_id=SID, tokens_left=100)


def t_open_receipt(data: bytes) -> None:
    _, receipt = open_receipt(data, expected_peer=VERIFIER_ID)
    validate_receipt(receipt, request_envelope=REQUEST_ENV, result=RESULT_MSG,
                     node_peer=NODE_ID, verifier_peer=VERIFIER_ID, model_id="tiny-test")


def t_open_statement(data: bytes) -> None:
    _, st = open_statement(data)
    validate_statement(st, node=NODE_ID, issuers=[VERIFIER_ID], now_ms=STATEMENT.as_of_unix_ms,
                       max_age_s=3600)


def t_open_session(data: bytes) -> None:
    validate_open_session(_parse(pb.OpenSession, data), vocab_size=VOCAB, model_id="tiny-test",
                          revision="main", max_context_tokens=4096, free_slots=1)


def t_session_opened(data: bytes) -> None:
    validate_session_opened(_parse(pb.SessionOpened, data), expected_peer=VERIFIER_ID)


def t_verify_request(data: bytes) -> None:
    validate_verify_request(_parse(pb.VerifyRequest, data), VOCAB, 64, 2, session_id=SID)


def t_verify_result(data: bytes) -> None:
    validate_verify_result(_parse(pb.VerifyResult, data), REQUEST, VOCAB)


def t_receipt(data: bytes) -> None:
    validate_receipt(_parse(pb.Receipt, data), request_envelope=REQUEST_ENV, request=REQUEST,
                     result=RESULT_MSG, node_peer=NODE_ID, verifier_peer=VERIFIER_ID)


def t_small_messages(data: bytes) -> None:
    # Close, Error, Advertisement, AdvertQuery, Progress: the first byte picks which.
    kind, rest = (data[0] % 5, data[1:]) if data else (0, b"")
    if kind == 0:
        validate_close_session(_parse(pb.CloseSession, rest), session_id=SID)
    elif kind == 1:
        validate_error(_parse(pb.Error, rest))
    elif kind == 2:
        validate_advertisement(_parse(pb.Advertisement, rest))
    elif kind == 3:
        validate_advert_query(_parse(pb.AdvertQuery, rest))
    else:
        validate_progress(_parse(pb.Progress, rest), session_id=SID, seq=3)


def t_versions(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    for check in (check_version, parse_protocol_id):
        try:
            check(text)
        except ProtocolError:
            pass
    negotiate(text.split("\n"))


def t_identity(data: bytes) -> None:
    _decode_key(Path("fuzz.key"), data)


class _BytesStream:
    """In-memory stream handing out bytes in short reads, then EOF."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data, self.pos, self.chunk = data, 0, chunk

    async def read(self, n: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        out = self.data[self.pos : self.pos + min(n or self.chunk, self.chunk)]
        self.pos += len(out)
        return out


async def _read_all(data: bytes) -> None:
    # Short reads of 1 to 7 bytes; long inputs get larger reads so one input stays fast.
    chunk = 1 + (data[-1] % 7 if data else 0)
    stream = _BytesStream(data, chunk if len(data) < 2048 else chunk * 64)
    while True:
        try:
            frame = await read_frame(stream, timeout=SLOW_INPUT_S)
        except ProtocolError as exc:
            if exc.code == ErrorCode.STREAM_CLOSED and "between frames" in exc.message:
                return  # a clean end after whole frames: the input was accepted
            raise
        _check_frame(frame)


TARGETS: dict[str, tuple[Callable[[bytes], None], list[bytes]]] = {
    "uvarint": (t_uvarint, [encode_uvarint(v) for v in (0, 1, 300, 2**32, 2**63 - 1)]),
    "parse_frame": (t_parse_frame, [f.SerializeToString() for f in FRAMES]),
    "frame_decoder": (t_frame_decoder, FRAME_BYTES + [b"".join(FRAME_BYTES)]),
    "read_frame": (lambda d: None, FRAME_BYTES + [b"".join(FRAME_BYTES)]),  # run async below
    "open_request": (t_open_request, [REQUEST_ENV]),
    "open_receipt": (t_open_receipt, [RECEIPT_ENV]),
    "open_statement": (t_open_statement, [STATEMENT_ENV]),
    "open_session": (t_open_session, [OPEN.SerializeToString()]),
    "session_opened": (t_session_opened, [OPENED.SerializeToString()]),
    "verify_request": (t_verify_request, [REQUEST.SerializeToString()]),
    "verify_result": (t_verify_result, [RESULT_MSG.SerializeToString()]),
    "receipt": (t_receipt, [RECEIPT.SerializeToString()]),
    "small_messages": (t_small_messages, [
        b"\x00" + pb.CloseSession(session_id=SID, reason="x").SerializeToString(),
        b"\x01" + pb.Error(code=3, message="m").SerializeToString(),
        b"\x02" + ADVERT.SerializeToString(),
        b"\x03" + pb.AdvertQuery(model_id="tiny-test").SerializeToString(),
        b"\x04" + PROGRESS.SerializeToString(),
    ]),
    "versions": (t_versions, [b"1.0.0", b"/specedge/verify/1.0.0", b"/specedge/verify/2.1.0\n1.0"]),
    "identity": (t_identity, [NODE.private_key.serialize()]),
}
# Targets whose seeds are signed: mutate the payload and re-sign it some of the time.
RESIGN = {
    "open_request": (NODE, DOMAIN_VERIFY_REQUEST, PAYLOAD_VERIFY_REQUEST),
    "open_receipt": (VERIFIER, DOMAIN_RECEIPT, PAYLOAD_RECEIPT),
    "open_statement": (VERIFIER, DOMAIN_STANDING, PAYLOAD_STANDING),
}

INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
               b"\xff\xff\xff\xff\x0f", b"\xff\xff\xff\xff\xff\xff\xff\xff\x7f",
               encode_uvarint(2**31), encode_uvarint(2**63 - 1), b"\xc3\x28", b"\n\x00"]


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    """Apply one to four random edits."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 2:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and buf:
            del buf[pos : pos + rng.randint(1, 16)]
        elif op == 4:
            del buf[pos:]
        elif op == 5 and buf:
            start = rng.randrange(len(buf))
            buf[pos:pos] = buf[start : start + rng.randint(1, 32)]
        elif op == 6:
            other = rng.choice(corpus)
            cut = rng.randrange(len(other) + 1)
            buf[pos:] = other[cut:]
        elif op == 7:
            buf[pos:pos] = rng.choice(INTERESTING)
        else:
            buf[pos : pos + 1] = rng.choice(INTERESTING)
    return bytes(buf)


U32 = [0, 1, 2, 15, 16, 17, 63, 64, 65, VOCAB - 1, VOCAB, VOCAB + 1, 1023, 1024, 1025,
       2**31 - 1, 2**31, 2**32 - 1]
U64 = U32 + [2**32, 3_600_000_001, 2**63 - 1, 2**63, 2**64 - 1]
S32 = [-(2**31), -3, -2, -1, 0, 1, 2, 3, 4, 5, 2**31 - 1]
FLOATS = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-30, 0.5, 1.0, 1.0000001,
          2.0, 100.0, 101.0, 1e30, -1.0]
TEXT = ["", "1.0.0", "2.0.0", "1.0", "tiny-test", "main", NODE_ID, VERIFIER_ID, "a\nb",
        "\x00", "\u202e", "x" * 257, "é" * 100, "/specedge/verify/1.0.0"]
BYTES_LEN = [0, 1, 15, 16, 17, 31, 32, 33, 36, 63, 64, 65]


def _scalar(rng: random.Random, fd) -> object:
    t = fd.type
    if t == fd.TYPE_UINT32:
        return rng.choice(U32) if rng.random() < 0.7 else rng.randrange(2**32)
    if t == fd.TYPE_UINT64:
        return rng.choice(U64) if rng.random() < 0.7 else rng.randrange(2**64)
    if t == fd.TYPE_SINT32:
        return rng.choice(S32) if rng.random() < 0.7 else rng.randrange(-(2**31), 2**31)
    if t in (fd.TYPE_FLOAT, fd.TYPE_DOUBLE):
        return rng.choice(FLOATS)
    if t == fd.TYPE_BOOL:
        return rng.random() < 0.5
    if t == fd.TYPE_ENUM:
        return rng.choice([0, 1, 5, 24, 25, 999, -1])
    if t == fd.TYPE_STRING:
        return rng.choice(TEXT)
    if t == fd.TYPE_BYTES:
        return rng.choice([SID, b"", REQUEST_ENV, RECEIPT_ENV]) if rng.random() < 0.3 else \
            rng.randbytes(rng.choice(BYTES_LEN))
    raise AssertionError(t)


def mutate_message(rng: random.Random, msg, depth: int = 0):
    """Structure-aware edit: set one to three fields to boundary or random values."""
    fields = msg.DESCRIPTOR.fields
    for _ in range(rng.randint(1, 3)):
        fd = rng.choice(fields)
        if fd.message_type is not None and not fd.is_repeated:
            if depth < 3 and rng.random() < 0.8:
                mutate_message(rng, getattr(msg, fd.name), depth + 1)
            else:
                msg.ClearField(fd.name)
        elif fd.is_repeated and fd.message_type is not None:  # e.g. Advertisement.pass_costs
            values = getattr(msg, fd.name)
            if rng.random() < 0.2:
                del values[:]
            for _ in range(rng.choice([1, 2, 70])):
                mutate_message(rng, values.add(), depth + 1)
        elif fd.is_repeated:
            values = getattr(msg, fd.name)
            action = rng.randrange(5)
            if action == 0:
                del values[:]
            elif action == 1 and len(values):
                values[rng.randrange(len(values))] = _scalar(rng, fd)
            elif action == 2:
                values.append(_scalar(rng, fd))
            elif action == 3 and len(values):
                del values[rng.randrange(len(values))]
            else:
                values.extend(_scalar(rng, fd) for _ in range(rng.choice([1, 64, 1025, 5000])))
        else:
            try:
                setattr(msg, fd.name, _scalar(rng, fd))
            except (ValueError, TypeError):
                msg.ClearField(fd.name)  # e.g. a value outside the field's type
    return msg


def _structured(rng: random.Random, name: str) -> bytes | None:
    # A hostile but well-formed message, wrapped the way the target receives it.
    if name not in STRUCTURED:
        return None
    seeds, wrap = STRUCTURED[name]
    msg = type(seed := rng.choice(seeds))()
    msg.CopyFrom(seed)
    return wrap(mutate_message(rng, msg))


def make_input(rng: random.Random, name: str, seeds: list[bytes]) -> bytes:
    roll = rng.random()
    if roll < 0.25:
        return rng.randbytes(rng.choice([0, 1, 2, 5, 16, 64, 300]) and rng.randint(0, 300))
    if roll < 0.55:
        data = _structured(rng, name)
        if data is not None:
            return data
    if name in RESIGN and roll < 0.65:
        key, domain, ptype = RESIGN[name]
        try:
            env = pb.Envelope.FromString(rng.choice(seeds))
        except DecodeError:
            env = pb.Envelope.FromString(TARGETS[name][1][0])  # fall back to the seed
        return seal(key, domain, ptype, mutate(rng, env.payload, [env.payload]))
    return mutate(rng, rng.choice(seeds), seeds)


def _prefixed(frame: pb.Frame) -> bytes:
    body = frame.SerializeToString()  # no sender-side limit: the receiver must cope
    return encode_uvarint(len(body)) + body


def _small(msg) -> bytes:
    index = [pb.CloseSession, pb.Error, pb.Advertisement, pb.AdvertQuery,
             pb.Progress].index(type(msg))
    return bytes([index]) + msg.SerializeToString()


SMALL = [pb.CloseSession(session_id=SID, reason="x"), pb.Error(code=3, message="m"), ADVERT,
         pb.AdvertQuery(model_id="tiny-test"), PROGRESS]
KEY_FILE = crypto_pb2.PrivateKey.FromString(NODE.private_key.serialize())


def _serialize(msg) -> bytes:
    return msg.SerializePartialToString()  # proto2 key files have required fields


STRUCTURED = {
    "parse_frame": (FRAMES, _serialize),
    "frame_decoder": (FRAMES, _prefixed),
    "read_frame": (FRAMES, _prefixed),
    "open_request": ([REQUEST], lambda m: seal_request(NODE, m)),
    "open_receipt": ([RECEIPT], lambda m: seal_receipt(VERIFIER, m)),
    "open_statement": ([STATEMENT], lambda m: seal_statement(VERIFIER, m)),
    "open_session": ([OPEN], _serialize),
    "session_opened": ([OPENED], _serialize),
    "verify_request": ([REQUEST], _serialize),
    "verify_result": ([RESULT_MSG], _serialize),
    "receipt": ([RECEIPT], _serialize),
    "small_messages": (SMALL, _small),
    "identity": ([KEY_FILE], _serialize),
}


@dataclass
class Report:
    name: str
    inputs: int = 0
    accepted: int = 0
    codes: Counter = field(default_factory=Counter)
    escapes: list[str] = field(default_factory=list)
    slowest_s: float = 0.0
    seconds: float = 0.0


def _record(report: Report, data: bytes, elapsed: float, exc: BaseException | None) -> None:
    report.inputs += 1
    report.slowest_s = max(report.slowest_s, elapsed)
    if exc is None:
        report.accepted += 1
    elif isinstance(exc, ProtocolError):
        report.codes[exc.code.name] += 1
        if exc.code == ErrorCode.TIMEOUT and len(report.escapes) < 5:
            # In-memory streams never stall: a timeout here means the reader hung.
            report.escapes.append(f"read timed out (a hang) on input {data[:80]!r}")
    elif isinstance(exc, IdentityError) and report.name == "identity":
        report.codes["IdentityError"] += 1
    elif len(report.escapes) < 5:
        report.escapes.append(f"{type(exc).__name__}: {exc} on input {data[:80]!r}")
    elif exc is not None:
        report.escapes.append("...")
    if elapsed > SLOW_INPUT_S and len(report.escapes) < 5:
        report.escapes.append(f"input took {elapsed:.2f} s: {data[:80]!r}")


def fuzz_target(name: str, count: int, seed: int) -> Report:
    """Feed ``count`` inputs to one target."""
    fn, seeds = TARGETS[name]
    rng = random.Random(f"{seed}:{name}")
    report = Report(name)
    start = time.perf_counter()
    if name == "read_frame":
        async def run_all() -> None:
            for _ in range(count):
                data = make_input(rng, name, seeds)
                t0 = time.perf_counter()
                try:
                    await _read_all(data)
                    exc: BaseException | None = None
                except Exception as e:  # noqa: BLE001 - we classify below
                    exc = e
                _record(report, data, time.perf_counter() - t0, exc)
        trio.run(run_all)
    else:
        for _ in range(count):
            data = make_input(rng, name, seeds)
            t0 = time.perf_counter()
            try:
                fn(data)
                exc = None
            except Exception as e:  # noqa: BLE001 - we classify below
                exc = e
            _record(report, data, time.perf_counter() - t0, exc)
    report.seconds = time.perf_counter() - start
    return report


def run(per_target: int, seed: int = 0, targets: list[str] | None = None,
        out=sys.stdout) -> list[Report]:
    reports = []
    for name in targets or list(TARGETS):
        report = fuzz_target(name, per_target, seed)
        reports.append(report)
        if out is not None:
            top = ", ".join(f"{k} {v}" for k, v in report.codes.most_common(4))
            print(f"{name:15s} {report.inputs:8d} inputs {report.seconds:7.1f} s  "
                  f"slowest {report.slowest_s * 1e3:6.1f} ms  accepted {report.accepted:6d}  "
                  f"escapes {len(report.escapes)}  [{top}]", file=out, flush=True)
            for line in report.escapes:
                print(f"    ESCAPE {line}", file=out)
    return reports


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-target", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", action="append", choices=list(TARGETS))
    args = parser.parse_args()
    start = time.perf_counter()
    reports = run(args.per_target, args.seed, args.target)
    total = sum(r.inputs for r in reports)
    bad = sum(len(r.escapes) for r in reports)
    print(f"total {total} inputs into {len(reports)} targets in "
          f"{time.perf_counter() - start:.1f} s; escapes/hangs: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
