"""A minimal edge node for verifier tests (and the load benchmark): a real process.

It speaks the verify protocol exactly as `verifier/host.py` documents, drafting with
`specedge.drafter` and checking every result and receipt, and it can misbehave on
purpose. The real node (`specedge.node`) is richer; this client exists so the verifier
can be tested against something that is not itself.

    python tests/verifier_client.py generate --addr MA --prompt TEXT [--prompt TEXT ...]
    python tests/verifier_client.py attack   --addr MA --prompt TEXT
    python tests/verifier_client.py hold     --addr MA --prompt TEXT --sessions K
    python tests/verifier_client.py advert   --addr MA | --discover BOOTSTRAP_MA

Results go to stdout as one JSON object (`hold` prints READY, then waits to be killed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from specedge.protocol import hosts
from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.envelopes import open_receipt, request_frame, seal_request
from specedge.protocol.errors import ProtocolError, RemoteError, from_error
from specedge.protocol.framing import read_frame, write_frame
from specedge.protocol.identity import peer_id_of
from specedge.protocol.ids import ADVERT_PROTOCOL, PROTOCOL_VERSION, VERIFY_PROTOCOL, dht_key
from specedge.protocol.validation import (
    expect,
    validate_receipt,
    validate_session_opened,
    validate_verify_result,
)

if TYPE_CHECKING:
    from specedge.trees import TreeShape

TIMEOUT = 60.0
TINY_TARGET, TINY_DRAFT = "tiny-test", "tiny-test-draft"


@dataclass
class Conn:
    """One session's stream, from the node's side."""

    stream: object
    key_pair: object
    verifier: str
    opened: pb.SessionOpened | None = None
    seq: int = 0
    receipts: int = 0
    codes: list[str] = field(default_factory=list)

    async def open(self, model_id: str, prompt: list[int], max_new_tokens: int) -> None:
        msg = pb.OpenSession(model_id=model_id, prompt=prompt, client_version=PROTOCOL_VERSION,
                             max_new_tokens=max_new_tokens, sampling=pb.Sampling(top_p=1.0))
        await write_frame(self.stream, pb.Frame(open=msg))
        frame = await read_frame(self.stream, timeout=TIMEOUT)
        expect(frame, "opened")
        validate_session_opened(frame.opened, expected_peer=self.verifier)
        self.opened = frame.opened

    def request(self, tokens: list[int], parents: list[int], seq: int | None = None,
                session_id: bytes | None = None,
                key_pair: object = None) -> tuple[pb.VerifyRequest, bytes]:
        assert self.opened is not None
        req = pb.VerifyRequest(session_id=session_id or self.opened.session_id,
                               seq=self.seq + 1 if seq is None else seq, tokens=tokens,
                               parents=parents, draft_micros=1234)
        return req, seal_request(key_pair or self.key_pair, req)

    async def verify(self, req: pb.VerifyRequest, envelope: bytes) -> pb.VerifyResult:
        """Send a sealed request and check the answer (raises RemoteError on refusal)."""
        try:
            await write_frame(self.stream, request_frame(envelope))
        except ProtocolError:
            # The verifier may have refused and closed while we drafted: its Error frame
            # is still waiting to be read.
            with trio.move_on_after(2):
                expect(await read_frame(self.stream, timeout=2), "result")
            raise
        frame = await read_frame(self.stream, timeout=TIMEOUT)
        expect(frame, "result")
        res = frame.result
        validate_verify_result(res, req, self.opened.vocab_size)
        _, receipt = open_receipt(res.receipt, expected_peer=self.verifier)
        validate_receipt(receipt, request_envelope=envelope, request=req, result=res,
                         node_peer=peer_id_of(self.key_pair), verifier_peer=self.verifier)
        assert receipt.draft_micros == 1234
        self.seq = req.seq
        self.receipts += 1
        return res

    async def refused(self, req: pb.VerifyRequest, envelope: bytes) -> str:
        """Send a request that must be refused; return the error code's name."""
        try:
            await self.verify(req, envelope)
        except RemoteError as exc:
            return exc.code.name
        return "ANSWERED"

    async def close(self) -> None:
        if self.opened is not None:
            await write_frame(self.stream, pb.Frame(close=pb.CloseSession(
                session_id=self.opened.session_id, reason="done")))
        await self.stream.close()


