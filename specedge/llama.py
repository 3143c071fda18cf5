"""llama.cpp through llama-cpp-python's low-level API: a GGUF model, a context over it,
batches whose tokens each carry a set of sequence ids, and the sequence operations on
the context's KV memory.

Why the low-level API and not `llama_cpp.Llama`: the verifier and the drafter need what
the high-level class hides. Many sessions share one context (a sequence id each) and go
through one `llama_decode`; a token tree is one batch in which every node belongs to the
sequences of the leaves below it, so each node attends to exactly its ancestors and the
shared cached prefix (tree attention, without a custom mask); after a verification only
the accepted path is kept (`seq_rm`/`seq_cp` on the KV memory).

The KV memory is unified (`kv_unified`): a cell can belong to several sequences, which is
what makes a copied sequence (`seq_cp`) free and a tree's shared nodes stored once.

Thread use: one call at a time per context (the engine's single worker thread).
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

INSTALL_HINT = ("the llama.cpp engine needs llama-cpp-python: pip install 'specedge[llama]' "
                "(or, from a checkout, pip install -e '.[llama]'; it compiles llama.cpp)")


class LlamaError(RuntimeError):
    """llama.cpp refused a model, a context or a batch; the message says which."""


class MemoryFull(LlamaError):
    """The context's KV memory has no room for the batch (llama_decode returned 1)."""


def unavailable() -> str | None:
    """Why the llama.cpp engine cannot run here, or None when it can."""
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: the shared library failed to load
        return f"{INSTALL_HINT} ({type(exc).__name__}: {exc})"
    return None


def _lib():
    try:
        import llama_cpp
    except (ImportError, OSError) as exc:
        raise LlamaError(f"{INSTALL_HINT} ({exc})") from exc
    return llama_cpp


_backend_ready = False
_log_callback = None  # kept referenced: llama.cpp calls it from C


def _init_backend(verbose: bool) -> None:
    global _backend_ready, _log_callback
    if _backend_ready:
        return
    lib = _lib()
    if not verbose and os.environ.get("SPECEDGE_LLAMA_LOG") != "1":
        # llama.cpp logs every load and context to stderr; keep the daemon's log readable.
        _log_callback = lib.llama_log_callback(lambda level, text, data: None)
        lib.llama_log_set(_log_callback, ctypes.c_void_p(0))
    lib.llama_backend_init()
    _backend_ready = True


def _weight_type(desc: str) -> str:
    """'qwen2 1.5B Q4_K - Medium' -> 'Q4_K_M'; 'qwen2 ?B all F32' -> 'F32'."""
    parts = desc.split(" ", 2)
    kind = parts[2] if len(parts) == 3 else desc
    kind = kind.removeprefix("all ").strip()
    sizes = {"Medium": "M", "Small": "S", "Large": "L"}
    match = re.fullmatch(r"(\S+) - (\w+)", kind)
    if match:
        kind = f"{match[1]}_{sizes.get(match[2], match[2])}"
    return kind.replace(" ", "_") or "unknown"


class LlamaModel:
    """A GGUF model loaded by llama.cpp (memory-mapped; weights stay in their GGUF type)."""

    def __init__(self, path: str | Path, gpu_layers: int = 0, verbose: bool = False) -> None:
        lib = _lib()
        _init_backend(verbose)
        path = Path(path)
        if not path.is_file():
            raise LlamaError(f"GGUF file not found: {path}")
        params = lib.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        self._lib = lib
        self.ptr = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise LlamaError(f"llama.cpp could not load {path} (not a GGUF it supports?)")
        self.path = path
        buf = ctypes.create_string_buffer(256)
        lib.llama_model_desc(self.ptr, buf, len(buf))
        self.desc = buf.value.decode(errors="replace")
        self.weight_type = _weight_type(self.desc)
        self.n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.ptr)))
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(self.ptr))
        self.n_layer = int(lib.llama_model_n_layer(self.ptr))
        self.n_embd = int(lib.llama_model_n_embd(self.ptr))
        self.size_bytes = int(lib.llama_model_size(self.ptr))

    def close(self) -> None:
        if self.ptr:
            self._lib.llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        self.close()


def default_threads() -> int:
    """Physical cores (llama.cpp gains nothing from hyper-threads), at least one."""
    import psutil

    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


