"""The per-verifier hash chain.

Row n of verifier V stores prev_hash = row_hash of row n-1 (or V's genesis hash) and

    row_hash = sha256(TAG || prev_hash || u64 chain_index || u64 ingested_ms
                      || u32 len(receipt envelope) || receipt envelope
                      || sha256(request envelope))

The receipt envelope is hashed whole; the request enters by its digest, which the signed
receipt also names, so the chain commits to both signed byte strings. The genesis hash
depends on the verifier's peer id, so rows cannot be moved from one chain to another.
"""

from __future__ import annotations

import hashlib
import struct

HASH_BYTES = 32
_ROW_TAG = b"specedge-ledger/chain/v1\x00"
_GENESIS_TAG = b"specedge-ledger/genesis/v1\x00"
_HEADER = struct.Struct(">QQI")


def genesis_hash(verifier_peer_id: str) -> bytes:
    """prev_hash of a verifier's first row."""
    return hashlib.sha256(_GENESIS_TAG + verifier_peer_id.encode("utf-8")).digest()


def link_hash(
    prev_hash: bytes,
    chain_index: int,
    ingested_ms: int,
    receipt_envelope: bytes,
    request_sha256: bytes,
) -> bytes:
    """row_hash of one chain row (see the module docstring)."""
    h = hashlib.sha256(_ROW_TAG)
    h.update(prev_hash)
    h.update(_HEADER.pack(chain_index, ingested_ms, len(receipt_envelope)))
    h.update(receipt_envelope)
    h.update(request_sha256)
    return h.digest()
