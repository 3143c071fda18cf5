"""Verify pass cost by rows, on one device, through the verifier's own engine.

The simulator prices every verifier pass by its rows (`sims.calibration.Curve`); on a CPU
that cost grows with the rows, on a GPU it should stay flat until the compute roof
(`sims.roofline`). This measures it: sessions prefilled with a `--context`-token prompt,
then `verifier.engine.TargetEngine.run` over verify jobs of a given total of rows, two ways:

- one_session: a single session with a chain of rows - 1 draft tokens (one sequence);
- sessions: rows / per_session sessions with chains of per_session - 1 tokens each (the
  verifier's batches: many sessions, a few rows each; its per-session attention loop
  costs one SDPA call per session per layer).

Each figure is the median of `--repeats` passes after a warm-up pass; after each pass the
sessions are cut back, so every pass sees the same context. Prints a table and writes JSON.

    python -m bench.pass_cost --device cuda --model qwen2.5-coder-1.5b --dtype bfloat16
    python -m bench.pass_cost --device cpu --model tiny-test --rows 1,2,4,8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def parse_rows(text: str) -> list[int]:
    rows = sorted({int(x) for x in text.split(",") if x.strip()})
    if not rows or rows[0] < 1:
        raise argparse.ArgumentTypeError("rows must be positive integers, e.g. 1,2,4,8")
    return rows


def machine(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "device": device, "gpu": None}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count)
    return info


class Bench:
    """A target engine and prefilled sessions to verify against."""

    def __init__(self, model_name: str, dtype: str, device: str, context: int) -> None:
        import torch

        from specedge.models import load_model, vocab_size
        from specedge.sampling import SamplingParams
        from specedge.verifier.engine import TargetEngine, TargetState

        self.torch = torch
        model, _ = load_model(model_name, dtype=getattr(torch, dtype), device=device)
        self.engine = TargetEngine(model, exact=False)
        self.vocab = vocab_size(model)
        self.context = context
        self._state = lambda prompt: TargetState(prompt, SamplingParams())
        self.sessions: list = []

    def session(self, i: int):
        """The i-th prefilled session (made on first use)."""
        while len(self.sessions) <= i:
            n = len(self.sessions)
            prompt = [(7 + 13 * (n + k)) % self.vocab for k in range(self.context + 1)]
            state = self._state(prompt)
            while (job := self.engine.next_prefill(state)) is not None:
                self.engine.run([job])
            self.sessions.append(state)
        return self.sessions[i]

    def verify_ms(self, chains: list[int], repeats: int) -> float:
        """Median ms of one pass verifying a chain of each length (one session each)."""
        from specedge import kvcache
        from specedge.verifier.engine import VerifyJob

        states = [self.session(i) for i in range(len(chains))]
        times = []
        for _ in range(repeats + 1):  # the first pass warms up
            marks = [(len(s.tokens), s.cached) for s in states]
            jobs = [VerifyJob(s, [(11 * k + 5) % self.vocab for k in range(n)],
                              list(range(-1, n - 1))) for s, n in zip(states, chains, strict=True)]
            result = self.engine.run(jobs)
            times.append(result.seconds * 1000)
            for s, (n_tokens, cached) in zip(states, marks, strict=True):
                del s.tokens[n_tokens:]
                kvcache.keep_rows(s.cache, range(cached))
        return statistics.median(times[1:])


def measure(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    bench = Bench(args.model, args.dtype, args.device, args.context)
    bench.verify_ms([args.per_session - 1] * 2, 2)  # first passes: allocator, kernels, caches
    out = {"one_session": {"rows": [], "ms": []},
           "sessions": {"rows": [], "sessions": [], "ms": []}}
    for rows in args.rows:
        if time.perf_counter() - t0 > args.max_seconds:
            out["stopped_early"] = f"time budget of {args.max_seconds:g} s reached"
            break
        out["one_session"]["rows"].append(rows)
        out["one_session"]["ms"].append(round(bench.verify_ms([rows - 1], args.repeats), 3))
        n = max(1, rows // args.per_session)
        chains = [args.per_session - 1] * n
        out["sessions"]["rows"].append(n * args.per_session)
        out["sessions"]["sessions"].append(n)
        out["sessions"]["ms"].append(round(bench.verify_ms(chains, args.repeats), 3))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def table(doc: dict) -> str:
    one, many = doc["one_session"], doc["sessions"]
    lines = [f"{'rows':>6} {'one session':>12} {'x 1 row':>8} | {'rows':>6} {'sessions':>8} "
             f"{'ms':>10} {'ms/row':>8}", "-" * 68]
    base = one["ms"][0] if one["ms"] else 1.0
    for i, rows in enumerate(one["rows"]):
        r2, s2, ms2 = many["rows"][i], many["sessions"][i], many["ms"][i]
        lines.append(f"{rows:>6} {one['ms'][i]:>12.2f} {one['ms'][i] / base:>7.2f}x | "
                     f"{r2:>6} {s2:>8} {ms2:>10.2f} {ms2 / r2:>8.3f}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.pass_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b",
                    help="target model: a preset (tiny-test, qwen2.5-coder-1.5b), HF id or path")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--rows", type=parse_rows, default=list(ROWS), help="comma-separated")
    ap.add_argument("--per-session", type=int, default=5,
                    help="rows per session in the many-sessions series (chain:4 is 5)")
    ap.add_argument("--context", type=int, default=128, help="prompt tokens per session")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=240.0,
                    help="stop starting larger passes after this long")
    ap.add_argument("--json", help="write the results here")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.per_session < 1 or args.repeats < 1 or args.context < 1:
        print("error: --per-session, --repeats and --context must be >= 1", file=sys.stderr)
        return 2
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device} but torch {torch.__version__} sees no CUDA GPU",
              file=sys.stderr)
        return 2
    doc = {"machine": machine(args.device),
           "config": {k: getattr(args, k) for k in ("model", "dtype", "context", "per_session",
                                                    "repeats")},
           **measure(args)}
    print(table(doc))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
        print("wrote", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
