"""Command-line options and defaults of the network commands, without importing libp2p.

Importing libp2p costs half a second on an idle machine (two on a busy one); building a
parser for `--help` must not pay it, so what the parsers need lives here and
`specedge.protocol.hosts` takes its defaults from this module.
"""

from __future__ import annotations

import argparse

DEFAULT_LISTEN = "/ip4/0.0.0.0/tcp/4001"
# Provider records live 48 h in py-libp2p and cannot be withdrawn; re-announcing every
# few minutes keeps a record fresh on peers that joined (or restarted) since.
REANNOUNCE_INTERVAL = 300.0


def add_bootstrap_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``specedge bootstrap`` (shared so the CLI stays one line)."""
    parser.add_argument("--listen", action="append", metavar="MULTIADDR",
                        help=f"address to listen on (repeatable; default {DEFAULT_LISTEN})")
    parser.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                        help="another bootstrap peer to join (repeatable)")
    parser.add_argument("--identity", metavar="PATH",
                        help="identity key file (default: the 'bootstrap' key in the user "
                        "data directory; created on first use)")
    parser.add_argument("--announce-file", metavar="PATH",
                        help="write the full multiaddrs here, one a line, once serving")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("--relay", action="store_true",
                        help="also relay connections (circuit relay v2) to verifiers behind "
                        "NAT that reserve a slot here; run it on a public address")
    parser.add_argument("--relay-max-reservations", type=int, default=128, metavar="N",
                        help="peers that may hold a relay slot at once (default: %(default)s)")
    parser.add_argument("--relay-max-circuits", type=int, default=16, metavar="N",
                        help="relayed connections to one slot holder at once (default: "
                        "%(default)s)")
    parser.add_argument("--relay-max-circuit-mb", type=float, default=1024.0, metavar="MB",
                        help="bytes one relayed connection may carry, both ways together; "
                        "it is cut off beyond (default: %(default)g)")
    parser.add_argument("--relay-max-circuit-seconds", type=int, default=3600, metavar="S",
                        help="how long one relayed connection may last (default: %(default)s)")


def relay_limits(args: argparse.Namespace) -> object:
    """The relay limits the ``--relay-*`` options ask for (ValueError when out of range)."""
    from specedge.protocol.relay import RelayLimitsConfig

    if min(args.relay_max_reservations, args.relay_max_circuits,
           args.relay_max_circuit_seconds) < 1 or not args.relay_max_circuit_mb > 0:
        raise ValueError("--relay-* limits must be positive")
    return RelayLimitsConfig(max_reservations=args.relay_max_reservations,
                             max_circuits=args.relay_max_circuits,
                             max_circuit_bytes=int(args.relay_max_circuit_mb * 2**20),
                             max_circuit_seconds=args.relay_max_circuit_seconds)
