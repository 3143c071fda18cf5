"""Reaching hosts behind NAT: circuit relay v2, a dial-back check and hole punching.

py-libp2p 0.8.1 ships the parts (``libp2p.relay.circuit_v2``: hop/stop, reservations,
DCUtR; ``libp2p.host.autonat``) but ``new_host`` switches none of them on, and some do
not work as shipped. This module wires them in for SpecEdge and works around what is
broken, in our code (nothing of py-libp2p is copied or patched):

- **Dial-back (AutoNAT v1 wire format).** py-libp2p's AutoNAT server dials the
  requester back with ``host.connect``, which returns the connection the request came
  on: every peer it can dial at all is told "public". It also only dials addresses whose
  IP equals the observed one, so a host behind NAT (advertising its private address) is
  refused rather than told "private". ``DialBackServer`` answers the same protocol from a
  second, throwaway host that has no connection to the requester, at the observed IP
  with each advertised TCP port (what go-libp2p does): success means the port is really
  open from the internet.
- **Dialling a /p2p-circuit address.** The swarm drops relay addresses ("no relay
  transport") even when one exists, so ``reach_peer`` dials direct addresses first and
  then each circuit address through ``CircuitV2Transport.dial`` itself.
- **Reservations.** The transport's refresher keeps a reservation on the relay it was
  made on and gives up when that relay dies; ``Reservations`` (verifier side) keeps
  slots on two relays at once, notices a lost relay by its connection, and reserves on
  the next one (a node that loses one relay mid-generation reconnects through the other).

A relay applies limits per circuit (bytes and seconds, both directions together),
circuits per reserving peer, and reservations in all (``RelayLimitsConfig``). Nothing
here imports model code.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID, AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message as AutoNATMessage
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr

from specedge.protocol import hosts

log = logging.getLogger("specedge.relay")

DIALBACK_TIMEOUT = 5.0  # seconds the dial-back host tries one address
DIALBACK_CONCURRENCY = 8  # dial-backs a server runs at once (more wait)
DIRECT_FIRST_TIMEOUT = 3.0  # a direct dial tried before a relayed one gets this long
RESERVE_TIMEOUT = 10.0
RESERVATION_CHECK = 2.0  # seconds between checks that the relay is still there
MAX_AUTONAT_MSG = 64 * 1024


@dataclass
class RelayLimitsConfig:
    """What a relay grants (``specedge bootstrap --relay-*``)."""

    max_reservations: int = 128  # peers holding a slot at once
    max_circuits: int = 16  # circuits to one reserving peer at once
    max_circuit_bytes: int = 1 << 30  # both directions of one circuit together
    max_circuit_seconds: int = 3600  # one circuit's lifetime
    reservation_ttl: int = 3600  # a slot lasts this long unless refreshed

    def to_libp2p(self) -> RelayLimits:
        return RelayLimits(duration=self.max_circuit_seconds, data=self.max_circuit_bytes,
                           max_circuit_conns=self.max_circuits,
                           max_reservations=self.max_reservations,
                           reservation_ttl=self.reservation_ttl)


def is_circuit(addr: Multiaddr | str) -> bool:
    return "/p2p-circuit" in str(addr)


def connection_path(host: IHost, peer: ID) -> str | None:
    """"direct", "relayed" or None (not connected): how we are connected to ``peer``."""
    conns = host.get_network().get_connections(peer)
    paths = set()
    for conn in conns:
        try:
            addrs = conn.get_transport_addresses() or []
        except Exception:
            addrs = []
        paths.add("relayed" if any(is_circuit(a) for a in addrs) else "direct")
    if not paths:
        return None
    return "direct" if "direct" in paths else "relayed"


# ---------------------------------------------------------------------------- relay side


@asynccontextmanager
async def relay_service(host: IHost, limits: RelayLimitsConfig) -> AsyncIterator[
        CircuitV2Protocol]:
    """Relay for others (hop) on ``host`` with ``limits``, while the block runs."""
    proto = CircuitV2Protocol(host, limits=limits.to_libp2p(), allow_hop=True)
    async with background_trio_service(proto):
        log.info("relaying: %d reservations, %d circuits per peer, %d MiB and %d s per "
                 "circuit", limits.max_reservations, limits.max_circuits,
                 limits.max_circuit_bytes >> 20, limits.max_circuit_seconds)
        yield proto


class DialBackServer:
    """Answers AutoNAT v1 dial requests by dialling back from a host of its own.

    The requester's advertised TCP ports are dialled at the IP its request came from,
    never at an address it names (no amplification), and never over a relay."""

    def __init__(self, dialer: IHost) -> None:
        self.dialer = dialer
        self.limit = trio.Semaphore(DIALBACK_CONCURRENCY)

    async def handle(self, stream: INetStream) -> None:
        try:
            with trio.fail_after(DIALBACK_TIMEOUT * 4):
                raw = await read_varint_prefixed_bytes_limited(stream, MAX_AUTONAT_MSG)
                request = AutoNATMessage()
                request.ParseFromString(raw)
                response = await self._answer(stream, request)
                await stream.write(encode_varint_prefixed(response.SerializeToString()))
        except Exception as exc:  # a malformed or stalled request: drop this stream only
            log.debug("dial-back request failed: %s", exc)
        finally:
            await hosts.close_stream(stream)

    async def _answer(self, stream: INetStream, request: AutoNATMessage) -> AutoNATMessage:
        response = AutoNATMessage(type=AutoNATMessage.DIAL_RESPONSE)
        remote = stream.get_remote_address() if hasattr(stream, "get_remote_address") else None
        peer = stream.muxed_conn.peer_id
        if request.type != AutoNATMessage.DIAL or remote is None or is_circuit(
                getattr(stream.muxed_conn, "get_transport_addresses", lambda: [])()):
            response.dialResponse.status = AutoNATMessage.E_DIAL_REFUSED
            response.dialResponse.statusText = "no dial-back over a relay or without an IP"
            return response
        targets = dialback_targets(request, remote[0])
        if not targets or ID(request.dial.peer.id) != peer:
            response.dialResponse.status = AutoNATMessage.E_BAD_REQUEST
            response.dialResponse.statusText = "no TCP address, or not the requester's id"
            return response
        async with self.limit:
            for addr in targets:
                if await self._try(peer, addr):
                    response.dialResponse.status = AutoNATMessage.OK
                    response.dialResponse.addr = addr.to_bytes()
                    return response
        response.dialResponse.status = AutoNATMessage.E_DIAL_ERROR
        response.dialResponse.statusText = "dial-back failed on every port"
        return response

    async def _try(self, peer: ID, addr: Multiaddr) -> bool:
        # Only this address, and dialled for real: the swarm would also try the
        # addresses of an earlier check, and refuses for a minute a peer whose every
        # address once failed (a port forwarded just now must be seen at once).
        self.dialer.get_peerstore().clear_addrs(peer)
        hosts.learn_addrs(self.dialer, PeerInfo(peer, [addr]))
        try:
            await hosts.connect(self.dialer, PeerInfo(peer, [addr]), timeout=DIALBACK_TIMEOUT)
        except ConnectionError as exc:
            log.debug("dial-back to %s at %s failed: %s", peer, addr, exc)
            return False
        with trio.move_on_after(2.0):
            await self.dialer.disconnect(peer)
        return True


def dialback_targets(request: AutoNATMessage, observed_ip: str) -> list[Multiaddr]:
    """The observed IP with each distinct TCP port the request advertises (at most 8)."""
    ports: list[int] = []
    for raw in request.dial.peer.addrs:
        try:
            port = int(Multiaddr(bytes(raw)).value_for_protocol("tcp"))
        except Exception:
            continue
        if 0 < port < 65536 and port not in ports and not is_circuit(Multiaddr(bytes(raw))):
            ports.append(port)
    family = "ip6" if ":" in observed_ip else "ip4"
    return [Multiaddr(f"/{family}/{observed_ip}/tcp/{p}") for p in ports[:8]]


@asynccontextmanager
async def dialback_service(host: IHost, listen_ip: str = "0.0.0.0") -> AsyncIterator[None]:
    """Serve dial-back requests on ``host`` from a second host with a throwaway key."""
    family = "ip6" if ":" in listen_ip else "ip4"
    async with hosts.running_host(create_new_key_pair(), [f"/{family}/{listen_ip}/tcp/0"],
                                  health_monitoring=False) as dialer:
        server = DialBackServer(dialer)
        host.set_stream_handler(AUTONAT_PROTOCOL_ID, server.handle)
        yield


async def ask_dialback(host: IHost, server: ID, ports: Sequence[int],
                       timeout: float = DIALBACK_TIMEOUT * 3) -> tuple[bool | None, str]:
    """Ask ``server`` to dial us back on ``ports``: (True, addr) reachable, (False, why)
    not, (None, why) when the server could not tell (no such service, an error)."""
    client = AutoNATService(host, serve=False)  # type: ignore[arg-type]
    addrs = [Multiaddr(f"/ip4/0.0.0.0/tcp/{p}").to_bytes() for p in ports]
    try:
        status, addr = await client.query_server(server, addrs, timeout=timeout)
    except Exception as exc:
        return None, f"{server} did not answer a dial-back request ({exc})"
    if status == AutoNATMessage.OK:
        return True, str(Multiaddr(addr)) if addr else ""
    if status == AutoNATMessage.E_DIAL_ERROR:
        return False, "the dial-back failed"
    return None, f"{server} refused the dial-back request (status {status})"


# ---------------------------------------------------------------------------- client side


@dataclass
class RelayClient:
    """What a host needs to use relays: accept relayed connections (stop), dial circuit
    addresses, and hole-punch relayed connections into direct ones (DCUtR)."""

    host: IHost
    transport: CircuitV2Transport
    dcutr: DCUtRProtocol | None


_clients: weakref.WeakKeyDictionary[IHost, RelayClient] = weakref.WeakKeyDictionary()


@asynccontextmanager
async def relay_client(host: IHost, *, hole_punch: bool = True) -> AsyncIterator[RelayClient]:
    """Stop handler, circuit dialler and DCUtR on ``host`` while the block runs."""
    proto = CircuitV2Protocol(host, allow_hop=False)
    # Role STOP only: with CLIENT the transport's discovery reserves a slot on every relay
    # it meets, so every node would take one; slots are reserved by Reservations instead.
    transport = CircuitV2Transport(host, proto, RelayConfig(roles=RelayRole.STOP))
    async with background_trio_service(proto):
        if not hole_punch:
            client = _clients[host] = RelayClient(host, transport, None)
            yield client
            return
        dcutr = DCUtRProtocol(host)
        async with background_trio_service(dcutr):
            client = _clients[host] = RelayClient(host, transport, dcutr)
            yield client


async def reach_peer(host: IHost, info: PeerInfo, timeout: float = hosts.DIAL_TIMEOUT) -> str:
    """Connect to ``info``, directly if any direct address works, else through a relay
    named by one of its ``/p2p-circuit`` addresses. Returns "direct" or "relayed"
    (an existing connection counts as it is). ConnectionError when neither works."""
    path = connection_path(host, info.peer_id)
    if path is not None:
        return path
    direct = [a for a in info.addrs if not is_circuit(a)]
    relayed = [a for a in info.addrs if is_circuit(a)]
    client = _clients.get(host)
    errors = []
    if direct or not relayed or client is None:
        try:
            await hosts.connect(host, PeerInfo(info.peer_id, direct or info.addrs),
                                timeout=DIRECT_FIRST_TIMEOUT if relayed and client else timeout)
            return "direct"
        except ConnectionError as exc:
            if not relayed or client is None:
                raise
            errors.append(f"direct: {exc}")
    for addr in relayed:
        full = addr if "/p2p/" in str(addr).split("/p2p-circuit")[-1] else Multiaddr(
            f"{addr}/p2p/{info.peer_id.to_base58()}")
        try:
            with trio.fail_after(timeout):
                await _connect_relay_of(host, full)
                conn = await client.transport.dial(full)
            # py-libp2p may pick another of the peer's relays than the one asked for.
            used = next(iter(conn.get_transport_addresses() or []), full)
            log.info("connected to %s through a relay (%s)", info.peer_id, used)
            return "relayed"
        except (Exception, trio.TooSlowError) as exc:
            errors.append(f"{full}: {exc or type(exc).__name__}")
    raise ConnectionError(f"cannot reach {info.peer_id}: " + "; ".join(errors))


async def _connect_relay_of(host: IHost, circuit: Multiaddr) -> None:
    relay_part = Multiaddr(str(circuit).split("/p2p-circuit")[0])
    await hosts.connect(host, relay_part)


# ---------------------------------------------------------------------------- reservations


@dataclass
class Slot:
    relay: PeerInfo
    expires: float
    addrs: list[Multiaddr]


@dataclass
class Reservations:
    """Keep slots on ``want`` relays at once (from ``relays``, in order), replacing one
    whose relay goes away, so a relay's death never leaves the host unreachable.

    ``addrs`` is what the host advertises for its slots (``<relay>/p2p-circuit``);
    ``on_change`` is called whenever the set of relays changes (to re-announce)."""

    host: IHost
    relays: list[PeerInfo]
    on_change: Callable[[], None] = lambda: None
    want: int = 2
    slots: dict[ID, Slot] = field(default_factory=dict)
    last_error: str = ""

    @property
    def addrs(self) -> list[Multiaddr]:
        return [a for slot in self.slots.values() for a in slot.addrs]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Reserve now (``started`` after the first attempt, granted or not), then keep
        the slots: refresh each before it expires, replace one whose relay is gone."""
        await self.fill()
        task_status.started()
        while True:
            await trio.sleep(RESERVATION_CHECK)
            for peer, slot in list(self.slots.items()):
                if connection_path(self.host, peer) is None:
                    log.warning("lost the relay %s; reserving elsewhere", peer)
                    del self.slots[peer]
                    self.on_change()
                elif time.time() > slot.expires - 60:
                    await self._take(slot.relay, [])
            if len(self.slots) < self.want:
                await self.fill()

    async def fill(self) -> None:
        """Reserve on relays not held yet until ``want`` slots are held (or none is left)."""
        errors: list[str] = []
        before = set(self.slots)
        for relay in self.relays:
            if len(self.slots) >= self.want:
                break
            if relay.peer_id not in self.slots:
                await self._take(relay, errors)
        self.last_error = "; ".join(errors) if not self.slots else ""
        if set(self.slots) != before:
            self.on_change()

    async def _take(self, relay: PeerInfo, errors: list[str]) -> None:
        try:
            expires, addrs = await reserve(self.host, relay)
        except ConnectionError as exc:
            errors.append(str(exc))
            self.slots.pop(relay.peer_id, None)
            return
        if relay.peer_id not in self.slots:
            log.info("reserved a slot on relay %s: reachable at %s", relay.peer_id,
                     ", ".join(map(str, addrs)))
        self.slots[relay.peer_id] = Slot(relay, expires, addrs)


