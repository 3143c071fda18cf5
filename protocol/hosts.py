"""libp2p plumbing shared by the node, the verifier and the bootstrap peer.

One place decides how a SpecEdge host is built and run, because py-libp2p's defaults
are wrong for us (see notes/libp2p.md):

- ``max_connections_per_peer=1``: otherwise every first connect waits a fixed 250 ms
  happy-eyeballs timer; with it a loopback connect takes 4 to 9 ms.
- Health monitoring with ``abort_connection_on_ping_failure``: without it a frozen peer
  (SIGSTOP, a dead laptop lid) hangs every read on its streams forever; with it the
  streams see EOF within a few seconds and sessions are reaped.
- The DHT needs its routing table filled by hand after connecting to bootstrap peers.
- Its loggers write raw lines through Python's fallback handler and some of its modules
  log on the root logger: ``configure_logging`` filters them.
- Ctrl-C in trio surfaces as an exception group and exit status 1: ``run_main`` and
  ``StopSignal`` turn SIGINT/SIGTERM into an orderly stop and exit status 0.

Typical use (the verifier daemon)::

    async with running_host(key_pair, ["/ip4/0.0.0.0/tcp/4001"]) as host:
        host.set_stream_handler(VERIFY_PROTOCOL, handler)
        async with running_dht(host, bootstrap=addrs) as dht:
            nursery.start_soon(provide_forever, dht, dht_key(model_id))
            ...

Nothing here imports model code.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

# Importing libp2p costs about 0.45 s; every user of this module needs it anyway.
import libp2p
import trio
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from specedge.protocol.netargs import (  # noqa: F401  (re-exported: their old home)
    DEFAULT_LISTEN,
    REANNOUNCE_INTERVAL,
    add_bootstrap_args,
)

log = logging.getLogger("specedge.hosts")

DIAL_TIMEOUT = 10.0  # seconds for one connect (TCP + Noise + yamux)
DHT_TIMEOUT = 15.0  # seconds for one provide / find_providers walk
# Health monitoring: a frozen peer's connection is aborted after a failed ping, so its
# streams see EOF within about HEALTH_INTERVAL + PING_TIMEOUT seconds. The ping timeout
# is not tighter because a host busy with a forward pass answers pings a little late.
HEALTH_INTERVAL = 1.0
PING_TIMEOUT = 2.0
PROVIDE_SETTLE = 0.5  # seconds between an announcement and the walk that checks it
RECHECK_INTERVAL = 30.0  # re-announce this soon while the check does not find the record


# ---------------------------------------------------------------------------- hosts


def connection_config(*, health_monitoring: bool = True) -> ConnectionConfig:
    """The connection settings every SpecEdge host uses (see the module docstring)."""
    if not health_monitoring:
        return ConnectionConfig(max_connections_per_peer=1)
    return ConnectionConfig(
        max_connections_per_peer=1,
        enable_health_monitoring=True,
        health_initial_delay=0.2,
        health_warmup_window=0.0,
        health_check_interval=HEALTH_INTERVAL,
        ping_timeout=PING_TIMEOUT,
        abort_connection_on_ping_failure=True,
    )


def as_multiaddrs(addrs: Iterable[str | Multiaddr]) -> list[Multiaddr]:
    """Parse multiaddr strings (ValueError with the bad one named)."""
    out = []
    for a in addrs:
        if isinstance(a, Multiaddr):
            out.append(a)
            continue
        try:
            out.append(Multiaddr(a))
        except Exception as exc:  # multiaddr raises its own error types
            raise ValueError(f"not a multiaddr: {a!r} ({exc})") from None
    return out


def new_host(
    key_pair: KeyPair,
    listen_addrs: Sequence[str | Multiaddr] = (DEFAULT_LISTEN,),
    *,
    health_monitoring: bool = True,
    mdns: bool = False,
    upnp: bool = False,
) -> IHost:
    """A libp2p host (Noise, yamux, TCP) with our identity and connection settings.

    It does not listen yet: run it with ``running_host`` or ``host.run(listen_addrs)``.
    ``mdns``: also find peers on the LAN (it multicasts on every interface: keep it
    off in tests unless inside a private network namespace). ``upnp``: ask the LAN's
    router to forward the listen ports.
    """
    return libp2p.new_host(
        key_pair=key_pair,
        listen_addrs=as_multiaddrs(listen_addrs),
        connection_config=connection_config(health_monitoring=health_monitoring),
        muxer_preference="YAMUX",
        enable_mDNS=mdns,
        enable_upnp=upnp,
    )


@asynccontextmanager
async def running_host(
    key_pair: KeyPair,
    listen_addrs: Sequence[str | Multiaddr] = (DEFAULT_LISTEN,),
    *,
    health_monitoring: bool = True,
    mdns: bool = False,
    upnp: bool = False,
) -> AsyncIterator[IHost]:
    """A started host, listening on ``listen_addrs``; stopped on exit."""
    addrs = as_multiaddrs(listen_addrs)
    host = new_host(key_pair, addrs, health_monitoring=health_monitoring, mdns=mdns,
                    upnp=upnp)
    async with host.run(addrs):
        yield host


def peer_addrs(host: IHost) -> list[str]:
    """The host's full multiaddrs, each ending in ``/p2p/<peer id>``, as strings."""
    pid = host.get_id().to_base58()
    out = []
    for a in host.get_addrs():
        text = str(a)
        out.append(text if "/p2p/" in text else f"{text}/p2p/{pid}")
    return out


