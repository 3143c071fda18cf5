"""Fraud proofs on a libp2p pubsub topic, so one node's proof protects every node.

Verifiers and nodes join the gossipsub topic `FRAUD_TOPIC` on the hosts they already
run. Verifiers relay (they are the peers everyone is connected to); nodes publish the
proofs they make and act on the ones they hear. A message is relayed and delivered only
if it is a proof that checks (`audits.check_proof`, no model needed), so a forged or
stale-nonsense message dies at the first hop and cannot get an honest verifier banned.
Gossip suits rare announcements (see notes/libp2p.md: bursts get dropped); a node that
was offline learns nothing from it, which is why proofs also live in ledgers.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio
from libp2p.abc import IHost
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from specedge.protocol.audits import FraudProofError, ProvenFraud, check_proof
from specedge.protocol.limits import MAX_FRAUD_PROOF_BYTES

log = logging.getLogger("specedge.protocol.gossip")

FRAUD_TOPIC = "/specedge/frauds/1.0.0"
GOSSIP_MAX_BYTES = 1024 * 1024  # proofs larger than this stay in ledgers and files

OnProof = Callable[[bytes, ProvenFraud], None]


class FraudGossip:
    """Publish proofs; `on_proof(data, found)` hears every valid one from others."""

    def __init__(self, pubsub: Pubsub) -> None:
        self.pubsub = pubsub
        self.published = 0
        self.heard = 0
        self.refused = 0

    async def publish(self, data: bytes) -> None:
        if len(data) > GOSSIP_MAX_BYTES:
            log.info("fraud proof of %d bytes not gossiped (limit %d)", len(data),
                     GOSSIP_MAX_BYTES)
            return
        await self.pubsub.publish(FRAUD_TOPIC, data)
        self.published += 1


def _valid(data: bytes) -> ProvenFraud | None:
    if len(data) > min(MAX_FRAUD_PROOF_BYTES, GOSSIP_MAX_BYTES):
        return None
    try:
        return check_proof(data)
    except (FraudProofError, Exception):  # whatever a stranger sends must not escape
        return None


@asynccontextmanager
async def fraud_gossip(host: IHost, on_proof: OnProof | None = None
                       ) -> AsyncIterator[FraudGossip]:
    """Run gossipsub on `host` for the fraud topic during the block."""
    router = GossipSub([PROTOCOL_ID_V11], degree=6, degree_low=4, degree_high=12,
                       heartbeat_interval=1, eclipse_protection_enabled=False)
    pubsub = Pubsub(host, router)
    gossip = FraudGossip(pubsub)

    async def validator(peer: object, msg: object) -> bool:
        # Off the event loop: a large proof is many signature checks.
        data = bytes(getattr(msg, "data", b""))
        ok = await trio.to_thread.run_sync(_valid, data) is not None
        gossip.refused += not ok
        return ok

    async with background_trio_service(pubsub), background_trio_service(router):
        await pubsub.wait_until_ready()
        pubsub.set_topic_validator(FRAUD_TOPIC, validator, True)
        sub = await pubsub.subscribe(FRAUD_TOPIC)
        async with trio.open_nursery() as nursery:
            if on_proof is not None:
                nursery.start_soon(_listen, sub, gossip, on_proof)
            try:
                yield gossip
            finally:
                nursery.cancel_scope.cancel()


async def _listen(sub: object, gossip: FraudGossip, on_proof: OnProof) -> None:
    me = gossip.pubsub.my_id.to_bytes()
    while True:
        msg = await sub.get()  # type: ignore[attr-defined]
        if bytes(msg.from_id) == me:
            continue  # our own proof, already acted on
        data = bytes(msg.data)
        found = await trio.to_thread.run_sync(_valid, data)
        if found is None:
            continue
        gossip.heard += 1
        try:
            on_proof(data, found)
        except Exception:
            log.exception("acting on a fraud proof failed")
