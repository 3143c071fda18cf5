"""Finding every verifier on the network, and asking each one how it is doing.

Kademlia cannot list its keys, so a monitor cannot ask the DHT "which models are
served". It finds peers instead, then asks each one:

1. **Walk the routing tables.** From the bootstrap peers, send each peer Kademlia
   FIND_NODE queries and follow every peer they name. One query returns the 20 peers
   of its routing table closest to a key; to see a peer's whole table the walk asks for
   keys that fall in each of its buckets in turn (bucket i holds the peers whose
   keyspace point shares i leading bits with the peer's own), until an answer brings
   nothing new. Both ends hash into the keyspace (a peer's point is sha256 of its id, a
   key's is sha256 of the key), so a key for bucket i is found by trying random ones:
   2**(i+1) hashes on average, microseconds each.
2. **Ask every peer for its Advertisement** on ``/specedge/advert/1.0.0`` with an empty
   model id (every model). A verifier answers with its figures; a bootstrap peer or a
   node does not speak the protocol; anything else it says is misbehaviour.
3. **Look up providers** of every model id seen (and those named with ``--model``):
   a verifier behind NAT may sit in no routing table but still provides its model's
   key. New providers are asked too; a provider that does not answer adverts claims a
   model it does not serve.

Everything a peer sends is untrusted: every exchange is bounded by a timeout and a size
limit, a walk stops growing at ``MAX_PEERS`` (a hostile peer can invent ids), and no
failure of one peer stops the crawl. Nothing here imports node or verifier code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import trio
from libp2p.abc import IHost
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.protocol_muxer.exceptions import MultiselectClientError
from multiaddr import Multiaddr

from specedge.protocol import hosts
from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.errors import ErrorCode, ProtocolError
from specedge.protocol.framing import read_delimited, read_frame, write_frame
from specedge.protocol.ids import ADVERT_PROTOCOL, dht_key
from specedge.protocol.limits import ADVERT_TIMEOUT, FRAME_LIMITS, MAX_MODEL_ID_CHARS
from specedge.protocol.validation import expect, validate_advertisement
from specedge.protocol.varint import encode_uvarint

log = logging.getLogger("specedge.monitor.crawl")

KAD_PROTOCOL = "/ipfs/kad/1.0.0"
BUCKET_SIZE = 20  # k: peers in one FIND_NODE answer
QUERY_TIMEOUT = 5.0  # one FIND_NODE or advert exchange, dial included
MAX_KAD_RESPONSE = 256 * 1024  # 20 peers with addresses and signed records take ~10 KB
MAX_PEERS = 2000  # a walk stops growing here
MAX_MODELS = 64  # provider lookups per crawl
PROVIDER_COUNT = 1000  # providers asked of one lookup (it stops at this many answers)
MAX_BUCKETS = 12  # FIND_NODE probes per peer at most: enough below ~80,000 peers
MAX_ADDRS = 8  # addresses kept per peer found in a FIND_NODE answer
CONCURRENCY = 16  # peers queried at once
WALK_DEADLINE = 30.0  # a walk that has not finished by then uses what it found
ASK_DEADLINE = 30.0  # the same for one round of advert queries

# What an advert query found out about a peer.
VERIFIER = "verifier"  # a valid Advertisement
GONE = "gone"  # unreachable, or says it is shutting down or full
NOT_VERIFIER = "not_verifier"  # reachable, does not speak the advert protocol
MISBEHAVING = "misbehaving"  # spoke it, and said something wrong (or nothing in time)

# Refusals that say "alive but not serving now" rather than "broken".
_LEAVING = {ErrorCode.SHUTTING_DOWN, ErrorCode.OVERLOADED}


@dataclass
class Answer:
    """One peer's answer to an advert query."""

    peer_id: str
    addrs: list[str]
    kind: str
    advert: pb.Advertisement | None = None
    rtt_s: float = 0.0
    problem: str = ""


@dataclass
class Crawl:
    """One pass over the network: who was found, what each said, who claims what."""

    started: float  # unix seconds
    seconds: float = 0.0
    walked: int = 0  # peers found by the walk
    answers: dict[str, Answer] = field(default_factory=dict)
    claims: dict[str, set[str]] = field(default_factory=dict)  # peer -> models it provides