class LlamaContext:
    """A context over a model: KV memory of `n_ctx` cells shared by up to `n_seq_max`
    sequences, batches of up to `n_batch` tokens decoded in one graph."""

    def __init__(self, model: LlamaModel, n_ctx: int, n_batch: int,
                 threads: int | None = None, n_seq_max: int | None = None) -> None:
        lib = model._lib
        self._lib = lib
        self.model = model
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        # One micro-batch per decode: a pass is one graph, as in the torch engine.
        params.n_batch = params.n_ubatch = n_batch
        self.n_seq_max = n_seq_max or int(lib.llama_max_parallel_sequences())
        params.n_seq_max = self.n_seq_max
        params.kv_unified = True  # cells shared by sequences: trees and copies are free
        # float32 keys/values and no flash attention: a session's cells sit in the shared
        # memory in whatever order they were free, and flash attention accumulates float16
        # values in cell order, so its rounding (and a near-tie 0.005 logits wide, seen
        # in the tests) would depend on the other sessions. In float32 the order changes
        # only the last bits. Costs twice the KV memory of float16.
        params.type_k = params.type_v = lib.GGML_TYPE_F32
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        params.n_threads = params.n_threads_batch = threads or default_threads()
        self.threads = params.n_threads
        self.ptr = lib.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise LlamaError(f"llama.cpp could not create a context of {n_ctx} cells")
        self.n_ctx = int(lib.llama_n_ctx(self.ptr))
        self.n_batch = n_batch
        self.mem = lib.llama_get_memory(self.ptr)
        self._batch = lib.llama_batch_init(n_batch, 0, self.n_seq_max)
        self._batch_cap = n_batch

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        self.close()

    def decode(self, tokens: Sequence[int], positions: Sequence[int],
               seqs: Sequence[Sequence[int]], outputs: Sequence[bool]) -> np.ndarray:
        """Forward one batch; return the logits of the rows flagged in `outputs`, in
        batch order, as float32 [n_outputs, n_vocab] (a copy).

        Raises MemoryFull when the KV memory has no room, LlamaError on any other refusal
        (llama.cpp then leaves the memory as it was before the call).
        """
        n = len(tokens)
        if not 0 < n <= self._batch_cap:
            raise LlamaError(f"a batch holds 1 to {self._batch_cap} tokens, not {n}")
        b = self._batch
        for i, (tok, pos, ids, out) in enumerate(zip(tokens, positions, seqs, outputs,
                                                     strict=True)):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = len(ids)
            for k, s in enumerate(ids):
                b.seq_id[i][k] = s
            b.logits[i] = 1 if out else 0
        b.n_tokens = n
        rc = self._lib.llama_decode(self.ptr, b)
        if rc == 1:
            raise MemoryFull(f"no room in the KV memory ({self.n_ctx} cells) for {n} tokens")
        if rc != 0:
            raise LlamaError(f"llama_decode failed ({rc})")
        wanted = sum(1 for o in outputs if o)
        if not wanted:
            return np.empty((0, self.model.n_vocab), dtype=np.float32)
        ptr = self._lib.llama_get_logits(self.ptr)
        return np.ctypeslib.as_array(ptr, shape=(wanted, self.model.n_vocab)).copy()

    # -- the KV memory's sequence operations (positions [p0, p1); -1: open end) --------

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        if not self._lib.llama_memory_seq_rm(self.mem, seq, p0, p1):
            raise LlamaError(f"could not remove positions [{p0}, {p1}) of sequence {seq}")

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        self._lib.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_len(self, seq: int) -> int:
        """Positions 0..n-1 held for `seq`: the largest position plus one (0: empty)."""
        return int(self._lib.llama_memory_seq_pos_max(self.mem, seq)) + 1

    def clear(self) -> None:
        self._lib.llama_memory_clear(self.mem, True)


def greedy_decode(model: LlamaModel, prompt: Sequence[int], max_new_tokens: int,
                  eos_ids: Sequence[int] = (), threads: int | None = None,
                  ) -> tuple[list[int], list[float]]:
    """llama.cpp's own greedy decoding, one token per decode after the prompt: the
    reference a llama.cpp verifier's output is compared with. Returns the tokens and, per
    token, the logit margin between the chosen token and the runner-up (a small margin is
    a near-tie that another summation order may flip)."""
    if not prompt:
        raise ValueError("a generation needs at least one prompt token")
    n_ctx = (len(prompt) + max_new_tokens + 255) // 256 * 256
    ctx = LlamaContext(model, n_ctx, max(len(prompt), 1), threads, n_seq_max=1)
    try:
        logits = ctx.decode(list(prompt), range(len(prompt)), [[0]] * len(prompt),
                            [False] * (len(prompt) - 1) + [True])[0]
        out: list[int] = []
        margins: list[float] = []
        eos = set(eos_ids)
        while len(out) < max_new_tokens:
            top2 = np.argpartition(-logits, 1)[:2]
            tok = int(np.argmax(logits))
            other = int(top2[0] if top2[0] != tok else top2[1])
            out.append(tok)
            margins.append(float(logits[tok] - logits[other]))
            if tok in eos or len(out) >= max_new_tokens:
                break
            logits = ctx.decode([tok], [len(prompt) + len(out) - 1], [[0]], [True])[0]
        return out, margins
    finally:
        ctx.close()
