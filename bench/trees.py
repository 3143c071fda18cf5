"""`specedge bench --sweep`: draft shapes side by side, in one process, on the server cores.

For each shape (chains, static trees, dynamic trees), over the committed prompts: the
draft model drafts each round's tree, the verifier's own engine verifies it, greedy. It
reports, per shape:

- accepted tokens per round (draft tokens the target kept; each round also yields a bonus);
- verify pass cost (ms per round, the engine's pass) and drafting cost (ms per round);
- server throughput: tokens per second of verify passes (what SpecEdge's verifier spends);
- serial ms per token: drafting plus verifying, the single-stream pace with nothing hidden;
- bet coverage: how often the verdict was among the drafter's 1, 2 or 3 likeliest
  outcomes (`Drafter.bet`): the proactive hit rate with that many bets and no time limit.

Dynamic shapes are sized against this engine's pass cost, measured first (the curve a
verifier advertises). The best shape: the highest server throughput among those whose
serial time per token is within 10% of the fastest; the report names it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from bench.prompts import prompt_set

SHAPES = ("chain:2", "chain:4", "chain:6", "chain:8", "tree:8,4,2", "tree:16,6,4",
          "tree:32,8,4", "dynamic:16", "dynamic:32", "dynamic:64")
ITL_SLACK = 1.10  # the best shape may be this much slower per token than the fastest


def run_shape(shape_text: str, draft_model: object, engine: object, prompts: list[list[int]],
              max_new: int, stop: set[int], cost: object) -> dict:
    """Generate every prompt with one shape; its costs and outputs."""
    from specedge.drafter import Drafter, _outcomes
    from specedge.sampling import SamplingParams
    from specedge.trees import TreeShape
    from specedge.verifier.engine import VerifyJob

    shape = TreeShape.parse(shape_text)
    t = dict(rounds=0, drafted=0, accepted=0, tokens=0, draft_s=0.0, verify_s=0.0, rows=0)
    covered = [0, 0, 0]
    outputs = []
    for prompt in prompts:
        state = engine.new_state(prompt, SamplingParams())
        while (job := engine.next_prefill(state)) is not None:
            engine.run([job])
        drafter = Drafter(draft_model, shape)
        drafter.cost = cost
        out: list[int] = []
        while len(out) < max_new and not (out and out[-1] in stop):
            t0 = time.perf_counter()
            tree = drafter.draft(list(state.tokens))
            t["draft_s"] += time.perf_counter() - t0
            drafter._forward_rest(drafter.growth)  # for the bets' odds; not timed
            bets = _outcomes(tree, drafter.growth, 3)
            result = engine.run([VerifyJob(state, tree.tokens, tree.parents)])
            verdict = result.verdicts[0]
            t["verify_s"] += result.seconds
            t["rows"] += result.tokens
            verdict_at = (verdict.accepted[-1] if verdict.accepted else -1, verdict.bonus)
            for n in range(3):
                covered[n] += verdict_at in bets[: n + 1]
            drafter.commit(tree, verdict.accepted)
            t["rounds"] += 1
            t["drafted"] += len(tree)
            t["accepted"] += len(verdict.accepted)
            for tok in verdict.new_tokens:
                if len(out) < max_new and not (out and out[-1] in stop):
                    out.append(tok)
        engine.release(state)
        t["tokens"] += len(out)
        outputs.append(out)
    r = t["rounds"]
    return {
        "shape": shape_text, "tokens": t["tokens"], "rounds": r,
        "tree_tokens_per_round": round(t["drafted"] / r, 2),
        "accepted_per_round": round(t["accepted"] / r, 3),
        "verify_ms_per_round": round(t["verify_s"] * 1000 / r, 2),
        "draft_ms_per_round": round(t["draft_s"] * 1000 / r, 2),
        "server_throughput_tps": round(t["tokens"] / t["verify_s"], 3),
        "serial_ms_per_token": round((t["draft_s"] + t["verify_s"]) * 1000 / t["tokens"], 2),
        "bet_coverage": {str(n + 1): round(c / r, 4) for n, c in enumerate(covered)},
        "outputs": outputs,
    }


def best_shape(rows: list[dict]) -> str:
    """The highest server throughput among shapes within ITL_SLACK of the fastest pace."""
    fastest = min(r["serial_ms_per_token"] for r in rows)
    fair = [r for r in rows if r["serial_ms_per_token"] <= fastest * ITL_SLACK]
    return max(fair, key=lambda r: r["server_throughput_tps"])["shape"]


def sweep(args: argparse.Namespace) -> dict:
    import torch

    from specedge.costs import CostCurve
    from specedge.kvblocks import store_for
    from specedge.models import load_model, vocab_size
    from specedge.text import eos_ids
    from specedge.trees import TreeShape
    from specedge.verifier.costprobe import measure_pass_costs
    from specedge.verifier.engine import TargetEngine

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, args.server_cores)
    torch.set_num_threads(len(args.server_cores))
    dtype = getattr(torch, args.dtype)
    draft, tok = load_model(args.draft_model, dtype, args.device)
    target, _ = load_model(args.target_model, dtype, args.device)
    engine = TargetEngine(target, store=store_for(target, enabled=False))
    stop = set(eos_ids(tok, target.generation_config))
    prompts = [list(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"])
               for _, m in prompt_set(args.quick)]
    prompts = prompts[: args.prompts or (3 if args.quick else None)]
    shapes = args.shapes.split() if args.shapes else list(SHAPES)
    top = max(TreeShape.parse(s).budget for s in shapes) + 1
    points = measure_pass_costs(engine, vocab_size(target), top)
    cost = CostCurve.of((r, us / 1e6) for r, us in points)
    rows = []
    for shape in shapes:
        print(f"sweep {shape} ...", flush=True)
        rows.append(run_shape(shape, draft, engine, prompts, args.max_new_tokens, stop, cost))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "outputs"}), flush=True)
    ref = rows[0]["outputs"]
    for r in rows:
        same = sum(a == b for a, b in zip(r.pop("outputs"), ref, strict=True))
        r["outputs_equal_to_first"] = f"{same}/{len(ref)}"
    return {"config": {"target_model": args.target_model, "draft_model": args.draft_model,
                       "dtype": args.dtype, "prompts": len(prompts),
                       "max_new_tokens": args.max_new_tokens, "cores": args.server_cores},
            "pass_cost_ms": {r: round(us / 1000, 3) for r, us in points},
            "shapes": rows, "best": best_shape(rows)}


def print_sweep(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="specedge bench --sweep")
    for col in ["shape", "tree tokens", "accepted / round", "verify ms", "draft ms",
                "server tok/s", "serial ms / token", "bets 1/2/3 cover", "equal"]:
        table.add_column(col, justify="right")
    for r in report["shapes"]:
        cov = "/".join(f"{100 * v:.0f}%" for v in r["bet_coverage"].values())
        table.add_row(r["shape"], f"{r['tree_tokens_per_round']:.1f}",
                      f"{r['accepted_per_round']:.2f}", f"{r['verify_ms_per_round']:.1f}",
                      f"{r['draft_ms_per_round']:.1f}", f"{r['server_throughput_tps']:.2f}",
                      f"{r['serial_ms_per_token']:.1f}", cov, r["outputs_equal_to_first"])
    console = Console(width=max(Console().width, 130))
    console.print(table)
    console.print(f"pass cost by rows (ms): {report['pass_cost_ms']}")
    console.print(f"best shape: {report['best']}")


def sweep_main(args: argparse.Namespace) -> int:
    if args.max_new_tokens == 48 and args.quick:
        args.max_new_tokens = 32
    report = sweep(args)
    from bench.run import machine

    report["machine"] = machine()
    print_sweep(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0