# ---------------------------------------------------------------------------- the walk


def bucket_key(peer_key: bytes, cpl: int) -> bytes:
    """A FIND_NODE key whose keyspace point shares exactly ``cpl`` leading bits with
    ``peer_key`` (the peer's own point): its answer is the peer's bucket ``cpl`` first.

    Keys are sha2-256 multihashes (what a peer id looks like), so any DHT accepts them.
    """
    want = (int.from_bytes(peer_key, "big") >> (255 - cpl)) ^ 1  # bit cpl flipped
    while True:
        key = b"\x12\x20" + os.urandom(32)
        if int.from_bytes(hashlib.sha256(key).digest(), "big") >> (255 - cpl) == want:
            return key


def routing_key(peer_id: ID) -> bytes:
    """A peer's point in the DHT keyspace (as py-libp2p and go-libp2p compute it)."""
    return hashlib.sha256(peer_id.to_bytes()).digest()


async def find_node(host: IHost, peer: ID, key: bytes,
                    timeout: float = QUERY_TIMEOUT) -> list[PeerInfo]:
    """One FIND_NODE exchange: the peers ``peer`` knows closest to ``key``.

    Raises ConnectionError or ProtocolError when the peer is dead, is no DHT server,
    or answers nonsense; the caller decides what that means.
    """
    body = Message(type=Message.MessageType.FIND_NODE, key=key).SerializeToString()
    try:
        with trio.fail_after(timeout):
            stream = await host.new_stream(peer, [KAD_PROTOCOL])
    except trio.TooSlowError:
        raise ConnectionError(f"no DHT stream within {timeout:g} s") from None
    except Exception as exc:  # dial failures, multistream refusals
        raise ConnectionError(f"no DHT stream: {exc}") from exc
    try:
        with trio.fail_after(timeout):
            await stream.write(encode_uvarint(len(body)) + body)
        data = await read_delimited(stream, MAX_KAD_RESPONSE, timeout)
    except trio.TooSlowError:
        raise ProtocolError(ErrorCode.TIMEOUT, "FIND_NODE write stalled") from None
    except ProtocolError:
        raise
    except Exception as exc:
        raise ConnectionError(f"FIND_NODE failed: {exc}") from exc
    finally:
        await hosts.close_stream(stream)
    return closer_peers(data)


def closer_peers(data: bytes) -> list[PeerInfo]:
    """The peers of a FIND_NODE answer, malformed entries dropped (MALFORMED if the
    answer is not a Kademlia message at all)."""
    msg = Message()
    try:
        msg.ParseFromString(data)
    except Exception:  # protobuf's DecodeError, and worse on hostile input
        raise ProtocolError(ErrorCode.MALFORMED, "FIND_NODE answer is not a DHT message") from None
    out = []
    for p in msg.closerPeers[: 2 * BUCKET_SIZE]:
        if not 2 <= len(p.id) <= 64:  # Ed25519 ids are 38 bytes, RSA ones 34
            continue
        addrs = [a for a in map(parse_addr, p.addrs[:MAX_ADDRS]) if a is not None]
        out.append(PeerInfo(ID(bytes(p.id)), addrs))
    return out


def parse_addr(raw: bytes) -> Multiaddr | None:
    """A multiaddr from its binary form, or None. Multiaddr(bytes) parses lazily: junk
    passes the constructor and raises later, inside a dial or a str(), so each one is
    turned into text and back before anything else sees it."""
    try:
        text = str(Multiaddr(raw))
        return Multiaddr(text) if text else None  # an empty address dials nothing
    except Exception:  # multiaddr's parse errors, and worse on hostile bytes
        return None


