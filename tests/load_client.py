"""Load generator for the verifier: many concurrent sessions from one process, for a
fixed time.

--sessions slots each run generations of --segment tokens back to back, a new session
each (so sessions open, prefill and close under load, as generations do). A session
sends chains of the target's own continuation (from --truth-file, computed once by the
test), each token wrong with probability --miss: drafting costs nothing and the
verifier is the bottleneck. Every result and receipt is checked (by
`verifier_client.Conn.verify`) and every committed token is compared with the truth.
The first sessions open before the clock starts (then the process prints OPEN); all
slots start together at the wall-clock time the test writes to --start-file once every
load process is ready, and stop --duration seconds later.

    python tests/load_client.py --addr MA --truth-file F --sessions K --duration S \
        --start-file PATH --miss P

Prints one JSON object: per slot its tokens, rounds, generations and seconds; the
errors seen; tokens that differ from the truth.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from verifier_client import Client, Conn

from specedge.protocol import hosts
from specedge.protocol.errors import ProtocolError
from specedge.protocol.identity import load_or_create_identity

CHAIN = 4


async def slot_loop(client: Client, truths: list[dict], slot: int, args: argparse.Namespace,
                    start: float, stop: float, first: Conn, out: dict) -> None:
    """One concurrent session slot: generations of --segment tokens back to back (each a
    new session on the next truth), from `start` until `stop`."""
    rng = random.Random(slot)
    index = slot % len(truths)
    conn, tokens, rounds, sessions = first, 0, 0, 0
    latencies: list[float] = []  # per round: seconds per committed token (what a user sees)
    await trio.sleep_until(start)
    t0 = trio.current_time()
    try:
        while trio.current_time() < stop:
            if conn is None:
                index = (index + 1) % len(truths)
                conn = await client.session(truths[index]["prompt"], args.segment + CHAIN + 1)
            truth = truths[index]["truth"]
            pos = 0
            vocab = conn.opened.vocab_size
            while trio.current_time() < stop and pos < args.segment:
                chain = [t if rng.random() >= args.miss else (t + 1) % vocab
                         for t in truth[pos : pos + CHAIN]]
                asked = trio.current_time()
                res = await conn.verify(*conn.request(chain, list(range(-1, CHAIN - 1))))
                new = [chain[i] for i in res.accepted] + [res.bonus_token]
                latencies.append((trio.current_time() - asked) / len(new))
                rounds += 1
                if new != truth[pos : pos + len(new)]:
                    # The test decides whether this is a float near-tie or a real error.
                    k = next(j for j, (a, b) in enumerate(zip(new, truth[pos:], strict=False))
                             if a != b)
                    out["wrong"].append({"truth_index": index, "pos": pos + k, "got": new[k],
                                         "chain": chain, "round": conn.seq})
                    tokens += k
                    pos = args.segment  # this generation cannot go on against the truth
                    break
                pos += len(new)
                tokens += len(new)
            await conn.close()
            conn, sessions = None, sessions + 1
    except ProtocolError as exc:
        out["errors"].append(f"{exc.code.name}: {exc}")
    out["sessions"].append({"tokens": tokens, "rounds": rounds, "generations": sessions,
                            "seconds": trio.current_time() - t0,
                            "itl_ms": [round(x * 1000, 2) for x in latencies]})


async def amain(args: argparse.Namespace) -> dict:
    with open(args.truth_file) as f:
        truths = json.load(f)
    key_pair = (load_or_create_identity(Path(args.identity)) if args.identity
                else create_new_key_pair())
    out: dict = {"sessions": [], "errors": [], "wrong": []}
    async with hosts.running_host(key_pair, ["/ip4/127.0.0.1/tcp/0"]) as host:
        await hosts.connect(host, args.addr)
        client = Client(host, key_pair, args.addr, "tiny-test", None)
        slots = range(args.offset, args.offset + args.sessions)
        firsts = [await client.session(truths[s % len(truths)]["prompt"],
                                       args.segment + CHAIN + 1) for s in slots]
        print("OPEN", flush=True)
        with trio.fail_after(120):
            while not (text := _read(args.start_file)):
                await trio.sleep(0.02)
        # The start time is wall-clock time, shared by processes; trio's clock is its own.
        start = trio.current_time() + max(0.0, float(text) - time.time())
        stop = start + args.duration
        async with trio.open_nursery() as nursery:
            for slot, first in zip(slots, firsts, strict=True):
                nursery.start_soon(slot_loop, client, truths, slot, args, start, stop, first,
                                   out)
    return out


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", required=True)
    p.add_argument("--truth-file", required=True)
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--offset", type=int, default=0, help="first truth and seed to use")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--start-file", required=True,
                   help="start at the wall-clock time written here (waits for the file)")
    p.add_argument("--miss", type=float, default=0.2)
    p.add_argument("--segment", type=int, default=200,
                   help="tokens per generation; then the slot opens a new session")
    p.add_argument("--identity", help="the node's key file (default: a fresh identity)")
    args = p.parse_args()
    hosts.configure_logging(-1)
    print(json.dumps(trio.run(amain, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
