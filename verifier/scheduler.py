"""Continuous batching: whatever is ready when the engine is free runs as one pass.

There is no barrier and no fixed batch shape. Stream handlers submit jobs (a session's
verify request, or "prefill this new session") and wait; the scheduler loop takes every
queued job that fits the pass's token budget, runs them as one forward pass in the
engine thread, and hands each job its result. A request that arrives while a pass runs
joins the next one, as SpecEdge's pipeline-aware scheduling intends: a node drafting
its next tree while its request is out keeps the verifier busy without waiting for a
batch to fill.

Pipeline-aware gathering: a pass's cost grows far slower than its rows (on the bench's
CPU, 5 rows take 210 ms and 20 rows 335 ms), so a request that joins a pass instead of
running alone in the next one saves most of a pass. Each session has a rhythm: the time
from its answer to its next request (the node drafting). When the engine comes free,
the scheduler holds the pass for sessions whose next request is due within `batch_wait`
mean passes, and starts as soon as they are all in. Why more than one pass: sessions left
alone settle into a pipeline, each group arriving just as the previous group's pass
ends, one pass apart, and every pass then costs nearly a full pass for a fraction of the
sessions. A longer hold merges the groups, and sessions answered together draft
together and come back together, so they stay in step and later holds are short. A
held request loses at most the hold; one due within a pass gains, since it would
otherwise wait for this pass and then run its own. A lone session never waits, nor does
a queue that already holds more requests than are due. `sims/` models the same rule:
with 4 to 32 edges per verifier it raises tokens per busy second by 13 to 59%, for 0.4
to 9% more inter-token latency (`--batch-wait 0` for latency above all).

Fairness: the queue is FIFO. A pass takes jobs in queue order and skips (leaves in
place) any that does not fit the remaining budget, so a large job is never overtaken
forever: once it is at the head it goes first, and every job fits an empty pass. Each
session has at most one job queued.

Prefill is chunked (`TargetEngine.prefill_chunk` rows, aligned) and interleaved: a new
session re-queues at the tail after each chunk, and a pass carries at most one chunk's
worth of prompt rows besides the job at the head, so running sessions' verifications
are delayed by at most one chunk per pass, never by a whole long prompt.

Model compute runs in one worker thread at a time (`trio.to_thread.run_sync`), so the
event loop keeps serving streams during a pass.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import trio

from specedge.protocol.errors import ErrorCode, ProtocolError
from specedge.protocol.limits import BATCH_WAIT
from specedge.verification import Verdict
from specedge.verifier.engine import PassResult, PrefillJob, TargetEngine, VerifyJob
from specedge.verifier.metrics import VerifierMetrics
from specedge.verifier.sessions import Session

log = logging.getLogger("specedge.verifier.scheduler")


@dataclass
class Outcome:
    """What a verify job's submitter gets back."""

    verdict: Verdict
    seconds: float  # this job's share of its pass's compute time
    batch_requests: int  # verify jobs in its pass


@dataclass
class _Work:
    session: Session
    verify: VerifyJob | None  # None: prefill the session
    done: trio.Event = field(default_factory=trio.Event)
    outcome: Outcome | None = None
    error: ProtocolError | None = None
    seconds: float = 0.0  # accumulated compute share (prefill spans several passes)

    def size(self, engine: TargetEngine) -> int:
        if self.verify is not None:
            return self.verify.size
        chunk = engine.next_prefill(self.session.state)
        return chunk.size if chunk else 0

    def finish(self, error: ProtocolError | None = None) -> None:
        self.error = error
        self.done.set()


@dataclass
class _Rhythm:
    """When a session's next request is due: its last answer plus its usual think time."""

    answered_at: float
    think: float | None = None  # moving average of answer -> next request, seconds
    owed: bool = True  # answered, next request not yet submitted

    def due(self) -> float:
        assert self.think is not None
        return self.answered_at + self.think


