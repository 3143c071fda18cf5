"""Signed envelopes (after libp2p's signed-envelope RFC 0002).

Noise already authenticates the channel; envelopes exist so that someone who was not
on the channel (a ledger auditor) can later check who asked for what and who
answered. Signatures cover the exact bytes sent, so nothing needs a canonical
re-encoding of the payload. The envelope itself must be canonical (what protobuf
emits for its four fields, nothing more), so one signed payload has exactly one
envelope encoding and therefore one ``request_digest``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import DecodeError, Message
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.peer.id import ID

from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.errors import ErrorCode, ProtocolError
from specedge.protocol.limits import (
    ED25519_PUBLIC_KEY_PROTO_BYTES,
    ED25519_SIGNATURE_BYTES,
    MAX_ENVELOPE_BYTES,
    MAX_PAYLOAD_TYPE_BYTES,
    MAX_RECEIPT_ENVELOPE_BYTES,
    MAX_STATEMENT_BYTES,
)
from specedge.protocol.varint import encode_uvarint

DOMAIN_VERIFY_REQUEST = "specedge-verify-request"
DOMAIN_RECEIPT = "specedge-receipt"
DOMAIN_STANDING = "specedge-standing"
PAYLOAD_STANDING = b"specedge.v1.StandingStatement"
PAYLOAD_VERIFY_REQUEST = b"specedge.v1.VerifyRequest"
PAYLOAD_RECEIPT = b"specedge.v1.Receipt"

_M = TypeVar("_M", bound=Message)

# libp2p PublicKey protobuf header for Ed25519: field 1 (Type) = 1, field 2 (Data) len 32.
_ED25519_KEY_HEADER = b"\x08\x01\x12\x20"


@dataclass(frozen=True)
class Opened:
    """A checked envelope.

    peer_id: base58 peer id derived from the envelope's key (never taken on trust).
    public_key: that key, libp2p protobuf-encoded (36 bytes), as in the envelope.
    payload: the exact signed payload bytes.
    raw: the exact envelope bytes received (what ``request_digest`` hashes).
    """

    peer_id: str
    public_key: bytes
    payload: bytes
    raw: bytes


def signing_input(domain: str, payload_type: bytes, payload: bytes) -> bytes:
    """The bytes an envelope signature covers: each part varint-length-prefixed."""
    d = domain.encode("utf-8")
    return b"".join(
        (
            encode_uvarint(len(d)),
            d,
            encode_uvarint(len(payload_type)),
            payload_type,
            encode_uvarint(len(payload)),
            payload,
        )
    )


def peer_id_from_public_key(public_key: bytes) -> str:
    """Base58 peer id of a libp2p-encoded Ed25519 key: the identity multihash of it."""
    # Keys up to 42 bytes are inlined (multihash code 0x00), as go-libp2p does.
    return ID(b"\x00" + bytes([len(public_key)]) + public_key).to_base58()


def seal(key_pair: KeyPair, domain: str, payload_type: bytes, payload: bytes) -> bytes:
    """Sign ``payload`` for ``domain`` and return the serialized Envelope."""
    if key_pair.public_key.get_type() != KeyType.Ed25519:
        raise ValueError("SpecEdge identities are Ed25519 keys")
    signature = key_pair.private_key.sign(signing_input(domain, payload_type, payload))
    env = pb.Envelope(
        public_key=key_pair.public_key.serialize(),
        payload_type=payload_type,
        payload=payload,
        signature=signature,
    )
    return env.SerializeToString()


def open_envelope(
    data: bytes,
    domain: str,
    payload_type: bytes,
    expected_peer: str | ID | None = None,
    max_size: int = MAX_ENVELOPE_BYTES,
) -> Opened:
    """Check an envelope and return who signed what.

    Raises ProtocolError: TOO_LARGE, MALFORMED (not a canonical Envelope), BAD_KEY,
    WRONG_PAYLOAD_TYPE, WRONG_PEER (key is not ``expected_peer``'s), BAD_SIGNATURE.
    The cheap checks run before the signature so garbage costs no curve arithmetic.
    ``expected_peer`` may be a base58 string or a libp2p ``ID`` (e.g. the stream's
    ``muxed_conn.peer_id``).
    """
    data = bytes(data)
    if len(data) > max_size:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"envelope of {len(data)} bytes > {max_size}")
    try:
        env = pb.Envelope.FromString(data)
    except (DecodeError, ValueError) as exc:
        raise ProtocolError(ErrorCode.MALFORMED, "envelope does not parse") from exc
    canonical = pb.Envelope(
        public_key=env.public_key,
        payload_type=env.payload_type,
        payload=env.payload,
        signature=env.signature,
    ).SerializeToString()
    if canonical != data:
        raise ProtocolError(ErrorCode.MALFORMED, "envelope is not canonically encoded")
    key = env.public_key
    if len(key) != ED25519_PUBLIC_KEY_PROTO_BYTES or not key.startswith(_ED25519_KEY_HEADER):
        raise ProtocolError(ErrorCode.BAD_KEY, "envelope key is not a libp2p Ed25519 key")
    if len(env.payload_type) > MAX_PAYLOAD_TYPE_BYTES or env.payload_type != payload_type:
        raise ProtocolError(
            ErrorCode.WRONG_PAYLOAD_TYPE,
            f"expected payload {payload_type!r}, got {env.payload_type[:64]!r}",
        )
    peer_id = peer_id_from_public_key(key)
    if expected_peer is not None and peer_id != str(expected_peer):
        raise ProtocolError(ErrorCode.WRONG_PEER, f"signed by {peer_id}, expected {expected_peer}")
    if len(env.signature) != ED25519_SIGNATURE_BYTES:
        raise ProtocolError(ErrorCode.BAD_SIGNATURE, "signature is not 64 bytes")
    try:
        verifier = Ed25519PublicKey.from_public_bytes(key[len(_ED25519_KEY_HEADER) :])
        verifier.verify(env.signature, signing_input(domain, env.payload_type, env.payload))
    except InvalidSignature as exc:
        raise ProtocolError(ErrorCode.BAD_SIGNATURE, "signature does not verify") from exc
    except ValueError as exc:  # not a valid curve point
        raise ProtocolError(ErrorCode.BAD_KEY, "envelope key is not a valid point") from exc
    return Opened(peer_id=peer_id, public_key=key, payload=env.payload, raw=data)


def request_digest(envelope_bytes: bytes) -> bytes:
    """sha256 of the exact signed-request envelope bytes; receipts name requests by it."""
    return hashlib.sha256(envelope_bytes).digest()


def _parse(cls: type[_M], payload: bytes, what: str) -> _M:
    try:
        return cls.FromString(payload)
    except (DecodeError, ValueError) as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"{what} does not parse") from exc


def seal_request(key_pair: KeyPair, request: pb.VerifyRequest) -> bytes:
    """A node signs its VerifyRequest; the result goes in ``Frame.verify``."""
    return seal(
        key_pair, DOMAIN_VERIFY_REQUEST, PAYLOAD_VERIFY_REQUEST, request.SerializeToString()
    )


def request_envelope(data: bytes) -> pb.Envelope:
    """Parse envelope bytes into the Envelope message (for ``Frame(verify=...)``)."""
    return _parse(pb.Envelope, data, "envelope")


def open_request(
    data: bytes, expected_peer: str | ID | None = None
) -> tuple[Opened, pb.VerifyRequest]:
    """Check a signed VerifyRequest (``expected_peer``: the stream's remote peer id).

    Only signature and structure are checked here; call
    ``validation.validate_verify_request`` for the tree, vocabulary and sequence.
    """
    opened = open_envelope(data, DOMAIN_VERIFY_REQUEST, PAYLOAD_VERIFY_REQUEST, expected_peer)
    return opened, _parse(pb.VerifyRequest, opened.payload, "VerifyRequest")


def seal_receipt(key_pair: KeyPair, receipt: pb.Receipt) -> bytes:
    """A verifier signs a Receipt; the result goes in ``VerifyResult.receipt``."""
    return seal(key_pair, DOMAIN_RECEIPT, PAYLOAD_RECEIPT, receipt.SerializeToString())


def open_receipt(data: bytes, expected_peer: str | ID | None = None) -> tuple[Opened, pb.Receipt]:
    """Check a signed Receipt.

    Besides the envelope checks, the receipt's ``verifier_peer_id`` must be the signer:
    a receipt cannot claim to come from a verifier that did not sign it (WRONG_PEER).
    """
    opened = open_envelope(
        data, DOMAIN_RECEIPT, PAYLOAD_RECEIPT, expected_peer, max_size=MAX_RECEIPT_ENVELOPE_BYTES
    )
    receipt = _parse(pb.Receipt, opened.payload, "Receipt")
    if receipt.verifier_peer_id != opened.peer_id:
        raise ProtocolError(
            ErrorCode.WRONG_PEER,
            f"receipt names verifier {receipt.verifier_peer_id[:64]!r} but {opened.peer_id} "
            "signed it",
        )
    return opened, receipt


def seal_statement(key_pair: KeyPair, statement: pb.StandingStatement) -> bytes:
    """A verifier signs a node's StandingStatement."""
    return seal(key_pair, DOMAIN_STANDING, PAYLOAD_STANDING, statement.SerializeToString())


def open_statement(data: bytes) -> tuple[Opened, pb.StandingStatement]:
    """Check a signed StandingStatement: its issuer_peer_id must be its signer. Whether
    the issuer is trusted, the node the right one and the statement fresh is the
    reader's decision (``validation.validate_statement``)."""
    opened = open_envelope(data, DOMAIN_STANDING, PAYLOAD_STANDING,
                           max_size=MAX_STATEMENT_BYTES)
    statement = _parse(pb.StandingStatement, opened.payload, "StandingStatement")
    if statement.issuer_peer_id != opened.peer_id:
        raise ProtocolError(ErrorCode.WRONG_PEER, "statement names an issuer that did not "
                            "sign it")
    return opened, statement


def request_frame(envelope_bytes: bytes) -> pb.Frame:
    """Wrap a sealed request in a Frame (``Frame.verify``) for ``write_frame``."""
    return pb.Frame(verify=request_envelope(envelope_bytes))


def frame_envelope_bytes(frame: pb.Frame) -> bytes:
    """The envelope bytes of a received ``Frame.verify``, to pass to ``open_request``.

    Envelopes must be canonical (``open_envelope`` refuses anything else), so
    re-serializing the parsed message gives back exactly the bytes the node signed
    and hashed: node and verifier compute the same ``request_digest``.
    """
    return frame.verify.SerializeToString()
