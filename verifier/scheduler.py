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

Queue order: two FIFO queues, verify requests and sessions waiting for their prefill.
A pass first serves whichever head has waited longer, then fills the rest of its token
budget from the other queue, so neither kind starves the other. Verify requests are
taken in arrival order, skipping (leaving in place) any that does not fit the budget;
every one fits an empty pass, so a large one waits at most until it is the oldest.
Prefill is chunked (`TargetEngine.prefill_chunk` rows, aligned) and first come, first
served: a pass carries at most one chunk's worth of prompt rows, from the session that
asked first (then the next ones, if their whole chunk still fits), and a session keeps
its place until its prompt is done. So sessions opened together finish their prefill
one after another, the first one after its own prompt's worth of passes, instead of
all of them late together (which is what re-queueing each at the tail after every
chunk did), while running sessions' verifications are delayed by at most one chunk per
pass. Each session has at most one job queued.

Standing (verifier/standing.py): when a standing source is given, verify requests are
taken in order of waited time plus a boost that grows with the log of the requesting
node's standing (one mean pass per doubling over the starting grant, `boost_passes`).
Only the order changes, never what a pass may hold: with room for everyone it is
every request, as before; under overload the earned requests go first, and a fresh one
that has waited as long as the boost goes before them (nobody starves).

Speed is measured, never assumed: the rows per second of prefill (each pass's time
split by rows) and the mean pass time give the estimates the verifier sends in Progress
frames, uses to refuse sessions it could not start soon (admission), and advertises.