async def routing_table_of(host: IHost, info: PeerInfo) -> list[PeerInfo]:
    """As much of a peer's routing table as its bucket-by-bucket answers show; [] for a
    peer that is dead, no DHT server, or hostile."""
    hosts.learn_addrs(host, info)
    point = routing_key(info.peer_id)
    seen: dict[ID, PeerInfo] = {}
    for cpl in range(MAX_BUCKETS):
        try:
            answer = await find_node(host, info.peer_id, bucket_key(point, cpl))
        except (ConnectionError, ProtocolError) as exc:
            log.debug("FIND_NODE to %s failed: %s", info.peer_id, exc)
            break
        new = [p for p in answer if p.peer_id not in seen]
        for p in new:
            seen[p.peer_id] = p
        if not new or len(answer) < BUCKET_SIZE:  # nothing more, or the whole table fit
            break
    return list(seen.values())


async def walk(host: IHost, start: Iterable[PeerInfo], *, max_peers: int = MAX_PEERS,
               concurrency: int = CONCURRENCY) -> dict[ID, PeerInfo]:
    """Every peer reachable through routing tables from ``start`` (itself included),
    at most ``max_peers``; this host left out."""
    me = host.get_id()
    found: dict[ID, PeerInfo] = {}
    limiter = trio.CapacityLimiter(concurrency)

    async def visit(info: PeerInfo, nursery: trio.Nursery) -> None:
        async with limiter:
            try:
                table = await routing_table_of(host, info)
            except Exception:  # a libp2p surprise on hostile input: skip this peer
                log.exception("walking %s failed", info.peer_id)
                return
        for p in table:
            if p.peer_id != me and p.peer_id not in found and len(found) < max_peers:
                found[p.peer_id] = p
                nursery.start_soon(visit, p, nursery)

    async with trio.open_nursery() as nursery:
        for info in start:
            if info.peer_id != me and info.peer_id not in found:
                found[info.peer_id] = info
                nursery.start_soon(visit, info, nursery)
    return found


# ---------------------------------------------------------------------------- adverts


def addrs_of(host: IHost, info: PeerInfo) -> list[str]:
    """What the network says a peer's addresses are (the peerstore, else the info)."""
    try:
        addrs = host.get_peerstore().addrs(info.peer_id)
    except Exception:  # PeerStoreError: unknown or expired
        addrs = list(info.addrs)
    out = []
    for a in addrs[:MAX_ADDRS]:
        try:
            out.append(str(a))
        except Exception:  # a lazily parsed junk address someone else stored
            continue
    return out


async def ask(host: IHost, info: PeerInfo, timeout: float = ADVERT_TIMEOUT) -> Answer:
    """Ask one peer for its Advertisement (an empty model id: every model it serves)."""
    peer = info.peer_id.to_base58()
    hosts.learn_addrs(host, info)
    try:
        await hosts.connect(host, info, timeout=timeout)
    except ConnectionError as exc:
        return Answer(peer, addrs_of(host, info), GONE, problem=str(exc))
    addrs = addrs_of(host, info)
    start = time.perf_counter()
    try:
        with trio.fail_after(timeout):
            stream = await host.new_stream(info.peer_id, [ADVERT_PROTOCOL])
    except trio.TooSlowError:
        return Answer(peer, addrs, MISBEHAVING, problem=f"no advert stream within {timeout:g} s")
    except Exception as exc:
        if isinstance(exc.__cause__, MultiselectClientError):  # it answered: "not here"
            return Answer(peer, addrs, NOT_VERIFIER, problem=f"no advert protocol: {exc}"[:200])
        return Answer(peer, addrs, GONE, problem=f"no stream: {exc}"[:200])  # connection lost
    try:
        advert = await _exchange(stream, timeout)
    except ProtocolError as exc:  # a hang-up after accepting the query is misbehaviour too
        kind = GONE if exc.code in _LEAVING else MISBEHAVING
        return Answer(peer, addrs, kind, problem=str(exc)[:300])  # "CODE: what"
    finally:
        await hosts.close_stream(stream)
    return Answer(peer, addrs, VERIFIER, advert, time.perf_counter() - start)


async def _exchange(stream: object, timeout: float) -> pb.Advertisement:
    await write_frame(stream, pb.Frame(advert_query=pb.AdvertQuery()), timeout=timeout)
    frame = await read_frame(stream, max_size=FRAME_LIMITS["advert"], timeout=timeout)
    expect(frame, "advert")
    validate_advertisement(frame.advert)
    return frame.advert


