"""Every validator accepts a good message and refuses each fault with its one code."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair

from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.envelopes import request_digest, seal_request
from specedge.protocol.errors import ErrorCode, ProtocolError, RemoteError
from specedge.protocol.identity import peer_id_of
from specedge.protocol.limits import MAX_PROMPT_TOKENS, MAX_RECEIPT_ENVELOPE_BYTES, MAX_TREE_TOKENS
from specedge.protocol.validation import (
    expect,
    validate_advert_query,
    validate_advertisement,
    validate_close_session,
    validate_error,
    validate_frame,
    validate_open_session,
    validate_receipt,
    validate_session_opened,
    validate_tree,
    validate_verify_request,
    validate_verify_result,
)

SID = b"s" * 16
VOCAB = 256
NODE = create_new_key_pair(seed=b"N" * 32)
OTHER = create_new_key_pair(seed=b"O" * 32)
NODE_ID = peer_id_of(NODE)
VERIFIER_ID = peer_id_of(create_new_key_pair(seed=b"V" * 32))


def open_session(**kw) -> pb.OpenSession:
    base = dict(model_id="tiny-test", revision="main", prompt=[1, 2, 3], client_version="1.0.0",
                max_new_tokens=32, sampling=pb.Sampling(temperature=0.8, top_p=0.95, top_k=50))
    base.update(kw)
    return pb.OpenSession(**base)


def request(**kw) -> pb.VerifyRequest:
    base = dict(session_id=SID, seq=5, tokens=[10, 11, 12, 13], parents=[-1, 0, 0, 2],
                draft_micros=100)
    base.update(kw)
    return pb.VerifyRequest(**base)


def result(**kw) -> pb.VerifyResult:
    base = dict(session_id=SID, seq=5, accepted=[0, 2, 3], bonus_token=7, receipt=b"r" * 100)
    base.update(kw)
    return pb.VerifyResult(**base)


SIGNED = seal_request(NODE, request())


def receipt(**kw) -> pb.Receipt:
    base = dict(verifier_peer_id=VERIFIER_ID, node_peer_id=NODE_ID, session_id=SID, seq=5,
                request_sha256=request_digest(SIGNED), drafted=4, accepted=3, verify_micros=10,
                unix_ms=1_700_000_000_000, model_id="tiny-test", draft_micros=100)
    base.update(kw)
    return pb.Receipt(**base)


def advert(**kw) -> pb.Advertisement:
    base = dict(model_id="tiny-test", revision="main", max_batch_tokens=4096, free_slots=2,
                queue_depth=0, mean_verify_micros=3000, protocol_version="1.0.0",
                max_tree_tokens=64, vocab_size=VOCAB)
    base.update(kw)
    return pb.Advertisement(**base)


def check_open(msg: pb.OpenSession, **kw) -> None:
    args = dict(vocab_size=VOCAB, model_id="tiny-test", revision="main", max_context_tokens=4096)
    args.update(kw)
    validate_open_session(msg, **args)


def check_request(req: pb.VerifyRequest, **kw) -> None:
    args = dict(vocab_size=VOCAB, max_tree_tokens=16, last_seq=4, session_id=SID, tokens_left=100)
    args.update(kw)
    validate_verify_request(req, **args)


def check_result(res: pb.VerifyResult, req: pb.VerifyRequest | None = None) -> None:
    validate_verify_result(res, req or request(), VOCAB)


def check_receipt(rc: pb.Receipt, **kw) -> None:
    args = dict(request_envelope=SIGNED, result=result(), node_peer=NODE_ID,
                verifier_peer=VERIFIER_ID, model_id="tiny-test")
    args.update(kw)
    validate_receipt(rc, **args)


E = ErrorCode
CASES: list[tuple[str, Callable[[], None], ErrorCode]] = [
    # OpenSession
    ("open: unknown major version", lambda: check_open(open_session(client_version="2.0.0")),
     E.UNSUPPORTED_VERSION),
    ("open: no version", lambda: check_open(open_session(client_version="")), E.MALFORMED),
    ("open: too many logprobs", lambda: check_open(open_session(top_logprobs=21)),
     E.INVALID_PARAMETER),
    ("open: no model", lambda: check_open(open_session(model_id="")), E.MALFORMED),
    ("open: control chars", lambda: check_open(open_session(model_id="a\nb")), E.MALFORMED),
    ("open: long model id", lambda: check_open(open_session(model_id="m" * 257)), E.TOO_LARGE),
    ("open: other model", lambda: check_open(open_session(model_id="other")),
     E.UNSUPPORTED_MODEL),
    ("open: other revision", lambda: check_open(open_session(revision="v2")),
     E.UNSUPPORTED_MODEL),
    ("open: empty prompt", lambda: check_open(open_session(prompt=[])), E.MALFORMED),
    ("open: long prompt", lambda: check_open(open_session(prompt=[1] * (MAX_PROMPT_TOKENS + 1)),
                                             max_context_tokens=None), E.TOO_LARGE),
    ("open: prompt over verifier cap", lambda: check_open(open_session(prompt=[1] * 11),
                                                          max_prompt_tokens=10), E.TOO_LARGE),
    ("open: prompt token out of vocab", lambda: check_open(open_session(prompt=[1, VOCAB])),
     E.TOKEN_OUT_OF_VOCAB),
    ("open: NaN temperature", lambda: check_open(open_session(
        sampling=pb.Sampling(temperature=float("nan")))), E.INVALID_PARAMETER),
    ("open: negative temperature", lambda: check_open(open_session(
        sampling=pb.Sampling(temperature=-1))), E.INVALID_PARAMETER),
    ("open: inf temperature", lambda: check_open(open_session(
        sampling=pb.Sampling(temperature=float("inf")))), E.INVALID_PARAMETER),
    ("open: top_p > 1", lambda: check_open(open_session(sampling=pb.Sampling(top_p=1.5))),
     E.INVALID_PARAMETER),
    ("open: top_k > vocab", lambda: check_open(open_session(sampling=pb.Sampling(top_k=VOCAB + 1))),
     E.INVALID_PARAMETER),
    ("open: max_new_tokens 0", lambda: check_open(open_session(max_new_tokens=0)),
     E.INVALID_PARAMETER),
    ("open: over context", lambda: check_open(open_session(max_new_tokens=4094)),
     E.LIMIT_REACHED),
    ("open: verifier full", lambda: check_open(open_session(), free_slots=0), E.OVERLOADED),
    # SessionOpened
    ("opened: short session id", lambda: validate_session_opened(pb.SessionOpened(
        session_id=b"x", verifier_peer_id=VERIFIER_ID, vocab_size=1, max_tree_tokens=1)),
     E.MALFORMED),
    ("opened: other peer", lambda: validate_session_opened(pb.SessionOpened(
        session_id=SID, verifier_peer_id=NODE_ID, vocab_size=1, max_tree_tokens=1),
        expected_peer=VERIFIER_ID), E.WRONG_PEER),
    ("opened: zero vocab", lambda: validate_session_opened(pb.SessionOpened(
        session_id=SID, verifier_peer_id=VERIFIER_ID, vocab_size=0, max_tree_tokens=1)),
     E.INVALID_PARAMETER),
    ("opened: huge tree budget", lambda: validate_session_opened(pb.SessionOpened(
        session_id=SID, verifier_peer_id=VERIFIER_ID, vocab_size=9,
        max_tree_tokens=MAX_TREE_TOKENS + 1)), E.INVALID_PARAMETER),
    ("opened: pass cost at 0 rows", lambda: validate_session_opened(pb.SessionOpened(
        session_id=SID, verifier_peer_id=VERIFIER_ID, vocab_size=9, max_tree_tokens=4,
        pass_costs=[pb.PassCost(rows=0, micros=5)])), E.INVALID_PARAMETER),
    ("opened: too many pass costs", lambda: validate_session_opened(pb.SessionOpened(
        session_id=SID, verifier_peer_id=VERIFIER_ID, vocab_size=9, max_tree_tokens=4,
        pass_costs=[pb.PassCost(rows=r, micros=5) for r in range(1, 100)])), E.TOO_LARGE),
    # VerifyRequest
    ("request: bad session id", lambda: check_request(request(session_id=b"short")), E.MALFORMED),
    ("request: other session", lambda: check_request(request(session_id=b"t" * 16)),
     E.UNKNOWN_SESSION),
    ("request: replayed seq", lambda: check_request(request(seq=4)), E.REPLAYED_SEQUENCE),
    ("request: seq 0", lambda: check_request(request(seq=0), last_seq=0), E.REPLAYED_SEQUENCE),
    ("request: skipped seq", lambda: check_request(request(seq=7)), E.SKIPPED_SEQUENCE),
    ("request: session spent", lambda: check_request(request(), tokens_left=0), E.LIMIT_REACHED),
    ("request: tree over budget", lambda: check_request(request(), max_tree_tokens=3),
     E.TREE_TOO_LARGE),
    ("request: parents length", lambda: check_request(request(parents=[-1, 0, 0])), E.BAD_TREE),
    ("request: forward parent", lambda: check_request(request(parents=[-1, 2, 0, 0])),
     E.BAD_TREE),
    ("request: self parent", lambda: check_request(request(parents=[-1, 1, 0, 0])), E.BAD_TREE),
    ("request: parent < -1", lambda: check_request(request(parents=[-2, 0, 0, 0])), E.BAD_TREE),
    ("request: first parent 0", lambda: check_request(request(parents=[0, 0, 0, 0])), E.BAD_TREE),
    ("request: token out of vocab", lambda: check_request(request(tokens=[1, 2, VOCAB, 3])),
     E.TOKEN_OUT_OF_VOCAB),
    ("request: absurd draft time", lambda: check_request(request(draft_micros=2**63)),
     E.INVALID_PARAMETER),
    # VerifyResult
    ("result: other seq", lambda: check_result(result(seq=6)), E.BAD_RESULT),
    ("result: too many accepted", lambda: check_result(result(accepted=[0, 1, 2, 3, 3])),
     E.BAD_RESULT),
    ("result: index out of tree", lambda: check_result(result(accepted=[0, 9])), E.BAD_RESULT),
    ("result: not a path", lambda: check_result(result(accepted=[0, 1, 3])), E.BAD_RESULT),
    ("result: not from the root", lambda: check_result(result(accepted=[2, 3])), E.BAD_RESULT),
    ("result: bonus out of vocab", lambda: check_result(result(bonus_token=VOCAB)),
     E.TOKEN_OUT_OF_VOCAB),
    ("result: no receipt", lambda: check_result(result(receipt=b"")), E.MALFORMED),
    ("result: huge receipt",
     lambda: check_result(result(receipt=b"r" * (MAX_RECEIPT_ENVELOPE_BYTES + 1))), E.TOO_LARGE),
    # Receipt
    ("receipt: no node", lambda: check_receipt(receipt(node_peer_id="")), E.MALFORMED),
    ("receipt: not base58", lambda: check_receipt(receipt(verifier_peer_id="0OIl")), E.MALFORMED),
    ("receipt: short digest", lambda: check_receipt(receipt(request_sha256=b"x")), E.MALFORMED),
    ("receipt: no time", lambda: check_receipt(receipt(unix_ms=0)), E.MALFORMED),
    ("receipt: seq 0", lambda: check_receipt(receipt(seq=0)), E.MALFORMED),
    ("receipt: accepted > drafted", lambda: check_receipt(receipt(accepted=5)), E.BAD_RECEIPT),
    ("receipt: absurd timing", lambda: check_receipt(receipt(verify_micros=2**62)),
     E.BAD_RECEIPT),
    ("receipt: other node", lambda: check_receipt(receipt(), node_peer=VERIFIER_ID),
     E.WRONG_PEER),
    ("receipt: other verifier", lambda: check_receipt(receipt(), verifier_peer=NODE_ID),
     E.WRONG_PEER),
    ("receipt: other model", lambda: check_receipt(receipt(model_id="x")), E.BAD_RECEIPT),
    ("receipt: wrong digest", lambda: check_receipt(receipt(request_sha256=b"\x00" * 32)),
     E.BAD_RECEIPT),
    ("receipt: request signed by someone else", lambda: check_receipt(
        receipt(request_sha256=request_digest(seal_request(OTHER, request()))),
        request_envelope=seal_request(OTHER, request())), E.WRONG_PEER),
    ("receipt: other seq", lambda: check_receipt(receipt(seq=6)), E.BAD_RECEIPT),
    ("receipt: drafted count", lambda: check_receipt(receipt(drafted=3)), E.BAD_RECEIPT),
    ("receipt: draft_micros", lambda: check_receipt(receipt(draft_micros=99)), E.BAD_RECEIPT),
    ("receipt: accepted count", lambda: check_receipt(receipt(accepted=2)), E.BAD_RECEIPT),
    ("receipt: request differs", lambda: check_receipt(receipt(), request=request(seq=6)),
     E.BAD_RECEIPT),
    # CloseSession, Error, Advertisement, AdvertQuery
    ("close: bad id", lambda: validate_close_session(pb.CloseSession(session_id=b"")),
     E.MALFORMED),
    ("close: other session", lambda: validate_close_session(
        pb.CloseSession(session_id=b"t" * 16), session_id=SID), E.UNKNOWN_SESSION),
    ("close: long reason", lambda: validate_close_session(
        pb.CloseSession(session_id=SID, reason="r" * 300)), E.TOO_LARGE),
    ("error: long message", lambda: validate_error(pb.Error(message="m" * 2000)), E.TOO_LARGE),
    ("error: bad session id", lambda: validate_error(pb.Error(session_id=b"x")), E.MALFORMED),
    ("advert: unknown major", lambda: validate_advertisement(advert(protocol_version="9.0.0")),
     E.UNSUPPORTED_VERSION),
    ("advert: no model", lambda: validate_advertisement(advert(model_id="")), E.MALFORMED),
    ("advert: zero batch", lambda: validate_advertisement(advert(max_batch_tokens=0)),
     E.INVALID_PARAMETER),
    ("advert: huge tree", lambda: validate_advertisement(advert(max_tree_tokens=10**6)),
     E.INVALID_PARAMETER),
    ("advert: more sessions than slots can be", lambda: validate_advertisement(
        advert(sessions_open=2**16 + 1)), E.INVALID_PARAMETER),
    ("query: long model", lambda: validate_advert_query(pb.AdvertQuery(model_id="m" * 300)),
     E.TOO_LARGE),
    # Frames
    ("frame: empty", lambda: validate_frame(pb.Frame()), E.MALFORMED),
    ("frame: stateless check", lambda: validate_frame(pb.Frame(open=open_session(prompt=[]))),
     E.MALFORMED),
    ("frame: unexpected kind", lambda: expect(pb.Frame(advert_query=pb.AdvertQuery()), "result"),
     E.UNEXPECTED_MESSAGE),
]


@pytest.mark.parametrize(("name", "call", "code"), CASES, ids=[c[0] for c in CASES])
def test_each_fault_has_its_code(name: str, call: Callable[[], None], code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        call()
    assert info.value.code == code, info.value


def test_good_messages_pass() -> None:
    check_open(open_session())
    check_open(open_session(revision=""))  # any revision will do
    check_open(open_session(sampling=pb.Sampling()))  # greedy defaults
    validate_open_session(open_session())  # no verifier context at all
    validate_session_opened(pb.SessionOpened(session_id=SID, verifier_peer_id=VERIFIER_ID,
                                             vocab_size=VOCAB, max_tree_tokens=64),
                            expected_peer=VERIFIER_ID)
    check_request(request())
    check_request(request(seq=1), last_seq=0)
    check_request(request(tokens=[], parents=[]))  # empty tree: one plain target step
    chain = list(range(16))
    check_request(request(tokens=chain, parents=[i - 1 for i in chain]))
    check_result(result())
    check_result(result(accepted=[]))
    check_receipt(receipt())
    check_receipt(receipt(), request=request())
    validate_close_session(pb.CloseSession(session_id=SID, reason="done"), session_id=SID)
    validate_error(pb.Error(code=999, message="from the future"))
    validate_advertisement(advert())
    validate_advertisement(advert(protocol_version="1.4.0"))
    validate_advert_query(pb.AdvertQuery())
    for frame in [pb.Frame(open=open_session()), pb.Frame(advert=advert()),
                  pb.Frame(result=result())]:
        validate_frame(frame)
    assert expect(pb.Frame(result=result()), "result", "error") == "result"


def test_expect_raises_a_peer_error_with_its_code() -> None:
    frame = pb.Frame(error=pb.Error(code=pb.OVERLOADED, message="full", seq=3))
    with pytest.raises(RemoteError) as info:
        expect(frame, "opened")
    assert info.value.code == ErrorCode.OVERLOADED and info.value.seq == 3


def test_caller_bugs_are_value_errors_not_protocol_errors() -> None:
    # A wrong vocab size is our bug, not the peer's: it must not be sent as an Error frame.
    with pytest.raises(ValueError):
        validate_tree([1], [-1], vocab_size=0, max_tree_tokens=4)


def test_tree_budget_never_exceeds_the_protocol_ceiling() -> None:
    n = MAX_TREE_TOKENS + 1
    with pytest.raises(ProtocolError) as info:
        validate_tree([0] * n, [-1] * n, vocab_size=VOCAB, max_tree_tokens=10**9)
    assert info.value.code == ErrorCode.TREE_TOO_LARGE


def _raise(exc: BaseException) -> None:
    raise exc


def _timeout() -> None:
    import trio

    from specedge.protocol.framing import read_frame

    class Stalled:
        async def read(self, n: int | None = None) -> bytes:
            await trio.sleep_forever()
            return b""

    trio.run(lambda: read_frame(Stalled(), timeout=0.01))


def _closed() -> None:
    import trio

    from specedge.protocol.framing import read_frame

    class Ended:
        async def read(self, n: int | None = None) -> bytes:
            return b""

    trio.run(lambda: read_frame(Ended(), timeout=1))


def _forged() -> None:
    from specedge.protocol.envelopes import open_request

    env = pb.Envelope.FromString(seal_request(OTHER, request()))
    env.public_key = NODE.public_key.serialize()
    open_request(env.SerializeToString(), expected_peer=NODE_ID)


def _full_verifier() -> None:
    from specedge.verifier.sessions import SessionTable

    table = SessionTable(max_sessions=1, max_per_peer=1)
    table.reserve("a")
    table.reserve("b")  # no slot left: BUSY, with when to ask again


def test_every_error_code_has_a_trigger() -> None:
    """The report's table: one input per code (SHUTTING_DOWN is the verifier's state)."""
    from specedge.protocol.envelopes import open_envelope, open_request
    from specedge.protocol.errors import error_frame, from_error
    from specedge.protocol.framing import parse_frame

    triggers: dict[ErrorCode, Callable[[], None]] = {
        E.ERROR_UNSPECIFIED: lambda: _raise(from_error(pb.Error(code=999))),
        E.MALFORMED: lambda: parse_frame(b"\xff\xff"),
        E.TOO_LARGE: lambda: parse_frame(pb.Frame(
            advert_query=pb.AdvertQuery(model_id="x" * 5000)).SerializeToString()),
        E.UNEXPECTED_MESSAGE: lambda: expect(pb.Frame(advert_query=pb.AdvertQuery()), "result"),
        E.BAD_KEY: lambda: open_request(pb.Envelope(public_key=b"\x08\x01\x12\x20" + b"\0" * 31)
                                        .SerializeToString()),
        E.BAD_SIGNATURE: _forged,
        E.WRONG_PAYLOAD_TYPE: lambda: open_envelope(SIGNED, "specedge-receipt",
                                                    b"specedge.v1.Receipt"),
        E.WRONG_PEER: lambda: open_request(seal_request(OTHER, request()), expected_peer=NODE_ID),
        E.UNKNOWN_SESSION: lambda: check_request(request(session_id=b"t" * 16)),
        E.REPLAYED_SEQUENCE: lambda: check_request(request(seq=4)),
        E.SKIPPED_SEQUENCE: lambda: check_request(request(seq=6), last_seq=0),
        E.TOKEN_OUT_OF_VOCAB: lambda: check_request(request(tokens=[1, 2, VOCAB, 3])),
        E.BAD_TREE: lambda: check_request(request(parents=[-1, 2, 0, 0])),
        E.TREE_TOO_LARGE: lambda: check_request(request(), max_tree_tokens=3),
        E.INVALID_PARAMETER: lambda: check_open(open_session(sampling=pb.Sampling(top_p=1.5))),
        E.BAD_RESULT: lambda: check_result(result(accepted=[0, 1, 3])),
        E.BAD_RECEIPT: lambda: check_receipt(receipt(request_sha256=b"\0" * 32)),
        E.LIMIT_REACHED: lambda: check_open(open_session(max_new_tokens=4094)),
        E.OVERLOADED: lambda: check_open(open_session(), free_slots=0),
        E.UNSUPPORTED_MODEL: lambda: check_open(open_session(model_id="other")),
        E.UNSUPPORTED_VERSION: lambda: check_open(open_session(client_version="2.0.0")),
        E.TIMEOUT: _timeout,
        E.STREAM_CLOSED: _closed,
        E.INTERNAL: lambda: _raise(from_error(error_frame(KeyError("bug")).error)),
        E.BUSY: _full_verifier,
    }
    assert set(triggers) | {E.SHUTTING_DOWN} == set(ErrorCode)
    for code, trigger in triggers.items():
        with pytest.raises(ProtocolError) as info:
            trigger()
        assert info.value.code == code, (code, info.value)
