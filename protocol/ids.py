"""Protocol ids, versions and DHT keys.

The libp2p protocol id carries the major version ("/specedge/verify/1.0.0" for every
1.x). Peers with the same major version interoperate; multistream-select matches ids
exactly, so the id never names a minor version (a 1.0 node must still find a 1.1
verifier's handler), and a peer speaking an unknown major version finds no handler.
Minor versions are exchanged in messages (OpenSession.client_version,
Advertisement.protocol_version), where ``negotiate`` / ``check_version`` refuse an
unknown major explicitly and ``supports`` tells what a peer's minor version adds.

1.1 adds OpenSession.progress (Progress frames, SessionOpened at admission), BUSY with
Error.retry_after_ms, and the Advertisement's measured speed and load.

1.2 adds checkable receipts (Receipt.positions: the target's log-probability and margin
at every committed position, the session digest, the engine) and the audit protocol
(AuditRequest / AuditAnswer); a 1.2 node refuses receipts without them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from specedge.protocol.errors import ErrorCode, ProtocolError

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 2
PROTOCOL_PATCH = 0
PROTOCOL_VERSION = f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}.{PROTOCOL_PATCH}"

VERIFY_FAMILY = "/specedge/verify"
ADVERT_FAMILY = "/specedge/advert"
WIRE_VERSION = f"{PROTOCOL_MAJOR}.0.0"  # what protocol ids carry: the major version only
VERIFY_PROTOCOL = f"{VERIFY_FAMILY}/{WIRE_VERSION}"
ADVERT_PROTOCOL = f"{ADVERT_FAMILY}/{WIRE_VERSION}"
PROGRESS_SINCE = (1, 1, 0)  # OpenSession.progress, BUSY, the Advertisement's speed fields
AUDIT_SINCE = (1, 2, 0)  # Receipt.positions and the audit protocol
AUDIT_FAMILY = "/specedge/audit"
AUDIT_PROTOCOL = f"{AUDIT_FAMILY}/{PROTOCOL_MAJOR}.0.0"

DHT_NAMESPACE = "/specedge/model/"  # the legacy (pre-CID) provider key prefix
DHT_DOMAIN = b"specedge/model/v1\x00"  # hashed before the model id into the CID key

_VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})$")


def parse_version(version: str) -> tuple[int, int, int]:
    """Parse "MAJOR.MINOR.PATCH" (MALFORMED if it is not one)."""
    m = _VERSION_RE.match(version)
    if not m:
        raise ProtocolError(ErrorCode.MALFORMED, f"bad version string {version[:32]!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def check_version(version: str) -> tuple[int, int, int]:
    """Accept a peer's version if its major is ours (UNSUPPORTED_VERSION otherwise).

    Minor and patch differences are compatible by definition: they only add optional
    fields, which protobuf ignores when unknown.
    """
    parsed = parse_version(version)
    if parsed[0] != PROTOCOL_MAJOR:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"peer speaks protocol {version}, we speak {PROTOCOL_VERSION}",
        )
    return parsed


def supports(version: str, since: tuple[int, int, int]) -> bool:
    """Whether a peer announcing ``version`` (same major) has what ``since`` added."""
    try:
        return check_version(version) >= since
    except ProtocolError:
        return False


def parse_protocol_id(protocol_id: str) -> tuple[str, tuple[int, int, int]]:
    """Split "/specedge/verify/1.0.0" into ("/specedge/verify", (1, 0, 0))."""
    family, sep, version = protocol_id.rpartition("/")
    if not sep or not family.startswith("/specedge/"):
        raise ProtocolError(
            ErrorCode.MALFORMED, f"not a specedge protocol id: {protocol_id[:64]!r}"
        )
    return family, parse_version(version)


def negotiate(offered: Iterable[str], family: str = VERIFY_FAMILY) -> str:
    """Pick the protocol id we speak from those a peer offers, or refuse.

    Returns our own id for ``family`` when the peer offers any id of that family with
    our major version; raises UNSUPPORTED_VERSION when it offers only other majors.
    """
    seen: list[str] = []
    for pid in offered:
        try:
            fam, (major, _, _) = parse_protocol_id(pid)
        except ProtocolError:
            continue
        if fam != family:
            continue
        seen.append(pid)
        if major == PROTOCOL_MAJOR:
            return f"{family}/{WIRE_VERSION}"
    raise ProtocolError(
        ErrorCode.UNSUPPORTED_VERSION,
        f"no offered {family} version is compatible with {PROTOCOL_VERSION}: {seen[:8]}",
    )


def dht_key(model_id: str) -> str:
    """The Kademlia provider key under which verifiers of ``model_id`` advertise.

    A CIDv1 (raw codec, sha2-256 of a domain-separated model id), in base32 text. Every
    libp2p DHT takes a provider key as a CID and puts its multihash on the wire:
    py-libp2p decodes the text itself, and a js-libp2p or go-libp2p peer accepts the
    32-byte sha2-256 multihash it receives (js refused the old ``/specedge/model/<hex>``
    key with "Invalid CID", so those records only lived on py-libp2p peers). The domain
    prefix keeps our keys apart from any content whose bytes happen to be a model id.
    """
    from cid import V1Builder  # py-cid: py-libp2p's own dependency for its CIDs

    digest_input = DHT_DOMAIN + model_id.encode("utf-8")
    return V1Builder(codec="raw", mh_type="sha2-256").sum(digest_input).encode("base32").decode()


def legacy_dht_key(model_id: str) -> str:
    """The provider key of SpecEdge before CIDs (``/specedge/model/<sha256 hex>``).

    Verifiers still announce it and nodes look it up when the CID key finds nobody, so
    old and new peers find each other during the migration (see the README)."""
    return DHT_NAMESPACE + hashlib.sha256(model_id.encode("utf-8")).hexdigest()