async def ask_all(host: IHost, infos: Iterable[PeerInfo], answers: dict[str, Answer], *,
                  concurrency: int = CONCURRENCY, deadline: float = ASK_DEADLINE) -> None:
    """Ask every peer at once (``concurrency`` at a time) into ``answers``; peers not
    done by ``deadline`` seconds are recorded as misbehaving (they held the crawl)."""
    limiter = trio.CapacityLimiter(concurrency)
    pending = {i.peer_id.to_base58(): i for i in infos}

    async def one(peer: str, info: PeerInfo) -> None:
        async with limiter:
            try:
                answers[peer] = await ask(host, info)
            except Exception as exc:  # a libp2p surprise on hostile input: this peer only
                log.exception("asking %s failed", peer)
                answers[peer] = Answer(peer, [], MISBEHAVING, problem=f"INTERNAL: {exc}"[:300])

    with trio.move_on_after(deadline):
        async with trio.open_nursery() as nursery:
            for peer, info in pending.items():
                nursery.start_soon(one, peer, info)
    for peer, info in pending.items():
        if peer not in answers:
            answers[peer] = Answer(peer, addrs_of(host, info), MISBEHAVING,
                                   problem=f"no answer within the crawl's {deadline:g} s")


async def providers(dht: KadDHT, models: Iterable[str]) -> dict[str, tuple[PeerInfo, set[str]]]:
    """Providers of each model's DHT key: peer -> (info, models it claims)."""
    out: dict[str, tuple[PeerInfo, set[str]]] = {}

    async def one(model: str) -> None:
        # A large count: py-libp2p counts repeats of a provider toward it and stops early.
        for info in await hosts.find_providers(dht, dht_key(model), count=PROVIDER_COUNT):
            peer = info.peer_id.to_base58()
            out.setdefault(peer, (info, set()))[1].add(model)

    async with trio.open_nursery() as nursery:
        for model in list(models)[:MAX_MODELS]:
            if model and len(model) <= MAX_MODEL_ID_CHARS:
                nursery.start_soon(one, model)
    return out


# ---------------------------------------------------------------------------- one crawl


async def crawl_once(host: IHost, dht: KadDHT | None, start: Sequence[PeerInfo],
                     models: Iterable[str] = (), known: Sequence[PeerInfo] = ()) -> Crawl:
    """Walk, ask, look up providers, ask the new ones: one picture of the network.

    ``models``: model ids to look up providers for before any peer has named them;
    ``known``: peers to ask whatever the walk finds (the verifiers seen before, so a
    dead one is noticed even when it has left every routing table).
    """
    crawl = Crawl(started=time.time())
    t0 = time.monotonic()
    peers: dict[ID, PeerInfo] = {}
    with trio.move_on_after(WALK_DEADLINE):
        peers = await walk(host, start)
    crawl.walked = len(peers)
    for info in known:
        peers.setdefault(info.peer_id, info)
    peers.pop(host.get_id(), None)
    wanted = set(models)
    await _ask_and_lookup(host, dht, peers, wanted, crawl)
    seen = {a.advert.model_id for a in crawl.answers.values() if a.advert is not None}
    if seen - wanted and dht is not None:  # models nobody named before: their providers
        await _ask_and_lookup(host, dht, peers, seen - wanted, crawl)
    crawl.seconds = time.monotonic() - t0
    return crawl


async def _ask_and_lookup(host: IHost, dht: KadDHT | None, peers: dict[ID, PeerInfo],
                          models: set[str], crawl: Crawl) -> None:
    found = await providers(dht, models) if dht is not None and models else {}
    for peer, (info, claimed) in found.items():
        crawl.claims.setdefault(peer, set()).update(claimed)
        if info.peer_id != host.get_id():
            peers.setdefault(info.peer_id, info)
    todo = [i for i in peers.values() if i.peer_id.to_base58() not in crawl.answers]
    await ask_all(host, todo, crawl.answers)