def parse_peer_id(text: str) -> ID:
    """A base58 peer id: an identity or sha2-256 multihash (ValueError naming it when it
    is not one; base58 alone accepts almost any word)."""
    try:
        raw = ID.from_base58(text).to_bytes()
    except Exception as exc:
        raise ValueError(f"not a peer id: {text!r} ({exc})") from None
    identity = len(raw) >= 2 and raw[0] == 0x00 and raw[1] == len(raw) - 2
    sha256 = len(raw) == 34 and raw[:2] == b"\x12\x20"
    if not (identity or sha256):
        raise ValueError(f"not a peer id: {text!r} (not a multihash of a key)")
    return ID(raw)


def parse_peer_addr(addr: str | Multiaddr) -> PeerInfo:
    """PeerInfo of a full multiaddr (ValueError unless it ends in ``/p2p/<id>``)."""
    try:
        return info_from_p2p_addr(addr if isinstance(addr, Multiaddr) else Multiaddr(addr))
    except Exception as exc:
        raise ValueError(f"not a peer multiaddr (…/p2p/<peer id>): {addr!r} ({exc})") from None


async def connect(
    host: IHost, peer: str | Multiaddr | PeerInfo, *, timeout: float = DIAL_TIMEOUT
) -> PeerInfo:
    """Dial a peer (a full multiaddr or a PeerInfo) within ``timeout`` seconds.

    Raises ``ConnectionError`` on failure or timeout, whatever libp2p raised inside.
    """
    info = peer if isinstance(peer, PeerInfo) else parse_peer_addr(peer)
    try:
        with trio.fail_after(timeout):
            await host.connect(info)
    except trio.TooSlowError:
        raise ConnectionError(f"connect to {info.peer_id} timed out after {timeout:g} s") from None
    except Exception as exc:  # SwarmException, OSError, handshake errors
        raise ConnectionError(f"connect to {info.peer_id} failed: {exc}") from exc
    return info