_EWMA = 0.2  # weight of the newest sample in the moving averages


def _average(old: float | None, sample: float) -> float:
    """Exponential moving average; the first sample starts it."""
    return sample if old is None else old + _EWMA * (sample - old)


class Scheduler:
    def __init__(self, engine: TargetEngine, max_batch_tokens: int,
                 metrics: VerifierMetrics | None = None,
                 batch_wait: float = BATCH_WAIT) -> None:
        if max_batch_tokens < engine.prefill_chunk:
            raise ValueError("max_batch_tokens must hold at least one prefill chunk")
        if batch_wait < 0:
            raise ValueError("batch_wait must be >= 0")
        self.engine = engine
        self.max_batch_tokens = max_batch_tokens
        self.metrics = metrics
        self.batch_wait = batch_wait  # in mean passes; 0: never hold a pass
        self.mean_pass_seconds = 0.0  # moving average of verify passes' time
        self._rhythms: dict[bytes, _Rhythm] = {}  # session id -> rhythm
        self._queue: deque[_Work] = deque()
        self._wakeup = trio.Event()
        self._closing = False
        self.running = 0  # jobs in the current pass
        # Mean seconds from submit to result, per verify request (exponential average);
        # the Advertisement's "mean verify time".
        self.mean_verify_seconds = 0.0
        self.passes = 0

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    # -- submitting ---------------------------------------------------------------

    async def verify(self, session: Session, tokens: list[int], parents: list[int]) -> Outcome:
        """Queue a verification and wait for its verdict (already committed to the session).

        If the caller is cancelled while the job runs, the session's state still moves
        on; the caller's session is then being torn down anyway.
        """
        start = trio.current_time()
        rhythm = self._rhythms.get(session.id)
        if rhythm is not None and rhythm.owed:
            rhythm.think = _average(rhythm.think, start - rhythm.answered_at)
            rhythm.owed = False
        work = await self._submit(_Work(session, VerifyJob(session.state, tokens, parents)))
        assert work.outcome is not None
        elapsed = trio.current_time() - start
        self.mean_verify_seconds += 0.1 * (elapsed - self.mean_verify_seconds)
        return work.outcome

    async def prefill(self, session: Session) -> float:
        """Fill a new session's cache, chunk by chunk between other work; return the
        compute seconds it took."""
        if session.state.prefilled:
            return 0.0
        work = await self._submit(_Work(session, None))
        return work.seconds

    async def _submit(self, work: _Work) -> _Work:
        if self._closing:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the verifier is shutting down")
        self._queue.append(work)
        self._wakeup.set()
        self._gauge()
        await work.done.wait()
        if work.error is not None:
            raise work.error
        return work

    # -- the loop -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run passes until `close()` and an empty queue; then return."""
        task_status.started()
        limiter = trio.CapacityLimiter(1)  # one engine thread at a time
        while True:
            if self._queue and not self._closing:
                await self._gather()
            batch = self._take()
            if not batch:
                if self._closing:
                    return
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            jobs = [w.verify or self._chunk(w) for w in batch]
            self.running = len(batch)
            self._gauge()
            try:
                result = await trio.to_thread.run_sync(self.engine.run, jobs, limiter=limiter)
            except Exception as exc:  # the engine rolled every cache back
                log.exception("forward pass of %d jobs failed", len(jobs))
                for w in batch:
                    w.finish(ProtocolError(ErrorCode.INTERNAL, f"verification failed: "
                                           f"{type(exc).__name__}"))
                continue
            finally:
                self.running = 0
            self.passes += 1
            self._deliver(batch, jobs, result)

    async def _gather(self) -> None:
        """Hold the next pass until the sessions due within the hold have submitted
        (see the module docstring); at most `batch_wait` mean passes."""
        hold = self.batch_wait * self.mean_pass_seconds
        start = trio.current_time()
        deadline = start + hold
        due = self._due_by(deadline) if hold > 0 else []
        if not due or len(due) < sum(1 for w in self._queue if w.verify is not None):
            return  # nothing due, or more waiting than due: this pass is worth running now
        while due:
            self._wakeup = trio.Event()
            # A little grace for the latest one's jitter; never past the hold.
            until = min(deadline, max(due) + 0.5 * self.mean_pass_seconds)
            with trio.move_on_at(until):
                await self._wakeup.wait()  # a submit (or close) wakes us to look again
            if self._closing or trio.current_time() >= until:
                break
            due = self._due_by(deadline)
        held = trio.current_time() - start
        if held > 0 and self.metrics is not None:
            self.metrics.gather_seconds.inc(held)

    def _due_by(self, deadline: float) -> list[float]:
        """Due times (<= deadline) of sessions that owe a request and are not stale."""
        now = trio.current_time()
        queued = {w.session.id for w in self._queue}
        due = []
        for sid, r in list(self._rhythms.items()):
            if not r.owed or r.think is None or sid in queued:
                continue
            when = r.due()
            if when + r.think < now:  # long overdue: the node stopped or stalls; forget it
                del self._rhythms[sid]
            elif when <= deadline:
                due.append(when)
        return due

    def forget(self, session: Session) -> None:
        """A session ended: never wait for it again."""
        self._rhythms.pop(session.id, None)

    def _chunk(self, work: _Work) -> PrefillJob:
        chunk = self.engine.next_prefill(work.session.state)
        assert chunk is not None
        return chunk

    def _take(self) -> list[_Work]:
        """Jobs for the next pass, FIFO, within the token budget (see module docstring)."""
        budget = self.max_batch_tokens
        prefill_budget = self.engine.prefill_chunk
        taken: list[_Work] = []
        kept: deque[_Work] = deque()
        while self._queue:
            work = self._queue.popleft()
            if work.session.closed:
                work.finish(ProtocolError(ErrorCode.STREAM_CLOSED, "session closed"))
                continue
            size = work.size(self.engine)
            if size == 0:  # a prefill that has nothing left to do
                work.finish()
                continue
            prefill_ok = work.verify is not None or not taken or size <= prefill_budget
            if size <= budget and prefill_ok:
                taken.append(work)
                budget -= size
                if work.verify is None:
                    prefill_budget -= size
            else:
                kept.append(work)
        self._queue = kept
        return taken

    def _deliver(self, batch: list[_Work], jobs: list, result: PassResult) -> None:
        requests = sum(1 for w in batch if w.verify is not None)
        if self.metrics is not None:
            self.metrics.record_pass(requests, len(batch), result.tokens, result.seconds)
        if requests:
            self.mean_pass_seconds = _average(self.mean_pass_seconds or None, result.seconds)
        now = trio.current_time()
        for work, job, verdict in zip(batch, jobs, result.verdicts, strict=True):
            work.seconds += result.share(job)
            if work.verify is not None:
                assert verdict is not None
                work.outcome = Outcome(verdict, work.seconds, requests)
                work.finish()
                # (the handler counts the new tokens after this returns)
                if not work.session.closed and (
                        work.session.tokens_left > len(verdict.new_tokens)):
                    rhythm = self._rhythms.setdefault(work.session.id, _Rhythm(now))
                    rhythm.answered_at, rhythm.owed = now, True
            else:
                if self.metrics is not None:
                    self.metrics.prefill_tokens.inc(job.size)
                if work.session.state.prefilled:
                    work.finish()
                else:
                    self._queue.append(work)  # next chunk, behind what arrived meanwhile
        self._gauge()

    def close(self) -> None:
        """Refuse new jobs; `run` returns once the queued ones are done."""
        self._closing = True
        self._wakeup.set()

    def fail_queued(self, error: ProtocolError) -> None:
        """Answer every job not yet in a pass with `error` (shutdown past its deadline)."""
        while self._queue:
            self._queue.popleft().finish(error)
        self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))

