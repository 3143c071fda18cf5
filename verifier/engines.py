"""Which engine serves the target here: torch or llama.cpp, chosen by measurement.

`--engine torch` is the default and the bit-exact float32 path the tests rely on.
`--engine llama.cpp` loads the model's GGUF directly (`specedge.ggufs`). `--engine auto`
(and `--dtype auto`) builds every engine this machine can run for the model, measures
each one's pass cost by rows for a few seconds (`specedge.passcost`), keeps the fastest
and logs what it chose and why. The curve the verifier advertises to nodes is measured
after, on the engine it serves with (`verifier/costprobe.py`).
"""

from __future__ import annotations

import argparse
import gc
import logging

from specedge import passcost

log = logging.getLogger("specedge.verifier")

ENGINES = ("auto", "torch", "llama.cpp")
TORCH_DTYPES = ("float32", "bfloat16")  # what --dtype auto measures on torch
LLAMA_CTX_CAP = 16384  # default KV cells of a llama.cpp context


def build(args: argparse.Namespace) -> object:
    """The engine for `args` (--engine, --dtype, --model, ...), measured when asked."""
    names = ["torch", "llama.cpp"] if args.engine == "auto" else [args.engine]
    dtypes = list(TORCH_DTYPES) if args.dtype == "auto" else [args.dtype]
    if len(names) == 1 and len(dtypes) == 1:
        # Nothing to choose: the verifier's cost probe measures the curve it advertises.
        return _torch(args, dtypes[0]) if names[0] == "torch" else _llama(args)
    measured: list[passcost.Measured] = []
    leader: passcost.Measured | None = None
    for name in names:
        for dtype in dtypes if name == "torch" else [None]:
            label = f"torch/{dtype}" if dtype else "llama.cpp"
            try:
                engine = _torch(args, dtype) if dtype else _llama(args)
                m = passcost.Measured(engine.name, _curve(engine), engine)
            except Exception as exc:  # a candidate that cannot run here just loses
                log.info("engine %s cannot run here: %s", label, exc)
                m = passcost.Measured(label, {}, error=str(exc).splitlines()[0])
            measured.append(m)
            engine = None
            rows = passcost.VERIFIER_ROWS
            if leader is None or m.score(rows) < leader.score(rows):
                leader, m = m, leader
            if m is not None:
                m.engine = None  # free the slower one's weights before loading the next
            gc.collect()
    best, why = passcost.choose(measured, passcost.VERIFIER_ROWS)
    log.info("%s", why)
    best.engine.pass_costs = best.costs
    return best.engine


def _curve(engine: object) -> dict[int, float]:
    return passcost.cost_curve(engine, engine.vocab_size, _cutter(engine))


def _cutter(engine: object):
    if hasattr(engine, "ctx"):  # llama.cpp
        def cut(state, n_tokens: int, cached: int) -> None:
            engine.ctx.seq_rm(state.seq, cached, -1)
            del state.tokens[n_tokens:]
            state.cached = cached
        return cut
    from specedge import kvcache

    def cut_torch(state, n_tokens: int, cached: int) -> None:
        del state.tokens[n_tokens:]
        kvcache.keep_rows(state.cache, range(cached))
    return cut_torch


def _torch(args: argparse.Namespace, dtype_name: str) -> object:
    import torch

    from specedge.models import load_model, vocab_size
    from specedge.verifier.cli import kv_store
    from specedge.verifier.engine import TargetEngine

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[dtype_name]
    model, _tok = load_model(args.model, dtype, args.device)
    engine = TargetEngine(model, prefill_chunk=min(args.prefill_chunk, args.max_batch_tokens),
                          store=kv_store(model, args))
    engine.name = f"torch/{dtype_name}"
    engine.vocab_size = vocab_size(model)
    engine.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 20)
    return engine


def _llama(args: argparse.Namespace) -> object:
    from specedge.ggufs import gguf_path
    from specedge.llama import LlamaModel, unavailable
    from specedge.verifier.llama_engine import LlamaEngine

    reason = unavailable()
    if reason:
        raise ValueError(reason)
    path = gguf_path(args.model)
    model = LlamaModel(path, gpu_layers=-1 if args.device.startswith("cuda") else 0,
                       verbose=args.verbose >= 2)
    n_ctx = _llama_cells(model, args)
    engine = LlamaEngine(model, args.max_batch_tokens, n_ctx,
                         prefill_chunk=min(args.prefill_chunk, args.max_batch_tokens),
                         threads=args.threads)
    log.info("llama.cpp: %s (%s), %d KV cells (%.1f MiB), %d threads", path.name, model.desc,
             engine.ctx.n_ctx, engine.ctx.n_ctx * engine.row_bytes / 2**20, engine.ctx.threads)
    return engine


def _llama_cells(model: object, args: argparse.Namespace) -> int:
    """KV cells of the context: --kv-cache-gb's worth, else up to LLAMA_CTX_CAP."""
    from specedge.verifier.llama_engine import _row_bytes

    row = _row_bytes(model)
    if args.kv_cache_gb:
        cells = int(args.kv_cache_gb * 2**30) // row
    else:
        cells = LLAMA_CTX_CAP
    return max(256, cells // 256 * 256)
