"""`specedge monitor` and `specedge bootstrap --monitor`: arguments and entry points.

Nothing heavy is imported until a command runs, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable

DEFAULT_LISTEN = "127.0.0.1:8090"
DEFAULT_REFRESH = 10.0
DEFAULT_P2P_LISTEN = "/ip4/0.0.0.0/tcp/0"  # it only dials out: any free port will do


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.5 <= value <= 3600:
        raise argparse.ArgumentTypeError("the refresh period must be 0.5 to 3600 seconds")
    return value


def add_monitor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", action="append", required=True, metavar="MULTIADDR",
                   help="bootstrap peer the crawl starts from (repeatable; full multiaddr "
                   "ending in /p2p/<peer id>)")
    p.add_argument("--ledger", metavar="URL",
                   help="ledger for the leaderboard, cost and throughput plot: an SQLite "
                   "file or postgresql://... (read only; without it, no leaderboard)")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help="web server address (default %(default)s; 0.0.0.0:PORT to publish "
                   "it; port 0 picks a free one)")
    p.add_argument("--refresh", type=positive_seconds, default=DEFAULT_REFRESH, metavar="S",
                   help="seconds between crawls; the page refreshes as often, so a dead "
                   "verifier leaves it within about a period (default %(default)g)")
    p.add_argument("--model", action="append", default=[], metavar="ID",
                   help="also look up DHT providers of this model id (repeatable; models "
                   "any verifier advertises are looked up anyway)")
    p.add_argument("--p2p-listen", action="append", metavar="MULTIADDR",
                   help=f"libp2p listen address (default {DEFAULT_P2P_LISTEN})")
    p.add_argument("--identity", metavar="PATH",
                   help="identity key file (default: a fresh key each run; a monitor needs "
                   "no lasting identity)")
    p.add_argument("--announce-file", metavar="PATH",
                   help="write the page's URL here once serving")
    p.add_argument("-v", "--verbose", action="count", default=0)


def add_bootstrap_monitor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--monitor", metavar="HOST:PORT",
                   help="also serve the network monitor (`specedge monitor`'s page and "
                   "/api/state) here, crawling from this peer's routing table")
    p.add_argument("--monitor-ledger", metavar="URL",
                   help="ledger for the monitor's leaderboard (as `specedge monitor --ledger`)")
    p.add_argument("--monitor-refresh", type=positive_seconds, default=DEFAULT_REFRESH,
                   metavar="S", help="the monitor's refresh period (default %(default)g)")


def _config(listen: str, refresh: float, ledger: str | None, models: list[str],
            announce_file: str | None = None):  # noqa: ANN202 (server.MonitorConfig)
    """A checked MonitorConfig: ValueError now, not inside the event loop."""
    from specedge.monitor.leaderboard import open_readonly
    from specedge.monitor.server import MonitorConfig, parse_listen

    if ledger:
        open_readonly(ledger).close()  # a missing file or a bad URL fails here
    return MonitorConfig(listen=parse_listen(listen), refresh=refresh, ledger=ledger,
                         models=list(models), announce_file=announce_file)


def cmd_monitor(args: argparse.Namespace) -> int:
    """Run the monitor until SIGINT/SIGTERM; exit status 0 (2 on a bad argument)."""
    import trio
    from libp2p.crypto.ed25519 import create_new_key_pair

    from specedge.monitor.server import standalone
    from specedge.protocol import hosts
    from specedge.protocol.identity import load_or_create_identity

    hosts.configure_logging(args.verbose)
    for a in args.bootstrap:
        hosts.parse_peer_addr(a)  # ValueError names the bad one
    config = _config(args.listen, args.refresh, args.ledger, args.model, args.announce_file)
    key_pair = load_or_create_identity(args.identity) if args.identity else create_new_key_pair()

    async def main() -> None:
        stopper = hosts.StopSignal()
        async with trio.open_nursery() as nursery:
            await nursery.start(stopper.watch, nursery.cancel_scope)
            await standalone(key_pair, args.bootstrap, args.p2p_listen or [DEFAULT_P2P_LISTEN],
                             config, stopper.event)
            nursery.cancel_scope.cancel()

    return _run(main, hosts.run_main)


def _run(main: Callable[[], Awaitable[None]], run_main: Callable[..., int]) -> int:
    """run_main, with a port already in use said in one line instead of a traceback."""
    failed: BaseException | None = None
    try:
        return run_main(main)
    except* OSError as group:
        failed = group
        while isinstance(failed, BaseExceptionGroup):  # nurseries nest the one OSError
            failed = failed.exceptions[0]
    print(f"specedge monitor: error: {failed}", file=sys.stderr)
    return 2


def bootstrap_service(args: argparse.Namespace):  # noqa: ANN201
    """The service ``specedge bootstrap --monitor`` runs beside the DHT, or None."""
    if not getattr(args, "monitor", None):
        return None
    from specedge.monitor import server

    config = _config(args.monitor, args.monitor_refresh, args.monitor_ledger, [])
    return server.bootstrap_service(config)