class Client:
    def __init__(self, host: object, key_pair: object, verifier_addr: str, model_id: str,
                 draft: object) -> None:
        self.host = host
        self.key_pair = key_pair  # the host's own key: requests are signed by the stream's peer
        self.info = hosts.parse_peer_addr(verifier_addr)
        self.verifier = self.info.peer_id.to_base58()
        self.model_id = model_id
        self.draft = draft
        self.limiter = trio.CapacityLimiter(1)

    async def stream(self, protocol: str = VERIFY_PROTOCOL) -> object:
        with trio.fail_after(TIMEOUT):
            return await self.host.new_stream(self.info.peer_id, [protocol])

    async def session(self, prompt: list[int], max_new_tokens: int) -> Conn:
        conn = Conn(await self.stream(), self.key_pair, self.verifier)
        await conn.open(self.model_id, prompt, max_new_tokens)
        return conn

    async def generate(self, conn: Conn, prompt: list[int], n: int, shape: TreeShape,
                       rounds: int | None = None) -> list[int]:
        """Draft, verify, commit until `n` tokens (or `rounds` rounds)."""
        from specedge.drafter import Drafter

        drafter = Drafter(self.draft, shape)
        seq, out, done = list(prompt), [], 0
        while len(out) < n and (rounds is None or done < rounds):
            tree = await trio.to_thread.run_sync(drafter.draft, seq, limiter=self.limiter)
            res = await conn.verify(*conn.request(tree.tokens, tree.parents))
            drafter.commit(tree, list(res.accepted))
            new = [tree.tokens[i] for i in res.accepted] + [res.bonus_token]
            seq += new
            out += new
            done += 1
        return out[:n]


