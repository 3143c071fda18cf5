"""bench/latency.py: the delaying TCP forwarder the NAT tests and `specedge bench --rtt-ms`
put between a node and a verifier (`tc netem` is missing from this kernel)."""

from __future__ import annotations

import os

import trio

from bench.latency import serve


def test_forwarder_keeps_every_byte_in_order_and_adds_the_round_trip() -> None:
    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)

    async def main() -> None:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
                upstream = listeners[0].socket.getsockname()[1]
                nursery.start_soon(trio.serve_listeners, echo, listeners)
                port = await nursery.start(serve, ("127.0.0.1", 0), ("127.0.0.1", upstream),
                                           40.0)
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                start = trio.current_time()
                await stream.send_all(b"ping")
                assert await stream.receive_some(4) == b"ping"
                assert trio.current_time() - start >= 0.040  # both ways held 20 ms
                blob = os.urandom(1 << 20)
                got = bytearray()

                async def read() -> None:
                    while len(got) < len(blob):
                        got.extend(await stream.receive_some(65536))

                async with trio.open_nursery() as inner:
                    inner.start_soon(read)
                    await stream.send_all(blob)
                assert bytes(got) == blob
                await stream.aclose()
                nursery.cancel_scope.cancel()

    trio.run(main)
