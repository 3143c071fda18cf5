"""Can nodes reach this verifier, and how: the verifier operator's view of NAT.

At start (and every ``RECHECK_INTERVAL`` after) the verifier asks its bootstrap peers to
dial it back on its listen ports from a host of theirs that has no connection to it
(``specedge.protocol.relay.DialBackServer``). When one gets through, the verifier is
reachable directly. When none does (or none can tell), it reserves slots on two relays
(``--relay``, or else the bootstrap peers that relay), advertises
``<relay>/p2p-circuit/p2p/<self>`` beside its own addresses (identify, the DHT provider
record, the announce file), and keeps the slots, replacing one whose relay goes away.
Nodes connect through a relay; DCUtR then tries to turn each relayed
connection into a direct one (hole punching) where the two NATs allow it.

The status says it in plain words, in the log when it changes and, with
``--status-file``, as JSON rewritten every ``STATUS_INTERVAL`` seconds: reachable
directly (at which address), through which relay, or not at all, and what to forward
on the router to be reachable directly. It also lists how each connected peer reaches
us (direct or relayed), which is how a hole punch shows.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio
from libp2p.abc import IHost

from specedge.protocol import hosts, relay

log = logging.getLogger("specedge.verifier.reach")

RECHECK_INTERVAL = 600.0  # seconds between dial-back checks (a port forwarded later)
STATUS_INTERVAL = 2.0
MODES = ("auto", "public", "private")


@dataclass
class ReachConfig:
    mode: str = "auto"  # auto: the dial-back decides; public: never relay; private: always
    relays: list[str] = field(default_factory=list)  # default: the bootstrap peers
    upnp: bool = False
    hole_punch: bool = True
    status_file: str | None = None


class Reach:
    """Reachability of one verifier host (see the module docstring)."""

    def __init__(self, config: ReachConfig, bootstrap: list[str],
                 provided: hosts.ProvideStatus | None = None) -> None:
        if config.mode not in MODES:
            raise ValueError(f"reachability mode must be one of {MODES}, not {config.mode!r}")
        self.config = config
        self.bootstrap = bootstrap
        self.provided = provided
        self.state = "checking"  # direct | relayed | unreachable | checking
        self.dialback = "not asked yet"
        self.direct_addr = ""
        self.reservations: relay.Reservations | None = None
        self.host: IHost | None = None
        self.on_mode: Callable[[bool], None] = lambda server: None  # DHT server or client
        self._said = ""

    # -- running -------------------------------------------------------------------

    @asynccontextmanager
    async def running(self, host: IHost, on_change: Callable[[], None] = lambda: None
                      ) -> AsyncIterator[None]:
        """Decide (dial-back, reservation) before yielding, so the first DHT record
        already carries the relayed address; keep it all up until the block ends."""
        self.host = host
        await hosts.connect_bootstrap(host, self.bootstrap)  # the dial-back asks them
        async with relay.relay_client(host, hole_punch=self.config.hole_punch):
            relay.advertise_also(host, self._circuit_addrs)
            async with trio.open_nursery() as nursery:
                relays = self._relay_infos()
                self.reservations = relay.Reservations(host, relays, on_change=lambda: (
                    self._update(), on_change()))
                await self._check()
                if self.state != "direct" and self.config.mode != "public":
                    await nursery.start(self.reservations.run)
                self._update()
                nursery.start_soon(self._recheck)
                nursery.start_soon(self._write_status_forever)
                yield
                nursery.cancel_scope.cancel()

    @property
    def dht_server(self) -> bool:
        """Answer DHT queries only when reachable directly (as go-libp2p does): a DHT
        server behind NAT makes every lookup that meets it wait on a dial that fails."""
        return self.state == "direct"

    def _circuit_addrs(self) -> list:
        res = self.reservations
        return list(res.addrs) if res is not None and self.state != "direct" else []

    def _relay_infos(self) -> list:
        infos = []
        for a in self.config.relays or self.bootstrap:
            try:
                infos.append(hosts.parse_peer_addr(a))
            except ValueError as exc:
                log.warning("relay: %s", exc)
        return infos

    async def _check(self) -> None:
        """Ask the bootstrap peers to dial us back (mode auto); set ``state``."""
        if self.config.mode == "public":
            self.state, self.dialback = "direct", "not checked (--reachability public)"
            return
        if self.config.mode == "private":
            self.dialback = "not checked (--reachability private)"
            self.state = "unreachable"
            return
        ports = self.listen_ports()
        verdicts = []
        for info in self._bootstrap_infos():
            ok, why = await relay.ask_dialback(self.host, info.peer_id, ports)
            verdicts.append(why)
            if ok is not None:
                self.dialback = (f"{info.peer_id} dialled back {why}" if ok else
                                 f"{info.peer_id} could not dial back TCP port(s) "
                                 f"{', '.join(map(str, ports))}")
                self.direct_addr = why if ok else ""
                self.state = "direct" if ok else "unreachable"
                return
        self.dialback = "no bootstrap peer could tell: " + ("; ".join(verdicts) or "none")
        self.state = "unreachable"  # unknown is treated as unreachable: take a relay too

    def _bootstrap_infos(self) -> list:
        out = []
        for a in self.bootstrap:
            try:
                out.append(hosts.parse_peer_addr(a))
            except ValueError:
                continue
        return out

    async def _recheck(self) -> None:
        while True:
            await trio.sleep(RECHECK_INTERVAL)
            before = self.state
            await self._check()
            if self.state != "direct" and before == "direct" and self.reservations is not None:
                await self.reservations.fill()
            self._update()
            if (before == "direct") != (self.state == "direct"):
                self.on_mode(self.dht_server)  # a port forwarded (or closed) since

    def _update(self) -> None:
        if self.state != "direct":
            res = self.reservations
            self.state = "relayed" if res is not None and res.slots else "unreachable"
        text = self.summary()
        if text != self._said:
            log.info("reachability: %s", text)
            self._said = text

    # -- reporting -----------------------------------------------------------------

    def listen_ports(self) -> list[int]:
        ports = []
        for a in self.host.get_transport_addrs() if self.host else []:
            try:
                port = int(a.value_for_protocol("tcp"))
            except Exception:
                continue
            if port not in ports:
                ports.append(port)
        return ports

    def advice(self) -> str:
        """What to do on the router to be reachable directly (empty when already)."""
        if self.state == "direct":
            return ""
        ports = self.listen_ports() or [4001]
        local = self._local_ip()
        return (f"to be reachable directly, forward TCP port {ports[0]} on your router to "
                f"this machine ({local}:{ports[0]}), or run with --upnp if the router "
                "supports UPnP")

    def _local_ip(self) -> str:
        for a in self.host.get_transport_addrs() if self.host else []:
            try:
                ip = a.value_for_protocol("ip4")
            except Exception:
                continue
            if ip not in ("0.0.0.0", "127.0.0.1"):
                return str(ip)
        return "this machine's LAN address"

    def summary(self) -> str:
        """The status in one sentence an operator can act on."""
        if self.state == "direct":
            return f"reachable directly ({self.dialback})"
        res = self.reservations
        if self.state == "relayed" and res is not None and res.slots:
            return (f"not reachable directly ({self.dialback}); reachable through relay "
                    f"{', '.join(str(p) for p in res.slots)} at "
                    f"{', '.join(map(str, res.addrs))}; {self.advice()}")
        why = res.last_error if res is not None and res.last_error else "no relay known"
        return (f"NOT reachable: not directly ({self.dialback}) and no relay slot ({why}); "
                f"{self.advice()}")

    def status(self) -> dict[str, object]:
        res = self.reservations
        host = self.host
        peers = {}
        if host is not None:
            for pid in host.get_connected_peers():
                peers[pid.to_base58()] = relay.connection_path(host, pid)
        upnp = getattr(host, "upnp", None)
        return {
            "reachability": self.state,
            "summary": self.summary(),
            "dialback": self.dialback,
            "direct_addr": self.direct_addr,
            "relays": [] if res is None else [{
                "peer": peer.to_base58(),
                "addrs": [str(a) for a in slot.addrs],
                "expires_in_s": round(slot.expires - time.time()),
            } for peer, slot in res.slots.items()],
            "advice": self.advice(),
            "upnp": None if upnp is None else {"external_ip": upnp.get_external_ip()},
            "addrs": [str(a) for a in host.get_addrs()] if host is not None else [],
            "dht": self.provided.as_dict() if self.provided is not None else None,
            "connections": peers,
        }

    def write_status(self) -> None:
        path = self.config.status_file
        if not path:
            return
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(self.status(), indent=1) + "\n")
        os.replace(tmp, path)

    async def _write_status_forever(self) -> None:
        while True:
            self._update()
            try:
                self.write_status()
            except OSError as exc:
                log.warning("cannot write the status file: %s", exc)
            await trio.sleep(STATUS_INTERVAL)
