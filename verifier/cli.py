"""`specedge-verifier serve`: run a verifier host until SIGINT/SIGTERM (then exit 0)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16", "auto")
log = logging.getLogger("specedge.verifier")


def build_parser() -> argparse.ArgumentParser:
    from specedge.protocol.limits import ADMIT_WAIT, BATCH_WAIT, IDLE_TIMEOUT, MAX_TREE_TOKENS
    from specedge.protocol.netargs import DEFAULT_LISTEN, REANNOUNCE_INTERVAL

    parser = argparse.ArgumentParser(
        prog="specedge-verifier",
        description="SpecEdge verifier host: verifies drafts from many edge nodes in "
        "batched forward passes of the target model and signs receipts.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve verifications on the network")
    p.add_argument("--model", required=True,
                   help="target model: preset (tiny-test, qwen2.5-coder-1.5b), HF id, folder "
                   "or .gguf")
    p.add_argument("--model-id", help="model id announced and required in OpenSession "
                   "(default: --model)")
    p.add_argument("--revision", default="",
                   help="model revision announced; sessions naming another are refused")
    p.add_argument("--listen", action="append", metavar="MULTIADDR",
                   help=f"listen address (repeatable; default {DEFAULT_LISTEN})")
    p.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                   help="bootstrap peer to join the DHT through (repeatable)")
    p.add_argument("--no-dht", action="store_true",
                   help="do not join the DHT (direct dialling only)")
    p.add_argument("--reannounce", type=float, default=REANNOUNCE_INTERVAL, metavar="SECONDS",
                   help="DHT provider re-announce interval (default: %(default)s)")
    p.add_argument("--reachability", choices=("auto", "public", "private"), default="auto",
                   help="auto: ask the bootstrap peers to dial back, and reserve a relay slot "
                   "when they cannot; public: never use a relay; private: always (default: "
                   "%(default)s; see 'Running a verifier behind NAT' in the README)")
    p.add_argument("--relay", action="append", default=[], dest="relays", metavar="MULTIADDR",
                   help="relay to reserve a slot on when not reachable directly (repeatable, "
                   "tried in order; default: the bootstrap peers that relay)")
    p.add_argument("--upnp", action="store_true",
                   help="ask the router (UPnP IGD) to forward the listen port")
    p.add_argument("--no-hole-punch", action="store_true",
                   help="keep relayed connections relayed (no DCUtR hole punching)")
    p.add_argument("--status-file", metavar="PATH",
                   help="keep a JSON status here (reachability, relay, what to forward, the "
                   "DHT record, how each peer is connected), rewritten every 2 s")
    p.add_argument("--identity", metavar="PATH",
                   help="identity key file (default: the 'verifier' key in the user data "
                   "directory; created on first use)")
    p.add_argument("--ledger", metavar="URL",
                   help="ledger database: SQLite path or URL, or postgresql://... (default: "
                   "an SQLite file in the user data directory)")
    p.add_argument("--spool-dir", metavar="PATH",
                   help="where receipts wait while the ledger database is down (default: "
                   "verifier-spool in the user data directory)")
    p.add_argument("--no-ledger", action="store_true",
                   help="do not write receipts to a ledger (benchmarks)")
    p.add_argument("--metrics-port", type=int, metavar="N",
                   help="serve Prometheus metrics on http://127.0.0.1:N/metrics")
    p.add_argument("--announce-file", metavar="PATH",
                   help="write the full multiaddrs here, one a line, once ready to serve")
    p.add_argument("--max-batch-tokens", type=int, default=1024, metavar="N",
                   help="rows per forward pass, trees and prefill chunks together "
                   "(default: %(default)s)")
    p.add_argument("--max-tree-tokens", type=int, default=64, metavar="N",
                   help=f"largest tree a request may carry (default: %(default)s; at most "
                   f"{MAX_TREE_TOKENS} and below --max-batch-tokens)")
    p.add_argument("--batch-wait", type=float, default=BATCH_WAIT, metavar="PASSES",
                   help="hold a free engine for sessions whose next request is due within "
                   "this many mean passes, so they share one pass instead of taking one "
                   "each (more server throughput, a little latency while sessions fall "
                   "into step); 0 never holds (default: %(default)s)")
    p.add_argument("--admit-wait", type=float, default=ADMIT_WAIT, metavar="SECONDS",
                   help="refuse a new session at once with BUSY and a retry-after when its "
                   "prefill could not start within this many seconds (queued prompt tokens "
                   "over the measured prefill speed); the node then tries another verifier "
                   "or comes back (default: %(default)s)")
    p.add_argument("--test-pass-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--no-cost-probe", action="store_true",
                   help="skip measuring the pass cost by rows at start (a few seconds); nodes "
                   "then size dynamic trees to their budget")
    p.add_argument("--no-standing", action="store_true",
                   help="serve requests first come, first served, whatever the node's standing "
                   "(by default, under load, nodes with earned credit go first and the last "
                   "quarter of the session slots is kept for them; see the README)")
    p.add_argument("--standing-boost", type=float, default=1.0, metavar="PASSES",
                   help="head start in the queue per doubling of a node's standing over the "
                   "starting grant, in mean passes (default: %(default)s)")
    p.add_argument("--accept-standing-from", action="append", default=[], metavar="PEER_ID",
                   help="count standing statements signed by this verifier (repeatable; "
                   "advertised, so nodes know which statements to present)")
    p.add_argument("--kv-cache-gb", type=float, metavar="GB",
                   help="memory for sessions' KV cache, shared prefix blocks and cached "
                   "blocks of past sessions; a session that would not fit is refused BUSY "
                   "(default: half the memory free after loading the model)")
    p.add_argument("--kv-host-gb", type=float, default=0.0, metavar="GB",
                   help="with a GPU: host RAM for blocks evicted from the GPU (default: 0)")
    p.add_argument("--kv-disk-dir", metavar="PATH",
                   help="keep evicted KV blocks in this folder (checksummed) and restore "
                   "them for later turns, when reading one is faster than recomputing it "
                   "(measured at start)")
    p.add_argument("--kv-disk-gb", type=float, default=10.0, metavar="GB",
                   help="disk space for KV blocks (default: %(default)s)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="no KV reuse between sessions: every prompt is prefilled in full")
    p.add_argument("--prefill-chunk", type=int, default=256, metavar="N",
                   help="prompt rows prefilled per pass and session (default: %(default)s)")
    p.add_argument("--max-sessions", type=int, default=64, metavar="N",
                   help="sessions open at once (default: %(default)s)")
    p.add_argument("--max-sessions-per-peer", type=int, default=16, metavar="N",
                   help="sessions one peer may hold (default: %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT, metavar="SECONDS",
                   help="a session without a request this long is closed (default: "
                   "%(default)s)")
    p.add_argument("--drain-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="on shutdown, how long rounds in flight may still finish "
                   "(default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default: cpu)")
    p.add_argument("--engine", choices=("torch", "llama.cpp", "auto"), default="torch",
                   help="torch: the model in --dtype (bit-exact in float32; GPUs, CPUs with "
                   "native bf16); llama.cpp: the model's GGUF file as it is (quantised "
                   "weights; fastest on CPUs without bf16, needs the 'llama' extra); auto: "
                   "measure the pass cost of each one this machine can run for a few "
                   "seconds and serve with the fastest (default: %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="torch weights and compute dtype; auto: measure float32 and "
                   "bfloat16 and keep the faster (default: float32, the bit-exact one)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for the engine (default: torch's choice; llama.cpp: "
                   "the physical cores)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="-v: debug lines of the verifier; -vvv: libp2p's too")
    p.set_defaults(func=cmd_serve)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    from specedge.protocol.limits import MAX_BATCH_TOKENS, MAX_TREE_TOKENS

    if not 2 <= args.max_batch_tokens <= MAX_BATCH_TOKENS:
        raise ValueError(f"--max-batch-tokens must be in [2, {MAX_BATCH_TOKENS}]")
    if not 1 <= args.max_tree_tokens <= min(MAX_TREE_TOKENS, args.max_batch_tokens - 1):
        raise ValueError("--max-tree-tokens must be in [1, min(1024, --max-batch-tokens - 1)]")
    if args.engine != "torch" and args.max_tree_tokens > LLAMA_MAX_TREE:
        raise ValueError(f"--max-tree-tokens must be at most {LLAMA_MAX_TREE} with the "
                         "llama.cpp engine (a tree's leaves each take a sequence)")
    if args.dtype == "auto" and args.engine == "llama.cpp":
        raise ValueError("--dtype applies to the torch engine; llama.cpp runs the GGUF's "
                         "own weight types")
    if args.prefill_chunk < 1:
        raise ValueError("--prefill-chunk must be positive")
    if args.max_sessions < 1 or args.max_sessions_per_peer < 1:
        raise ValueError("session limits must be positive")
    if not 0 <= args.batch_wait <= 4:
        raise ValueError("--batch-wait must be in [0, 4] (mean passes)")
    if not args.admit_wait > 0:
        raise ValueError("--admit-wait must be positive")
    for name in ("kv_cache_gb", "kv_disk_gb"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.kv_host_gb < 0:
        raise ValueError("--kv-host-gb must be >= 0")
    if not 0 <= args.standing_boost <= 100:
        raise ValueError("--standing-boost must be in [0, 100] (mean passes)")
    from specedge.protocol.hosts import parse_peer_id

    for peer in args.accept_standing_from:
        parse_peer_id(peer)


LLAMA_MAX_TREE = 128  # the llama.cpp engine's temporary sequences (llama_engine.py)


# glibc's mallopt parameter for the number of malloc arenas (malloc.h: M_ARENA_MAX).
_M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for this process; False where that is not glibc.

    Model compute and ledger writes run in worker threads, and trio hands work to
    whichever cached thread is free; glibc gives threads their own arenas (up to 8 per
    core) and each keeps the memory it freed. Under load with long sessions, whose KV
    caches grow and are freed in ever new sizes, the idle daemon's RSS climbed round
    after round of 32 such sessions (505, 516, 531 MB after three); with two arenas it
    stayed flat (505, 505, 503, 500 MB after four; tests/test_load.py, slow).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    limit_malloc_arenas()  # first: before torch or anything else starts threads
    import torch
    import trio

    from specedge.protocol import hosts
    from specedge.protocol.identity import default_identity_path, load_or_create_identity
    from specedge.verifier import engines
    from specedge.verifier.host import Verifier
    from specedge.verifier.metrics import VerifierMetrics

    hosts.configure_logging(args.verbose)
    if args.verbose < 2:  # the ledger's migrations announce themselves at INFO
        logging.getLogger("alembic").setLevel(logging.WARNING)
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    key_pair = load_or_create_identity(args.identity or default_identity_path("verifier"))
    engine = engines.build(args)
    engine.tree_slack = args.max_tree_tokens + 1
    pass_costs = [] if args.no_cost_probe else _probe(engine, args)
    engine.extra_pass_seconds = args.test_pass_delay
    log.info("model %s loaded (%s on %s); batched results %s one-session results bit for bit",
             args.model, engine.name, args.device, "reproduce" if engine.exact else
             "may differ in the last bits from")
    config = verifier_config(args, engine, pass_costs)
    metrics = VerifierMetrics()
    if args.metrics_port is not None:
        port = metrics.serve(args.metrics_port)
        log.info("metrics on http://127.0.0.1:%d/metrics", port)
    ledger = None if args.no_ledger else _ledger(args)
    verifier = Verifier(engine, key_pair, config, ledger, metrics)

    async def main() -> None:
        stopper = hosts.StopSignal()
        async with trio.open_nursery() as nursery:
            await nursery.start(stopper.watch, nursery.cancel_scope)
            await verifier.serve(stopper.event)
            nursery.cancel_scope.cancel()

    try:
        return hosts.run_main(main)
    finally:
        if ledger is not None:
            ledger.close()


def verifier_config(args: argparse.Namespace, engine: object,
                    pass_costs: list[tuple[int, int]]) -> object:
    """The Verifier's settings from the command line and the engine it serves with."""
    from specedge.protocol import hosts
    from specedge.verifier.host import VerifierConfig
    from specedge.verifier.reach import ReachConfig

    return VerifierConfig(
        model_id=args.model_id or args.model,
        vocab_size=engine.vocab_size,
        max_context_tokens=engine.max_context,
        revision=args.revision,
        listen=args.listen or [hosts.DEFAULT_LISTEN],
        bootstrap=args.bootstrap,
        max_batch_tokens=args.max_batch_tokens,
        max_tree_tokens=args.max_tree_tokens,
        batch_wait=args.batch_wait,
        admit_wait=args.admit_wait,
        rank_by_standing=not args.no_standing,
        standing_boost=args.standing_boost,
        accept_standing_from=args.accept_standing_from,
        max_sessions=args.max_sessions,
        max_sessions_per_peer=args.max_sessions_per_peer,
        idle_timeout=args.idle_timeout,
        drain_timeout=args.drain_timeout,
        announce_file=args.announce_file,
        dht=not args.no_dht,
        reannounce_interval=args.reannounce,
        reach=ReachConfig(mode=args.reachability, relays=args.relays, upnp=args.upnp,
                          hole_punch=not args.no_hole_punch, status_file=args.status_file),
        pass_costs=pass_costs,
    )


