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
