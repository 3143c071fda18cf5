"""Measure the engine's pass time by rows at start, for the verifier to advertise.

Nodes size dynamic trees against this curve (`specedge.costs`): one more row is worth
drafting only while its chance of acceptance pays for what it adds to the pass. A few
seconds at most: passes of 1, 2, 4, ... rows on one throwaway session, the fastest of a
few each after a warm-up pass (other work on the machine only ever adds time), stopping
early when the time budget is spent.
"""

from __future__ import annotations

import logging
import time

from specedge.kvblocks import MemoryFull
from specedge.sampling import SamplingParams
from specedge.verifier.engine import TargetEngine, VerifyJob

log = logging.getLogger("specedge.verifier")

PROBE_CONTEXT = 64  # prompt rows the probe session holds (a short chat turn)
PROBE_REPEATS = 3
PROBE_BUDGET_S = 5.0


def probe_rows(max_rows: int) -> list[int]:
    """1, 2, 4, ... up to `max_rows`, and `max_rows` itself (the largest tree plus root)."""
    rows, r = [], 1
    while r < max_rows:
        rows.append(r)
        r *= 2
    return [*rows, max_rows]


def measure_pass_costs(engine: TargetEngine, vocab: int, max_rows: int,
                       budget_s: float = PROBE_BUDGET_S) -> list[tuple[int, int]]:
    """(rows, microseconds) for each probed row count, in order.

    A warm-up round over every row count, then rounds over all of them again, keeping
    each count's fastest pass: interleaved, so a burst of other work on the machine
    cannot bend the curve at one count. Stops after the first measured round once
    `budget_s` is spent."""
    prompt = [(7 + 13 * k) % vocab for k in range(PROBE_CONTEXT)]
    try:  # the probe session holds its prompt and the largest tree, nothing more
        state = engine.new_state(prompt, SamplingParams(), max_new_tokens=max_rows)
    except MemoryFull as exc:
        log.warning("no pass-cost probe (nodes size trees without it): %s", exc)
        return []
    best: dict[int, float] = {}
    try:
        while (job := engine.next_prefill(state)) is not None:
            engine.run([job])
        start = time.perf_counter()
        for repeat in range(PROBE_REPEATS + 1):  # round 0 warms every shape up
            for rows in probe_rows(max_rows):
                drafts = [(11 * k + 5) % vocab for k in range(rows - 1)]
                seconds = engine.run([VerifyJob(state, drafts,
                                                list(range(-1, rows - 2)))]).seconds
                if repeat:
                    best[rows] = min(best.get(rows, seconds), seconds)
            if repeat and time.perf_counter() - start > budget_s:
                break
    finally:
        engine.release(state)
    return [(rows, int(s * 1e6)) for rows, s in sorted(best.items())]
