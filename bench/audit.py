"""What auditing costs a verifier, and how soon it catches a cheater.

Cost: sessions are generated through the verifier's own engine (`TargetEngine.run`:
prefill, then one verify pass per drafted tree from the node's `Drafter`), and each
finished transcript is replayed once as an auditor replays it (`engine.audit_facts`: one
prefill-style pass). The audit overhead is audit seconds over verify seconds, times the
rate at which sessions are audited: the floor a trusted verifier settles at (5%), and
the adaptive schedule averaged over a verifier's first N sessions (every session until
5 clean audits, then 5 / clean, floored).

Detection: the probability q that one audit of a cheated session proves fraud, measured
on transcripts of two cheaters: `lazy` commits the draft model's own tokens (it accepts
every draft), `subtle` commits one wrong token in the whole session. Sessions until
caught then follow from the audit rate r: P(caught within n cheated sessions) =
1 - (1 - r q)^n, for a verifier new to the node (r = 1), for one trusted for long
(r = 5%) and for --audit-rate 0.2.

    python -m bench.audit --sessions 8 --tokens 48
    python -m bench.audit --target qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from bench.prompts import prompt_set
from specedge.drafter import Drafter
from specedge.models import load_model
from specedge.node.audit import FLOOR_RATE, rate_after
from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.audits import judge
from specedge.sampling import SamplingParams
from specedge.text import encode_prompt
from specedge.trees import TreeShape
from specedge.verifier.engine import TargetEngine, VerifyJob, audit_facts

GREEDY = SamplingParams()


def one_session(engine: TargetEngine, drafter: Drafter, prompt: list[int], n: int
                ) -> tuple[float, float, list[int], list[float]]:
    """(verify seconds, audit seconds, committed tokens, margins) of one session."""
    state = engine.new_state(prompt, GREEDY, n)
    busy = 0.0
    while (job := engine.next_prefill(state)) is not None:
        busy += engine.run([job]).seconds
    committed: list[int] = []
    margins: list[float] = []
    while len(committed) < n:
        tree = drafter.draft([*prompt, *committed])
        res = engine.run([VerifyJob(state, list(tree.tokens), list(tree.parents))])
        busy += res.seconds
        verdict = res.verdicts[0]
        drafter.commit(tree, verdict.accepted)
        committed += verdict.new_tokens
        margins += [f.margin for f in verdict.facts]
    engine.release(state)
    start = time.perf_counter()
    audit_facts(engine.model, prompt, committed, GREEDY)
    return busy, time.perf_counter() - start, committed, margins


def caught(model, prompt: list[int], committed: list[int], margins: list[float],
           engine_name: str) -> bool:
    """Whether one audit of this (claimed) transcript proves a fraud."""
    facts = audit_facts(model, prompt, committed, GREEDY)
    answer = pb.AuditAnswer(request_sha256=b"x" * 32, engine=engine_name, positions=[
        pb.AuditPosition(token=f.token, deficit=f.deficit) for f in facts])
    return bool(judge(committed, margins, engine_name, answer, b"x" * 32).frauds)


def draft_continuation(draft, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(draft(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def adaptive_mean_rate(sessions: int) -> float:
    """Mean audit rate over an honest verifier's first `sessions` sessions."""
    clean, total = 0, 0.0
    for _ in range(sessions):
        r = rate_after(clean)
        total += r
        clean += r  # in expectation: audited sessions come back clean
    return total / sessions


def detection(q: float, rate: float, sessions: list[int]) -> dict[str, float]:
    return {str(n): round(1 - (1 - rate * q) ** n, 4) for n in sessions}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.audit", description=__doc__.split("\n")[0])
    p.add_argument("--target", default="tiny-test")
    p.add_argument("--draft", default="tiny-test-draft")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--tokens", type=int, default=48, help="tokens generated per session")
    p.add_argument("--out", default="bench/results/audit-cpu-2core.json")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    target, tok = load_model(args.target, dtype)
    draft, _ = load_model(args.draft, dtype)
    engine = TargetEngine(target)
    name = f"torch/{args.dtype}"
    texts = [messages[-1]["content"] for _, messages in prompt_set()]
    prompts = [encode_prompt(tok, texts[i % len(texts)]) for i in range(args.sessions)]
    verify_s = audit_s = 0.0
    lazy = subtle = 0
    for prompt in prompts:
        drafter = Drafter(draft, TreeShape.chain(4))
        v, a, committed, margins = one_session(engine, drafter, prompt, args.tokens)
        verify_s, audit_s = verify_s + v, audit_s + a
        # The lazy cheater: the draft's own tokens, claimed with zero margins.
        fake = draft_continuation(draft, prompt, len(committed))
        lazy += caught(target, prompt, fake, [0.0] * len(fake), name)
        # The subtle one: one token swapped for the draft's where they differ.
        swap = next((i for i, (x, y) in enumerate(zip(committed, fake, strict=True))
                     if x != y), None)
        if swap is not None:
            bent = [*committed[:swap], fake[swap], *committed[swap + 1:]]
            # it claims an honest-looking margin at the swapped position
            subtle += caught(target, prompt, bent, [*margins[:swap], 0.0, *margins[swap + 1:]],
                             name)
    per_audit = audit_s / verify_s
    q_lazy, q_subtle = lazy / len(prompts), subtle / len(prompts)
    ns = [1, 5, 20, 60, 100]
    result = {
        "target": args.target, "draft": args.draft, "dtype": args.dtype,
        "sessions": len(prompts), "tokens": args.tokens,
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "avx512_bf16": _flag("avx512_bf16"), "threads": torch.get_num_threads()},
        "verify_seconds": round(verify_s, 3), "audit_seconds": round(audit_s, 3),
        "audit_over_verify_per_session": round(per_audit, 4),
        "overhead_at_floor": round(per_audit * FLOOR_RATE, 4),
        "overhead_first_100_sessions": round(per_audit * adaptive_mean_rate(100), 4),
        "overhead_first_1000_sessions": round(per_audit * adaptive_mean_rate(1000), 4),
        "q_lazy": q_lazy, "q_subtle": q_subtle,
        "p_caught_lazy_new_verifier": detection(q_lazy, 1.0, ns),
        "p_caught_lazy_trusted_floor": detection(q_lazy, FLOOR_RATE, ns),
        "p_caught_subtle_trusted_floor": detection(q_subtle, FLOOR_RATE, ns),
        "p_caught_subtle_rate_0.2": detection(q_subtle, 0.2, ns),
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _flag(name: str) -> bool:
    try:
        return name in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