async def connect_bootstrap(
    host: IHost,
    addrs: Iterable[str | Multiaddr],
    *,
    dht: KadDHT | None = None,
    timeout: float = DIAL_TIMEOUT,
) -> list[ID]:
    """Dial every bootstrap peer concurrently; add the reachable ones to the DHT table.

    A bootstrap peer that cannot be reached is logged and skipped: one dead entry in a
    list must not stop a host from starting. Returns the ids connected to.
    """
    infos = []
    for a in addrs:
        try:
            infos.append(parse_peer_addr(a))
        except ValueError as exc:
            log.warning("bootstrap: %s", exc)
    connected: list[ID] = []

    async def one(info: PeerInfo) -> None:
        try:
            await connect(host, info, timeout=timeout)
        except ConnectionError as exc:
            log.warning("bootstrap peer unreachable: %s", exc)
            return
        connected.append(info.peer_id)
        if dht is not None:
            await add_to_routing_table(dht, info.peer_id)

    async with trio.open_nursery() as nursery:
        for info in infos:
            nursery.start_soon(one, info)
    return connected


async def add_to_routing_table(dht: KadDHT, peer_id: ID) -> bool:
    """Put a connected peer into the DHT's routing table (py-libp2p does not)."""
    try:
        with trio.move_on_after(DIAL_TIMEOUT):
            return bool(await dht.routing_table.add_peer(peer_id))
    except Exception as exc:  # the table checks the peer over the network
        log.debug("routing table refused %s: %s", peer_id, exc)
    return False


CLOSE_TIMEOUT = 2.0  # seconds a stream we are done with may take to finish politely
_DRAIN_CHUNK = 64 * 1024


async def close_stream(stream: object, timeout: float = CLOSE_TIMEOUT) -> None:
    """End a stream we are done with: bounded, never raises, leaves nothing behind.

    Polite first: our FIN (frames we wrote still reach the peer), then whatever the
    peer still sends is read and dropped until its own FIN. A peer that does not finish
    within ``timeout`` gets a reset. Either way the bytes it sent that nobody read are
    dropped now: py-libp2p 0.8.1 keeps a stream's unread bytes until the stream is
    closed in both directions, and never, once the peer reset it and we closed it
    (``YamuxStream.close`` marks a reset stream half-open again, so its sweeper skips
    it). A peer writing 250 KB on a stream and resetting it, 12,000 times over one
    connection, grew a verifier by 250 MB that way.
    """
    with trio.move_on_after(timeout) as scope:
        scope.shield = True
        try:
            if not _reset_by_peer(stream):
                await stream.close()  # type: ignore[attr-defined]
                while await stream.read(_DRAIN_CHUNK):  # type: ignore[attr-defined]
                    pass
        except Exception:  # StreamEOF (the peer finished too), a reset, a broken conn
            pass
    with trio.move_on_after(timeout) as scope:
        scope.shield = True
        try:
            await stream.reset()  # type: ignore[attr-defined]  # no-op once fully closed
        except Exception:
            pass
        await _drop_unread(stream)


def _reset_by_peer(stream: object) -> bool:
    return bool(getattr(getattr(stream, "muxed_stream", None), "reset_received", False))


async def _drop_unread(stream: object) -> None:
    """Forget the bytes a finished stream's peer sent that were never read (yamux)."""
    muxed = getattr(stream, "muxed_stream", None)
    conn = getattr(muxed, "conn", None)
    buffers = getattr(conn, "stream_buffers", None)
    if not isinstance(buffers, dict):
        return  # another muxer: nothing we know how to release
    buf = buffers.get(getattr(muxed, "stream_id", None))
    if buf:
        buf.clear()
    finalize = getattr(conn, "_finalize_stream", None)
    if buf is not None and getattr(muxed, "closed", False) and finalize is not None:
        try:
            await finalize(muxed, fully_closed=True)  # drops the stream's bookkeeping
        except Exception:
            pass


# ---------------------------------------------------------------------------- DHT


