"""Pass cost by rows for each engine on this machine, in one run: the figures behind the
engine choice (README "Engines measured").

For each engine (torch in each `--dtypes`, llama.cpp on the model's GGUF) it prefills a
`--context`-token prompt (timed: the prefill figure), then times passes verifying one
chain of R rows over that cache, R in `--rows` (median of `--repeats` after a warm-up),
through the verifier's own engines (`specedge.passcost.cost_curve`).

    python -m bench.engines --model qwen2.5-coder-1.5b --threads 1
    python -m bench.engines --model tiny-test --rows 1,5 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


def cpu_flags() -> list[str]:
    """The CPU flags that decide which engine wins (bf16, AMX, AVX-512, AVX2)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    keep = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma", "f16c")
    return [f for f in keep if f in flags]


def _args(model: str, engine: str, dtype: str, threads: int) -> argparse.Namespace:
    return argparse.Namespace(
        engine=engine, dtype=dtype, model=model, device="cpu", prefill_chunk=512,
        max_batch_tokens=1024, kv_cache_gb=0.25, threads=threads, verbose=0, model_id=None,
        no_prefix_cache=True, kv_host_gb=0.0, kv_disk_dir=None, kv_disk_gb=1.0)


def measure(model: str, engine: str, dtype: str, threads: int, rows: list[int],
            context: int, repeats: int) -> dict:
    import torch

    from specedge.sampling import SamplingParams
    from specedge.verifier import engines

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    built = engines._torch(_args(model, engine, dtype, threads), dtype) if engine == "torch" \
        else engines._llama(_args(model, engine, dtype, threads))
    load_s = time.perf_counter() - t0
    prompt = [(7 + 13 * k) % built.vocab_size for k in range(context + 1)]
    state = built.new_state(prompt, SamplingParams(), max_new_tokens=64)
    start = time.perf_counter()
    while (job := built.next_prefill(state)) is not None:
        built.run([job])
    prefill_ms = (time.perf_counter() - start) * 1000
    built.release(state)
    from specedge import passcost

    costs = passcost.cost_curve(built, built.vocab_size, engines._cutter(built), rows,
                                context=context, repeats=repeats, budget_s=600)
    return {"engine": built.name, "load_s": round(load_s, 2), "prefill_ms": round(prefill_ms, 1),
            "ms": {str(n): round(s * 1000, 2) for n, s in costs.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.engines", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--engines", default="torch,llama.cpp", help="comma-separated")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="torch dtypes, comma-separated")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,5,16")
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = sorted({int(x) for x in args.rows.split(",")})
    out = {"machine": {"cpu": platform.processor() or platform.machine(),
                       "flags": cpu_flags(), "threads": args.threads},
           "config": {"model": args.model, "context": args.context, "rows": rows,
                      "repeats": args.repeats}, "engines": []}
    for engine in args.engines.split(","):
        for dtype in (args.dtypes.split(",") if engine == "torch" else ["-"]):
            try:
                res = measure(args.model, engine, dtype, args.threads, rows, args.context,
                              args.repeats)
            except Exception as exc:  # report it, measure the others
                res = {"engine": f"{engine}/{dtype}", "error": str(exc).splitlines()[0]}
            out["engines"].append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)
    print(f"{args.model}, {args.threads} thread(s), {args.context}-token cache; CPU flags "
          f"{' '.join(out['machine']['flags'])}")
    print(f"{'engine':<20}" + "".join(f"{f'{n} rows':>10}" for n in rows) +
          f"{f'prefill {args.context}':>14}")
    for res in out["engines"]:
        if "error" in res:
            print(f"{res['engine']:<20} error: {res['error']}")
            continue
        print(f"{res['engine']:<20}" + "".join(f"{res['ms'].get(str(n), 0):>10.1f}"
                                              for n in rows) + f"{res['prefill_ms']:>14.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
