"""Command line: `python -m sims validate|scale|paper|fake-bench|run` (from the repository root).

    python -m sims validate --bench bench.json     # simulated vs measured, exit 1 past 15%
    python -m sims scale [--calibration bench.json] [--out sims/out]
    python -m sims paper [--out sims/out]            # the SpecEdge paper's GPU setting
    python -m sims fake-bench --out /tmp/fake.json [--perturb 0.3]
    python -m sims run --mode specedge --nodes 64 --verifiers 4 --duration 120
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

from sims.calibration import Calibration, CalibrationError


def load_calibration(path: str | None) -> Calibration:
    return Calibration.from_bench_json(path) if path else Calibration.default()


def cmd_validate(args: argparse.Namespace) -> int:
    from sims.validation import table, validate

    try:
        doc = json.loads(Path(args.bench).read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: cannot read bench JSON {args.bench}: {e}", file=sys.stderr)
        return 2
    try:
        rows = validate(doc, args.max_k, args.repeats, args.seed, source=args.bench)
    except CalibrationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cal = Calibration.from_bench(doc, source=args.bench)
    print(f"calibration: {args.bench}; acceptance {cal.acceptance():.3f}, "
          f"hit rate {cal.proactive_hit_rate:.3f}, rtt {cal.rtt_ms:g} ms; "
          f"simulated figures are the mean of {args.repeats} seeds")
    for note in cal.notes:
        print(f"  note: {note}")
    if not rows:
        print(f"error: the bench has no K <= {args.max_k}", file=sys.stderr)
        return 2
    print(table(rows, args.tolerance))
    if args.json:
        out = [dict(mode=r.mode, streams=r.streams, metric=r.metric, measured=r.measured,
                    simulated=r.simulated, error=r.error) for r in rows]
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    bad = [r for r in rows if r.error > args.tolerance]
    print("FAIL" if bad else "OK", f"({len(bad)} of {len(rows)} figures beyond "
          f"{args.tolerance:.0%})")
    return 1 if bad else 0


def cmd_scale(args: argparse.Namespace) -> int:
    from sims.plots import plot_all
    from sims.scenarios import headline, run_points, scale_points, table

    cal = load_calibration(args.calibration)
    nodes = tuple(int(n) for n in args.nodes.split(","))
    points = scale_points(args.duration, args.warmup, nodes, args.verifiers)
    n_runs = len({p.scenario for p in points})
    print(f"scale: {n_runs} runs, {args.duration:g} s simulated each (measured after "
          f"{args.warmup:g} s warm-up), calibration: {cal.source}")
    t0 = time.perf_counter()
    rows = run_points(points, cal, args.jobs)
    elapsed = time.perf_counter() - t0
    biggest = max((r for r in rows if r["series"] == "specedge"), key=lambda r: r["nodes"])
    settings = {
        "duration_s": args.duration, "warmup_s": args.warmup, "runs": n_runs,
        "jobs": args.jobs, "elapsed_s": round(elapsed, 1),
        "events_per_s_at_largest": round(biggest["events"] / biggest["runtime_s"]),
        "events_at_largest": biggest["events"], "runtime_s_at_largest": biggest["runtime_s"],
    }
    head = headline(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"settings": settings, "calibration": cal.summary(), "headline": head, "points": rows}
    (out / "scale.json").write_text(json.dumps(doc, indent=1) + "\n")
    pngs = plot_all(rows, out, "default CPU figures" if args.calibration is None
                    else Path(args.calibration).name)
    print(table(rows))
    print(f"\nheadline ({head['nodes']} nodes, {head['verifiers']} verifiers, 14 ms RTT):")
    print(json.dumps(head, indent=1))
    print(f"\n{n_runs} runs in {elapsed:.0f} s; {settings['events_per_s_at_largest']} events/s "
          f"at {biggest['nodes']} nodes")
    print("wrote", out / "scale.json", *pngs)
    return 0


def cmd_paper(args: argparse.Namespace) -> int:
    from sims import paper
    from sims import roofline as rl
    from sims.plots import plot_paper_scale, plot_pass_cost
    from sims.roofline import gpu_calibration

    t0 = time.perf_counter()
    batches = tuple(int(b) for b in args.batches.split(","))
    print("The SpecEdge paper's setting, simulated from a GPU roofline\n")
    print("\n".join(paper.setting_lines(paper.paper_setting())))
    rows = paper.paper_rows(batches, args.duration, args.warmup, args.seeds, args.jobs)
    print(f"\nheadline: batch 1, two edges ({args.seeds} seeds x {args.duration:g} s simulated)")
    print(paper.comparison_table(rows[0]))
    print("\nvariants (tput, cost: SpecEdge over server-only; busy: verifier busy fraction)")
    print(paper.variants_table(rows))
    cpu = paper.default_cpu(args.calibration)
    curves = paper.pass_curves(cpu)
    print("\nwhere the CPU and GPU cases part: target pass cost by rows")
    print(paper.pass_table(curves))
    out = Path(args.out)
    pngs = [plot_pass_cost(paper.PASS_ROWS, curves, out / "paper_pass_cost.png")]
    doc: dict = {"paper": paper.PAPER, "headline": rows[0], "variants": rows,
                 "pass_cost_ms": {"rows": list(paper.PASS_ROWS), **curves}}
    if args.scale_nodes:
        gpu = gpu_calibration(paper.project_setting(cpu=cpu))
        big = gpu_calibration(paper.project_setting(rl.QWEN3_14B, rl.QWEN3_1_7B, cpu=cpu))
        nodes = tuple(int(n) for n in args.scale_nodes.split(","))
        cpu_d, gpu_d = (args.cpu_duration, args.cpu_duration / 3), (args.gpu_duration,
                                                                     args.gpu_duration / 3)
        cals = {"cpu 1.5B": cpu, "gpu 1.5B": gpu, "gpu 14B": big}
        durations = {"cpu 1.5B": cpu_d, "gpu 1.5B": gpu_d, "gpu 14B": gpu_d}
        scale = paper.scale_rows(cals, nodes, durations, args.jobs)
        ratios = paper.scale_ratios(scale)
        print("\nload per verifier, chain:4 and the CPU bench's acceptance throughout: the CPU "
              "bench's calibration (1.5B: the demo pair), the same pair on GPUs (A100 "
              "verifier, RTX 4090 edges, CUDA graphs), and Qwen3-14B / 1.7B on them")
        print(paper.scale_table(ratios))
        pngs.append(plot_paper_scale(scale, out / "paper_scale.png"))
        doc.update(scale=scale, scale_ratios=ratios,
                   gpu_calibrations={"gpu 1.5B": gpu.summary(), "gpu 14B": big.summary()})
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"\n{time.perf_counter() - t0:.0f} s; wrote", out / "paper.json", *pngs)
    return 0


def cmd_fake_bench(args: argparse.Namespace) -> int:
    from sims.validation import fake_bench, write_json

    cal = load_calibration(args.calibration)
    doc = fake_bench(cal, noise=args.noise, perturb=args.perturb, seed=args.seed,
                     prompts=args.prompts)
    write_json(doc, args.out)
    print("wrote", args.out)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from sims.network import Scenario, simulate

    cal = load_calibration(args.calibration)
    names = {f.name for f in fields(Scenario)}
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.duration_s is not None:
        kw["requests_per_node"] = None
    print(json.dumps(simulate(Scenario(**kw), cal).as_dict(), indent=1))
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sims", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    v = sub.add_parser("validate", help="simulated vs measured for each mode and K")
    v.add_argument("--bench", required=True, help="JSON from `specedge bench --json`")
    v.add_argument("--max-k", type=int, default=8)
    v.add_argument("--tolerance", type=float, default=0.15)
    v.add_argument("--repeats", type=int, default=5, help="seeds averaged per figure")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--json", help="also write the rows here")
    v.set_defaults(func=cmd_validate)

    s = sub.add_parser("scale", help="sweeps up to 10,000 nodes; JSON, table and PNGs")
    s.add_argument("--calibration", help="bench JSON (default: plausible CPU figures)")
    s.add_argument("--out", default="sims/out")
    s.add_argument("--duration", type=float, default=600.0, help="simulated seconds per run")
    s.add_argument("--warmup", type=float, default=200.0, help="seconds not measured")
    s.add_argument("--nodes", default="100,300,1000,3000,10000")
    s.add_argument("--verifiers", type=int, default=100)
    s.add_argument("--jobs", type=int, default=None, help="processes (default: all cores)")
    s.set_defaults(func=cmd_scale)

    p = sub.add_parser("paper", help="the SpecEdge paper's GPU setting: table and PNGs")
    p.add_argument("--out", default="sims/out")
    p.add_argument("--duration", type=float, default=60.0, help="simulated s per paper run")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--seeds", type=int, default=3, help="seeds averaged per paper figure")
    p.add_argument("--batches", default="1,2,4,8", help="verifier batch sizes (2 edges each)")
    p.add_argument("--calibration", help="CPU bench JSON (default: sims/bench_cpu_full.json)")
    p.add_argument("--scale-nodes", default="1,4,16,64,100,256",
                   help="nodes per verifier for the CPU/GPU load sweep ('' skips it)")
    p.add_argument("--cpu-duration", type=float, default=600.0)
    p.add_argument("--gpu-duration", type=float, default=30.0)
    p.add_argument("--jobs", type=int, default=None, help="processes (default: all cores)")
    p.set_defaults(func=cmd_paper)

    f = sub.add_parser("fake-bench", help="a bench JSON made by the simulation (for tests)")
    f.add_argument("--out", required=True)
    f.add_argument("--calibration")
    f.add_argument("--noise", type=float, default=0.03)
    f.add_argument("--perturb", type=float, default=0.0)
    f.add_argument("--seed", type=int, default=1234)
    f.add_argument("--prompts", type=int, default=64)
    f.set_defaults(func=cmd_fake_bench)

    r = sub.add_parser("run", help="one scenario, result as JSON")
    r.add_argument("--calibration")
    r.add_argument("--mode", default="specedge")
    r.add_argument("--nodes", type=int, default=8)
    r.add_argument("--verifiers", type=int, default=1)
    r.add_argument("--requests-per-node", dest="requests_per_node", type=int, default=4)
    r.add_argument("--duration", dest="duration_s", type=float,
                   help="run this long instead of a fixed number of requests")
    r.add_argument("--warmup", dest="warmup_s", type=float)
    r.add_argument("--rtt-ms", dest="rtt_ms", type=float)
    r.add_argument("--acceptance-scale", dest="acceptance_scale", type=float)
    r.add_argument("--choice", choices=["least_loaded", "random"])
    r.add_argument("--batch-wait", dest="batch_wait", type=float,
                   help="verifier hold for due sessions, in mean passes (0: none)")
    r.add_argument("--fail-fraction", dest="fail_fraction", type=float)
    r.add_argument("--fail-at", dest="fail_at_s", type=float)
    r.add_argument("--no-proactive", dest="proactive", action="store_false", default=None)
    r.add_argument("--seed", type=int)
    r.set_defaults(func=cmd_run)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except CalibrationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
