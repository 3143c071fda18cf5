"""A real `specedge-verifier serve` process that cheats, for the audit tests.

    python tests/cheating_verifier.py MODE [specedge-verifier serve arguments...]

It is the real daemon with one piece swapped before it starts:

- ``accept-all``: accepts every draft token of the tree's first branch and signs receipts
  whose facts are forged to look consistent (its token first in the alternatives, margin
  0): the lazy verifier that saves its compute and earns full credit;
- ``sometimes``: the same, but only in about one round of three;
- ``lying-auditor``: verifies honestly but lies when asked to audit: it reports another
  token than the target's at several positions, with a large deficit.

A verifier that serves another model under the target's name needs no patch: the tests
run the real CLI with ``--model tiny-test-draft --model-id tiny-test``.
"""

from __future__ import annotations

import random
import sys

from specedge.audit import Facts

MODES = ("accept-all", "sometimes", "lying-auditor")


def cheating_accept(rate: float):  # noqa: ANN201
    """An acceptance 'rule' that commits the draft's first branch whole (at `rate`)."""
    from specedge import acceptance

    rng = random.Random(7)

    def accept(tokens, parents, target_tokens):  # noqa: ANN001, ANN202
        if rng.random() >= rate:
            return acceptance.accept(tokens, parents, target_tokens)
        path, node = [], -1
        while True:
            child = next((i for i, p in enumerate(parents) if p == node), None)
            if child is None:
                return path, int(target_tokens[node + 1])
            path.append(child)
            node = child

    return accept


def forged_facts(original):  # noqa: ANN001, ANN201
    """Receipt facts that name the committed tokens and contradict nothing the node can
    check alone: the committed token listed first, tied with the runner-up."""

    def record(rows, where, job, path, bonus):  # noqa: ANN001, ANN202
        honest = original(rows, where, job, path, bonus)
        committed = [*(int(job.tokens[n]) for n in path), bonus]
        out = []
        for fact, token in zip(honest, committed, strict=True):
            k = len(fact.top_tokens)
            others = [t for t in fact.top_tokens if t != token][: max(k - 1, 0)]
            out.append(Facts(token, fact.logprob if k else 0.0, 0.0, 0.0,
                             [token, *others][:k], [fact.logprob] * k))
        return out

    return record


def lying_audit(original):  # noqa: ANN001, ANN201
    def audit(model, prompt, committed, params, **how):  # noqa: ANN001, ANN202, ANN003
        facts = original(model, prompt, committed, params, **how)
        lied = []
        for i, f in enumerate(facts):
            if i % 3 == 0:  # claim another token at every third position, far ahead
                lied.append(Facts((f.token + 1) % 256, f.logprob, 5.0, 5.0))
            else:
                lied.append(f)
        return lied

    return audit


def main(argv: list[str]) -> int:
    mode, rest = argv[0], argv[1:]
    if mode not in MODES:
        raise SystemExit(f"mode must be one of {MODES}")
    from specedge.verifier import engine

    if mode in ("accept-all", "sometimes"):
        engine.accept = cheating_accept(1.0 if mode == "accept-all" else 0.34)
        engine.record_facts = forged_facts(engine.record_facts)
    else:
        engine.audit_facts = lying_audit(engine.audit_facts)
    from specedge.verifier.cli import main as serve

    return serve(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
