"""Finding verifiers for the target model, checking they are alive, ranking them, and
opening sessions on the best one with a warm spare behind it.

Sources: bootstrap peers (dialled first; they are also the DHT's entry points), Kademlia
provider records under `dht_key(model_id)`, verifiers named directly (`--verifier`), and
with `--mdns` peers seen on the LAN. Provider records outlive dead verifiers (48 h, no
withdrawal), so every candidate is asked for its Advertisement over the advert protocol
before it is used: no answer within ADVERT_TIMEOUT means dead. The answers rank them:
a free session slot first, then a short queue, then the measured round trip plus the
advertised verify time. The top two stay connected, so a failover costs a stream and a
prefill, not a dial.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.peer.peerinfo import PeerInfo

from specedge.kvblocks import block_hashes, model_key
from specedge.node.audit import Auditor
from specedge.node.client import Liveness, Session, SessionRequest
from specedge.node.errors import BootstrapError, NoVerifierError, VerifiersBusy
from specedge.protocol import hosts, relay
from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.audits import ProvenFraud
from specedge.protocol.envelopes import open_statement
from specedge.protocol.errors import ErrorCode, ProtocolError
from specedge.protocol.framing import read_frame, write_frame
from specedge.protocol.gossip import fraud_gossip
from specedge.protocol.ids import (
    ADVERT_PROTOCOL,
    AUDIT_PROTOCOL,
    PROGRESS_SINCE,
    VERIFY_PROTOCOL,
    dht_key,
    legacy_dht_key,
    supports,
)
from specedge.protocol.limits import ADVERT_TIMEOUT, BUSY_WAIT, SILENCE_TIMEOUT
from specedge.protocol.validation import expect, validate_advertisement

log = logging.getLogger("specedge.node.discovery")

STREAM_TIMEOUT = 10.0  # opening a stream to a frozen peer otherwise waits ~10 s anyway
REFRESH_INTERVAL = 15.0  # join: re-ask the DHT and every candidate this often
MDNS_WAIT = 2.0  # mDNS found a peer in about 1.6 s on a LAN
AFFINITY_BLOCKS = 65536  # conversation blocks remembered for prefix-aware routing
BUSY_RECHECK = 30.0  # while every verifier is busy, look again at least this often


@dataclass
class Candidate:
    """A verifier that answered an advert query, and how it looked then."""

    info: PeerInfo
    advert: pb.Advertisement
    rtt_s: float
    source: str
    checked_at: float
    path: str = ""  # "direct" or "relayed" (through a relay: the verifier is behind NAT)

    @property
    def peer(self) -> str:
        return self.info.peer_id.to_base58()

    def rank_key(self) -> tuple[bool, int, float]:
        a = self.advert
        backlog = a.queued_prefill_tokens / a.prefill_tokens_per_s if a.prefill_tokens_per_s \
            else 0.0  # seconds of prompts queued ahead of a new session
        cost = self.rtt_s + a.mean_verify_micros / 1e6 + backlog
        return (a.free_slots == 0, a.queue_depth, cost)

    def liveness(self, silence: float = SILENCE_TIMEOUT) -> Liveness:
        """Progress-based liveness for 1.1 verifiers, the old deadlines for 1.0 ones."""
        return Liveness(progress=supports(self.advert.protocol_version, PROGRESS_SINCE),
                        silence=silence)


def parse_bootstrap(addrs: Sequence[str]) -> list[PeerInfo]:
    """Parse `--bootstrap` multiaddrs, failing with a message that names the bad one."""
    out = []
    for a in addrs:
        try:
            out.append(hosts.parse_peer_addr(a))
        except ValueError:
            raise BootstrapError(
                f"malformed bootstrap address {a!r}: expected a full multiaddr such as "
                "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW...") from None
    return out


async def dial_bootstrap(host: IHost, peers: Sequence[PeerInfo], dht: KadDHT | None = None,
                         timeout: float = hosts.DIAL_TIMEOUT) -> list[PeerInfo]:
    """Dial every bootstrap peer at once; raise BootstrapError if none answers."""
    reached: list[PeerInfo] = []
    errors: list[str] = []

    async def one(info: PeerInfo) -> None:
        try:
            await hosts.connect(host, info, timeout=timeout)
        except ConnectionError as exc:
            errors.append(str(exc))
            return
        reached.append(info)
        if dht is not None:
            await hosts.add_to_routing_table(dht, info.peer_id)

    async with trio.open_nursery() as nursery:
        for info in peers:
            nursery.start_soon(one, info)
    for e in errors:
        log.warning("bootstrap peer unreachable: %s", e)
    if peers and not reached:
        raise BootstrapError("no bootstrap peer could be reached: " + "; ".join(errors)
                             + ". Check the address, that the peer runs, and the network.")
    return reached


async def probe(host: IHost, info: PeerInfo, model_id: str,
                timeout: float = ADVERT_TIMEOUT) -> tuple[pb.Advertisement, float]:
    """Ask a peer for its Advertisement: the liveness check and the ranking data.

    Raises ProtocolError or ConnectionError when the peer is dead, is not a verifier of
    `model_id`, or answers nonsense.
    """
    start = time.perf_counter()
    stream = await open_stream(host, info, ADVERT_PROTOCOL, timeout)
    try:
        query = pb.AdvertQuery(model_id=model_id, want_standing=True)
        await write_frame(stream, pb.Frame(advert_query=query), timeout=timeout)
        frame = await read_frame(stream, timeout=timeout)
        expect(frame, "advert")
        validate_advertisement(frame.advert)
        if frame.advert.model_id != model_id:
            raise ConnectionError(f"serves {frame.advert.model_id!r}, not {model_id!r}")
    finally:
        with trio.move_on_after(1.0) as scope:
            scope.shield = True
            try:
                await stream.close()
            except Exception:
                pass
    return frame.advert, time.perf_counter() - start


async def open_stream(host: IHost, info: PeerInfo, protocol: str,
                      timeout: float = STREAM_TIMEOUT) -> INetStream:
    """A new stream to `info` (dialling it if needed), bounded by `timeout`."""
    try:
        with trio.fail_after(timeout):
            hosts.learn_addrs(host, info)
            await relay.reach_peer(host, info, timeout)  # direct first, else a relay
            return await host.new_stream(info.peer_id, [protocol])
    except trio.TooSlowError:
        raise ConnectionError(f"no stream to {info.peer_id} within {timeout:g} s") from None
    except Exception as exc:  # SwarmException, StreamFailure, multiselect errors
        raise ConnectionError(f"no stream to {info.peer_id}: {exc}") from exc


class VerifierPool:
    """The verifiers this node knows for one model, ranked; a `generation.Connector`."""

    def __init__(self, host: IHost, identity: KeyPair, model_id: str, *,
                 dht: KadDHT | None = None,
                 direct: Sequence[PeerInfo] = (), bootstrap: Sequence[PeerInfo] = (),
                 mdns: bool = False, silence_timeout: float = SILENCE_TIMEOUT,
                 busy_wait: float = BUSY_WAIT) -> None:
        self.host = host
        self.identity = identity
        self.model_id = model_id
        self.dht = dht
        self.direct = list(direct)
        self.bootstrap = list(bootstrap)
        self.mdns = mdns
        self.silence_timeout = silence_timeout
        self.busy_wait = busy_wait  # how long a session open waits while all are BUSY
        self.ranked: list[Candidate] = []
        self.dead: dict[str, str] = {}  # peer -> why, from the last refresh
        self.in_use: dict[str, int] = {}  # peer -> open sessions (for the status)
        self.paths: dict[str, str] = {}  # peer -> "direct"/"relayed" when its last session opened
        self.refreshed_at = 0.0
        self._refresh_lock = trio.Lock()
        # Which verifier last served a conversation, by the chained hashes of its token
        # blocks: the next turn goes where its KV cache is (prefix-aware routing).
        self.affinity: OrderedDict[bytes, str] = OrderedDict()
        self._affinity_key = model_key("routing", model_id)
        # Statements of this node's standing that verifiers signed (issuer -> envelope,
        # earned), presented to verifiers that accept their issuer.
        self.statements: dict[str, tuple[bytes, float]] = {}
        # Audits of this pool's sessions (node.audit), when enabled; verifiers it proved
        # to cheat are never used again.
        self.auditor: Auditor | None = None
        self.prefer: str | None = None  # a verifier (peer id) to try first when usable
        # Verifiers proven to cheat by proofs heard on the network (protocol.gossip), and
        # how this pool publishes its own proofs there.
        self.heard: dict[str, str] = {}
        self.publish_proof: Callable[[bytes], Awaitable[None]] | None = None

    # -- discovery ---------------------------------------------------------------

    async def _sources(self) -> dict[str, tuple[PeerInfo, str]]:
        found: dict[str, tuple[PeerInfo, str]] = {}
        me = self.host.get_id()
        for info in self.direct:
            found.setdefault(info.peer_id.to_base58(), (info, "direct"))
        if self.dht is not None:
            infos = await hosts.find_providers(self.dht, dht_key(self.model_id))
            if not infos:  # verifiers from before CID keys announce the old key only
                infos = await hosts.find_providers(self.dht, legacy_dht_key(self.model_id))
            for info in infos:
                found.setdefault(info.peer_id.to_base58(), (info, "dht"))
        # A bootstrap peer may itself be a verifier; the probe tells.
        for info in self.bootstrap:
            found.setdefault(info.peer_id.to_base58(), (info, "bootstrap"))
        if self.mdns:
            store = self.host.get_peerstore()
            for pid in store.peers_with_addrs():
                if pid != me:
                    found.setdefault(pid.to_base58(), (PeerInfo(pid, store.addrs(pid)), "mdns"))
        found.pop(me.to_base58(), None)
        return found

    async def refresh(self) -> list[Candidate]:
        """Find candidates, probe them all at once, keep the live ones ranked."""
        async with self._refresh_lock:
            found = await self._sources()
            alive: list[Candidate] = []
            dead: dict[str, str] = {}

            async def check(peer: str, info: PeerInfo, source: str) -> None:
                try:
                    advert, rtt = await probe(self.host, info, self.model_id)
                except (ProtocolError, ConnectionError) as exc:
                    if source != "bootstrap":  # a plain bootstrap peer is not a verifier
                        dead[peer] = str(exc)
                    return
                alive.append(Candidate(info, advert, rtt, source, time.monotonic(),
                                       relay.connection_path(self.host, info.peer_id) or ""))
                self._keep_statement(peer, advert)

            async with trio.open_nursery() as nursery:
                for peer, (info, source) in found.items():
                    nursery.start_soon(check, peer, info, source)
            alive.sort(key=Candidate.rank_key)
            for peer, why in dead.items():
                if peer not in self.dead:  # say it once, not every refresh
                    log.info("verifier %s is not usable: %s", peer, why)
            self.ranked, self.dead = alive, dead
            self.refreshed_at = time.monotonic()
            return alive

    async def keep_fresh(self, interval: float = REFRESH_INTERVAL) -> None:
        """Refresh every `interval` s (at once if never done) and keep the best two
        connected (the warm spare), until cancelled."""
        while True:
            if time.monotonic() - self.refreshed_at >= interval or not self.refreshed_at:
                await self.refresh()
            await self.warm()
            await trio.sleep(interval)

    async def warm(self, count: int = 2) -> None:
        """Keep connections open to the first `count` verifiers, so failover is quick."""
        for cand in self.ranked[:count]:
            try:
                await relay.reach_peer(self.host, cand.info, hosts.DIAL_TIMEOUT)
            except ConnectionError as exc:
                log.info("cannot keep %s warm: %s", cand.peer, exc)

    # -- sessions ----------------------------------------------------------------

    async def open_session(self, request: SessionRequest, avoid: set[str]) -> Session:
        """Open a session on the best live verifier not in `avoid`.

        Refreshes first when nothing usable is known, and once more when every known one
        fails (a verifier may have restarted elsewhere, or come back since the last
        refresh). Tries each in rank order; one that refuses or fails is skipped. When
        the only refusals are BUSY, waits for the soonest retry-after (looking again for
        other verifiers meanwhile) for up to `busy_wait` seconds in all, then raises
        VerifiersBusy; NoVerifierError when all fail otherwise, naming why.
        """
        deadline = trio.current_time() + self.busy_wait
        if not [c for c in self.ranked if c.peer not in avoid]:
            await self.refresh()
        while True:
            reasons: list[str] = []
            busy: list[float] = []
            session = await self._open_first(request, avoid, reasons, busy)
            if session is None and reasons and not busy:
                await self.refresh()
                session = await self._open_first(request, avoid, reasons, busy)
            if session is not None:
                return session
            if not busy:
                raise NoVerifierError(self.explain(avoid, reasons))
            wait = min(busy)
            left = deadline - trio.current_time()
            if wait > left:
                raise VerifiersBusy(
                    f"every verifier for {self.model_id!r} is busy (waited "
                    f"{self.busy_wait - max(left, 0):.0f} s of --busy-wait "
                    f"{self.busy_wait:g} s): " + "; ".join(reasons), retry_after=wait)
            log.info("every verifier is busy; asking again in %.1f s", wait)
            await trio.sleep(min(wait, BUSY_RECHECK))
            await self.refresh()

    async def _open_first(self, request: SessionRequest, avoid: set[str],
                          reasons: list[str], busy: list[float]) -> Session | None:
        """A session on the first ranked verifier (not in `avoid`) that opens one.

        `busy` collects the retry-after of each verifier that answered BUSY."""
        for cand in self._order(request.prompt, avoid):
            try:
                stream = await open_stream(self.host, cand.info, VERIFY_PROTOCOL)
                offer = replace(request, standing=self._statement_for(cand))
                session = await Session.open(stream, cand.peer, self.identity, offer,
                                             cand.liveness(self.silence_timeout))
            except (ProtocolError, ConnectionError) as exc:
                reasons.append(f"{cand.peer}: {exc}")
                if isinstance(exc, ProtocolError) and exc.code == ErrorCode.BUSY:
                    busy.append(max(exc.retry_after or 1.0, 0.1))
                log.info("verifier %s did not open a session: %s", cand.peer, exc)
                continue
            self.in_use[cand.peer] = self.in_use.get(cand.peer, 0) + 1
            session.on_end = lambda peer=cand.peer, s=session: self._ended(peer, s)
            if self.auditor is not None and self.auditor.sync:
                session.before_use = self.auditor.before_use
            self.paths[cand.peer] = relay.connection_path(self.host, cand.info.peer_id) or ""
            return session
        return None

    def _keep_statement(self, verifier: str, advert: pb.Advertisement) -> None:
        """Keep the verifier's signed statement of our standing, if it is one (signed by
        that verifier, about us); anything else is dropped."""
        if not advert.standing_statement:
            return
        try:
            _, st = open_statement(bytes(advert.standing_statement))
        except ProtocolError:
            return
        if st.issuer_peer_id == verifier and st.node_peer_id == self.host.get_id().to_base58():
            self.statements[verifier] = (bytes(advert.standing_statement), st.earned)

    def _statement_for(self, cand: Candidate) -> bytes:
        """The best statement `cand` says it accepts (none: b"")."""
        usable = [self.statements[i] for i in cand.advert.standing_issuers
                  if i in self.statements and i != cand.peer]
        return max(usable, key=lambda s: s[1])[0] if usable else b""

    def served(self, tokens: Sequence[int], verifier: str) -> None:
        """`verifier` holds the KV of `tokens` now: remember it for a follow-up turn."""
        for h in block_hashes(tokens, self._affinity_key):
            self.affinity[h] = verifier
            self.affinity.move_to_end(h)
        while len(self.affinity) > AFFINITY_BLOCKS:
            self.affinity.popitem(last=False)

    def _home(self, prompt: Sequence[int]) -> str | None:
        """The verifier that served the longest known start of `prompt`, if any."""
        home = None
        for h in block_hashes(prompt, self._affinity_key):
            peer = self.affinity.get(h)
            if peer is None:
                break
            home = peer
        return home

    def _order(self, prompt: Sequence[int], avoid: set[str]) -> list[Candidate]:
        """Candidates to try: by rank, but the one holding this conversation's KV first."""
        banned = {**self.heard, **(self.auditor.banned if self.auditor is not None else {})}
        cands = [c for c in self.ranked if c.peer not in avoid and c.peer not in banned]
        home = self._home(prompt)
        first = [c for c in cands if c.peer == home and c.advert.free_slots > 0]
        order = first + [c for c in cands if c.peer != home or not first]
        return sorted(order, key=lambda c: c.peer != self.prefer)  # stable: preferred first

    async def still_there(self, verifier: str) -> bool:
        """Whether a verifier whose session just died can be used again at once: its
        session ran through a relay (the relay may be what died) and it answers an advert
        query now, directly or through another of its relays. The generation then
        reopens its session there instead of avoiding it."""
        cand = next((c for c in self.ranked if c.peer == verifier), None)
        if self.paths.get(verifier) != "relayed" or cand is None:
            return False
        with trio.move_on_after(2.0):  # the dead circuit may still be listed: drop it
            try:
                await self.host.disconnect(cand.info.peer_id)
            except Exception:
                pass
        try:
            await probe(self.host, cand.info, self.model_id)
        except (ProtocolError, ConnectionError) as exc:
            log.info("verifier %s is gone too: %s", verifier, exc)
            return False
        log.info("verifier %s is still there (%s); reopening the session",
                 verifier, relay.connection_path(self.host, cand.info.peer_id))
        return True

    def failed(self, verifier: str, reason: str) -> None:
        """Drop a verifier whose session failed until the next refresh probes it again, so
        other generations do not try it first in the meantime."""
        self.ranked = [c for c in self.ranked if c.peer != verifier]
        self.dead[verifier] = reason

    def explain(self, avoid: set[str], reasons: list[str]) -> str:
        if reasons:
            return f"no verifier for {self.model_id!r} would take the session: " + "; ".join(
                reasons)
        if avoid:
            return (f"no verifier for {self.model_id!r} is left: the ones known failed "
                    f"({', '.join(sorted(avoid))})")
        dead = "".join(f"; {p} did not answer ({why})" for p, why in self.dead.items())
        return (f"no verifier for {self.model_id!r} was found{dead}. Check that a verifier "
                "serves this target model and that your bootstrap peers are on its network.")

    def heard_fraud(self, data: bytes, found: ProvenFraud) -> None:
        """A valid fraud proof from the network: never use that verifier again."""
        if found.model_id != self.model_id or found.accused in self.heard:
            return
        why = f"fraud proven by node {found.node} (heard on the network)"
        self.heard[found.accused] = why
        log.warning("verifier %s is banned: %s", found.accused, why)
        self.failed(found.accused, why)
        if self.auditor is not None:
            self.auditor.adopt(data, found.accused, why)

    def _ended(self, peer: str, session: Session) -> None:
        self.released(peer)
        if self.auditor is not None:
            self.auditor.session_ended(session)

    async def open_audit_stream(self, cand: Candidate) -> INetStream:
        """A stream to `cand` on the audit protocol (ConnectionError if none)."""
        return await open_stream(self.host, cand.info, AUDIT_PROTOCOL)

    def released(self, peer: str) -> None:
        n = self.in_use.get(peer, 0) - 1
        if n > 0:
            self.in_use[peer] = n
        else:
            self.in_use.pop(peer, None)