async def run_generate(client: Client, args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    from specedge.trees import TreeShape

    shape = TreeShape.parse(args.tree)
    results: list[dict] = [{} for _ in prompts]

    async def one(i: int) -> None:
        start = time.perf_counter()
        conn = await client.session(prompts[i], args.max_new_tokens)
        tokens = await client.generate(conn, prompts[i], args.max_new_tokens, shape)
        results[i] = {"prompt": prompts[i], "tokens": tokens, "rounds": conn.seq,
                      "seconds": time.perf_counter() - start}
        await conn.close()

    async def oracle(i: int, truth: list[int]) -> None:
        start = time.perf_counter()
        conn = await client.session(prompts[i], args.max_new_tokens)
        tokens = await oracle_generate(conn, truth, args.max_new_tokens, shape.budget,
                                       args.oracle_miss, seed=i)
        results[i] = {"prompt": prompts[i], "tokens": tokens, "rounds": conn.seq,
                      "seconds": time.perf_counter() - start}
        await conn.close()

    truths = args.truths
    async with trio.open_nursery() as nursery:
        for i in range(len(prompts)):
            if truths:
                nursery.start_soon(oracle, i, truths[i])
            else:
                nursery.start_soon(one, i)
    return {"sessions": results}


async def oracle_generate(conn: Conn, truth: list[int], n: int, k: int, miss: float,
                          seed: int) -> list[int]:
    """Rounds whose chains of `k` are the target's own continuation, each token wrong
    with probability `miss`: a drafter that costs nothing, for saturating a verifier."""
    import random

    rng = random.Random(seed)
    out: list[int] = []
    while len(out) < n:
        chain = [t if rng.random() >= miss else (t + 1) % conn.opened.vocab_size
                 for t in truth[len(out) : len(out) + k]]
        res = await conn.verify(*conn.request(chain, list(range(-1, len(chain) - 1))))
        out += [chain[i] for i in res.accepted] + [res.bonus_token]
    return out[:n]


async def run_attack(client: Client, args: argparse.Namespace, prompt: list[int]) -> dict:
    """One session interleaving refused requests with good rounds, then more streams."""
    from specedge.trees import TreeShape

    shape = TreeShape.parse(args.tree)
    codes: dict[str, str] = {}
    conn = await client.session(prompt, args.max_new_tokens)
    out = await client.generate(conn, prompt, args.max_new_tokens, shape, rounds=1)
    vocab, budget = conn.opened.vocab_size, conn.opened.max_tree_tokens

    req, env = conn.request([1, 2], [-1, 0])
    forged = bytearray(env)
    forged[-1] ^= 0x01  # the signature is the envelope's last field
    codes["forged_signature"] = await conn.refused(req, bytes(forged))
    codes["wrong_peer"] = await conn.refused(*conn.request([1, 2], [-1, 0],
                                                           key_pair=create_new_key_pair()))
    codes["replayed_seq"] = await conn.refused(*conn.request([1], [-1], seq=conn.seq))
    codes["skipped_seq"] = await conn.refused(*conn.request([1], [-1], seq=conn.seq + 2))
    codes["oversized_tree"] = await conn.refused(
        *conn.request([1] * (budget + 1), [-1, *range(budget)]))
    codes["out_of_vocab"] = await conn.refused(*conn.request([1, vocab], [-1, 0]))
    codes["bad_tree"] = await conn.refused(*conn.request([1, 2], [-1, 1]))
    codes["unknown_session"] = await conn.refused(*conn.request([1], [-1], session_id=b"x" * 16))
    await write_frame(conn.stream, pb.Frame(advert_query=pb.AdvertQuery()))
    codes["unexpected_message"] = await expect_error(conn.stream)
    # The session is unharmed: generate the rest and compare with the reference.
    drafter_prompt = prompt + out
    rest = await client.generate(conn, drafter_prompt, args.max_new_tokens - len(out), shape)
    await conn.close()

    garbage = await client.stream()
    await garbage.write(b"\x07garbage!!")  # a frame of 7 bytes that is no Frame
    codes["garbage_bytes"] = await expect_error(garbage)
    early = await client.stream()
    req = pb.VerifyRequest(session_id=b"y" * 16, seq=1, tokens=[1], parents=[-1])
    await write_frame(early, request_frame(seal_request(client.key_pair, req)))
    codes["verify_before_open"] = await expect_error(early)
    other = await client.stream()
    try:
        await Conn(other, client.key_pair, client.verifier).open("no-such-model", prompt, 8)
        codes["wrong_model"] = "ANSWERED"
    except RemoteError as exc:
        codes["wrong_model"] = exc.code.name
    return {"codes": codes, "tokens": (out + rest)[: args.max_new_tokens],
            "receipts": conn.receipts}


async def expect_error(stream: object) -> str:
    """The code of the Error frame the verifier sends next."""
    try:
        frame = await read_frame(stream, timeout=TIMEOUT)
    except ProtocolError as exc:
        return f"local {exc.code.name}"
    if frame.WhichOneof("body") != "error":
        return f"not an error: {frame.WhichOneof('body')}"
    return from_error(frame.error).code.name


async def run_hold(client: Client, args: argparse.Namespace, prompt: list[int]) -> dict:
    """Open sessions, run rounds, print READY once each has done two; then either wait
    to be killed (--rounds 2) or keep going (--rounds -1) until the verifier refuses."""
    from specedge.drafter import Drafter
    from specedge.trees import TreeShape

    shape = TreeShape.parse(args.tree)
    conns = [await client.session(prompt, args.max_new_tokens) for _ in range(args.sessions)]
    ready = [trio.Event() for _ in conns]
    ended: list[str] = []

    async def rounds(i: int) -> None:
        drafter = Drafter(client.draft, shape)
        seq = list(prompt)
        try:
            while args.rounds < 0 or conns[i].seq < args.rounds:
                tree = await trio.to_thread.run_sync(drafter.draft, seq, limiter=client.limiter)
                res = await conns[i].verify(*conns[i].request(tree.tokens, tree.parents))
                drafter.commit(tree, list(res.accepted))
                seq += [tree.tokens[k] for k in res.accepted] + [res.bonus_token]
                if conns[i].seq >= 2:
                    ready[i].set()
                await trio.sleep(0.02)
        except ProtocolError as exc:
            ended.append(exc.code.name)
            with contextlib.suppress(Exception):
                await conns[i].stream.close()  # a refused node hangs up
        ready[i].set()

    async with trio.open_nursery() as nursery:
        for i in range(len(conns)):
            nursery.start_soon(rounds, i)
        for event in ready:
            await event.wait()
        print("READY", flush=True)
    if args.rounds >= 0:
        await trio.sleep_forever()
    return {"receipts": sum(c.receipts for c in conns), "ended": ended}


async def run_advert(host: object, args: argparse.Namespace) -> dict:
    found: list[str] = []
    if args.discover:
        async with hosts.running_dht(host, server=False, bootstrap=[args.discover]) as dht:
            infos = await hosts.find_providers(dht, dht_key(args.model_id))
        found = [i.peer_id.to_base58() for i in infos]
        if not infos:
            return {"found": []}
        info = infos[0]
        if not info.addrs:
            info = hosts.parse_peer_addr(args.discover)
        await hosts.connect(host, info)
        peer = info.peer_id
    else:
        peer = (await hosts.connect(host, args.addr)).peer_id
    with trio.fail_after(TIMEOUT):
        stream = await host.new_stream(peer, [ADVERT_PROTOCOL])
    await write_frame(stream, pb.Frame(advert_query=pb.AdvertQuery(model_id=args.model_id)))
    frame = await read_frame(stream, timeout=TIMEOUT)
    expect(frame, "advert")
    a = frame.advert
    await stream.close()
    return {"found": found, "advert": {
        "model_id": a.model_id, "free_slots": a.free_slots, "queue_depth": a.queue_depth,
        "mean_verify_micros": a.mean_verify_micros, "max_batch_tokens": a.max_batch_tokens,
        "max_tree_tokens": a.max_tree_tokens, "vocab_size": a.vocab_size,
        "protocol_version": a.protocol_version}}


def prepare(args: argparse.Namespace) -> tuple[object, list[list[int]]]:
    """Models and prompts, loaded before any connection exists: a process whose event
    loop is busy for seconds stops answering pings, and the verifier's health monitor
    then drops its connection (as it should for a frozen node)."""
    import torch

    from specedge.models import load_model
    from specedge.text import encode_prompt
    from specedge.trees import TreeShape

    torch.set_num_threads(1)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    draft, tok = load_model(args.draft_model, dtype)
    prompts = [encode_prompt(tok, p, False) for p in args.prompt]
    args.truths = []
    if args.oracle_miss is not None:  # drafting costs nothing: the verifier is the limit
        from specedge.engine import autoregressive_generate

        target, _ = load_model(args.model_id, dtype)
        n = args.max_new_tokens + TreeShape.parse(args.tree).budget
        args.truths = [autoregressive_generate(target, p, n).token_ids for p in prompts]
    return draft, prompts


async def amain(args: argparse.Namespace) -> dict:
    key_pair = create_new_key_pair()
    draft, prompts = prepare(args) if args.command != "advert" else (None, [])
    async with hosts.running_host(key_pair, ["/ip4/127.0.0.1/tcp/0"]) as host:
        if args.command == "advert":
            return await run_advert(host, args)
        await hosts.connect(host, args.addr)
        client = Client(host, key_pair, args.addr, args.model_id, draft)
        if args.command == "generate":
            return await run_generate(client, args, prompts)
        if args.command == "attack":
            return await run_attack(client, args, prompts[0])
        return await run_hold(client, args, prompts[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["generate", "attack", "hold", "advert"])
    parser.add_argument("--addr", help="the verifier's full multiaddr")
    parser.add_argument("--discover", help="find the verifier through this DHT peer")
    parser.add_argument("--model-id", default=TINY_TARGET)
    parser.add_argument("--draft-model", default=TINY_DRAFT)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--prompt", action="append", default=[])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--tree", default="chain:4")
    parser.add_argument("--oracle-miss", type=float, metavar="P",
                        help="generate: skip drafting; send chains of the target's own "
                        "continuation, each token wrong with probability P")
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2,
                        help="hold: rounds per session, then wait; -1: until refused")
    args = parser.parse_args()
    hosts.configure_logging(-1)
    print(json.dumps(trio.run(amain, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
