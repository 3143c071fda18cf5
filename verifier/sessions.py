"""Sessions: one generation's state on this verifier, bound to one stream and one peer.

A session lives exactly as long as its stream handler: the handler creates it after a
valid OpenSession and removes it in its `finally`, whatever ended the stream (close,
EOF, reset, a frozen peer cut off by the health monitor, the idle timeout, shutdown).
That is the reaping: no session outlives the conversation that owns it, so there is
no separate sweeper to race with.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import trio

from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.errors import ErrorCode, ProtocolError
from specedge.protocol.limits import SESSION_ID_BYTES
from specedge.sampling import SamplingParams
from specedge.verifier.engine import TargetState


@dataclass
class Session:
    id: bytes
    peer: str  # base58 peer id of the stream's remote end: the only allowed signer
    state: TargetState
    max_new_tokens: int
    generated: int = 0  # tokens committed so far (accepted + bonus)
    last_seq: int = 0  # last answered request's seq (0 before the first)
    opened_at: float = field(default_factory=time.monotonic)
    closed: bool = False  # set when the handler ends; the scheduler drops its queued work
    progress: bool = False  # the node reads Progress frames (protocol 1.1)
    ready: trio.Event = field(default_factory=trio.Event)  # prefill finished (or failed)
    prefill_error: ProtocolError | None = None
    digest: bytes = b""  # protocol.audits.session_digest of its model, prompt and sampling
    answered_at: float | None = None  # trio time of its last answer (inter-token latency)
    # Frames from the session's rounds and its heartbeats must not interleave.
    write_lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def tokens_left(self) -> int:
        return self.max_new_tokens - self.generated


class SessionTable:
    """Open sessions and the slots reserved for sessions being opened.

    Limits: `max_sessions` per host and `max_per_peer` per remote peer, counting
    sessions still prefilling, so a burst of opens cannot oversubscribe memory.
    Trio-thread only (no locking).
    """

    def __init__(self, max_sessions: int, max_per_peer: int, reserved: int = 0) -> None:
        """`reserved`: the last slots, kept for nodes with earned standing."""
        self.max_sessions = max_sessions
        self.max_per_peer = max_per_peer
        self.reserved = min(reserved, max_sessions - 1)
        self.sessions: dict[bytes, Session] = {}
        self._reserved: dict[str, int] = {}  # peer -> slots held (open + opening)
        self.mean_lifetime: float | None = None  # seconds, moving average of ended sessions

    def __len__(self) -> int:
        return len(self.sessions)

    @property
    def free_slots(self) -> int:
        return max(self.max_sessions - sum(self._reserved.values()), 0)

    def reserve(self, peer: str, earned: bool = True) -> None:
        """Hold a slot for a session `peer` is opening: BUSY (with a retry-after) when the
        host is full, or when only reserved slots are left and `peer` has no earned
        standing; OVERLOADED when this peer holds its share."""
        if 0 < self.free_slots <= self.reserved and not earned:
            raise ProtocolError(ErrorCode.BUSY,
                                f"the last {self.reserved} session slots are kept for nodes "
                                "with earned standing; ask again later",
                                retry_after=self.slot_wait())
        if self.free_slots <= 0:
            raise ProtocolError(ErrorCode.BUSY,
                                f"all {self.max_sessions} session slots are taken; try "
                                "another verifier or ask again later",
                                retry_after=self.slot_wait())
        if self._reserved.get(peer, 0) >= self.max_per_peer:
            raise ProtocolError(ErrorCode.OVERLOADED,
                                f"this peer already holds {self.max_per_peer} sessions here")
        self._reserved[peer] = self._reserved.get(peer, 0) + 1

    def release(self, peer: str) -> None:
        """Give back a slot held by `reserve` (after close or a failed open)."""
        left = self._reserved.get(peer, 0) - 1
        if left > 0:
            self._reserved[peer] = left
        else:
            self._reserved.pop(peer, None)

    def add(self, session: Session) -> None:
        self.sessions[session.id] = session

    def remove(self, session: Session) -> None:
        """Forget a session: its KV cache is freed with the last reference to it."""
        session.closed = True
        if self.sessions.pop(session.id, None) is not None:
            life = time.monotonic() - session.opened_at
            old = self.mean_lifetime
            self.mean_lifetime = life if old is None else old + 0.2 * (life - old)

    def slot_wait(self) -> float:
        """Expected seconds until a session slot frees: with n sessions that each live
        L seconds on average, one ends about every L / n seconds (1 s .. 5 min)."""
        if self.mean_lifetime is None:
            return 5.0
        return min(max(self.mean_lifetime / max(len(self.sessions), 1), 1.0), 300.0)

    def kv_bytes(self) -> int:
        return sum(s.state.kv_bytes() for s in self.sessions.values())


def new_session_id() -> bytes:
    """16 random bytes: unguessable, so a session id is no handle for strangers."""
    return os.urandom(SESSION_ID_BYTES)


def sampling_params(msg: pb.Sampling) -> SamplingParams:
    """A session's (or an audited transcript's) sampling as received, float32 values
    (INVALID_PARAMETER when no sampler can honour it)."""
    params = SamplingParams(temperature=float(msg.temperature), top_p=float(msg.top_p or 1.0),
                            top_k=int(msg.top_k), seed=int(msg.seed))
    try:
        params.check()
    except ValueError as exc:
        raise ProtocolError(ErrorCode.INVALID_PARAMETER, str(exc)) from None
    return params