@asynccontextmanager
async def network(identity: KeyPair, model_id: str, *, bootstrap: Sequence[str] = (),
                  verifiers: Sequence[str] = (), listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
                  mdns: bool = False, use_dht: bool = True,
                  silence_timeout: float = SILENCE_TIMEOUT,
                  busy_wait: float = BUSY_WAIT) -> AsyncIterator[VerifierPool]:
    """A running host, connected to the bootstrap peers, with a DHT client and a pool.

    Malformed or unreachable addresses fail here with BootstrapError, before any model
    work, so the user learns at once.
    """
    boot = parse_bootstrap(bootstrap)
    direct = parse_bootstrap(verifiers)
    if not boot and not direct and not mdns:
        raise BootstrapError("give at least one --bootstrap peer (or --verifier, or --mdns) "
                             "to find verifiers")
    async with hosts.running_host(identity, listen, mdns=mdns) as host, \
            relay.relay_client(host):  # dial verifiers behind NAT through their relay
        if mdns:
            await trio.sleep(MDNS_WAIT)  # let LAN peers answer before the first look
        pools: list[VerifierPool] = []

        def heard(data: bytes, found: ProvenFraud) -> None:
            for p in pools:
                p.heard_fraud(data, found)

        async with fraud_gossip(host, heard) as gossip:
            if boot and use_dht:
                async with hosts.running_dht(host, server=False) as dht:
                    await dial_bootstrap(host, boot, dht)
                    pools.append(VerifierPool(
                        host, identity, model_id, dht=dht, direct=direct, bootstrap=boot,
                        mdns=mdns, silence_timeout=silence_timeout, busy_wait=busy_wait))
                    pools[0].publish_proof = gossip.publish
                    yield pools[0]
            else:
                await dial_bootstrap(host, boot)
                pools.append(VerifierPool(
                    host, identity, model_id, direct=direct, bootstrap=boot, mdns=mdns,
                    silence_timeout=silence_timeout, busy_wait=busy_wait))
                pools[0].publish_proof = gossip.publish
                yield pools[0]
