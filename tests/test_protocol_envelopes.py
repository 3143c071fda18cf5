"""Signed envelopes: good ones open; forged, altered, replayed, wrong-peer ones do not."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.secp256k1 import create_new_key_pair as create_secp256k1_key_pair
from libp2p.peer.id import ID

from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.envelopes import (
    DOMAIN_RECEIPT,
    DOMAIN_VERIFY_REQUEST,
    PAYLOAD_RECEIPT,
    PAYLOAD_VERIFY_REQUEST,
    Opened,
    frame_envelope_bytes,
    open_envelope,
    open_receipt,
    open_request,
    peer_id_from_public_key,
    request_digest,
    request_frame,
    seal,
    seal_receipt,
    seal_request,
    signing_input,
)
from specedge.protocol.errors import ErrorCode, ProtocolError
from specedge.protocol.framing import decode_frames, encode_frame
from specedge.protocol.identity import peer_id_of
from specedge.protocol.validation import validate_receipt, validate_verify_request

NODE = create_new_key_pair(seed=b"n" * 32)
VERIFIER = create_new_key_pair(seed=b"v" * 32)
MALLORY = create_new_key_pair(seed=b"m" * 32)
SID = b"S" * 16


def _request(seq: int = 1) -> pb.VerifyRequest:
    return pb.VerifyRequest(session_id=SID, seq=seq, tokens=[3, 4, 5], parents=[-1, 0, 0],
                            draft_micros=700)


def _receipt(envelope: bytes, seq: int = 1) -> pb.Receipt:
    return pb.Receipt(
        verifier_peer_id=peer_id_of(VERIFIER), node_peer_id=peer_id_of(NODE), session_id=SID,
        seq=seq, request_sha256=request_digest(envelope), drafted=3, accepted=1,
        verify_micros=900, unix_ms=1_700_000_000_000, model_id="tiny-test", draft_micros=700,
    )


def _code(fn, *args, **kwargs) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        fn(*args, **kwargs)
    return info.value.code


def _envelope(data: bytes) -> pb.Envelope:
    return pb.Envelope.FromString(data)


def test_request_round_trip_names_the_signer() -> None:
    data = seal_request(NODE, _request())
    opened, req = open_request(data, expected_peer=peer_id_of(NODE))
    assert isinstance(opened, Opened)
    assert req == _request()
    assert opened.peer_id == peer_id_of(NODE) == ID.from_pubkey(NODE.public_key).to_base58()
    assert opened.public_key == NODE.public_key.serialize()
    assert opened.raw == data and request_digest(data) == hashlib.sha256(data).digest()
    assert open_request(data)[1] == req  # expected_peer is optional


def test_signature_is_plain_ed25519_over_the_rfc_layout() -> None:
    # Any language can check it: the domain-separated string, signed with Ed25519.
    data = seal_request(NODE, _request())
    env = _envelope(data)
    expected = (b"\x17specedge-verify-request" + bytes([len(PAYLOAD_VERIFY_REQUEST)])
                + PAYLOAD_VERIFY_REQUEST + bytes([len(env.payload)]) + env.payload)
    assert signing_input(DOMAIN_VERIFY_REQUEST, env.payload_type, env.payload) == expected
    Ed25519PublicKey.from_public_bytes(NODE.public_key.to_bytes()).verify(env.signature, expected)
    assert peer_id_from_public_key(env.public_key) == peer_id_of(NODE)


def test_receipt_round_trip_and_full_check() -> None:
    request_env = seal_request(NODE, _request())
    data = seal_receipt(VERIFIER, _receipt(request_env))
    opened, receipt = open_receipt(data, expected_peer=peer_id_of(VERIFIER))
    assert opened.peer_id == peer_id_of(VERIFIER)
    validate_receipt(receipt, request_envelope=request_env, node_peer=peer_id_of(NODE),
                     verifier_peer=peer_id_of(VERIFIER), model_id="tiny-test")


def test_request_travels_in_a_frame_with_its_digest_unchanged() -> None:
    data = seal_request(NODE, _request())
    (frame,) = decode_frames(encode_frame(request_frame(data)))
    assert frame_envelope_bytes(frame) == data
    assert request_digest(frame_envelope_bytes(frame)) == request_digest(data)


def test_wrong_peer_is_refused() -> None:
    data = seal_request(MALLORY, _request())
    assert _code(open_request, data, expected_peer=peer_id_of(NODE)) == ErrorCode.WRONG_PEER


def test_forged_signature_is_refused() -> None:
    # Mallory signs with her key but presents the node's public key.
    env = _envelope(seal_request(MALLORY, _request()))
    env.public_key = NODE.public_key.serialize()
    forged = env.SerializeToString()
    assert _code(open_request, forged, expected_peer=peer_id_of(NODE)) == ErrorCode.BAD_SIGNATURE
    env.signature = b"\x00" * 64
    assert _code(open_request, env.SerializeToString()) == ErrorCode.BAD_SIGNATURE
    env.signature = b"\x00" * 63
    assert _code(open_request, env.SerializeToString()) == ErrorCode.BAD_SIGNATURE


@pytest.mark.parametrize("field", ["payload", "signature"])
def test_altered_envelope_is_refused(field: str) -> None:
    data = seal_request(NODE, _request())
    for i in range(len(getattr(_envelope(data), field))):
        env = _envelope(data)
        value = bytearray(getattr(env, field))
        value[i] ^= 0x01
        setattr(env, field, bytes(value))
        altered = env.SerializeToString()
        code = _code(open_request, altered, expected_peer=peer_id_of(NODE))
        assert code == ErrorCode.BAD_SIGNATURE, (field, i)


def test_altered_request_fields_are_refused() -> None:
    env = _envelope(seal_request(NODE, _request()))
    req = pb.VerifyRequest.FromString(env.payload)
    req.tokens[0] = 4  # change what was asked, keep the signature
    env.payload = req.SerializeToString()
    assert _code(open_request, env.SerializeToString()) == ErrorCode.BAD_SIGNATURE


def test_altered_receipt_is_refused() -> None:
    env = _envelope(seal_receipt(VERIFIER, _receipt(seal_request(NODE, _request()))))
    receipt = pb.Receipt.FromString(env.payload)
    receipt.accepted = 3  # inflate the credit
    env.payload = receipt.SerializeToString()
    assert _code(open_receipt, env.SerializeToString()) == ErrorCode.BAD_SIGNATURE


def test_receipt_claiming_another_verifier_is_refused() -> None:
    receipt = _receipt(seal_request(NODE, _request()))
    data = seal_receipt(MALLORY, receipt)  # names VERIFIER, signed by Mallory
    assert _code(open_receipt, data) == ErrorCode.WRONG_PEER


def test_replayed_request_is_refused_by_sequence() -> None:
    # A replay is a valid signature with an old seq: the session's last_seq catches it.
    data = seal_request(NODE, _request(seq=1))
    _, req = open_request(data, expected_peer=peer_id_of(NODE))
    validate_verify_request(req, vocab_size=16, max_tree_tokens=8, last_seq=0)
    code = _code(validate_verify_request, req, vocab_size=16, max_tree_tokens=8, last_seq=1)
    assert code == ErrorCode.REPLAYED_SEQUENCE


def test_signature_for_another_domain_is_refused() -> None:
    # A receipt signature cannot be passed off as a request signature or vice versa.
    payload = _request().SerializeToString()
    data = seal(NODE, DOMAIN_RECEIPT, PAYLOAD_VERIFY_REQUEST, payload)
    assert _code(open_request, data) == ErrorCode.BAD_SIGNATURE


def test_wrong_payload_type_is_refused() -> None:
    data = seal_request(NODE, _request())
    code = _code(open_envelope, data, DOMAIN_VERIFY_REQUEST, PAYLOAD_RECEIPT)
    assert code == ErrorCode.WRONG_PAYLOAD_TYPE
    data = seal(NODE, DOMAIN_RECEIPT, b"x" * 200, b"")
    assert _code(open_receipt, data) == ErrorCode.WRONG_PAYLOAD_TYPE


def test_bad_keys_are_refused() -> None:
    data = seal_request(NODE, _request())
    for key in [b"", b"\x08\x01\x12\x20" + b"\x00" * 31, b"\x08\x02\x12\x20" + b"\x00" * 32,
                create_secp256k1_key_pair().public_key.serialize()]:
        env = _envelope(data)
        env.public_key = key
        assert _code(open_request, env.SerializeToString()) == ErrorCode.BAD_KEY, key
    with pytest.raises(ValueError):
        seal(create_secp256k1_key_pair(), DOMAIN_VERIFY_REQUEST, PAYLOAD_VERIFY_REQUEST, b"")


def test_malformed_and_non_canonical_envelopes_are_refused() -> None:
    data = seal_request(NODE, _request())
    assert _code(open_request, b"\xff\xff") == ErrorCode.MALFORMED
    assert _code(open_request, data[:-1]) == ErrorCode.MALFORMED
    # Unknown field appended: same signature, different bytes, so a different digest.
    assert _code(open_request, data + b"\x30\x01") == ErrorCode.MALFORMED
    # Fields reordered: also refused, one signed payload has one encoding.
    env = _envelope(data)
    reordered = (pb.Envelope(signature=env.signature).SerializeToString()
                 + pb.Envelope(public_key=env.public_key, payload_type=env.payload_type,
                               payload=env.payload).SerializeToString())
    assert pb.Envelope.FromString(reordered) == env
    assert _code(open_request, reordered) == ErrorCode.MALFORMED
    # A payload that is signed but is not a VerifyRequest.
    junk = seal(NODE, DOMAIN_VERIFY_REQUEST, PAYLOAD_VERIFY_REQUEST, b"\xff\xff\xff")
    assert _code(open_request, junk) == ErrorCode.MALFORMED


def test_oversized_envelope_is_refused_before_parsing() -> None:
    big = pb.VerifyRequest(session_id=SID, seq=1, tokens=[2**32 - 1] * 5000)
    data = seal_request(NODE, big)
    assert _code(open_request, data) == ErrorCode.TOO_LARGE
