"""The monitor at work: a crawl every refresh period, the ledger read as often, and the
web page and JSON API served from the same trio loop (hypercorn's trio worker).

It runs on its own libp2p host (``specedge monitor``) or inside a bootstrap peer
(``specedge bootstrap --monitor``), whose routing table is then the crawl's start.
Nothing a peer does can stop it: a crawl that fails is logged and the next one runs;
the ledger being down shows as a warning on the page.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources

import trio
from libp2p.abc import IHost
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.peer.peerinfo import PeerInfo
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from specedge.ledger import Ledger
from specedge.monitor.cli import DEFAULT_LISTEN, DEFAULT_REFRESH
from specedge.monitor.crawl import crawl_once
from specedge.monitor.leaderboard import open_readonly, read_board
from specedge.monitor.page import render_live, render_page
from specedge.monitor.state import Swarm
from specedge.protocol import hosts

log = logging.getLogger("specedge.monitor")

# Defence in depth behind the escaping: no inline script or style runs, nothing loads
# from anywhere but the monitor, and the page cannot be framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
LEDGER_PERIOD = 10.0  # seconds between leaderboard reads, at least
STATIC = {"monitor.css": "text/css; charset=utf-8",
          "monitor.js": "text/javascript; charset=utf-8",
          "favicon.svg": "image/svg+xml"}


@dataclass
class MonitorConfig:
    listen: str = DEFAULT_LISTEN  # HOST:PORT of the web server (port 0 picks one)
    refresh: float = DEFAULT_REFRESH  # seconds between crawls and page refreshes
    ledger: str | None = None  # ledger URL for the leaderboard
    models: list[str] = field(default_factory=list)  # looked up even if nobody names them
    announce_file: str | None = None  # the page's URL is written here once serving


# ---------------------------------------------------------------------------- web


def make_app(swarm: Swarm) -> Starlette:
    """``/`` (the page), ``/fragment`` (its live part), ``/api/state`` (JSON), static files."""
    static = {name: resources.files("specedge.monitor").joinpath(name).read_text()
              for name in STATIC}

    def headers(extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**SECURITY_HEADERS, **(extra or {})}

    async def page(request: Request) -> Response:
        return HTMLResponse(render_page(swarm.snapshot()), headers=headers())

    async def fragment(request: Request) -> Response:
        return HTMLResponse(render_live(swarm.snapshot()), headers=headers())

    async def state(request: Request) -> Response:
        # Public and read-only: any page may read it (a dashboard elsewhere, a script).
        return JSONResponse(swarm.snapshot(),
                            headers=headers({"Access-Control-Allow-Origin": "*"}))

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in static:
            return Response("not found", 404, headers=headers())
        # no-cache: a browser asks again each load, so an upgraded monitor's style and
        # script apply at once (they are a few kilobytes).
        return Response(static[name], media_type=STATIC[name],
                        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    return Starlette(routes=[
        Route("/", page, methods=["GET"]),
        Route("/fragment", fragment, methods=["GET"]),
        Route("/api/state", state, methods=["GET"]),
        Route("/static/{name}", asset, methods=["GET"]),
    ])


async def serve_http(app: Starlette, bind: str, *,
                     task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` at ``bind`` until cancelled; ``task_status`` gets the base URL
    (e.g. http://127.0.0.1:8090, with the port chosen when ``bind`` asked for port 0)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [bind]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 1.0

    async def run(task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(app, config, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(run)
        task_status.started(binds[0])


def parse_listen(text: str) -> str:
    """Check a HOST:PORT (ValueError naming the problem); IPv6 hosts in brackets."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen wants HOST:PORT (e.g. {DEFAULT_LISTEN}), not {text!r}")
    return text


# ---------------------------------------------------------------------------- loops


