"""A TCP forwarder that adds a fixed delay each way: round trip on a link that has none.

`tc netem` would do this in the kernel, but the kernel here lacks it (sch_netem), so the
benchmarks and the network-namespace tests put this between a node and a verifier:

    python -m bench.latency --listen 127.0.0.1:0 --to 127.0.0.1:4001 --rtt-ms 14

Each byte is held for rtt/2 in each direction, measured from when it arrived, so the
link keeps its bandwidth (a chunk waits for its own deadline, not behind the previous
chunk's sleep) and the order of bytes is kept. The port it listens on is printed on
stdout (and written to --port-file) once it accepts connections.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

CHUNK = 64 * 1024
BACKLOG = 256  # chunks in flight per direction before the reader waits (backpressure)


async def _pump(src: trio.SocketStream, dst: trio.SocketStream, delay: float) -> None:
    """Copy src to dst, each chunk sent `delay` seconds after it was read."""
    send, recv = trio.open_memory_channel[tuple[float, bytes]](BACKLOG)

    async def reader() -> None:
        async with send:
            while data := await src.receive_some(CHUNK):
                await send.send((trio.current_time() + delay, data))

    async def writer() -> None:
        async with recv:
            async for due, data in recv:
                await trio.sleep_until(due)
                await dst.send_all(data)
        await dst.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(writer)


async def _splice(client: trio.SocketStream, upstream: tuple[str, int], delay: float) -> None:
    try:
        server = await trio.open_tcp_stream(*upstream)
    except OSError:
        await client.aclose()
        return
    async with client, server:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump, client, server, delay)
                nursery.start_soon(_pump, server, client, delay)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # one side went away: drop both, as a real link would


async def serve(listen: tuple[str, int], upstream: tuple[str, int], rtt_ms: float,
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Forward connections on `listen` to `upstream` with `rtt_ms` of added round trip.

    `task_status.started` gets the port listened on (useful with port 0)."""
    listeners = await trio.open_tcp_listeners(listen[1], host=listen[0])
    port = listeners[0].socket.getsockname()[1]
    task_status.started(port)

    async def handler(stream: trio.SocketStream) -> None:
        await _splice(stream, upstream, rtt_ms / 2000)

    await trio.serve_listeners(handler, listeners)


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=_hostport, required=True, metavar="HOST:PORT")
    parser.add_argument("--to", type=_hostport, required=True, metavar="HOST:PORT")
    parser.add_argument("--rtt-ms", type=float, required=True, help="added round trip, ms")
    parser.add_argument("--port-file", type=Path, help="write the port here once listening")
    args = parser.parse_args(argv)
    if args.rtt_ms < 0:
        parser.error("--rtt-ms must be >= 0")

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve, args.listen, args.to, args.rtt_ms)
            print(port, flush=True)
            if args.port_file:
                tmp = args.port_file.with_suffix(".tmp")
                tmp.write_text(f"{port}\n")
                tmp.replace(args.port_file)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())


def delayed_addr(procs: object, workdir: Path, addr: str, rtt_ms: float,
                 timeout: float = 60.0) -> str:
    """Start a forwarder (a child in ``procs``, a ``specedge.demo.Processes``) in front of
    the first hop of the libp2p multiaddr ``addr`` (/ip4/H/tcp/P/...) and return ``addr``
    with that hop replaced by the forwarder's port: the node dialling it gets ``rtt_ms``
    of round trip more on every byte to the verifier (or to its relay)."""
    import os

    parts = addr.split("/")  # ['', 'ip4', host, 'tcp', port, ...]
    if len(parts) < 5 or parts[1] != "ip4" or parts[3] != "tcp":
        raise ValueError(f"cannot put a forwarder in front of {addr!r}")
    port_file = workdir / f"delay-{parts[4]}.port"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = procs.start(f"delay-{parts[4]}", [  # type: ignore[attr-defined]
        sys.executable, "-m", "bench.latency", "--listen", f"{parts[2]}:0",
        "--to", f"{parts[2]}:{parts[4]}", "--rtt-ms", str(rtt_ms),
        "--port-file", str(port_file)], env=env)
    port = procs.wait_file(port_file, proc, timeout)  # type: ignore[attr-defined]
    return "/".join([*parts[:4], port.strip(), *parts[5:]])