Model compute runs in one worker thread at a time (`trio.to_thread.run_sync`), so the
event loop keeps serving streams during a pass.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from specedge.protocol.errors import ErrorCode, ProtocolError
from specedge.protocol.limits import BATCH_WAIT
from specedge.verification import Verdict
from specedge.verifier.engine import PassResult, PrefillJob, TargetEngine, VerifyJob
from specedge.verifier.metrics import VerifierMetrics
from specedge.verifier.sessions import Session
from specedge.verifier.standing import boost, standing_class

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
    since: float = 0.0  # when it (re)joined its queue: the fairness clock
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
class Status:
    """Where a session's work stands, for its Progress frames."""

    state: str  # "queued", "prefilling", "verifying" or "idle"
    position: int  # jobs ahead of it
    eta_s: float  # estimated seconds until it is done


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
                 batch_wait: float = BATCH_WAIT,
                 standing: Callable[[Session], float] | None = None,
                 boost_passes: float = 1.0, rank: bool = True) -> None:
        if max_batch_tokens < engine.prefill_chunk:
            raise ValueError("max_batch_tokens must hold at least one prefill chunk")
        if batch_wait < 0:
            raise ValueError("batch_wait must be >= 0")
        self.engine = engine
        self.max_batch_tokens = max_batch_tokens
        self.metrics = metrics
        self.batch_wait = batch_wait  # in mean passes; 0: never hold a pass
        self.standing = standing  # the requesting node's standing (metrics, ranking)
        self.rank = rank and standing is not None  # False: FIFO whatever the standing
        self.boost_passes = boost_passes
        self.mean_pass_seconds = 0.0  # moving average of verify passes' time
        self.prefill_rows_per_s = 0.0  # measured prefill speed (0 until the first chunk)
        self._rhythms: dict[bytes, _Rhythm] = {}  # session id -> rhythm
        self._verifies: deque[_Work] = deque()
        self._prefills: deque[_Work] = deque()
        self._running: list[_Work] = []
        self._pass_started = 0.0
        self._wakeup = trio.Event()
        self._closing = False
        # Mean seconds from submit to result, per verify request (exponential average);
        # the Advertisement's "mean verify time".
        self.mean_verify_seconds = 0.0
        self.passes = 0

    @property
    def queue_depth(self) -> int:
        return len(self._verifies) + len(self._prefills)

    @property
    def running(self) -> int:
        """Jobs in the pass under way."""
        return len(self._running)

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
        work.since = trio.current_time()
        (self._prefills if work.verify is None else self._verifies).append(work)
        self._wakeup.set()
        self._gauge()
        await work.done.wait()
        if work.error is not None:
            raise work.error
        return work

    # -- estimates ----------------------------------------------------------------

    def queued_prefill_rows(self) -> int:
        """Prompt rows waiting to be prefilled, in all."""
        return sum(w.session.state.prefix_len - w.session.state.cached
                   for w in (*self._prefills, *self._running) if w.verify is None)

    def admission_wait(self) -> float:
        """Seconds before a session opened now would start its prefill (0: unknown)."""
        if not self.prefill_rows_per_s:
            return 0.0
        return self.queued_prefill_rows() / self.prefill_rows_per_s

    def status(self, session: Session) -> Status:
        """Where `session`'s queued or running work stands, with an estimate."""
        now = trio.current_time()
        left = max(self._pass_started + self.mean_pass_seconds - now, 0.0) if self._running \
            else 0.0
        for w in self._running:
            if w.session is session:
                return Status("verifying" if w.verify else "prefilling", 0,
                              left + self._prefill_eta(w, 0))
        for queue in (self._prefills, self._verifies):
            for position, w in enumerate(queue):
                if w.session is session:
                    ahead = self._rows_ahead(queue, position) if w.verify is None else 0
                    passes = 1 + (position if w.verify is None else 0)
                    eta = left + (self._prefill_eta(w, ahead) if w.verify is None
                                  else passes * self.mean_pass_seconds)
                    return Status("queued", position + len(self._running), eta)
        return Status("idle", 0, 0.0)

    def _rows_ahead(self, queue: deque[_Work], position: int) -> int:
        return sum(queue[i].session.state.prefix_len - queue[i].session.state.cached
                   for i in range(position))

    def _prefill_eta(self, work: _Work, rows_ahead: int) -> float:
        if work.verify is not None:
            return self.mean_pass_seconds
        own = work.session.state.prefix_len - work.session.state.cached
        rate = self.prefill_rows_per_s
        return (rows_ahead + own) / rate if rate else 0.0

    # -- the loop -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run passes until `close()` and an empty queue; then return."""
        task_status.started()
        limiter = trio.CapacityLimiter(1)  # one engine thread at a time
        while True:
            if self.queue_depth and not self._closing:
                await self._gather()
            batch = self._take()
            if not batch:
                if self._closing:
                    return
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            jobs = [w.verify or self._chunk(w) for w in batch]
            self._running, self._pass_started = batch, trio.current_time()
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
                self._running = []
            self.passes += 1
            self._deliver(batch, jobs, result)

    async def _gather(self) -> None:
        """Hold the next pass until the sessions due within the hold have submitted
        (see the module docstring); at most `batch_wait` mean passes."""
        hold = self.batch_wait * self.mean_pass_seconds
        start = trio.current_time()
        deadline = start + hold
        due = self._due_by(deadline) if hold > 0 else []
        if not due or len(due) < len(self._verifies):
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
        queued = {w.session.id for w in (*self._verifies, *self._prefills)}
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
        """Jobs for the next pass within the token budget (see the module docstring)."""
        self._drop_closed()
        taken: list[_Work] = []
        budget = self.max_batch_tokens
        heads = [q for q in (self._prefills, self._verifies) if q]
        heads.sort(key=lambda q: q[0].since)  # the longer-waiting kind goes first
        for queue in heads:
            if queue is self._prefills:
                budget = self._take_prefills(taken, budget)
            else:
                budget = self._take_verifies(taken, budget)
        return taken

    def _drop_closed(self) -> None:
        for queue in (self._prefills, self._verifies):
            for w in [w for w in queue if w.session.closed]:
                queue.remove(w)
                w.finish(ProtocolError(ErrorCode.STREAM_CLOSED, "session closed"))

    def _take_prefills(self, taken: list[_Work], budget: int) -> int:
        """Whole aligned chunks, first come first served, at most one chunk's rows."""
        room = min(budget, self.engine.prefill_chunk)
        while self._prefills:
            work = self._prefills[0]
            size = work.size(self.engine)
            if size == 0:  # a prefill that has nothing left to do
                self._prefills.popleft().finish()
                continue
            if size > room:
                break  # later sessions never overtake the first one
            taken.append(self._prefills.popleft())
            room -= size
            budget -= size
        return budget

    def _take_verifies(self, taken: list[_Work], budget: int) -> int:
        now = trio.current_time()
        kept: deque[_Work] = deque()
        for work in self._ranked(now):
            size = work.size(self.engine)
            if size <= budget:
                taken.append(work)
                budget -= size
                self._waited(work, now)
            else:
                kept.append(work)
        self._verifies = kept
        return budget

    def _ranked(self, now: float) -> list[_Work]:
        """The verify queue in the order a pass takes it: FIFO, or by waited time plus
        the standing boost (see the module docstring)."""
        if not self.rank:
            return list(self._verifies)
        unit = self.boost_passes * (self.mean_pass_seconds or 0.05)

        def score(w: _Work) -> float:
            return (now - w.since) + boost(self.standing(w.session), unit)  # type: ignore[misc]

        return sorted(self._verifies, key=score, reverse=True)  # stable: FIFO among equals

    def _waited(self, work: _Work, now: float) -> None:
        if self.metrics is not None:
            label = standing_class(self.standing(work.session)) if self.standing else "fresh"
            self.metrics.queue_wait.labels(standing=label).observe(now - work.since)

    def _deliver(self, batch: list[_Work], jobs: list, result: PassResult) -> None:
        requests = sum(1 for w in batch if w.verify is not None)
        if self.metrics is not None:
            self.metrics.record_pass(requests, len(batch), result.tokens, result.seconds)
        if requests:
            self.mean_pass_seconds = _average(self.mean_pass_seconds or None, result.seconds)
        now = trio.current_time()
        unfinished: list[_Work] = []
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
                self._measure_prefill(job.size, result.share(job))
                if work.session.state.prefilled:
                    work.finish()
                else:
                    work.since = now
                    unfinished.append(work)
        # Sessions still prefilling keep their place at the head, in their order.
        self._prefills.extendleft(reversed(unfinished))
        self._gauge()

    def _measure_prefill(self, rows: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.prefill_tokens.inc(rows)
        if rows and seconds > 0 and math.isfinite(seconds):
            self.prefill_rows_per_s = _average(self.prefill_rows_per_s or None,
                                               rows / seconds)

    def close(self) -> None:
        """Refuse new jobs; `run` returns once the queued ones are done."""
        self._closing = True
        self._wakeup.set()

    def fail_queued(self, error: ProtocolError) -> None:
        """Answer every job not yet in a pass with `error` (shutdown past its deadline)."""
        for queue in (self._prefills, self._verifies):
            while queue:
                queue.popleft().finish(error)
        self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.queue_depth)
