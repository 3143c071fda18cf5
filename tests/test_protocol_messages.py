"""Round trips for every message, the proto/Python mirrors, ids and the generated module."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.errors import (
    ErrorCode,
    ProtocolError,
    RemoteError,
    error_frame,
    from_error,
)
from specedge.protocol.framing import decode_frames, encode_frame
from specedge.protocol.ids import (
    ADVERT_PROTOCOL,
    PROGRESS_SINCE,
    PROTOCOL_VERSION,
    VERIFY_PROTOCOL,
    check_version,
    dht_key,
    legacy_dht_key,
    negotiate,
    parse_protocol_id,
    supports,
)

PROTOCOL_DIR = Path(__file__).resolve().parent.parent / "protocol"
SID = bytes(range(16))


def sample_messages() -> dict[str, object]:
    """One fully populated instance of every message (each field set to a non-default)."""
    return {
        "envelope": pb.Envelope(public_key=b"k" * 36, payload_type=b"t", payload=b"p",
                                signature=b"s" * 64),
        "sampling": pb.Sampling(temperature=0.7, top_p=0.9, top_k=40, seed=2**64 - 1),
        "open": pb.OpenSession(
            model_id="tiny-test", revision="abc", prompt=[1, 2, 3, 2**32 - 1],
            sampling=pb.Sampling(temperature=1.0, top_p=1.0, top_k=1, seed=7),
            client_version="1.0.0", max_new_tokens=64, progress=True, standing=b"s" * 10,
            top_logprobs=5,
        ),
        "opened": pb.SessionOpened(session_id=SID, verifier_peer_id="12D3KooWx",
                                   vocab_size=256, max_tree_tokens=64,
                                   pass_costs=[pb.PassCost(rows=65, micros=2500)]),
        "verify_request": pb.VerifyRequest(session_id=SID, seq=2**64 - 1, tokens=[5, 6, 7],
                                           parents=[-1, 0, -1], proactive=True,
                                           draft_micros=1234),
        "result": pb.VerifyResult(session_id=SID, seq=3, accepted=[0, 1], bonus_token=9,
                                  receipt=b"r" * 10),
        "receipt": pb.Receipt(
            verifier_peer_id="v", node_peer_id="n", session_id=SID, seq=1,
            request_sha256=b"h" * 32, drafted=3, accepted=2, verify_micros=10, unix_ms=99,
            model_id="tiny-test", draft_micros=5,
            positions=[pb.AuditPosition(token=3, logprob=-0.5, margin=1.5, top_tokens=[3, 4],
                                        top_logprobs=[-0.5, -2.0], deficit=0.25)],
            session_sha256=b"d" * 32, engine="torch/float32", first_position=12,
        ),
        "audit_position": pb.AuditPosition(token=3, logprob=-0.5, margin=1.5, top_tokens=[3],
                                           top_logprobs=[-0.5], deficit=0.25),
        "audit_request": pb.AuditRequest(
            model_id="tiny-test", node_peer_id="n", prompt=[1, 2], sampling=pb.Sampling(seed=1),
            committed=[3, 4], unix_ms=99, nonce=b"x" * 16),
        "audit_answer": pb.AuditAnswer(
            auditor_peer_id="a", request_sha256=b"h" * 32, model_id="tiny-test",
            engine="torch/bfloat16", positions=[pb.AuditPosition(token=3)], audit_micros=5,
            unix_ms=99),
        "fraud_proof": pb.FraudProof(accused_peer_id="v", requests=[b"q"], receipts=[b"r"],
                                     audit_request=b"a", answers=[b"x", b"y"], position=2),
        "close": pb.CloseSession(session_id=SID, reason="done"),
        "error": pb.Error(code=pb.BUSY, message="bad", session_id=SID, seq=4,
                          retry_after_ms=1500),
        "advert": pb.Advertisement(
            model_id="tiny-test", revision="r", max_batch_tokens=4096, free_slots=3,
            queue_depth=1, mean_verify_micros=2500, protocol_version="1.0.0",
            max_tree_tokens=64, vocab_size=256, prefill_tokens_per_s=812.5,
            mean_pass_micros=40_000, sessions_open=2, max_sessions=64,
            queued_prefill_tokens=300, pass_costs=[pb.PassCost(rows=1, micros=900)],
            engine="torch/float32", committed_tokens=12345, your_standing=250.5,
            standing_statement=b"e" * 8, standing_issuers=["12D3KooWx"],
        ),
        "progress": pb.Progress(session_id=SID, seq=2, state=pb.Progress.PREFILLING,
                                queue_position=3, done=64, total=100, eta_ms=2000),
        "pass_cost": pb.PassCost(rows=8, micros=1200),
        "advert_query": pb.AdvertQuery(model_id="tiny-test", want_standing=True),
        "statement": pb.StandingStatement(issuer_peer_id="v", node_peer_id="n", earned=12.5,
                                          as_of_unix_ms=99, half_life_s=604800.0),
    }


@pytest.mark.parametrize("name", list(sample_messages()))
def test_every_message_round_trips(name: str) -> None:
    msg = sample_messages()[name]
    data = msg.SerializeToString()
    back = type(msg).FromString(data)
    assert back == msg
    # Every field was set: a field the sample forgets would silently go untested.
    for field in msg.DESCRIPTOR.fields:
        if field.is_repeated:
            assert len(getattr(back, field.name)) > 0, field.name
        elif field.message_type is not None:
            assert back.HasField(field.name), field.name
        else:
            assert getattr(back, field.name) != field.default_value, field.name


def _frames() -> list[pb.Frame]:
    m = sample_messages()
    return [
        pb.Frame(open=m["open"]),
        pb.Frame(opened=m["opened"]),
        pb.Frame(verify=m["envelope"]),
        pb.Frame(result=m["result"]),
        pb.Frame(close=m["close"]),
        pb.Frame(error=m["error"]),
        pb.Frame(advert=m["advert"]),
        pb.Frame(advert_query=m["advert_query"]),
        pb.Frame(progress=m["progress"]),
        pb.Frame(audit_request=m["envelope"]),
        pb.Frame(audit_answer=m["envelope"]),
    ]


def test_every_frame_kind_round_trips_through_framing() -> None:
    frames = _frames()
    kinds = {f.WhichOneof("body") for f in frames}
    assert kinds == {f.name for f in pb.Frame.DESCRIPTOR.oneofs_by_name["body"].fields}
    data = b"".join(encode_frame(f) for f in frames)
    assert decode_frames(data) == frames


def test_error_code_enum_mirrors_proto() -> None:
    proto = {v.name: v.number for v in pb.DESCRIPTOR.enum_types_by_name["ErrorCode"].values}
    assert proto == {c.name: c.value for c in ErrorCode}


def test_error_frame_keeps_code_and_hides_internal_details() -> None:
    frame = error_frame(ProtocolError(ErrorCode.BAD_TREE, "parents[3]=5"), session_id=SID, seq=4)
    assert frame.error.code == pb.BAD_TREE and frame.error.message == "parents[3]=5"
    assert (frame.error.session_id, frame.error.seq) == (SID, 4)
    frame = error_frame(KeyError("/secret/path"))
    assert frame.error.code == pb.INTERNAL and "secret" not in frame.error.message
    long = error_frame(ProtocolError(ErrorCode.MALFORMED, "x" * 10_000))
    encode_frame(long)  # clipped to fit the error frame limit
    back = from_error(long.error)
    assert isinstance(back, RemoteError) and back.code == ErrorCode.MALFORMED
    # A code from a newer peer is still readable.
    assert from_error(pb.Error(code=999, message="?")).code == ErrorCode.ERROR_UNSPECIFIED


def test_protocol_error_pickles() -> None:
    import pickle

    exc = pickle.loads(pickle.dumps(ProtocolError(ErrorCode.TIMEOUT, "slow")))
    assert (exc.code, exc.message) == (ErrorCode.TIMEOUT, "slow")
    rem = pickle.loads(pickle.dumps(RemoteError(ErrorCode.BUSY, "busy", SID, 3, 2.5)))
    assert (rem.code, rem.session_id, rem.seq, rem.retry_after) == (ErrorCode.BUSY, SID, 3, 2.5)


def test_busy_errors_carry_their_retry_after_both_ways() -> None:
    frame = error_frame(ProtocolError(ErrorCode.BUSY, "full", retry_after=2.25))
    assert frame.error.retry_after_ms == 2250
    back = from_error(frame.error)
    assert back.code == ErrorCode.BUSY and back.retry_after == 2.25
    assert from_error(pb.Error(code=pb.BUSY)).retry_after is None  # unknown: not zero
    huge = from_error(pb.Error(code=pb.BUSY, retry_after_ms=2**32 - 1))
    assert huge.retry_after == 3600.0  # bounded: a verifier cannot park a node forever


def test_protocol_ids_and_versions() -> None:
    assert VERIFY_PROTOCOL == "/specedge/verify/1.0.0"
    assert ADVERT_PROTOCOL == "/specedge/advert/1.0.0"
    assert parse_protocol_id(VERIFY_PROTOCOL) == ("/specedge/verify", (1, 0, 0))
    assert check_version(PROTOCOL_VERSION) == (1, 2, 0)
    # Ids carry the major only: a 1.0 node still finds a 1.1 verifier's handler.
    assert supports("1.1.0", PROGRESS_SINCE) and supports("1.4.2", PROGRESS_SINCE)
    assert not supports("1.0.0", PROGRESS_SINCE) and not supports("2.1.0", PROGRESS_SINCE)
    assert not supports("garbage", PROGRESS_SINCE)
    assert check_version("1.7.2") == (1, 7, 2)  # minor versions interoperate
    with pytest.raises(ProtocolError) as e:
        check_version("2.0.0")
    assert e.value.code == ErrorCode.UNSUPPORTED_VERSION
    for bad in ["", "1", "1.0", "01.0.0", "1.0.0-rc1", "v1.0.0", " 1.0.0"]:
        with pytest.raises(ProtocolError) as e:
            check_version(bad)
        assert e.value.code == ErrorCode.MALFORMED, bad
    assert negotiate(["/specedge/verify/1.3.0", "/other/1.0.0"]) == VERIFY_PROTOCOL
    with pytest.raises(ProtocolError) as e:
        negotiate(["/specedge/verify/2.0.0", "/specedge/advert/1.0.0", "junk"])
    assert e.value.code == ErrorCode.UNSUPPORTED_VERSION
    with pytest.raises(ProtocolError) as e:
        parse_protocol_id("/ipfs/kad/1.0.0")
    assert e.value.code == ErrorCode.MALFORMED


def test_dht_key_is_a_cidv1_raw_sha256_of_a_domain_separated_model_id() -> None:
    from cid import from_string
    from libp2p.kad_dht.kad_dht import _encode_key

    key = dht_key("Qwen/Qwen2.5-Coder-1.5B")
    cid = from_string(key)
    assert key.startswith("bafkrei") and cid.version == 1 and cid.codec == "raw"
    digest = hashlib.sha256(b"specedge/model/v1\x00Qwen/Qwen2.5-Coder-1.5B").digest()
    # What goes on the wire (py-libp2p, go and js alike): the sha2-256 multihash.
    assert _encode_key(key) == bytes([0x12, 0x20]) + digest == cid.multihash
    assert key == dht_key("Qwen/Qwen2.5-Coder-1.5B") != dht_key("tiny-test")
    assert legacy_dht_key("tiny-test") == "/specedge/model/" + hashlib.sha256(
        b"tiny-test").hexdigest()


def _normalise(text: str) -> str:
    # Drop the lines naming the protoc/protobuf version that generated the file, so
    # a different grpcio-tools build does not count as a stale schema.
    return "\n".join(
        line for line in text.splitlines()
        if "Protobuf Python Version" not in line and not re.fullmatch(r"\s*\d+,", line)
    )


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="needs grpcio-tools")
def test_generated_module_is_not_stale(tmp_path: Path) -> None:
    """Fails when specedge.proto changed without `make proto` (regenerate and compare)."""
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOCOL_DIR}",
        f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
        f"--descriptor_set_out={tmp_path / 'set.pb'}", str(PROTOCOL_DIR / "specedge.proto"),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    fresh = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "set.pb").read_bytes()).file[0]
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    for message in fresh.message_type:  # the embedded descriptor omits json names
        for field in message.field:
            field.ClearField("json_name")
    assert committed == fresh, "protocol/specedge_pb2.py is stale: run `make proto`"
    for name in ("specedge_pb2.py", "specedge_pb2.pyi"):
        new = _normalise((tmp_path / name).read_text())
        old = _normalise((PROTOCOL_DIR / name).read_text())
        assert new == old, f"protocol/{name} is stale: run `make proto`"


def test_largest_valid_messages_fit_their_frame_limits() -> None:
    """Limits must not refuse what validation accepts (worst-case sizes everywhere)."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    from specedge.protocol import limits as L
    from specedge.protocol.envelopes import open_receipt, open_request, seal_receipt, seal_request
    from specedge.protocol.validation import (
        validate_advert_query,
        validate_advertisement,
        validate_close_session,
        validate_error,
        validate_open_session,
        validate_receipt,
        validate_session_opened,
        validate_verify_request,
    )

    wide = "\U0001f600"  # 4 bytes in UTF-8
    top = L.MAX_VOCAB_SIZE - 1
    u64 = 2**64 - 1
    key = create_new_key_pair(seed=b"k" * 32)
    peer = "z" * L.MAX_PEER_ID_CHARS
    model = wide * L.MAX_MODEL_ID_CHARS
    n = L.MAX_TREE_TOKENS
    req = pb.VerifyRequest(session_id=SID, seq=u64 - 1, tokens=[top] * n,
                           parents=[i - 1 for i in range(n)], proactive=True,
                           draft_micros=L.MAX_DRAFT_MICROS)
    validate_verify_request(req, L.MAX_VOCAB_SIZE, n, u64 - 2)
    env = seal_request(key, req)
    open_request(env)
    receipt = pb.Receipt(verifier_peer_id=peer, node_peer_id=peer, session_id=SID, seq=u64 - 1,
                         request_sha256=b"h" * 32, drafted=n, accepted=n,
                         verify_micros=L.MAX_VERIFY_MICROS, unix_ms=u64, model_id=model,
                         draft_micros=L.MAX_DRAFT_MICROS)
    validate_receipt(receipt)
    sealed_receipt = seal_receipt(key, receipt)
    with pytest.raises(ProtocolError):  # only because the names are not the signer's
        open_receipt(sealed_receipt)
    assert len(sealed_receipt) <= L.MAX_RECEIPT_ENVELOPE_BYTES - 64  # room for a real id
    opn = pb.OpenSession(
        model_id=model, revision=wide * L.MAX_REVISION_CHARS, prompt=[top] * L.MAX_PROMPT_TOKENS,
        sampling=pb.Sampling(temperature=L.MAX_TEMPERATURE, top_p=1.0, top_k=L.MAX_TOP_K,
                             seed=u64),
        client_version="1.999999.999999", max_new_tokens=L.MAX_NEW_TOKENS,
    )
    validate_open_session(opn)
    opened = pb.SessionOpened(session_id=SID, verifier_peer_id=peer,
                              vocab_size=L.MAX_VOCAB_SIZE, max_tree_tokens=n)
    validate_session_opened(opened)
    close = pb.CloseSession(session_id=SID, reason=wide * L.MAX_REASON_CHARS)
    validate_close_session(close)
    err = pb.Error(code=pb.INTERNAL, message=wide * L.MAX_ERROR_MESSAGE_CHARS, session_id=SID,
                   seq=u64)
    validate_error(err)
    advert = pb.Advertisement(
        model_id=model, revision=wide * L.MAX_REVISION_CHARS, max_batch_tokens=L.MAX_BATCH_TOKENS,
        free_slots=L.MAX_FREE_SLOTS, queue_depth=L.MAX_QUEUE_DEPTH,
        mean_verify_micros=L.MAX_VERIFY_MICROS, protocol_version="1.999999.999999",
        max_tree_tokens=n, vocab_size=L.MAX_VOCAB_SIZE, sessions_open=L.MAX_FREE_SLOTS,
        committed_tokens=u64,
    )
    validate_advertisement(advert)
    query = pb.AdvertQuery(model_id=model)
    validate_advert_query(query)
    result = pb.VerifyResult(session_id=SID, seq=u64, accepted=list(range(n)), bonus_token=top,
                             receipt=b"r" * L.MAX_RECEIPT_ENVELOPE_BYTES)
    frames = [
        pb.Frame(verify=pb.Envelope.FromString(env)), pb.Frame(result=result),
        pb.Frame(open=opn), pb.Frame(opened=opened), pb.Frame(close=close),
        pb.Frame(error=err), pb.Frame(advert=advert), pb.Frame(advert_query=query),
    ]
    assert len(env) <= L.MAX_ENVELOPE_BYTES
    assert decode_frames(b"".join(encode_frame(f) for f in frames)) == frames
    assert len(error_frame(ProtocolError(ErrorCode.MALFORMED, wide * 5000)).error.message) <= (
        L.MAX_ERROR_MESSAGE_CHARS)