async def reserve(host: IHost, relay: PeerInfo,
                  timeout: float = RESERVE_TIMEOUT) -> tuple[float, list[Multiaddr]]:
    """Ask ``relay`` for a slot: (expiry time, our circuit addresses through it)."""
    try:
        with trio.fail_after(timeout):
            await hosts.connect(host, relay, timeout=timeout)
            stream = await host.new_stream(relay.peer_id, [HOP_PROTOCOL])
            try:
                await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
                resp = await read_delimited_msg(stream, HopMessage)
            finally:
                await hosts.close_stream(stream, timeout=1.0)
    except trio.TooSlowError:
        raise ConnectionError(f"relay {relay.peer_id} did not answer in {timeout:g} s") from None
    except ConnectionError:
        raise
    except Exception as exc:  # no hop handler (not a relay), a reset, a bad message
        raise ConnectionError(f"{relay.peer_id} is not a relay for us: {exc}") from exc
    if resp.type != HopMessage.STATUS or resp.status != 100:  # 100: OK in circuit v2
        raise ConnectionError(f"relay {relay.peer_id} refused a slot (status {resp.status})")
    bases = [Multiaddr(bytes(a)) for a in resp.reservation.addrs] or [
        Multiaddr(f"{a}/p2p/{relay.peer_id.to_base58()}") for a in relay.addrs
        if not is_circuit(a)]
    addrs = [Multiaddr(f"{_with_peer(b, relay.peer_id)}/p2p-circuit") for b in bases]
    expires = float(resp.reservation.expire) if resp.reservation.expire else time.time() + 600
    return expires, addrs


def _with_peer(addr: Multiaddr, peer: ID) -> str:
    text = str(addr)
    return text if "/p2p/" in text else f"{text}/p2p/{peer.to_base58()}"


def advertise_also(host: IHost, extra: Callable[[], list[Multiaddr]]) -> None:
    """Make ``host.get_addrs()`` (identify, DHT provider records, announce files) also
    return the circuit addresses ``extra()`` gives, each ending in our own /p2p/ id.

    py-libp2p's own hook (``addrs_factory``) strips an address's /p2p/ part and all that
    follows it, so ``<relay>/p2p/<relay id>/p2p-circuit`` would come out as the relay's
    bare address: the circuit addresses are appended after its pipeline instead."""
    original = host.get_addrs

    def get_addrs() -> list[Multiaddr]:
        own = f"/p2p/{host.get_id().to_base58()}"
        return list(original()) + [Multiaddr(f"{a}{own}") for a in extra()]

    host.get_addrs = get_addrs  # type: ignore[method-assign]
