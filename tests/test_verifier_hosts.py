"""`specedge.protocol.hosts`: the libp2p plumbing the verifier and the node share."""

from __future__ import annotations

import io
import logging
import os
import signal
import time

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from specedge.protocol import hosts
from specedge.protocol.ids import dht_key

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def test_connection_settings_follow_the_field_notes():
    cfg = hosts.connection_config()
    assert cfg.max_connections_per_peer == 1  # no 250 ms happy-eyeballs stall
    assert cfg.enable_health_monitoring and cfg.abort_connection_on_ping_failure
    assert cfg.health_check_interval + cfg.ping_timeout <= 5
    assert not hosts.connection_config(health_monitoring=False).enable_health_monitoring


def test_announce_file_is_written_whole(tmp_path):
    path = tmp_path / "sub" / "announce"
    hosts.write_announce_file(path, ["/ip4/1.2.3.4/tcp/1/p2p/x", "/ip4/5.6.7.8/tcp/2/p2p/x"])
    assert path.read_text() == "/ip4/1.2.3.4/tcp/1/p2p/x\n/ip4/5.6.7.8/tcp/2/p2p/x\n"
    assert [p.name for p in path.parent.iterdir()] == ["announce"]  # no temp file left


def test_peer_addresses_must_name_the_peer():
    with pytest.raises(ValueError):
        hosts.parse_peer_addr("/ip4/127.0.0.1/tcp/4001")
    with pytest.raises(ValueError):
        hosts.parse_peer_addr("not a multiaddr")
    with pytest.raises(ValueError):
        hosts.as_multiaddrs(["/ip4/300.1.1.1/tcp/1"])


def test_connect_failures_are_connection_errors_and_bounded():
    async def main() -> None:
        async with hosts.running_host(create_new_key_pair(), LOOPBACK) as host:
            with trio.socket.socket() as s:  # a port nobody listens on
                await s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dead = f"/ip4/127.0.0.1/tcp/{port}/p2p/{host.get_id().to_base58()}"
            start = trio.current_time()
            with pytest.raises(ConnectionError):
                await hosts.connect(host, dead, timeout=3)
            assert trio.current_time() - start < 5
            # A dead bootstrap entry is skipped, not fatal.
            assert await hosts.connect_bootstrap(host, [dead, "garbage"], timeout=3) == []

    trio.run(main)


def test_dht_discovery_through_a_bootstrap_peer():
    async def main() -> None:
        with trio.fail_after(30):
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                boot = await nursery.start(lambda task_status: hosts.run_bootstrap_peer(
                    create_new_key_pair(), LOOPBACK, stop=stop, task_status=task_status))
                async with hosts.running_host(create_new_key_pair(), LOOPBACK) as provider, \
                        hosts.running_host(create_new_key_pair(), LOOPBACK) as seeker:
                    async with hosts.running_dht(provider, bootstrap=boot) as pdht, \
                            hosts.running_dht(seeker, server=False, bootstrap=boot) as sdht:
                        assert await hosts.provide_once(pdht, dht_key("tiny-test"))
                        found = await hosts.find_providers(sdht, dht_key("tiny-test"))
                        assert [i.peer_id for i in found] == [provider.get_id()]
                        assert await hosts.find_providers(sdht, dht_key("other")) == []
                        start = time.perf_counter()
                        await hosts.connect(seeker, hosts.peer_addrs(provider)[0])
                        assert time.perf_counter() - start < 0.2  # no 250 ms connect stall
                stop.set()

    trio.run(main)


def test_reprovide_checks_the_record_through_get_providers():
    """The record under the CID key is checked by a GET_PROVIDERS walk (the status says
    whether it was found); the legacy key is announced beside it for old nodes; a host
    whose DHT has nobody to hold the record is told so."""
    from specedge.protocol.ids import legacy_dht_key

    async def main() -> None:
        with trio.fail_after(40):
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                boot = await nursery.start(lambda task_status: hosts.run_bootstrap_peer(
                    create_new_key_pair(), LOOPBACK, stop=stop, task_status=task_status))
                async with hosts.running_host(create_new_key_pair(), LOOPBACK) as provider, \
                        hosts.running_host(create_new_key_pair(), LOOPBACK) as seeker, \
                        hosts.running_host(create_new_key_pair(), LOOPBACK) as alone:
                    async with hosts.running_dht(provider, bootstrap=boot) as pdht, \
                            hosts.running_dht(seeker, server=False, bootstrap=boot) as sdht, \
                            hosts.running_dht(alone) as adht, trio.open_nursery() as inner:
                        status = hosts.ProvideStatus(dht_key("tiny-test"))
                        await inner.start(lambda task_status: hosts.provide_forever(
                            pdht, dht_key("tiny-test"), also=[legacy_dht_key("tiny-test")],
                            status=status, task_status=task_status))
                        assert status.found is True and status.failures == 0
                        assert status.checked_at >= status.provided_at
                        old = await hosts.find_providers(sdht, legacy_dht_key("tiny-test"))
                        assert [i.peer_id for i in old] == [provider.get_id()]
                        lonely = hosts.ProvideStatus(dht_key("tiny-test"))
                        await inner.start(lambda task_status: hosts.provide_forever(
                            adht, dht_key("tiny-test"), status=lonely,
                            task_status=task_status))
                        assert lonely.found is False and lonely.failures == 1
                        inner.cancel_scope.cancel()
                stop.set()

    trio.run(main)


def test_logging_hides_libp2p_noise_but_not_ours():
    out = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.lastResort
    try:
        hosts.configure_logging(0, stream=out)
        logging.getLogger("libp2p.kad_dht").error("Failed to read DHT message")
        # Some libp2p modules log on the root logger; recognised by their file.
        record = logging.LogRecord("root", logging.ERROR, os.path.join(
            os.path.dirname(hosts.libp2p.__file__), "x.py"), 1, "root noise", None, None)
        root.handle(record)
        logging.getLogger("specedge.verifier").info("ours")
        text = out.getvalue()
        assert "ours" in text and "DHT message" not in text and "root noise" not in text
    finally:
        root.handlers[:], root.level, logging.lastResort = saved[0], saved[1], saved[2]


def test_first_signal_stops_gracefully_second_cancels():
    async def main() -> None:
        stopper = hosts.StopSignal()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(stopper.watch, nursery.cancel_scope)
                os.kill(os.getpid(), signal.SIGTERM)
                await stopper.event.wait()
                assert stopper.signum == signal.SIGTERM
                os.kill(os.getpid(), signal.SIGINT)
                await trio.sleep_forever()  # cancelled by the second signal

    trio.run(main)
