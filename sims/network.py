"""The SimPy model of one run.

SpecEdge: every edge node is one stream. For each request it opens a session on a
verifier (which prefills the prompt, in chunks between other work), then drafts a tree
on its own GPU, sends it (half a round trip), waits while the verifier batches it with
whatever else is ready, gets the verdict back (the other half) and hands the accepted
tokens plus the bonus token to its user all at once. While a request is in flight it
drafts the next tree proactively, betting that the whole path is accepted: on a hit that
tree is ready at once (or when its drafting ends), on a miss it drafts anew.

Baselines: the server does everything for every stream, in lockstep batches: one decode
step per token (autoregressive), or drafting for every stream then verifying them all
(server-only speculative decoding). There is no network in a baseline pass.

Verifier failures: a verifier dies at a set time, losing its queue and the pass in flight;
each of its nodes notices after a detection timeout, opens a session on another verifier
(re-prefilling the prompt and everything accepted so far) and resends its tree.

Not modelled: KV-cache memory and session limits on a verifier; network bandwidth
(latency only); stale advertisements (the least-loaded choice sees live session counts);
discovery time; edge nodes that fail or leave; heterogeneous edge GPUs (beyond per-draft
jitter); end-of-sequence (every request generates exactly its token count); correlation
of acceptance between rounds (each round draws independently from the calibrated
histogram); bets that come true without the whole path accepted (possible with wide
trees); the ledger.

All times inside the model are seconds; calibration figures are milliseconds.
"""

from __future__ import annotations

import bisect
import functools
import math
import random
import time
from collections import deque
from collections.abc import Generator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import simpy

from sims.calibration import Calibration

MODES = ("autoregressive", "server_only", "specedge")
CHOICES = ("least_loaded", "random")


