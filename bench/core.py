"""Issue-2 figures: the in-process engine against target-only generation.

For one model pair and dtype, over a fixed prompt set, reports acceptance, mean accepted
length, proactive hit rate, target forwards per generated token and wall time of
speculative generation (proactive on and off) against target-only autoregressive
generation, all in one run on one machine.

    python -m bench.core --pair tiny --dtype float32
    python -m bench.core --pair demo --dtype bfloat16 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from specedge.engine import autoregressive_generate, speculative_generate
from specedge.models import DEMO_DRAFT, DEMO_TARGET, TINY_DRAFT, TINY_TARGET, load_model
from specedge.text import encode_prompt, eos_ids
from specedge.trees import TreeShape

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Implement binary search over a sorted list in Python.",
    "Explain what a hash map is in two sentences.",
    "Translate to French: The weather is nice today and we are going to the park.",
    "Summarise: Speculative decoding lets a small model propose tokens that a large model "
    "verifies in one pass, so the output is unchanged but the large model runs less often.",
    "What is 17 times 23? Show the steps.",
]
PAIRS = {"tiny": (TINY_DRAFT, TINY_TARGET), "demo": (DEMO_DRAFT, DEMO_TARGET)}


def run(pair: str, dtype: torch.dtype, max_new: int, shape: TreeShape) -> dict:
    draft_name, target_name = PAIRS[pair]
    draft, _ = load_model(draft_name, dtype)
    target, tok = load_model(target_name, dtype)
    stop = eos_ids(tok, target.generation_config)
    prompts = [encode_prompt(tok, p, chat=pair == "demo") for p in PROMPTS]
    autoregressive_generate(target, prompts[0], 4)  # warm-up
    rows: dict[str, dict] = {}
    reference: list[list[int]] = []
    for mode in ("autoregressive", "speculative", "speculative+proactive"):
        totals = dict(wall_s=0.0, generated=0, drafted=0, accepted=0, rounds=0, hits=0, bets=0,
                      target_forwards=0, exact=0)
        for i, prompt in enumerate(prompts):
            t0 = time.perf_counter()
            if mode == "autoregressive":
                gen = autoregressive_generate(target, prompt, max_new, eos_ids=stop)
                reference.append(gen.token_ids)
            else:
                gen = speculative_generate(draft, target, prompt, max_new, shape=shape,
                                           proactive=mode.endswith("proactive"), eos_ids=stop)
            wall = time.perf_counter() - t0
            s = gen.stats
            totals["wall_s"] += wall
            totals["generated"] += s.generated
            totals["drafted"] += s.drafted
            totals["accepted"] += s.accepted
            totals["rounds"] += s.rounds
            totals["hits"] += s.proactive_hits
            totals["bets"] += s.proactive_bets
            totals["target_forwards"] += s.target_forwards
            totals["exact"] += gen.token_ids == reference[i]
        rows[mode] = totals
    ar = rows["autoregressive"]
    out = {"pair": pair, "dtype": str(dtype).removeprefix("torch."), "shape": str(shape),
           "max_new_tokens": max_new, "threads": torch.get_num_threads(), "modes": {}}
    for mode, t in rows.items():
        out["modes"][mode] = {
            "tokens": t["generated"],
            "wall_s": round(t["wall_s"], 2),
            "tokens_per_s": round(t["generated"] / t["wall_s"], 2),
            "speedup_vs_target_only": round(ar["wall_s"] / t["wall_s"], 3),
            "acceptance": round(t["accepted"] / t["drafted"], 4) if t["drafted"] else None,
            "mean_accepted_length": round(t["accepted"] / t["rounds"], 3) if t["rounds"] else None,
            "proactive_hit_rate": round(t["hits"] / t["bets"], 4) if t["bets"] else None,
            "target_forwards_per_token": round(t["target_forwards"] / t["generated"], 4),
            "prompts_equal_to_target_only": f"{t['exact']}/{len(prompts)}",
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pair", choices=sorted(PAIRS), default="tiny")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--tree", default="chain:4", help="chain:N or tree:BUDGET,DEPTH,WIDTH")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(json.dumps(run(args.pair, dtype, args.max_new_tokens, TreeShape.parse(args.tree)),
                     indent=1))


if __name__ == "__main__":
    main()
