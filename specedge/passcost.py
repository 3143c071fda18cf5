"""Pass cost by rows, measured at start, and the choice of engine by it.

Which engine is fastest depends on the machine, not on the model alone: torch bf16 is the
fastest where the CPU computes bf16 natively (or on a GPU) and slower than float32 where
it does not; llama.cpp on quantised GGUF weights beats both on such CPUs (the figures are
in the README). So a process that may run several engines measures each for a few
seconds, on its own hardware, and keeps the fastest for its role:

- a verifier cares about passes of several rows (a session's tree, several sessions'
  trees together): its score is the cost of a 5-row pass (chain:4 and its root) plus a
  16-row one;
- a drafter decodes one token at a time: its score is the 1-row cost.

The measured curve (rows -> seconds) is what `--engine auto` chooses by; the curve a
verifier advertises comes from its own probe after (`verifier/costprobe.py`).
Any engine with the verifier engines' interface (`new_state`, `next_prefill`, `run`,
`release`) can be measured; `cut` puts a session back to an earlier length after a
measured pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from specedge.sampling import SamplingParams

log = logging.getLogger("specedge.passcost")

ROWS = (1, 5, 16)
VERIFIER_ROWS = (5, 16)
DRAFTER_ROWS = (1,)


def cost_curve(engine: object, vocab: int, cut: Callable[[object, int, int], None],
               rows: Sequence[int] = ROWS, context: int = 32, repeats: int = 2,
               budget_s: float = 20.0) -> dict[int, float]:
    """Seconds of a pass verifying one chain of `rows` rows over a `context`-token cache,
    for each row count: the fastest of `repeats` passes after a warm-up (other processes
    on the machine only ever add time). Stops early past `budget_s`: a very slow engine
    need not be measured in full to lose."""
    prompt = [(7 + 13 * k) % vocab for k in range(context + 1)]
    state = engine.new_state(prompt, SamplingParams(), max_new_tokens=max(rows) + 8)
    start = time.perf_counter()
    out: dict[int, float] = {}
    try:
        while (job := engine.next_prefill(state)) is not None:
            engine.run([job])
        verify = _verify_job(engine)
        for n in rows:
            times = []
            for i in range(repeats + 1):  # the first pass warms up
                n_tokens, cached = len(state.tokens), state.cached
                tokens = [(11 * k + 5) % vocab for k in range(n - 1)]
                result = engine.run([verify(state, tokens, list(range(-1, n - 2)))])
                if i:
                    times.append(result.seconds)
                cut(state, n_tokens, cached)
            out[n] = min(times)
            if time.perf_counter() - start > budget_s:
                break
    finally:
        engine.release(state)
    return out


def _verify_job(engine: object) -> Callable:
    """The VerifyJob class of the engine's own module."""
    import sys

    return sys.modules[type(engine).__module__].VerifyJob


@dataclass
class Measured:
    """One candidate engine and what it cost."""

    name: str
    costs: dict[int, float]
    engine: object = field(repr=False, default=None)
    error: str | None = None

    def score(self, rows: Sequence[int]) -> float:
        if self.error or not all(n in self.costs for n in rows):
            return float("inf")
        return sum(self.costs[n] for n in rows)


def describe(costs: dict[int, float]) -> str:
    return ", ".join(f"{n} rows {s * 1000:.1f} ms" for n, s in sorted(costs.items()))


def choose(measured: list[Measured], rows: Sequence[int]) -> tuple[Measured, str]:
    """The fastest candidate by `rows`, and a sentence saying why."""
    ranked = sorted(measured, key=lambda m: m.score(rows))
    best = ranked[0]
    if best.score(rows) == float("inf"):
        reasons = "; ".join(f"{m.name}: {m.error or 'not measured'}" for m in measured)
        raise RuntimeError(f"no engine could run here ({reasons})")
    parts = []
    for m in ranked:
        if m.error:
            parts.append(f"{m.name}: unavailable ({m.error})")
        else:
            parts.append(f"{m.name}: {describe(m.costs)}")
    rows_text = "+".join(str(n) for n in rows)
    return best, (f"chose {best.name}, the fastest by the cost of {rows_text}-row passes "
                  f"measured here [{'; '.join(parts)}]")