@dataclass(frozen=True)
class Scenario:
    """One simulated run. A finite workload (`requests_per_node`) runs until every request
    is done; otherwise the run lasts `duration_s` and is measured after `warmup_s`."""

    mode: str = "specedge"
    nodes: int = 1  # streams: one per edge node in SpecEdge, one per user in a baseline
    verifiers: int = 1  # verifiers (SpecEdge) or servers (baselines)
    requests_per_node: int | None = 4
    requests_total: int | None = None  # a shared queue of this many requests (the bench's)
    duration_s: float = 60.0
    warmup_s: float = 0.0
    max_new_tokens: int | None = None  # None: the calibration's
    prompt_tokens: int | None = None  # None: the calibration's
    rtt_ms: float | None = None  # mean round trip; None: the calibration's
    rtt_spread: float = 0.0  # coefficient of variation of the round trip across nodes
    net_jitter: float = 0.05  # coefficient of variation of one message's delay
    jitter: float = 0.05  # coefficient of variation of every compute time
    acceptance_scale: float = 1.0
    proactive: bool = True
    choice: str = "least_loaded"  # how a node picks its verifier
    max_batch_tokens: int = 1024  # a verifier pass takes ready requests up to this
    prefill_chunk: int = 512  # prefill runs in chunks of this many tokens, one per pass
    batch_wait: float = 1.5  # a free verifier holds for sessions due within this many passes
    # Static batching (the SpecEdge reference server): a pass waits until this many
    # messages are queued, or as many as there are open sessions; 0: off.
    min_batch: int = 0
    fail_fraction: float = 0.0  # verifiers that die at `fail_at_s`
    fail_at_s: float | None = None  # None: half way through the run
    detect_timeout_s: float = 2.0  # a node gives a silent verifier this long
    user_rtt: bool = False  # baselines: the user is a round trip away (adds to TTFT)
    start_spread_s: float = 0.0  # streams start at random times in [0, this)
    shared_draft_core: bool = False  # all nodes draft on one core (the bench's node process)
    seed: int = 0

    def check(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {self.choice!r}")
        if self.nodes < 1 or self.verifiers < 1:
            raise ValueError("a run needs at least one node and one verifier")
        if self.requests_per_node is None and self.duration_s <= self.warmup_s:
            raise ValueError("duration_s must exceed warmup_s")
        if not 0.0 <= self.fail_fraction < 1.0:
            raise ValueError("fail_fraction must be in [0, 1): someone has to survive")


@dataclass
class Result:
    """What one run measured, over its measurement window."""

    mode: str
    nodes: int
    verifiers: int
    tokens: int  # delivered inside the window
    tokens_total: int  # delivered in the whole run
    requests_done: int
    wall_s: float  # the window (or, for a finite workload, until the last token)
    server_busy_s: float  # summed over verifiers/servers, inside the window
    edge_draft_s: float  # summed over nodes, inside the window
    server_throughput_tps: float  # tokens per second of server busy time
    throughput_tps: float  # tokens per second of wall time
    itl_ms_p50: float
    itl_ms_p95: float
    itl_ms_mean: float
    ttft_ms_p50: float
    ttft_ms_p95: float
    cost_per_1m_tokens_usd: float
    acceptance: float | None
    mean_accepted_length: float | None
    proactive_hit_rate: float | None
    mean_batch_tokens: float
    failovers: int
    events: int
    runtime_s: float  # real seconds the simulation took
    per_request_tokens: list[int] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("per_request_tokens")
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


@dataclass
class Request:
    start: float
    prompt: int
    extra_ttft: float = 0.0  # the user's round trip in a baseline
    generated: int = 0
    first_at: float | None = None
    last_at: float | None = None


class Job:
    """One message a verifier handles: a verify request (tokens) and/or a prefill."""

    __slots__ = ("tokens", "prefill", "done", "sent", "session")

    def __init__(self, tokens: int, prefill: int, done: simpy.Event, sent: float,
                 session: int = -1):
        self.tokens = tokens
        self.prefill = prefill  # prompt tokens still to prefill
        self.done = done  # succeeds with True (verdict, or session ready) or None (gone)
        self.sent = sent
        self.session = session  # the node's index (verify jobs): whose rhythm it is


class Recorder:
    """Counts tokens, gaps between token arrivals, busy time; only what falls inside the
    window [w0, w1] enters the figures, so a run's start-up does not skew them."""

    def __init__(self, w0: float, w1: float):
        self.w0, self.w1 = w0, w1
        self.tokens = 0
        self.tokens_total = 0
        # Per request, as the bench measures it: (last token - first token) / (tokens - 1).
        self.itl: list[float] = []
        self.ttft: list[float] = []
        self.server_busy = 0.0
        self.edge_busy = 0.0
        self.rounds = 0
        self.drafted = 0
        self.accepted = 0
        self.bets = 0
        self.hits = 0
        self.failovers = 0
        self.batches = 0
        self.batch_tokens = 0
        self.finished: list[int] = []
        self.last_token_at = 0.0

    def _clip(self, start: float, end: float) -> float:
        return max(0.0, min(end, self.w1) - max(start, self.w0))

    def server(self, start: float, end: float) -> None:
        self.server_busy += self._clip(start, end)

    def edge(self, start: float, end: float) -> None:
        self.edge_busy += self._clip(start, end)

    def deliver(self, req: Request, t: float, n: int) -> None:
        """`n` tokens reach the user at `t`, together."""
        if n <= 0:
            return
        self.tokens_total += n
        req.generated += n
        self.last_token_at = max(self.last_token_at, t)
        inside = self.w0 <= t <= self.w1
        if inside:
            self.tokens += n
            if req.first_at is None:
                self.ttft.append(t - req.start + req.extra_ttft)
        if req.first_at is None:
            req.first_at = t
        req.last_at = t

    def round(self, accepted: int, drafted: int) -> None:
        self.rounds += 1
        self.accepted += accepted
        self.drafted += drafted

    def finish(self, req: Request) -> None:
        self.finished.append(req.generated)
        if (req.generated > 1 and req.first_at is not None and req.last_at is not None
                and req.first_at >= self.w0 and req.last_at <= self.w1):
            self.itl.append((req.last_at - req.first_at) / (req.generated - 1))


def lognormal_factor(rng: random.Random, cv: float) -> float:
    """A multiplier with mean 1 and coefficient of variation `cv` (1 when cv is 0)."""
    if cv <= 0:
        return 1.0
    sigma = math.sqrt(math.log1p(cv * cv))
    return rng.lognormvariate(-sigma * sigma / 2, sigma)


class Verifier:
    """A host with the target model, as `verifier.scheduler` runs it: continuous batching
    with a token budget. Whenever it is free it holds for the sessions whose next request
    is due within `batch_wait` mean passes (each session's rhythm: answer to next
    request), then takes every ready message (oldest first) up to the budget and runs
    them as one forward pass; a message arriving meanwhile waits for the next."""

    def __init__(self, sim: Simulation, index: int):
        self.sim = sim
        self.index = index
        self.queue: deque[Job] = deque()
        self.running: list[Job] = []
        self.wake: simpy.Event | None = None
        self.alive = True
        self.died_at = math.inf
        self.sessions = 0  # what it advertises: sessions open on it
        # session -> [answered at, think seconds or -1, owes a request]
        self.rhythms: dict[int, list] = {}
        self.mean_pass_s = 0.0
        sim.env.process(self.serve())

    def submit(self, job: Job) -> None:
        if not self.alive:
            self.sim.fail_later(job, job.sent + self.sim.sc.detect_timeout_s)
            return
        self.queue.append(job)
        r = self.rhythms.get(job.session) if job.tokens else None
        if r is not None and r[2]:
            think = self.sim.env.now - r[0]
            r[1] = think if r[1] < 0 else r[1] + 0.2 * (think - r[1])
            r[2] = False
        if self.wake is not None and not self.wake.triggered:
            self.wake.succeed()

    def due_by(self, deadline: float) -> list[float]:
        """Due times (<= deadline) of sessions that owe a request, not queued, not stale."""
        now = self.sim.env.now
        queued = {job.session for job in self.queue}
        due = []
        for sid, (answered, think, owed) in list(self.rhythms.items()):
            if not owed or think < 0 or sid in queued:
                continue
            when = answered + think
            if when + think < now:
                del self.rhythms[sid]
            elif when <= deadline:
                due.append(when)
        return due

    def gather(self) -> Generator[simpy.Event, Any, None]:
        env = self.sim.env
        if self.sim.sc.min_batch:
            yield from self.gather_static(self.sim.sc.min_batch)
            return
        hold = self.sim.sc.batch_wait * self.mean_pass_s
        deadline = env.now + hold
        due = self.due_by(deadline) if hold > 0 else []
        if len(due) < sum(1 for job in self.queue if job.tokens):
            return  # busy anyway: what is due can take the next pass, back to back
        while due and self.alive:
            until = min(deadline, max(due) + 0.5 * self.mean_pass_s)
            self.wake = env.event()
            yield env.any_of([self.wake, env.timeout(max(0.0, until - env.now))])
            self.wake = None
            if env.now >= until:
                break
            due = self.due_by(deadline)

    def gather_static(self, size: int) -> Generator[simpy.Event, Any, None]:
        """Wait for `size` queued messages (fewer when fewer sessions are open)."""
        while self.alive and len(self.queue) < min(size, self.sessions):
            self.wake = self.sim.env.event()
            yield self.wake
            self.wake = None

    def leave(self) -> None:
        """A session closes (done, or moving to another verifier). A static batch waiting
        for more sessions than remain must hear of it."""
        self.sessions -= 1
        if self.sim.sc.min_batch and self.wake is not None and not self.wake.triggered:
            self.wake.succeed()

    def forget(self, session: int) -> None:
        self.rhythms.pop(session, None)

    def serve(self) -> Generator[simpy.Event, Any, None]:
        sim, env, cal = self.sim, self.sim.env, self.sim.cal
        while self.alive:
            if not self.queue:
                self.wake = env.event()
                yield self.wake
                self.wake = None
                continue
            yield from self.gather()
            if not self.alive:
                return
            batch, verify_tokens, prefill_tokens = self.take()
            ms = cal.pass_ms(verify_tokens + prefill_tokens)  # one packed forward
            start = env.now
            self.running = [job for job, _ in batch]
            yield env.timeout(ms * lognormal_factor(sim.rng, sim.sc.jitter) / 1000)
            self.running = []
            sim.rec.server(start, min(env.now, self.died_at))
            if not self.alive:
                return  # the jobs were failed when it died
            sim.rec.batches += 1
            sim.rec.batch_tokens += verify_tokens + prefill_tokens
            if verify_tokens:
                took = env.now - start
                self.mean_pass_s += (took - self.mean_pass_s) * (0.2 if self.mean_pass_s else 1)
            for job, size in batch:
                if job.tokens:
                    r = self.rhythms.setdefault(job.session, [env.now, -1.0, True])
                    r[0], r[2] = env.now, True
                    job.done.succeed(True)
                else:
                    job.prefill -= size
                    if job.prefill > 0:
                        self.queue.append(job)  # next chunk, behind what arrived meanwhile
                    else:
                        job.done.succeed(True)

    def take(self) -> tuple[list[tuple[Job, int]], int, int]:
        """The next pass, as the verifier's scheduler picks it: queue order, skipping (and
        keeping in place) whatever does not fit the token budget, and at most one prefill
        chunk's worth of prompt besides the job at the head."""
        sc = self.sim.sc
        budget, prefill_budget = sc.max_batch_tokens, sc.prefill_chunk
        batch: list[tuple[Job, int]] = []
        kept: deque[Job] = deque()
        verify_tokens = prefill_tokens = 0
        while self.queue:
            job = self.queue.popleft()
            size = job.tokens or min(job.prefill, sc.prefill_chunk)
            prefill_ok = job.tokens > 0 or not batch or size <= prefill_budget
            if (size <= budget or not batch) and prefill_ok:
                batch.append((job, size))
                budget -= size
                if job.tokens:
                    verify_tokens += size
                else:
                    prefill_budget -= size
                    prefill_tokens += size
            else:
                kept.append(job)
        self.queue = kept
        return batch, verify_tokens, prefill_tokens

    def die(self) -> None:
        """The process is gone: everything queued or running is lost, and each waiting
        node notices when its timeout runs out."""
        self.alive = False
        self.died_at = self.sim.env.now
        for job in list(self.queue) + self.running:
            self.sim.fail_later(job, self.died_at + self.sim.sc.detect_timeout_s)
        self.queue.clear()
        self.running = []


CRITICAL, BET = 0, 1  # drafting priorities on a shared core


class CoreTask:
    __slots__ = ("work", "left", "prio", "done", "started")

    def __init__(self, work: float, prio: int, done: simpy.Event, started: float):
        self.work = work
        self.left = work
        self.prio = prio
        self.done = done
        self.started = started


class SharedCore:
    """One CPU core shared by drafting threads: processor sharing among the runnable tasks
    of the best priority present (a nice-19 bet gets the core only when no nice-0 drafting
    wants it: CFS gives it ~1.5% otherwise, taken as 0)."""

    def __init__(self, env: simpy.Environment):
        self.env = env
        self.tasks: list[CoreTask] = []
        self.last = env.now
        self.changed = env.event()
        env.process(self.loop())

    def _running(self) -> list[CoreTask]:
        if not self.tasks:
            return []
        best = min(t.prio for t in self.tasks)
        return [t for t in self.tasks if t.prio == best]

    def _advance(self) -> None:
        now = self.env.now
        running = self._running()
        if running and now > self.last:
            share = (now - self.last) / len(running)
            for t in running:
                t.left -= share
        self.last = now
        for t in [t for t in self.tasks if t.left <= 1e-12]:
            self.tasks.remove(t)
            t.done.succeed()

    def _kick(self) -> None:
        if not self.changed.triggered:
            self.changed.succeed()

    def loop(self) -> Generator[simpy.Event, Any, None]:
        env = self.env
        while True:
            self._advance()
            running = self._running()
            self.changed = env.event()
            if not running:
                yield self.changed
                continue
            dt = min(t.left for t in running) * len(running)
            yield env.any_of([env.timeout(dt), self.changed])

    def start(self, work: float, prio: int) -> CoreTask:
        self._advance()
        task = CoreTask(work, prio, self.env.event(), self.env.now)
        if work <= 0:
            task.done.succeed()
            return task
        self.tasks.append(task)
        self._kick()
        return task

    def cut(self, task: CoreTask, step: float) -> float:
        """Stop `task` after its current forward (of `step` seconds); return the work cut."""
        self._advance()
        if task.done.triggered or step <= 0:
            return 0.0
        done = task.work - task.left
        keep = min(task.work, math.ceil(done / step - 1e-9) * step)
        if keep <= done:
            keep = min(task.work, done + step)
        cut = task.work - keep
        task.left -= cut
        task.work = keep
        return cut

    def wait(self, task: CoreTask, rec: Recorder) -> Generator[simpy.Event, Any, None]:
        if not task.done.triggered:
            yield task.done
        rec.edge(task.started, self.env.now)

    def work(self, seconds: float, prio: int, rec: Recorder
             ) -> Generator[simpy.Event, Any, None]:
        yield from self.wait(self.start(seconds, prio), rec)


class Link:
    """A node's connection: a per-node mean one-way delay, per-message jitter, and
    in-order delivery (a stream does not overtake itself)."""

    def __init__(self, one_way_s: float):
        self.one_way_s = one_way_s
        self.last_arrival = 0.0


@dataclass
class Stream:
    """A baseline user: its requests, served by one server."""

    index: int
    user_rtt_s: float
    left: int | None
    req: Request | None = None
    target_fill: int = 0  # target prompt rows still to prefill
    draft_fill: int = 0  # draft-model rows to catch up (server-only)
    drafted: int = 0  # draft tokens of the current round (server-only)


class Simulation:
    """Builds the model for a scenario, runs it, returns the Result."""

    def __init__(self, scenario: Scenario, cal: Calibration):
        scenario.check()
        self.sc = scenario
        if scenario.mode == "server_only" and cal.server_draft_pass is None:
            # A hardware figure: derive it from the measured calibration, before scaling.
            cal = replace(cal, server_draft_pass=server_draft_pass_ms(cal))
        self.cal = cal.with_acceptance_scale(scenario.acceptance_scale)
        self.verify_busy = 0.0  # baselines: target passes only
        self.queue_left = scenario.requests_total  # None: each stream has its own count
        self.env = simpy.Environment()
        self.rng = random.Random(scenario.seed)
        self.max_new = scenario.max_new_tokens or self.cal.max_new_tokens
        self.prompt = scenario.prompt_tokens or self.cal.prompt_tokens
        rtt_ms = self.cal.rtt_ms if scenario.rtt_ms is None else scenario.rtt_ms
        self.rtt_s = rtt_ms / 1000
        finite = scenario.requests_per_node is not None
        w0 = 0.0 if finite else scenario.warmup_s
        w1 = math.inf if finite else scenario.duration_s
        self.rec = Recorder(w0, w1)
        pmf = self.cal.accepted_pmf()
        self.cdf = list(np.cumsum(pmf))
        self.cdf[-1] = 1.0
        self.depth = self.cal.depth
        self.hit_q = self.cal.hit_given_full()
        self.verifiers: list[Verifier] = []

    # -- shared pieces ----------------------------------------------------------------

    def draw_accepted(self) -> int:
        return min(bisect.bisect_right(self.cdf, self.rng.random()), self.depth)

    def node_rtt_s(self) -> float:
        return self.rtt_s * lognormal_factor(self.rng, self.sc.rtt_spread)

    def one_way(self, link: Link) -> float:
        return link.one_way_s * lognormal_factor(self.rng, self.sc.net_jitter)

    def draft_s(self, forwards: int) -> float:
        """`forwards` draft forwards on a node (one row each), seconds."""
        return (forwards * self.cal.draft_step_ms() * lognormal_factor(self.rng, self.sc.jitter)
                / 1000)

    def first_tree_s(self, prompt: int) -> float:
        """A request's first tree: one forward over the prompt, then depth - 1 more."""
        cal = self.cal
        ms = cal.draft_prefill_ms(prompt) + (self.depth - 1) * cal.draft_step_ms()
        return ms * lognormal_factor(self.rng, self.sc.jitter) / 1000

    def fail_later(self, job: Job, at: float) -> None:
        """Tell the job's node, at `at`, that no verdict is coming."""
        if job.done.triggered:
            return
        ev = self.env.timeout(max(0.0, at - self.env.now))
        done = job.done
        ev.callbacks.append(lambda _e: None if done.triggered else done.succeed(None))

    def send(self, link: Link, verifier: Verifier, job: Job, at: float) -> None:
        """The message leaves at `at` (now or later) and reaches `verifier` a one-way delay
        after, never before the node's previous message."""
        arrive = max(at + self.one_way(link), link.last_arrival)
        link.last_arrival = arrive
        ev = self.env.timeout(arrive - self.env.now)
        ev.callbacks.append(lambda _e: verifier.submit(job))

    def choose_verifier(self) -> Verifier:
        """Least loaded by advertised open sessions (ties broken at random), or random."""
        alive = [v for v in self.verifiers if v.alive]
        if self.sc.choice == "random":
            return self.rng.choice(alive)
        low = min(v.sessions for v in alive)
        best = [v for v in alive if v.sessions == low]
        return best[0] if len(best) == 1 else self.rng.choice(best)

    # -- SpecEdge ---------------------------------------------------------------------

    def node(self, index: int) -> Generator[simpy.Event, Any, None]:
        """One edge node: one stream of requests, drafting locally on its own device.

        The node waits only for replies (session opened, verdict). What it does on its
        own (drafting, a reply's way back) needs no event: `t` and `ready` are times it
        computes ahead of the clock, and its next message is scheduled to leave then. That
        halves the events per round, which is what lets 10,000 nodes run in seconds.

        As `node.generation` does: the first tree starts with a draft forward over the
        whole prompt; a fresh tree is `depth` forwards, a bet `depth + 1`; when the verdict
        arrives the bet stops only after its current forward (the round waits for the bet
        thread), and a won bet is finished (adopted) before the next round is sent."""
        env, cal, sc, rec = self.env, self.cal, self.sc, self.rec
        link = Link(self.node_rtt_s() / 2)
        t = self.rng.uniform(0.0, sc.start_spread_s) if sc.start_spread_s > 0 else env.now
        left = sc.requests_per_node
        tree = cal.tree_tokens
        while True:
            more, left = self.take_request(left)
            if not more:
                break
            req = Request(start=t, prompt=self.prompt)
            verifier, t = yield from self.open_session(link, req.prompt, t)
            ready = t + self.first_tree_s(req.prompt)
            rec.edge(t, ready)
            while req.generated < self.max_new:
                job = Job(tree + 1, 0, env.event(), ready, index)  # pending token + tree
                self.send(link, verifier, job, ready)
                bet = self.draft_s(self.depth + 1) if sc.proactive else 0.0
                ok = yield job.done
                if not ok:
                    # The verifier is gone. Open a session elsewhere with everything accepted
                    # so far and send the same tree again: nothing accepted is lost.
                    rec.failovers += 1
                    rec.edge(ready, min(ready + bet, env.now))
                    verifier.leave()
                    verifier.forget(index)
                    verifier, ready = yield from self.open_session(
                        link, req.prompt + req.generated, env.now)
                    continue
                t = env.now + self.one_way(link)  # the verdict reaches the node
                accepted = self.draw_accepted()
                rec.round(accepted, tree)
                rec.deliver(req, t, min(accepted + 1, self.max_new - req.generated))
                stop = t
                if bet > 0 and t < ready + bet:  # the bet's current forward ends first
                    step = bet / (self.depth + 1)
                    stop = min(ready + math.ceil((t - ready) / step) * step, ready + bet)
                if req.generated >= self.max_new:
                    rec.edge(ready, min(ready + bet, stop))  # the bet is dropped
                    t = stop
                    break
                hit = False
                if sc.proactive:
                    rec.bets += 1
                    hit = accepted == self.depth and self.rng.random() < self.hit_q
                    rec.hits += hit
                    rec.edge(ready, ready + bet if hit else min(ready + bet, stop))
                if hit:
                    ready = max(t, ready + bet)
                else:
                    d = self.draft_s(self.depth)
                    rec.edge(stop, stop + d)
                    ready = stop + d
            rec.finish(req)
            verifier.leave()
            verifier.forget(index)

    def node_shared(self, index: int, core: SharedCore) -> Generator[simpy.Event, Any, None]:
        """One stream of the bench's node process: every stream drafts on one shared core.

        Critical drafting (a request's first tree, a fresh tree after a miss, finishing a
        won bet) shares the core equally; bets run niced (`BET_NICE`), i.e. only when no
        critical drafting wants the core. The round waits for the bet's current forward.
        Events for every draft: only for small runs (the bench's K streams)."""
        env, sc, rec = self.env, self.sc, self.rec
        link = Link(self.node_rtt_s() / 2)
        left = sc.requests_per_node
        tree = self.cal.tree_tokens
        step = self.cal.draft_step_ms() / 1000
        while True:
            more, left = self.take_request(left)
            if not more:
                break
            req = Request(start=env.now, prompt=self.prompt)
            verifier, t = yield from self.open_session(link, req.prompt, env.now)
            yield env.timeout(max(0.0, t - env.now))
            yield from core.work(self.first_tree_s(req.prompt), CRITICAL, rec)
            while req.generated < self.max_new:
                job = Job(tree + 1, 0, env.event(), env.now, index)
                self.send(link, verifier, job, env.now)
                bet = core.start(self.draft_s(self.depth + 1), BET) if sc.proactive else None
                ok = yield job.done
                if not ok:
                    rec.failovers += 1
                    if bet is not None:
                        core.cut(bet, step)
                        yield from core.wait(bet, rec)
                    verifier.leave()
                    verifier.forget(index)
                    verifier, t = yield from self.open_session(
                        link, req.prompt + req.generated, env.now)
                    yield env.timeout(max(0.0, t - env.now))
                    yield from core.work(self.draft_s(self.depth), CRITICAL, rec)
                    continue
                yield env.timeout(self.one_way(link))  # the verdict reaches the node
                accepted = self.draw_accepted()
                rec.round(accepted, tree)
                rec.deliver(req, env.now, min(accepted + 1, self.max_new - req.generated))
                rest = 0.0
                if bet is not None:
                    rest = core.cut(bet, step)  # stops after the current forward
                    yield from core.wait(bet, rec)
                if req.generated >= self.max_new:
                    break
                hit = False
                if bet is not None:
                    rec.bets += 1
                    hit = accepted == self.depth and self.rng.random() < self.hit_q
                    rec.hits += hit
                yield from core.work(rest if hit else self.draft_s(self.depth), CRITICAL, rec)
            rec.finish(req)
            verifier.leave()
            verifier.forget(index)

    def open_session(self, link: Link, tokens: int, at: float
                     ) -> Generator[simpy.Event, Any, tuple[Verifier, float]]:
        """OpenSession from `at`: pick a verifier, have it prefill `tokens`, hear back.
        Tries the next verifier if this one turns out dead. Returns it and the time the
        node hears that the session is ready."""
        while True:
            verifier = self.choose_verifier()
            verifier.sessions += 1
            # The verifier caches every committed token but the pending one.
            job = Job(0, max(1, tokens - 1), self.env.event(), at)
            self.send(link, verifier, job, at)
            ok = yield job.done
            if ok:
                return verifier, self.env.now + self.one_way(link)
            self.rec.failovers += 1
            verifier.leave()
            at = self.env.now

    def kill_verifiers(self, at: float, count: int) -> Generator[simpy.Event, Any, None]:
        yield self.env.timeout(at)
        for v in self.rng.sample(self.verifiers, count):
            v.die()

    # -- baselines --------------------------------------------------------------------

    def take_request(self, left: int | None) -> tuple[bool, int | None]:
        """(whether a stream with `left` requests of its own gets another, its new left)."""
        if self.queue_left is not None:
            if self.queue_left <= 0:
                return False, left
            self.queue_left -= 1
            return True, left
        if left is None:
            return True, None
        return (True, left - 1) if left > 0 else (False, left)

    def next_request(self, s: Stream) -> None:
        more, s.left = self.take_request(s.left)
        if not more:
            s.req = None
            return
        s.req = Request(start=self.env.now, prompt=self.prompt, extra_ttft=s.user_rtt_s)
        s.target_fill = s.draft_fill = max(1, self.prompt - 1)  # all but the pending token
        s.drafted = 0

    def pass_(self, ms: float, target: bool = True) -> Generator[simpy.Event, Any, None]:
        start = self.env.now
        yield self.env.timeout(ms * lognormal_factor(self.rng, self.sc.jitter) / 1000)
        self.rec.server(start, self.env.now)
        self.rec.batches += 1
        if target:
            self.verify_busy += self.env.now - start

    def server(self, streams: list[Stream]) -> Generator[simpy.Event, Any, None]:
        """A baseline server, as `bench.serving` runs it: every live stream in every pass.

        Autoregressive: a pass holds a prefill chunk for each new stream (no token) and one
        decode row for each prefilled one. Server-only: new streams' prefill chunks ride
        in the verify pass; the prefilled streams first get their drafts
        (`server_drafts`), then one target pass verifies every tree (tree + pending token
        rows per stream), priced by the baseline's pass curve. A finished
        stream takes its next request before the next pass."""
        env, cal, sc, rec = self.env, self.cal, self.sc, self.rec
        ar = sc.mode == "autoregressive"
        chain = cal.tree_tokens
        chunk = sc.prefill_chunk
        draft_ms = 0.0 if ar else server_draft_pass_ms(cal)
        if sc.start_spread_s > 0:
            starts = sorted((self.rng.uniform(0.0, sc.start_spread_s), s.index) for s in streams)
        else:
            starts = [(0.0, s.index) for s in streams]
        by_index = {s.index: s for s in streams}
        waiting = deque(by_index[i] for _, i in starts)
        start_at = deque(t for t, _ in starts)
        active: list[Stream] = []
        while True:
            while start_at and start_at[0] <= env.now:
                start_at.popleft()
                s = waiting.popleft()
                self.next_request(s)
                if s.req is not None:
                    active.append(s)
            if not active:
                if not start_at:
                    return
                yield env.timeout(start_at[0] - env.now)
                continue
            filling = [s for s in active if s.target_fill > 0]
            ready = [s for s in active if s.target_fill == 0]
            fill_rows = {s.index: min(s.target_fill, chunk) for s in filling}
            if not ar:
                yield from self.server_drafts(ready, draft_ms)
            per = 1 if ar else chain + 1
            rows = sum(fill_rows.values()) + per * len(ready)
            yield from self.pass_(cal.baseline_pass_ms(rows))
            rec.batch_tokens += rows
            for s in filling:
                s.target_fill -= fill_rows[s.index]
                if not ar and s.target_fill == 0:
                    s.draft_fill = max(1, self.prompt - 1)
            for s in ready:
                if ar:
                    n = 1
                else:
                    accepted = self.draw_accepted()
                    rec.round(accepted, chain)
                    n = accepted + 1
                    # The draft cache keeps the accepted rows it has; a fully accepted chain
                    # leaves its last draft token without a row: one row to catch up.
                    s.draft_fill = 1 if accepted >= chain else 0
                    s.drafted = 0
                rec.deliver(s.req, env.now, min(n, self.max_new - s.req.generated))
                if s.req.generated >= self.max_new:
                    rec.finish(s.req)
                    self.next_request(s)
                    if s.req is None:
                        active.remove(s)

    def server_drafts(self, ready: list[Stream], draft_ms: float
                      ) -> Generator[simpy.Event, Any, None]:
        """Server-only: draft a tree for every ready stream, in batched draft-model passes.

        With a measured (or roofline) batch drafting curve, one phase of
        `server_draft_ms(streams)` plus a pass for any draft prefill. Otherwise passes of
        `draft_ms` scaled by the row shape: a catch-up row or the prompt for a stream that
        needs one, then `depth` passes of tree / depth rows per stream (a chain: one row)."""
        cal, rec, chunk = self.cal, self.rec, self.sc.prefill_chunk
        tree = cal.tree_tokens
        if cal.server_draft is not None:
            fill = sum(s.draft_fill for s in ready)
            ms = cal.server_draft_ms(len(ready))
            if fill:
                ms += draft_ms * cal.pass_shape(fill)
            for s in ready:
                s.draft_fill, s.drafted = 0, tree
            yield from self.pass_(ms, target=False)
            rec.batch_tokens += fill + tree * len(ready)
            return
        step = math.ceil(tree / self.depth)
        while ready and min(s.drafted for s in ready) < tree:
            rows = 0
            for s in ready:
                if s.drafted >= tree:
                    continue
                if s.draft_fill > 0:
                    n = min(s.draft_fill, chunk)
                    s.draft_fill -= n
                    rows += n
                else:
                    n = min(step, tree - s.drafted)
                    s.drafted += n
                    rows += n
            yield from self.pass_(draft_ms * cal.pass_shape(rows), target=False)
            rec.batch_tokens += rows

    # -- running ----------------------------------------------------------------------

    def run(self) -> Result:
        sc, env = self.sc, self.env
        t0 = time.perf_counter()
        finite = sc.requests_per_node is not None
        if sc.mode == "specedge":
            self.verifiers = [Verifier(self, i) for i in range(sc.verifiers)]
            core = SharedCore(env) if sc.shared_draft_core else None
            for i in range(sc.nodes):
                env.process(self.node(i) if core is None else self.node_shared(i, core))
            dying = round(sc.fail_fraction * sc.verifiers)
            if sc.fail_fraction > 0:
                dying = min(max(1, dying), sc.verifiers - 1)
            if dying:
                at = sc.fail_at_s if sc.fail_at_s is not None else sc.duration_s / 2
                env.process(self.kill_verifiers(at, dying))
        else:
            groups: list[list[Stream]] = [[] for _ in range(sc.verifiers)]
            for i in range(sc.nodes):
                rtt = self.node_rtt_s() if sc.user_rtt else 0.0
                groups[i % sc.verifiers].append(Stream(i, rtt, sc.requests_per_node))
            for g in groups:
                if g:
                    env.process(self.server(g))
        if finite:
            env.run()
        else:
            env.run(until=sc.duration_s)
        return self.result(time.perf_counter() - t0)

    def result(self, runtime_s: float) -> Result:
        sc, rec, cal = self.sc, self.rec, self.cal
        finite = sc.requests_per_node is not None
        wall = rec.last_token_at if finite else sc.duration_s - sc.warmup_s
        gaps_ms = np.asarray(rec.itl) * 1000
        ttft_ms = np.asarray(rec.ttft) * 1000

        def pct(a: np.ndarray, q: float) -> float:
            return float(np.percentile(a, q)) if a.size else math.nan

        tokens = rec.tokens
        cost_usd = (rec.server_busy / 3600 * cal.price_server_usd_h
                    + rec.edge_busy / 3600 * cal.price_edge_usd_h)
        spec = sc.mode != "autoregressive"
        eid = getattr(self.env, "_eid", None)
        return Result(
            mode=sc.mode,
            nodes=sc.nodes,
            verifiers=sc.verifiers,
            tokens=tokens,
            tokens_total=rec.tokens_total,
            requests_done=len(rec.finished),
            wall_s=wall,
            server_busy_s=rec.server_busy,
            edge_draft_s=rec.edge_busy,
            server_throughput_tps=tokens / rec.server_busy if rec.server_busy else 0.0,
            throughput_tps=tokens / wall if wall else 0.0,
            itl_ms_p50=pct(gaps_ms, 50),
            itl_ms_p95=pct(gaps_ms, 95),
            itl_ms_mean=float(gaps_ms.mean()) if gaps_ms.size else math.nan,
            ttft_ms_p50=pct(ttft_ms, 50),
            ttft_ms_p95=pct(ttft_ms, 95),
            cost_per_1m_tokens_usd=cost_usd / tokens * 1e6 if tokens else math.nan,
            acceptance=rec.accepted / rec.drafted if spec and rec.drafted else None,
            mean_accepted_length=rec.accepted / rec.rounds if spec and rec.rounds else None,
            proactive_hit_rate=(rec.hits / rec.bets if sc.mode == "specedge" and rec.bets
                                else None),
            mean_batch_tokens=rec.batch_tokens / rec.batches if rec.batches else 0.0,
            failovers=rec.failovers,
            events=next(eid) if eid is not None else -1,
            runtime_s=runtime_s,
            per_request_tokens=list(rec.finished),
        )


@functools.lru_cache(maxsize=64)
def server_draft_pass_ms(cal: Calibration) -> float:
    """The server's one-row draft-model pass, ms.

    Measured directly when the calibration has it. Otherwise derived from
    `server_draft_tree_ms`, which `bench.run.calibration()` defines as the minimum over the
    bench's K of server-only draft busy time over rounds (per stream and round, passes
    shared by the batch). Draft passes cost a fixed time scaled by the target's row
    shape (`pass_shape`: decode passes are weight-bound, so nearly flat in rows), so the
    simulated draft busy time is proportional to that fixed time: simulate the bench's
    server-only workload at each K with 1 ms and scale so that its minimum is the
    measured one."""
    if cal.server_draft_pass is not None:
        return cal.server_draft_pass
    unit = replace(cal, server_draft_pass=1.0)
    per_round = []
    for k in cal.bench_streams:
        sc = Scenario(mode="server_only", nodes=k, verifiers=1, jitter=0.0,
                      requests_per_node=math.ceil(max(k, cal.prompts) / k),
                      requests_total=max(k, cal.prompts), seed=0)
        sim = Simulation(sc, unit)
        sim.run()
        draft_busy = sim.rec.server_busy - sim.verify_busy
        if sim.rec.rounds:
            per_round.append(draft_busy * 1000 / sim.rec.rounds)
    return cal.server_draft_tree_ms / min(per_round) if per_round else cal.server_draft_tree_ms


def simulate(scenario: Scenario, cal: Calibration | None = None) -> Result:
    """Run one scenario (with the default calibration unless one is given)."""
    return Simulation(scenario, cal or Calibration.default()).run()