async def crawl_forever(host: IHost, dht: KadDHT | None, swarm: Swarm,
                        start: Callable[[], Sequence[PeerInfo]], models: Sequence[str],
                        refresh: float) -> None:
    """A crawl every ``refresh`` seconds (back to back when one takes longer)."""
    while True:
        began = trio.current_time()
        try:
            crawl = await crawl_once(host, dht, list(start()), set(models) | swarm.models(),
                                     swarm.known())
            swarm.apply(crawl)
            log.debug("crawl: %d peers walked, %d asked, %.2f s", crawl.walked,
                      len(crawl.answers), crawl.seconds)
        except Exception:  # a bug or a libp2p surprise: the page must stay up
            log.exception("crawl failed; the next one starts in %g s", refresh)
        await trio.sleep_until(began + refresh)


async def ledger_forever(ledger: Ledger, swarm: Swarm, refresh: float) -> None:
    """The leaderboard, read again every ``refresh`` seconds (in a worker thread)."""
    while True:
        try:
            swarm.ledger = await trio.to_thread.run_sync(read_board, ledger,
                                                         abandon_on_cancel=True)
        except Exception as exc:  # database down, locked, an old schema
            doc = dict(swarm.ledger or {})
            doc["error"] = f"cannot read the ledger: {type(exc).__name__}: {exc}"[:300]
            swarm.ledger = doc
            log.warning("%s", doc["error"])
        await trio.sleep(refresh)


async def run_monitor(host: IHost, dht: KadDHT | None, config: MonitorConfig,
                      start: Callable[[], Sequence[PeerInfo]], *,
                      task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Crawl, read the ledger and serve the page until cancelled.

    ``start``: the peers each crawl starts from (called every time, so a bootstrap
    peer's growing routing table is used). ``task_status`` gets the page's URL.
    """
    ledger = open_readonly(config.ledger) if config.ledger else None
    swarm = Swarm(config.refresh, peer_id=host.get_id().to_base58())
    if ledger is not None:
        swarm.ledger = {"error": "reading the ledger for the first time"}
    try:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve_http, make_app(swarm), config.listen)
            nursery.start_soon(crawl_forever, host, dht, swarm, start, config.models,
                               config.refresh)
            if ledger is not None:  # it scans every receipt: not more than every 10 s
                nursery.start_soon(ledger_forever, ledger, swarm,
                                   max(config.refresh, LEDGER_PERIOD))
            print(f"monitor: {url}/", flush=True)
            if config.announce_file:
                hosts.write_announce_file(config.announce_file, [f"{url}/"])
            log.info("monitor serving %s/ (crawl every %g s)", url, config.refresh)
            task_status.started(url)
    finally:
        if ledger is not None:
            ledger.close()


def connected_peers(host: IHost) -> list[PeerInfo]:
    """The peers this host is connected to, with their known addresses."""
    store = host.get_peerstore()
    out = []
    for pid in host.get_connected_peers():
        try:
            out.append(PeerInfo(pid, store.addrs(pid)))
        except Exception:  # no addresses known: dialled us, nothing to redial
            out.append(PeerInfo(pid, []))
    return out


def bootstrap_service(config: MonitorConfig) -> Callable[[IHost, KadDHT], Awaitable[None]]:
    """The monitor as a service of a bootstrap peer (``specedge bootstrap --monitor``):
    each crawl starts from the bootstrap's routing table and connections."""

    async def service(host: IHost, dht: KadDHT) -> None:
        def start() -> list[PeerInfo]:
            return dht.routing_table.get_peer_infos() + connected_peers(host)

        await run_monitor(host, dht, config, start)

    return service


async def standalone(key_pair: object, bootstrap: Sequence[str], p2p_listen: Sequence[str],
                     config: MonitorConfig, stop: trio.Event) -> None:
    """``specedge monitor``: its own host and DHT client, until ``stop`` is set."""
    boot = [hosts.parse_peer_addr(a) for a in bootstrap]
    async with hosts.running_host(key_pair, p2p_listen) as host:  # type: ignore[arg-type]
        async with hosts.running_dht(host, server=False, bootstrap=bootstrap) as dht:
            def start() -> list[PeerInfo]:
                return boot + dht.routing_table.get_peer_infos()

            async with trio.open_nursery() as nursery:
                await nursery.start(run_monitor, host, dht, config, start)
                await stop.wait()
                nursery.cancel_scope.cancel()
