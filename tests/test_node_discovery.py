"""Discovery over real libp2p hosts in one process: a bootstrap peer, verifiers that
provide themselves on the DHT (in-process fakes speaking the real protocol), liveness,
ranking, and the address errors a user sees."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from node_fakes import FakeVerifier, serve_on_host

from specedge.engine import autoregressive_generate
from specedge.node.discovery import BootstrapError, network, parse_bootstrap
from specedge.node.generation import generate
from specedge.protocol import hosts
from specedge.protocol.identity import peer_id_of
from specedge.protocol.ids import dht_key

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


async def start_verifier(nursery, fake, boot_addrs, stop):
    async def run(task_status):
        async with hosts.running_host(fake.key, LOOPBACK) as host:
            await serve_on_host(host, fake)
            async with hosts.running_dht(host, server=True, bootstrap=boot_addrs) as dht:
                await hosts.provide_once(dht, dht_key(fake.model_id))
                task_status.started(hosts.peer_addrs(host))
                await stop.wait()

    return await nursery.start(run)


def test_bootstrap_dht_liveness_and_generation(tiny_pair, tiny_prompts):
    draft, target, _ = tiny_pair
    alive, gone = FakeVerifier(target), FakeVerifier(target)

    async def main():
        stop_all, stop_gone = trio.Event(), trio.Event()
        async with trio.open_nursery() as nursery:
            boot = await nursery.start(lambda task_status: hosts.run_bootstrap_peer(
                create_new_key_pair(), LOOPBACK, stop=stop_all, task_status=task_status))
            await start_verifier(nursery, alive, boot, stop_all)
            await start_verifier(nursery, gone, boot, stop_gone)
            stop_gone.set()  # its provider record stays in the DHT
            await trio.sleep(0.3)
            identity = create_new_key_pair()
            with trio.fail_after(60):
                async with network(identity, "tiny-test", bootstrap=boot) as pool:
                    ranked = await pool.refresh()
                    assert [c.peer for c in ranked] == [alive.peer]
                    assert ranked[0].source == "dht" and ranked[0].advert.free_slots == 4
                    assert gone.peer in pool.dead
                    gen = await generate(draft, tiny_prompts[0], 24, connector=pool,
                                         model_id="tiny-test", eos_ids=[258])
                    assert pool.in_use == {}
            stop_all.set()
            return gen

    gen = trio.run(main)
    ref = autoregressive_generate(target, tiny_prompts[0], 24, eos_ids=[258])
    assert gen.token_ids == ref.token_ids
    assert gen.stats.verifiers == [alive.peer]


def test_direct_verifier_and_failover_over_libp2p(tiny_pair, tiny_prompts):
    draft, target, _ = tiny_pair
    first, second = FakeVerifier(target), FakeVerifier(target)

    async def main():
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            a = await start_verifier(nursery, first, [], stop)
            b = await start_verifier(nursery, second, [], stop)
            with trio.fail_after(60):
                async with network(create_new_key_pair(), "tiny-test",
                                   verifiers=a + b) as pool:
                    ranked = await pool.refresh()
                    assert {c.source for c in ranked} == {"direct"} and len(ranked) == 2
                    {first.peer: first, second.peer: second}[ranked[0].peer].die_at = 2
                    gen = await generate(draft, tiny_prompts[1], 24, connector=pool,
                                         model_id="tiny-test", eos_ids=[258])
            stop.set()
            return gen

    gen = trio.run(main)
    assert gen.token_ids == autoregressive_generate(target, tiny_prompts[1], 24,
                                                    eos_ids=[258]).token_ids
    assert gen.stats.failovers == 1 and set(gen.stats.verifiers) == {first.peer, second.peer}


def _pool_generation(draft, prompt, fakes, **pool_kw):
    """Serve `fakes` directly on libp2p hosts and run one generation through a pool."""

    async def main():
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            addrs = []
            for fake in fakes:
                addrs += await start_verifier(nursery, fake, [], stop)
            try:
                with trio.fail_after(60):
                    async with network(create_new_key_pair(), "tiny-test", verifiers=addrs,
                                       **pool_kw) as pool:
                        return await generate(draft, prompt, 16, connector=pool,
                                              model_id="tiny-test", eos_ids=[258])
            finally:
                stop.set()

    return trio.run(main)


def test_busy_verifier_is_passed_over_then_waited_for(tiny_pair, tiny_prompts):
    """BUSY is not a failure: the node opens on the next verifier (no failover), or, when
    the busy one is all there is, comes back after its retry-after and is served."""
    draft, target, _ = tiny_pair
    prompt = tiny_prompts[1]
    want = autoregressive_generate(target, prompt, 16, eos_ids=[258]).token_ids
    busy, free = FakeVerifier(target, busy_opens=-1), FakeVerifier(target, queue_depth=1)
    gen = _pool_generation(draft, prompt, [busy, free])
    assert busy.busy_refusals == 1  # ranked first (shorter queue), asked, refused
    assert gen.stats.verifiers == [free.peer] and gen.stats.failovers == 0
    assert gen.token_ids == want

    later = FakeVerifier(target, busy_opens=2, retry_after=0.3)
    gen = _pool_generation(draft, prompt, [later])
    assert later.busy_refusals == 2 and gen.stats.verifiers == [later.peer]
    assert gen.token_ids == want


def test_verifiers_busy_past_the_wait_is_a_clear_error(tiny_pair, tiny_prompts):
    from specedge.node.errors import VerifiersBusy

    draft, target, _ = tiny_pair
    busy = FakeVerifier(target, busy_opens=-1, retry_after=5.0)
    with pytest.raises(BaseException) as info:
        _pool_generation(draft, tiny_prompts[0], [busy], busy_wait=1.0)
    exc = info.value
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, VerifiersBusy) and exc.retry_after == 5.0
    assert "busy" in str(exc) and busy.busy_refusals == 1


@pytest.mark.parametrize("addr", ["nonsense", "/ip4/127.0.0.1/tcp/4001",
                                  "/ip4/127.0.0.1/tcp/4001/p2p/notapeer"])
def test_malformed_bootstrap_address(addr):
    with pytest.raises(BootstrapError, match="malformed bootstrap address"):
        parse_bootstrap([addr])


def test_unreachable_bootstrap_fails_fast():
    # A port nothing listens on (bound, then closed): the dial is refused at once.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id_of(create_new_key_pair())}"

    async def main():
        with trio.fail_after(20):
            async with network(create_new_key_pair(), "tiny-test", bootstrap=[addr]):
                pass

    with pytest.raises(BaseException) as info:
        trio.run(main)
    exc = info.value
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, BootstrapError) and "no bootstrap peer could be reached" in str(exc)


MDNS_SCRIPT = '''
import sys, trio
sys.path.insert(0, {tests!r})
from libp2p.crypto.ed25519 import create_new_key_pair
from node_fakes import FakeVerifier, serve_on_host
from specedge.models import build_tiny
from specedge.node.discovery import network
from specedge.protocol import hosts

async def main():
    fake = FakeVerifier(build_tiny()[0])
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        async def run(task_status):
            async with hosts.running_host(fake.key, ["/ip4/127.0.0.1/tcp/0"], mdns=True) as h:
                await serve_on_host(h, fake)
                task_status.started()
                await stop.wait()
        await nursery.start(run)
        with trio.fail_after(30):
            async with network(create_new_key_pair(), "tiny-test", mdns=True) as pool:
                await trio.sleep(2.5)
                ranked = await pool.refresh()
                print("FOUND", [(c.peer == fake.peer, c.source) for c in ranked])
        stop.set()
trio.run(main)
'''


@pytest.mark.slow
def test_mdns_finds_a_verifier_on_the_lan(tmp_path):
    """mDNS multicasts on every interface, so it runs in a private network namespace."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("no private network namespace (unshare -n) here")
    script = tmp_path / "mdns.py"
    script.write_text(MDNS_SCRIPT.format(tests=str(Path(__file__).parent)))
    res = subprocess.run(["unshare", "-n", "sh", "-c",
                          f"ip link set lo up && {sys.executable} {script}"],
                         capture_output=True, text=True, timeout=120)
    assert "FOUND [(True, 'mdns')]" in res.stdout, res.stdout + res.stderr[-3000:]
