"""Measure the engine's pass time by rows at start, for the verifier to advertise.

Nodes size dynamic trees against this curve (`specedge.costs`): one more row is worth
drafting only while its chance of acceptance pays for what it adds to the pass. A few
seconds at most: passes of 1, 2, 4, ... rows on one throwaway session, the fastest of a
few each after a warm-up pass (other work on the machine only ever adds time), stopping
early when the time budget is spent.
"""

from __future__ import annotations

import time

from specedge.sampling import SamplingParams
from specedge.verifier.engine import TargetEngine, VerifyJob

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
    """(rows, microseconds) for each probed row count, in order; counts past the time
    budget are left out (a node extrapolates from the last two)."""
    prompt = [(7 + 13 * k) % vocab for k in range(PROBE_CONTEXT)]
    state = engine.new_state(prompt, SamplingParams())
    start = time.perf_counter()
    out: list[tuple[int, int]] = []
    try:
        while (job := engine.next_prefill(state)) is not None:
            engine.run([job])
        for rows in probe_rows(max_rows):
            times = []
            for _ in range(PROBE_REPEATS + 1):  # the first pass of a new shape warms up
                drafts = [(11 * k + 5) % vocab for k in range(rows - 1)]
                times.append(engine.run([VerifyJob(state, drafts,
                                                   list(range(-1, rows - 2)))]).seconds)
            out.append((rows, int(min(times[1:]) * 1e6)))
            if time.perf_counter() - start > budget_s:
                break
    finally:
        engine.release(state)
    return out
