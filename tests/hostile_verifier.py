"""Peers that pose as verifiers, honest or not, for the monitor's tests.

Importable as `hostile_verifier` (trio tasks in the test's process) and runnable as a
process (`python tests/hostile_verifier.py --mode garbage --bootstrap MA
--announce-file F`). Each one listens on loopback, joins the DHT through a bootstrap
peer and provides a model's key there, as a verifier does, and answers advertisement
queries according to its mode:

- ``good``: a valid Advertisement with the figures given (a verifier without a model);
- ``html``: a valid Advertisement whose model id and revision are HTML and script;
- ``garbage``: bytes that are no frame;
- ``silent``: reads the query and never answers;
- ``hangup``: reads the query and closes the stream without a word;
- ``wrong``: a well-formed frame of the wrong kind (SessionOpened);
- ``invalid``: an Advertisement that fails validation (protocol version 9.0.0);
- ``huge``: a length prefix of 64 MiB, then a trickle of bytes;
- ``kad-garbage``: no advert protocol and no real DHT: it answers every DHT query
  with garbage or with invented peers (a hostile DHT member the crawl walks into).

Nothing here imports model code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.pb.kademlia_pb2 import Message

from specedge.protocol import hosts
from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.framing import encode_frame, read_frame
from specedge.protocol.ids import ADVERT_PROTOCOL, PROTOCOL_VERSION, dht_key
from specedge.protocol.varint import encode_uvarint

MODES = ("good", "html", "garbage", "silent", "hangup", "wrong", "invalid", "huge",
         "kad-garbage")
HTML_MODEL = '<script>alert("model")</script><img src=x onerror=alert(1)>'
HTML_REVISION = '"><b>rev</b>'
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def advertisement(model_id: str = "tiny-test", **figures: int) -> pb.Advertisement:
    defaults = {"max_batch_tokens": 256, "free_slots": 7, "queue_depth": 2,
                "mean_verify_micros": 12_500, "max_tree_tokens": 32, "vocab_size": 259,
                "sessions_open": 3, "committed_tokens": 1000}
    defaults.update(figures)
    return pb.Advertisement(model_id=model_id, protocol_version=PROTOCOL_VERSION, **defaults)


def advert_reply(mode: str, model_id: str, counter: list[int]) -> bytes | None:
    """The bytes a poser answers an advert query with (None: it never answers)."""
    if mode == "good":
        counter[0] += 500  # as if serving 500 tokens between two queries
        return encode_frame(pb.Frame(advert=advertisement(model_id,
                                                          committed_tokens=counter[0])))
    if mode == "html":
        ad = advertisement(HTML_MODEL)
        ad.revision = HTML_REVISION
        return encode_frame(pb.Frame(advert=ad))
    if mode == "garbage":
        return b"\xff" * 40  # a length prefix that never ends
    if mode == "wrong":
        return encode_frame(pb.Frame(opened=pb.SessionOpened(session_id=b"\x01" * 16)))
    if mode == "invalid":
        ad = advertisement(model_id)
        ad.protocol_version = "9.0.0"
        return encode_frame(pb.Frame(advert=ad))
    if mode == "huge":
        return encode_uvarint(64 << 20) + b"\x00" * 16
    if mode == "hangup":
        return b""
    return None  # silent


def advert_handler(mode: str, model_id: str):  # noqa: ANN201
    counter = [0]

    async def handler(stream: object) -> None:
        try:
            with trio.move_on_after(30):
                await read_frame(stream, timeout=10)
                reply = advert_reply(mode, model_id, counter)
                if reply is None:
                    await trio.sleep(30)  # silent: hold the stream open, say nothing
                    return
                if reply:
                    await stream.write(reply)
                if mode == "huge":
                    for _ in range(50):
                        await trio.sleep(0.2)
                        await stream.write(b"\x00")
        except Exception:
            pass  # a handler that raises takes the host down (notes/libp2p.md)
        finally:
            await hosts.close_stream(stream)

    return handler


def kad_handler():  # noqa: ANN201
    calls = [0]

    async def handler(stream: object) -> None:
        calls[0] += 1
        try:
            with trio.move_on_after(10):
                if calls[0] % 2:
                    await stream.write(b"\x05garbage-that-is-no-dht-message")
                else:  # a well-formed answer full of invented peers with bad addresses
                    peers = [Message.Peer(id=os.urandom(34), addrs=[b"\xff\x00junk", b""])
                             for _ in range(40)]
                    body = Message(type=Message.MessageType.FIND_NODE,
                                   closerPeers=peers).SerializeToString()
                    await stream.write(encode_uvarint(len(body)) + body)
        except Exception:
            pass
        finally:
            await hosts.close_stream(stream)

    return handler


async def pose(mode: str, bootstrap: Sequence[str], model_id: str = "tiny-test", *,
               task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Run one poser until cancelled; ``task_status`` gets its multiaddrs once it has
    provided its model's key (or, for kad-garbage, connected to the bootstrap peers)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    async with hosts.running_host(create_new_key_pair(), [LOOPBACK]) as host:
        if mode == "kad-garbage":
            host.set_stream_handler("/ipfs/kad/1.0.0", kad_handler())
            await hosts.connect_bootstrap(host, bootstrap)
            task_status.started(hosts.peer_addrs(host))
            await trio.sleep_forever()
        host.set_stream_handler(ADVERT_PROTOCOL, advert_handler(mode, model_id))
        async with hosts.running_dht(host, server=True, bootstrap=bootstrap) as dht:
            await hosts.provide_once(dht, dht_key(model_id))
            task_status.started(hosts.peer_addrs(host))
            await trio.sleep_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--bootstrap", action="append", required=True)
    parser.add_argument("--model", default="tiny-test")
    parser.add_argument("--announce-file", required=True)
    args = parser.parse_args(argv)
    hosts.configure_logging(-1)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            addrs = await nursery.start(pose, args.mode, args.bootstrap, args.model)
            hosts.write_announce_file(args.announce_file, addrs)

    return hosts.run_main(run)


if __name__ == "__main__":
    sys.exit(main())