@asynccontextmanager
async def running_dht(
    host: IHost, *, server: bool = True, bootstrap: Iterable[str | Multiaddr] = ()
) -> AsyncIterator[KadDHT]:
    """A Kademlia DHT on a running host, after dialling ``bootstrap`` peers.

    ``server``: answer other peers' DHT queries (verifiers and bootstrap peers do; a
    node behind NAT may run as a client).
    """
    dht = KadDHT(host, DHTMode.SERVER if server else DHTMode.CLIENT)
    async with background_trio_service(dht), trio.open_nursery() as nursery:
        if server:
            nursery.start_soon(_drop_dht_clients, dht)
        await connect_bootstrap(host, bootstrap, dht=dht)
        yield dht
        nursery.cancel_scope.cancel()


async def _drop_dht_clients(dht: KadDHT, interval: float = 1.0) -> None:
    """Keep DHT clients out of our routing table.

    py-libp2p adds every peer that sends it a DHT query to its table, client or not; a
    client behind NAT (a verifier without a direct address) then makes every lookup
    that is handed its address wait on dials that cannot succeed (20 s measured, longer
    than a lookup's budget). Peers whose identify says they do not serve the DHT go."""
    while True:
        await trio.sleep(interval)
        for peer in dht.routing_table.get_peer_ids():
            if _dht_role(dht.host, peer) is False:
                dht.routing_table.remove_peer(peer)


async def provide_once(dht: KadDHT, key: str, *, timeout: float = DHT_TIMEOUT) -> bool:
    """Announce this host as a provider of ``key``; False on failure (logged)."""
    try:
        with trio.move_on_after(timeout):
            return bool(await dht.provide(key))
        log.warning("DHT provide %s timed out", key)
    except Exception as exc:  # network errors inside the DHT walk
        log.warning("DHT provide %s failed: %s", key, exc)
    return False


@dataclass
class ProvideStatus:
    """How this host's provider record fares, for an operator's status.

    py-libp2p sends ADD_PROVIDER and does not wait for an answer, so a peer that refuses
    the record (a js-libp2p peer refused non-CID keys) loses it silently: only a
    GET_PROVIDERS walk that finds us tells that the record is really there."""

    key: str
    provided_at: float | None = None  # time.time() of the last announcement
    checked_at: float | None = None  # of the last GET_PROVIDERS check
    found: bool | None = None  # whether that check found this host's record
    failures: int = 0  # checks in a row that did not find it

    def as_dict(self) -> dict[str, object]:
        return {"key": self.key, "provided_at": self.provided_at,
                "checked_at": self.checked_at, "found": self.found,
                "failures": self.failures}


async def provider_found(dht: KadDHT, key: str, *, timeout: float = DHT_TIMEOUT) -> bool:
    """Whether a GET_PROVIDERS walk of the network (not our own store) lists this host."""
    me = dht.host.get_id()
    cached = _set_aside_cached_providers(dht, key)
    try:
        with trio.move_on_after(timeout):
            return any(i.peer_id == me for i in await dht.find_providers(key, 200))
    except Exception as exc:
        log.debug("DHT check of %s failed: %s", key, exc)
    finally:
        _restore_cached_providers(dht, cached)
    return False


