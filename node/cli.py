"""`specedge-node`: what a volunteer with a GPU runs.

    specedge-node generate --bootstrap ADDR --prompt TEXT [--json]   one generation
    specedge-node join --bootstrap ADDR [--api 127.0.0.1:8000]       stay up, serve the API

Both draft locally and verify on the network. Errors a user can fix (a bad or dead
bootstrap address, no verifier for the model, a vocabulary mismatch, bad parameters)
end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

from specedge.cli import DTYPES, add_sampling_args, torch_dtype, tree_shape
from specedge.treeshape import DEFAULT_TREE, TreeShape

if TYPE_CHECKING:  # the real imports are deferred: they cost seconds
    from libp2p.crypto.keys import KeyPair

    from specedge.node.discovery import VerifierPool
    from specedge.node.edge import Models

log = logging.getLogger("specedge.node")

DEFAULT_API = "127.0.0.1:8000"
DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"


def add_network_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                   help="bootstrap peer, /ip4/.../tcp/.../p2p/<id> (repeatable)")
    p.add_argument("--verifier", action="append", default=[], metavar="MULTIADDR",
                   help="a verifier to use directly, besides those found (repeatable)")
    p.add_argument("--mdns", action="store_true", help="also look for verifiers on the LAN")
    p.add_argument("--listen", action="append", metavar="MULTIADDR",
                   help=f"libp2p listen address (default {DEFAULT_LISTEN}: the node only "
                   "dials out)")
    p.add_argument("--identity", metavar="PATH",
                   help="node key file (default: the 'node' key in the user data directory)")
    p.add_argument("--ledger", metavar="PATH",
                   help="where to keep receipts (default: node.sqlite3 in the user data "
                   "directory)")
    p.add_argument("--no-ledger", action="store_true", help="check receipts but keep none")
    p.add_argument("--silence-timeout", type=float, default=10.0, metavar="S",
                   help="fail over when a verifier sends nothing at all for this long (a "
                   "killed or frozen one; a busy verifier sends progress every second, "
                   "so it is waited for, never failed over; default: %(default)s)")
    p.add_argument("--busy-wait", type=float, default=120.0, metavar="S",
                   help="when every verifier answers BUSY, keep asking (at the times they "
                   "suggest) for up to this long before failing the request with a "
                   "retry-after (default: %(default)s)")
    p.add_argument("--no-proactive", action="store_true",
                   help="do not draft the next tree while a verification is in flight")
    p.add_argument("--audit-rate", type=float, metavar="R",
                   help="audit this fraction of sessions (0 to 1) by replaying them on "
                   "another verifier (default: adaptive, every session of a verifier until "
                   "it has been audited clean 5 times, then less often, down to 5%%)")
    p.add_argument("--audit-sync", action="store_true",
                   help="audit every round before its tokens are used: exact output even "
                   "when a verifier cheats, at the cost of one replay per round (needs two "
                   "other verifiers to audit and settle disputes; a round none can audit "
                   "fails over)")
    p.add_argument("--no-audit", action="store_true",
                   help="never audit (a node that trusts every verifier)")
    p.add_argument("--prefer-verifier", metavar="PEER_ID",
                   help="open sessions on this verifier first whenever it is usable (your "
                   "own, say); the others remain for failover and audits")
    p.add_argument("--proof-dir", metavar="PATH",
                   help="also write each fraud proof here as a file (anyone can check one "
                   "with `specedge-ledger frauds FILE`)")
    p.add_argument("--bets", type=int, default=2, metavar="N",
                   help="while a verification is in flight, draft the next tree for each of "
                   "the N likeliest verdicts (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="-v: progress, -vv: debug, -vvv: libp2p's own logs")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-model", default="tiny-test",
                   help="the model verifiers serve, as they name it (default: %(default)s)")
    p.add_argument("--target-id", default=None,
                   help="the id verifiers announce for the target, when it differs from "
                   "--target-model (e.g. a local copy of a hub model)")
    p.add_argument("--draft-model", default=None,
                   help="local draft model (default: the preset paired with the target)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="draft weights dtype (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device for the draft model")
    p.add_argument("--engine", choices=("torch", "llama.cpp", "auto"), default="torch",
                   help="draft engine: torch (the model in --dtype), llama.cpp (the model's "
                   "GGUF as it is; fastest on CPUs without bf16, needs the 'llama' extra) "
                   "or auto (time a few single-token decodes of each and keep the faster) "
                   "(default: %(default)s)")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, metavar="GB",
                   help="RAM for the draft model's KV of past conversations, so a follow-up "
                   "turn drafts without prefilling again (default: %(default)s)")
    p.add_argument("--kv-disk-gb", type=float, default=2.0, metavar="GB",
                   help="disk space for that KV once evicted from RAM, used when reading it "
                   "back beats recomputing it (measured at start); 0: none "
                   "(default: %(default)s)")
    p.add_argument("--kv-disk-dir", metavar="PATH",
                   help="where (default: draft-kv in the user data directory)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="keep no KV between requests: prefill every prompt in full")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specedge-node",
        description="A SpecEdge edge node: drafts tokens locally, has them verified by "
        "verifiers on the network, keeps the signed receipts.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="one generation through the network")
    add_network_args(gen)
    add_model_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)
    join = sub.add_parser("join", help="stay up as a volunteer edge and serve an "
                          "OpenAI-compatible API")
    add_network_args(join)
    add_model_args(join)
    join.add_argument("--tree", type=tree_shape, default=TreeShape.parse(DEFAULT_TREE),
                      metavar="SHAPE",
                      help="draft shape: chain:N, tree:BUDGET,DEPTH,WIDTH or "
                      "dynamic:BUDGET[,WIDTH] "
                      "(grown while a node's draft probability pays for its row at the "
                      f"verifier's advertised pass cost; default: {DEFAULT_TREE})")
    join.add_argument("--api", default=DEFAULT_API, metavar="HOST:PORT",
                      help="where to serve the API (default: %(default)s; port 0 picks one)")
    join.add_argument("--model-name", help="the model name API clients use (default: the "
                      "target model)")
    join.add_argument("--announce-file", metavar="PATH",
                      help="write the API's base URL here once it serves")
    join.add_argument("--no-status", action="store_true", help="no live status display")
    join.set_defaults(func=cmd_join)
    return parser


# ---------------------------------------------------------------------------- shared


def _identity(args: argparse.Namespace) -> KeyPair:
    from specedge.protocol.identity import default_identity_path, load_or_create_identity

    return load_or_create_identity(args.identity or default_identity_path("node"))


def _network(args: argparse.Namespace,
             identity: KeyPair) -> AbstractAsyncContextManager[VerifierPool]:
    from specedge.node.discovery import network

    return network(identity, args.target_id or args.target_model, bootstrap=args.bootstrap,
                   verifiers=args.verifier, listen=args.listen or [DEFAULT_LISTEN],
                   mdns=args.mdns, silence_timeout=args.silence_timeout,
                   busy_wait=args.busy_wait)


async def _models_and_first_look(args: argparse.Namespace, pool: VerifierPool) -> Models:
    """Load the draft model in a thread while the first discovery round runs."""
    import trio

    from specedge.node.edge import load_models

    pool.prefer = args.prefer_verifier
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.refresh)
        models = await trio.to_thread.run_sync(
            load_models, args.target_model, args.draft_model, torch_dtype(args.dtype),
            args.device, args.target_id, _kv_options(args), args.engine)
    return models


AUDIT_DRAIN = 300.0  # seconds `generate` waits at exit for the audits it still owes
JOIN_AUDIT_DRAIN = 10.0  # a stopping `join` finishes audits under way only briefly


@asynccontextmanager
async def _auditing(args: argparse.Namespace, pool: VerifierPool, identity: KeyPair,
                    book: object, drain: float = AUDIT_DRAIN) -> AsyncIterator[object]:
    """The node's auditor (node.audit) running for the block; None with --no-audit.
    On exit it finishes the audits already sampled (bounded), so a one-shot `generate`
    still catches a cheater."""
    if args.no_audit:
        yield None
        return
    from pathlib import Path

    import trio

    from specedge.node.audit import Auditor, AuditPolicy

    ledger = getattr(book, "ledger", None)
    auditor = Auditor(
        identity, lambda: pool.ranked, pool.open_audit_stream,
        policy=AuditPolicy(args.audit_rate), sync=args.audit_sync, ban=pool.failed,
        keep_proof=ledger.store_proof if ledger is not None else None,
        keep_clean=ledger.record_audit if ledger is not None else None,
        publish=getattr(pool, "publish_proof", None),
        proof_dir=Path(args.proof_dir) if args.proof_dir else None)
    if ledger is not None:  # the verifiers this node proved to cheat stay banned
        from specedge.ledger.frauds import list_proofs

        for p in await trio.to_thread.run_sync(list_proofs, ledger.engine):
            auditor.banned[p.accused] = f"fraud proven earlier (proof {p.proof_sha256[:16]})"
    pool.auditor = auditor
    async with trio.open_nursery() as nursery:
        await nursery.start(auditor.run)
        try:
            yield auditor
        finally:
            auditor.close()
            with trio.CancelScope(shield=True):
                await auditor.drain(drain)
            nursery.cancel_scope.cancel()


def _kv_options(args: argparse.Namespace) -> object:
    from pathlib import Path

    import platformdirs

    from specedge.node.edge import KvOptions

    folder = Path(args.kv_disk_dir) if args.kv_disk_dir else (
        platformdirs.user_data_path("specedge") / "draft-kv")
    return KvOptions(ram_gb=args.kv_cache_gb, disk_dir=folder if args.kv_disk_gb > 0 else None,
                     disk_gb=args.kv_disk_gb, enabled=not args.no_prefix_cache)


def _check_addresses(args: argparse.Namespace) -> None:
    # Malformed addresses and settings fail before anything slow happens.
    from specedge.node.discovery import parse_bootstrap

    parse_bootstrap(args.bootstrap)
    parse_bootstrap(args.verifier)
    if not args.silence_timeout > 0:
        raise ValueError("--silence-timeout must be positive")
    if not args.busy_wait >= 0:
        raise ValueError("--busy-wait must be >= 0")
    if not args.kv_cache_gb > 0 or not args.kv_disk_gb >= 0:
        raise ValueError("--kv-cache-gb must be positive and --kv-disk-gb >= 0")
    if args.audit_rate is not None and not 0.0 <= args.audit_rate <= 1.0:
        raise ValueError("--audit-rate must be between 0 and 1")
    if args.audit_sync and args.no_audit:
        raise ValueError("--audit-sync and --no-audit contradict each other")


def _notice(text: str) -> None:
    print(f"specedge-node: {text}", file=sys.stderr, flush=True)


def _tell(kind: str, info: dict) -> None:
    """Tell the user about failovers as they happen."""
    if kind == "failover":
        _notice(f"verifier {info['verifier']} failed ({info['reason']}); failing over "
                f"with {info['committed']} tokens committed")
    elif kind == "session" and info.get("committed") is not None:
        log.info("verifier %s took the generation", info["verifier"])


# ---------------------------------------------------------------------------- generate


def cmd_generate(args: argparse.Namespace) -> int:
    _check_addresses(args)
    import trio

    from specedge.node.edge import Edge
    from specedge.node.receipts import receipt_book
    from specedge.protocol.identity import peer_id_of
    from specedge.sampling import SamplingParams
    from specedge.text import StreamDecoder, encode_prompt

    params = SamplingParams(args.temperature, args.top_p, args.top_k, args.seed)
    params.check()
    identity = _identity(args)
    node = peer_id_of(identity)
    sessions: list[str] = []

    def tell(kind: str, info: dict) -> None:
        if kind == "session":
            if sessions:
                _notice(f"continuing on verifier {info['verifier']}")
            sessions.append(info["verifier"])
        _tell(kind, info)

    async def main() -> dict | None:
        async with _network(args, identity) as pool:
            models = await _models_and_first_look(args, pool)
            tok = models.tokenizer
            prompt = encode_prompt(tok, args.prompt, args.chat)
            stream = StreamDecoder(tok)

            def show(new: list[int]) -> None:
                sys.stdout.write(stream.push(new))
                sys.stdout.flush()

            async with receipt_book(args.ledger, node, enabled=not args.no_ledger) as book, \
                    _auditing(args, pool, identity, book) as auditor:
                edge = Edge(models, pool, book=book, shape=args.tree,
                            proactive=not args.no_proactive, bets=args.bets)
                gen = await edge.generate(prompt, args.max_new_tokens, params,
                                          on_tokens=None if args.json else show, on_event=tell)
            if auditor is not None and auditor.stats.frauds:
                _notice(f"{auditor.stats.frauds} fraud proof(s) made; banned: "
                        f"{', '.join(auditor.banned)}")
            if args.json:
                return {"text": tok.decode(gen.token_ids, skip_special_tokens=True),
                        "token_ids": gen.token_ids, "stats": gen.stats.as_dict(),
                        "finish_reason": gen.finish_reason, "node": node,
                        "receipts": [r.summary() for r in gen.receipts],
                        "audits": auditor.status() if auditor is not None else None}
            sys.stdout.write(stream.flush() + "\n")
            s = gen.stats
            print(f"[{s.generated} tokens, {s.rounds} rounds, acceptance {s.acceptance:.1%}, "
                  f"proactive hits {s.proactive_hits}/{s.proactive_bets}, "
                  f"first token {s.time_to_first_token_ms or 0:.0f} ms, "
                  f"{s.inter_token_latency_ms or 0:.1f} ms/token, {s.failovers} failovers, "
                  f"{len(gen.receipts)} receipts, {s.wall_s:.2f} s]", file=sys.stderr)
            return None

    out = trio.run(main)
    if out is not None:
        print(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------- join


def cmd_join(args: argparse.Namespace) -> int:
    _check_addresses(args)
    _api_bind(args.api)
    import trio

    from specedge.node.api import create_app, serve_api
    from specedge.node.edge import Edge
    from specedge.node.receipts import receipt_book
    from specedge.node.status import show
    from specedge.protocol.hosts import StopSignal, write_announce_file
    from specedge.protocol.identity import peer_id_of

    identity = _identity(args)
    node = peer_id_of(identity)

    async def main() -> None:
        stopper = StopSignal()
        async with trio.open_nursery() as outer:
            await outer.start(stopper.watch, outer.cancel_scope)
            async with _network(args, identity) as pool:
                models = await _models_and_first_look(args, pool)
                async with receipt_book(args.ledger, node, enabled=not args.no_ledger) as book, \
                        _auditing(args, pool, identity, book, JOIN_AUDIT_DRAIN):
                    edge = Edge(models, pool, book=book, shape=args.tree,
                                proactive=not args.no_proactive, bets=args.bets)
                    app = create_app(edge, args.model_name)
                    async with trio.open_nursery() as side:
                        side.start_soon(pool.keep_fresh)
                        async with trio.open_nursery() as web:
                            url = await web.start(serve_api, app, args.api, stopper.event)
                            name = args.model_name or models.target_name
                            print(f"serving the OpenAI-compatible API at {url}/v1 (model "
                                  f"{name}); node {node}", flush=True)
                            if args.announce_file:
                                write_announce_file(args.announce_file, [url])
                            if not args.no_status:
                                side.start_soon(lambda: show(edge, pool, book, node=node,
                                                             api=url))
                        side.cancel_scope.cancel()  # the API has stopped: stop the rest
            outer.cancel_scope.cancel()

    trio.run(main)
    return 0


def _api_bind(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--api must be HOST:PORT, e.g. {DEFAULT_API}; got {text!r}")
    return text


# ---------------------------------------------------------------------------- main


def _root_cause(exc: BaseException) -> BaseException:
    """The error that matters inside trio's exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        import trio

        inner = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        exc = (inner or list(exc.exceptions))[0]
    return exc


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from specedge.protocol.hosts import configure_logging

    # generate: quiet unless asked (its stdout is the text); join: progress by default.
    configure_logging(args.verbose - (1 if args.command == "generate" else 0))
    if args.verbose < 2:
        logging.getLogger("alembic").setLevel(logging.WARNING)  # ledger migrations
    from specedge.node.errors import NodeError
    from specedge.protocol.identity import IdentityError

    try:
        return args.func(args)
    except BaseException as exc:  # sorted below
        cause = _root_cause(exc)
        if isinstance(cause, KeyboardInterrupt):
            return 130
        # ModelError and LedgerError by name: importing their modules costs seconds.
        if isinstance(cause, NodeError | ValueError | IdentityError | OSError) or type(
                cause).__name__ in ("ModelError", "LedgerError", "LedgerUnavailable"):
            print(f"specedge-node: error: {cause}", file=sys.stderr)
            return 2
        if isinstance(cause, SystemExit):
            raise cause from None
        raise


if __name__ == "__main__":
    sys.exit(main())
