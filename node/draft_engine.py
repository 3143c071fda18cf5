"""Which engine drafts here: torch or llama.cpp, chosen by measurement (`--engine`).

A drafter decodes one token at a time, so what matters is the cost of a 1-row pass.
`--engine auto` loads the draft model both ways this machine can (torch in `--dtype`,
llama.cpp from the model's GGUF), times single-token decodes over a short cache for
each, keeps the faster and logs what it chose and why (`specedge.passcost.choose`).
"""

from __future__ import annotations

import logging
import statistics
import time

from specedge import passcost
from specedge.models import TINY_DRAFT, TINY_TARGET
from specedge.trees import TreeShape

log = logging.getLogger("specedge.node")


def load_draft(name: str, dtype: object, device: str, engine: str,
               threads: int | None = None) -> tuple[object, object]:
    """(draft model, its tokenizer): a torch model, or a `LlamaDraftModel`."""
    from specedge.models import load_model

    if engine == "torch":
        return load_model(name, dtype, device)
    if engine == "llama.cpp":
        return _llama(name, threads)
    measured = []
    for label, load in (("torch", lambda: load_model(name, dtype, device)),
                        ("llama.cpp", lambda: _llama(name, threads))):
        try:
            model, tok = load()
            cost = _decode_seconds(model)
            measured.append(passcost.Measured(_name(model, dtype), {1: cost}, (model, tok)))
        except Exception as exc:  # a candidate that cannot run here just loses
            measured.append(passcost.Measured(label, {}, error=str(exc).splitlines()[0]))
    best, why = passcost.choose(measured, passcost.DRAFTER_ROWS)
    log.info("draft model %s: %s", name, why)
    return best.engine


def _name(model: object, dtype: object) -> str:
    return getattr(model, "name", None) or f"torch/{str(dtype).removeprefix('torch.')}"


def _llama(name: str, threads: int | None) -> tuple[object, object]:
    from specedge.ggufs import gguf_path
    from specedge.llama import LlamaModel, unavailable
    from specedge.llama_drafter import LlamaDraftModel
    from specedge.node.edge import load_target_tokenizer

    reason = unavailable()
    if reason:
        raise ValueError(reason)
    path = gguf_path(name)
    # The tokenizer: the preset's own for the tiny pair, else read from the GGUF itself
    # (no conversion of the weights needed).
    tok_source = name if name in (TINY_TARGET, TINY_DRAFT) else str(path)
    tok, _config = load_target_tokenizer(tok_source)
    return LlamaDraftModel(LlamaModel(path), threads), tok


def _decode_seconds(model: object, repeats: int = 3, context: int = 32) -> float:
    """Median seconds of one draft token over a `context`-token cache, on either engine."""
    if hasattr(model, "new_drafter"):  # llama.cpp (specedge.llama_drafter)
        drafter, vocab = model.new_drafter(TreeShape.chain(1), context + repeats + 2), \
            model.vocab_size
    else:
        from specedge.drafter import Drafter
        from specedge.models import vocab_size

        drafter, vocab = Drafter(model, TreeShape.chain(1)), vocab_size(model)
    prompt = [(7 + 13 * k) % vocab for k in range(context)]
    drafter.prefill(prompt)
    times = []
    for i in range(repeats + 1):  # the first warms up
        start = time.perf_counter()
        drafter.prefill([*prompt, i + 1])
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)