async def provide_forever(
    dht: KadDHT,
    key: str,
    *,
    interval: float = REANNOUNCE_INTERVAL,
    also: Sequence[str] = (),
    status: ProvideStatus | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Announce ``key`` (and the ``also`` keys) now and on a schedule until cancelled,
    checking after each announcement that a GET_PROVIDERS walk finds the record.

    The schedule is every ``interval`` seconds while the check finds the record, and
    every ``min(interval, RECHECK_INTERVAL)`` while it does not (a refused or lost
    record, or a DHT with no peer to hold it yet). ``task_status.started()`` fires after
    the first attempt; ``status`` (if given) is kept up to date for the operator.
    """
    status = status if status is not None else ProvideStatus(key)
    while True:
        await provide_once(dht, key)
        for extra in also:
            await provide_once(dht, extra)
        status.provided_at = time.time()
        await trio.sleep(PROVIDE_SETTLE)  # ADD_PROVIDER is not answered: let it land
        status.found = await provider_found(dht, key)
        status.checked_at = time.time()
        status.failures = 0 if status.found else status.failures + 1
        if not status.found:
            log.warning("DHT record %s not found by a GET_PROVIDERS walk (%d in a row); "
                        "announcing again in %.0f s", key, status.failures,
                        min(interval, RECHECK_INTERVAL))
        task_status.started()
        task_status = trio.TASK_STATUS_IGNORED
        await trio.sleep(interval if status.found else min(interval, RECHECK_INTERVAL))


async def find_providers(
    dht: KadDHT, key: str, *, count: int = 200, timeout: float = DHT_TIMEOUT
) -> list[PeerInfo]:
    """Providers of ``key``, each peer once, this host excluded; [] on failure.

    ``count`` is generous: py-libp2p counts repeats of one provider towards it and stops
    early (asking for 20 with 8 providers left 2 of them out, seen by the monitor).

    Provider records cannot be withdrawn: a listed peer may be dead. Check liveness
    (e.g. an advert query) before relying on one.

    Always asks the network. py-libp2p answers from its local provider store whenever
    it holds a record for the key, and every lookup stores what it found there, so a
    long-lived node would see the addresses of its first lookup for 48 hours: a
    verifier restarted on another port (same identity) was never found again. The
    local records are set aside during the walk (and returned only if the walk finds
    nothing). Each provider the walk finds has its announced addresses put in the
    peerstore and is let out of the swarm's "all addresses failed" cache (60 s): a
    verifier that was dialled in vain while it restarted can be dialled again at once.
    The cost is one more dial of a dead provider per lookup, which its liveness probe
    makes anyway on a node's first lookup.
    """
    cached = _set_aside_cached_providers(dht, key)
    try:
        with trio.move_on_after(timeout):
            found = await dht.find_providers(key, count)
            seen: dict[ID, PeerInfo] = {}
            for info in found:
                if info.peer_id != dht.host.get_id() and info.peer_id not in seen:
                    seen[info.peer_id] = info
            for info in seen.values():
                learn_addrs(dht.host, info)
            if not seen and cached:  # the network knows none: what we knew is all there is
                seen = {i.peer_id: i for i in cached[2] if i.peer_id != dht.host.get_id()}
            return list(seen.values())
        log.warning("DHT find_providers %s timed out", key)
    except Exception as exc:
        log.warning("DHT find_providers %s failed: %s", key, exc)
    finally:
        _restore_cached_providers(dht, cached)
    return []


def _set_aside_cached_providers(dht: KadDHT, key: str) -> tuple[bytes, dict, list] | None:
    """Remove the provider store's records for ``key``: (store key, records, infos)."""
    from libp2p.kad_dht import kad_dht as kad_module

    encode = getattr(kad_module, "_encode_key", None)
    providers = getattr(getattr(dht, "provider_store", None), "providers", None)
    if encode is None or not isinstance(providers, dict):
        return None  # another py-libp2p: its own behaviour stands
    store_key = encode(key)
    infos = dht.provider_store.get_providers(store_key) if store_key in providers else []
    records = providers.pop(store_key, None)
    return (store_key, records, infos) if records else None


def _restore_cached_providers(dht: KadDHT, cached: tuple[bytes, dict, list] | None) -> None:
    # Records the walk did not refresh go back (a DHT server also serves them to others).
    if cached is None:
        return
    store_key, records, _ = cached
    fresh = dht.provider_store.providers.setdefault(store_key, {})
    for peer, record in records.items():
        fresh.setdefault(peer, record)


def learn_addrs(host: IHost, info: PeerInfo) -> None:
    """Put a peer's known addresses in the peerstore and let the swarm dial it again now.

    py-libp2p refuses, for a minute, to dial a peer whose every address failed once (its
    negative cache). A verifier that restarts, on its old address or a new one, would
    then be unusable for that minute; our dials are already bounded and rare (a refresh,
    a session), so we lift the block each time we mean to reach a peer."""
    if info.addrs:
        host.get_peerstore().add_addrs(info.peer_id, info.addrs, 3600)
    unblock = getattr(host.get_network(), "unblock_peer", None)
    if unblock is not None:
        unblock(info.peer_id)


# ---------------------------------------------------------------------------- process


def write_announce_file(path: str | os.PathLike[str], addrs: Sequence[str]) -> None:
    """Write the host's multiaddrs, one a line, atomically.

    Whoever waits for the file (a test, a supervisor) sees it whole or not at all, so
    the file appearing means "ready to serve".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".announce-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(a + "\n" for a in addrs))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _QuietLibp2p(logging.Filter):
    """Drop libp2p's records below ``level``, wherever they were logged.

    Some libp2p modules log on the root logger, so filtering by logger name is not
    enough: records are also recognised by the file they come from.
    """

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level
        self.prefix = os.path.dirname(libp2p.__file__) + os.sep

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = record.name.startswith(("libp2p", "multiaddr", "async_service")) or (
            record.pathname.startswith(self.prefix)
        )
        return record.levelno >= self.level or not noisy


def configure_logging(verbose: int = 0, stream: object = None) -> None:
    """One stderr handler: our INFO lines (DEBUG with -vv), libp2p's only at -vv.

    libp2p logs a dozen harmless "Failed to read DHT message" errors per run and
    more on every peer that disconnects; by default only its CRITICAL records show.
    """
    level = logging.DEBUG if verbose >= 2 else logging.INFO if verbose >= 0 else logging.WARNING
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_QuietLibp2p(logging.DEBUG if verbose >= 3 else logging.CRITICAL))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    # libp2p's own loggers: nothing below WARNING is ever built unless asked for.
    logging.getLogger("libp2p").setLevel(logging.DEBUG if verbose >= 3 else logging.WARNING)
    # No raw lines through the fallback handler (nor its "No handlers" complaint).
    logging.lastResort = logging.NullHandler()


class StopSignal:
    """SIGINT/SIGTERM as an orderly stop.

    The first signal sets ``event`` (the program stops accepting work, answers what is
    in flight and returns); a second one cancels ``scope`` (the impatient Ctrl-C).
    Run ``watch`` in a nursery: ``await nursery.start(stop.watch, nursery.cancel_scope)``.
    """

    def __init__(self) -> None:
        self.event = trio.Event()
        self.signum: int | None = None

    async def watch(
        self,
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                if self.event.is_set():
                    log.warning("second %s: stopping now", signal.Signals(signum).name)
                    scope.cancel()
                    return
                self.signum = signum
                log.info("%s: stopping", signal.Signals(signum).name)
                self.event.set()


def run_main(async_fn: Callable[..., Awaitable[int | None]], *args: object) -> int:
    """``trio.run`` for a CLI: exit status 0 after a signal-driven stop, 130 on a raw
    KeyboardInterrupt (a signal before ``StopSignal.watch`` was installed)."""
    try:
        return int(trio.run(async_fn, *args) or 0)
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------------------- bootstrap peer


async def run_bootstrap_peer(
    key_pair: KeyPair,
    listen_addrs: Sequence[str | Multiaddr] = (DEFAULT_LISTEN,),
    *,
    bootstrap: Sequence[str | Multiaddr] = (),
    announce_file: str | os.PathLike[str] | None = None,
    stop: trio.Event | None = None,
    service: Callable[[IHost, KadDHT], Awaitable[None]] | None = None,
    relay: object = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A DHT peer that helps nodes and verifiers find each other.

    It serves the DHT (provider records) and dial-back checks (hosts asking whether they
    are reachable from outside); with ``relay`` (a ``relay.RelayLimitsConfig``) it also
    relays connections to hosts behind NAT that reserve a slot. ``task_status.started``
    gets its full multiaddrs; with ``announce_file`` they are also written there once
    it serves. Returns when ``stop`` is set (forever without one). ``service``: a task
    run beside the DHT on the same host until then (e.g. the network monitor).
    """
    from specedge.protocol import relay as relaying  # it builds on this module

    stop = stop if stop is not None else trio.Event()
    async with running_host(key_pair, listen_addrs) as host, contextlib.AsyncExitStack() as ext:
        await ext.enter_async_context(relaying.dialback_service(host, _listen_ip(listen_addrs)))
        if relay is not None:
            await ext.enter_async_context(relaying.relay_service(host, relay))
        async with running_dht(host, server=True, bootstrap=bootstrap) as dht:
            addrs = peer_addrs(host)
            for a in addrs:
                print(a, flush=True)
            if announce_file is not None:
                write_announce_file(announce_file, addrs)
            task_status.started(addrs)
            log.info("bootstrap peer %s serving the DHT", host.get_id().to_base58())

            async def add_new_peers() -> None:
                # Peers that dial us are put into the table, so they can find each other:
                # DHT servers only, once identify tells (a DHT client, e.g. a verifier
                # behind NAT, would make every lookup that meets it wait on a dial).
                known: set[ID] = set()
                while True:
                    for pid in host.get_connected_peers():
                        if pid not in known and (kind := _dht_role(host, pid)) is not None:
                            known.add(pid)
                            if kind:
                                await add_to_routing_table(dht, pid)
                    known &= set(host.get_connected_peers())
                    await trio.sleep(0.5)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(add_new_peers)
                if service is not None:
                    nursery.start_soon(service, host, dht)
                await stop.wait()
                nursery.cancel_scope.cancel()


def _dht_role(host: IHost, peer: ID) -> bool | None:
    """True: ``peer`` serves the DHT; False: it does not; None: identify has not told yet."""
    from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL

    try:
        protocols = host.get_peerstore().get_protocols(peer)
    except Exception:
        return None
    return str(KAD_PROTOCOL) in protocols if protocols else None


def _listen_ip(listen_addrs: Sequence[str | Multiaddr]) -> str:
    for a in as_multiaddrs(listen_addrs):
        for proto in ("ip4", "ip6"):
            try:
                return str(a.value_for_protocol(proto))
            except Exception:
                continue
    return "0.0.0.0"


def cmd_bootstrap(
    args: argparse.Namespace, service: Callable[[IHost, KadDHT], Awaitable[None]] | None = None
) -> int:
    """Run a bootstrap peer (and ``service`` beside it) until SIGINT/SIGTERM; exit 0."""
    from specedge.protocol.identity import default_identity_path, load_or_create_identity
    from specedge.protocol.netargs import relay_limits

    configure_logging(args.verbose)
    limits = relay_limits(args) if getattr(args, "relay", False) else None
    key_pair = load_or_create_identity(args.identity or default_identity_path("bootstrap"))

    async def main() -> None:
        stopper = StopSignal()
        async with trio.open_nursery() as nursery:
            await nursery.start(stopper.watch, nursery.cancel_scope)
            await run_bootstrap_peer(
                key_pair, args.listen or [DEFAULT_LISTEN], bootstrap=args.bootstrap,
                announce_file=args.announce_file, stop=stopper.event, service=service,
                relay=limits,
            )
            nursery.cancel_scope.cancel()

    return run_main(main)


def bootstrap_main(argv: list[str] | None = None) -> int:
    """``python -m specedge.protocol.hosts``: the bootstrap peer on its own."""
    parser = argparse.ArgumentParser(prog="specedge bootstrap",
                                     description="Run a DHT-only SpecEdge bootstrap peer.")
    add_bootstrap_args(parser)
    return cmd_bootstrap(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(bootstrap_main())