def _ledger(args: argparse.Namespace) -> object:
    """The verifier's ledger, spooling receipts to disk while the database is away."""
    import platformdirs

    from specedge.ledger import SpoolingLedger

    spool = Path(args.spool_dir) if args.spool_dir else (
        platformdirs.user_data_path("specedge") / "verifier-spool")
    ledger = SpoolingLedger(args.ledger, spool)
    ledger.start_background_flush()
    return ledger


def _probe(engine: object, args: argparse.Namespace) -> list[tuple[int, int]]:
    """The engine's pass cost by rows up to the largest tree (plus its root), for nodes."""
    from specedge.verifier.costprobe import measure_pass_costs

    costs = measure_pass_costs(engine, engine.vocab_size, args.max_tree_tokens + 1)
    log.info("pass cost by rows: %s", ", ".join(f"{r}: {us / 1000:.1f} ms" for r, us in costs))
    return costs


def kv_store(model: object, args: argparse.Namespace) -> object:
    """The KV block store: its memory budget, and a disk tier when asked and worth it."""
    from specedge.kvblocks import DiskTier, disk_pays, store_for

    budget = int(args.kv_cache_gb * 2**30) if args.kv_cache_gb else _free_memory(args.device) // 2
    store = store_for(model, budget, model_id=args.model_id or args.model,
                          enabled=not args.no_prefix_cache,
                          host_budget_bytes=int(args.kv_host_gb * 2**30))
    log.info("KV memory: %.1f MiB (%.1f KiB per token, blocks of %d tokens)%s",
             budget / 2**20, store.row_bytes / 1024, store.block,
             "; prefix reuse off" if args.no_prefix_cache else "")
    if args.kv_disk_dir and not args.no_prefix_cache:
        if disk_pays(model, Path(args.kv_disk_dir), store.block_bytes, store.block):
            store.disk = DiskTier(Path(args.kv_disk_dir), int(args.kv_disk_gb * 2**30),
                                  store.key)
    return store


def _free_memory(device: str) -> int:
    """Bytes free on `device` now (after the model is loaded)."""
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil

    return int(psutil.virtual_memory().available)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from specedge.errors import ModelError
    from specedge.protocol.identity import IdentityError

    try:
        return args.func(args)
    except (ModelError, IdentityError, ValueError) as exc:
        print(f"specedge-verifier: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
