"""Unsigned varints as libp2p uses them (multiformats unsigned-varint).

Strict on decode: at most 9 bytes (63 bits) and minimal encoding only, so every
length has exactly one encoding and a peer cannot pad a prefix to probe us.
"""

from __future__ import annotations

from specedge.protocol.errors import ErrorCode, ProtocolError
from specedge.protocol.limits import MAX_VARINT_BYTES

MAX_UVARINT = (1 << 63) - 1


def encode_uvarint(value: int) -> bytes:
    """Encode a non-negative integer below 2**63."""
    if value < 0 or value > MAX_UVARINT:
        raise ValueError(f"uvarint out of range: {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_uvarint(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int] | None:
    """Decode a uvarint at ``offset``: (value, bytes used), or None if ``data`` ends first.

    Raises ProtocolError(MALFORMED) for an over-long or non-minimal varint.
    """
    value = 0
    shift = 0
    for i in range(MAX_VARINT_BYTES):
        pos = offset + i
        if pos >= len(data):
            return None
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise ProtocolError(ErrorCode.MALFORMED, "non-minimal varint")
            return value, i + 1
        shift += 7
    raise ProtocolError(ErrorCode.MALFORMED, f"varint longer than {MAX_VARINT_BYTES} bytes")
