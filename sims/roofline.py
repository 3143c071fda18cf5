"""GPU pass costs from first principles: a roofline per device, the model's shapes, and
the engine's overheads. Used where no GPU bench exists yet (`gpu_calibration`).

One forward pass over `rows` new tokens of `seqs` sequences costs

    max(bytes / (bandwidth * bw_eff), flops / (bf16 peak * flops_eff), host launch time)
        + fixed per-pass host work

- bytes: every weight matrix once (a decode pass reads all of them whatever the rows),
  plus each sequence's KV cache (times the engine's attention traffic factor);
- flops: 2 per weight per row (multiply-add) plus attention (QK^T and AV);
- host launch time: an eager engine issues every kernel from Python; the GPU cannot run
  ahead of that, so a small pass is launch-bound (CUDA graphs replay the whole forward
  with one launch: 0);
- fixed: what runs around the forward after the GPU answers (input copies, graph
  replay, sampling, the host sync), additive because it waits for the logits.

Every number below names its source; efficiency factors are stated, not fitted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from sims.calibration import Calibration, Curve

GB = 1e9
TFLOP = 1e12


@dataclass(frozen=True)
class Device:
    name: str
    mem_bw_gbs: float  # peak DRAM bandwidth, GB/s (1e9 bytes)
    bf16_tflops: float  # peak dense bf16 tensor-core FLOP/s (FP32 accumulate), 1e12
    price_usd_h: float | None  # rental price used for cost figures
    source: str

    def ridge_rows(self, engine: Engine) -> float:
        """Rows where a weight-bound pass turns compute-bound (2 bytes and 2 FLOPs per
        weight per row in bf16, so the ridge is FLOP/s over bytes/s)."""
        return (self.bf16_tflops * TFLOP * engine.flops_eff) / (
            self.mem_bw_gbs * GB * engine.bw_eff)


# Vendor datasheets. Prices: the SpecEdge reference metrics (kaist-ina/specedge
# src/metric/__init__.py: A100_80_GPU_COST = 0.001402777778 $/s, RTX4090_GPU_COST =
# 0.00009722222222 $/s), i.e. $5.05/h and $0.35/h, the paper's GCP and Vast.ai prices.
A100_80GB_SXM = Device(
    "A100 80GB SXM", 2039.0, 312.0, 5.05,
    "NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4): HBM2e 2,039 GB/s, "
    "BF16 tensor 312 TFLOPS dense (624 with sparsity)")
RTX_4090 = Device(
    "RTX 4090", 1008.0, 165.2, 0.35,
    "NVIDIA Ada GPU architecture whitepaper v2.01, appendix: 384-bit GDDR6X at 21 Gbps = "
    "1,008 GB/s; peak BF16 tensor TFLOPS with FP32 accumulate 165.2 dense (330.4 sparse; "
    "the SpecEdge paper's 330.3 is FP16 with FP16 accumulate)")
H200_SXM = Device(
    "H200 SXM", 4800.0, 989.0, None,
    "NVIDIA H200 datasheet: HBM3e 4.8 TB/s, BF16 tensor 989 TFLOPS dense (this project's "
    "device notes measured 4.3 TB/s copy and 788 TFLOP/s on an 8192^3 bf16 matmul)")
DEVICES = {d.name: d for d in (A100_80GB_SXM, RTX_4090, H200_SXM)}


@dataclass(frozen=True)
class Model:
    """A dense decoder-only transformer (Llama/Qwen family: SwiGLU MLP, GQA attention)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool  # input embedding shared with the LM head
    source: str

    def layer_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)  # q, o, k, v
        mlp = 3 * self.hidden * self.intermediate  # gate, up, down
        return attn + mlp + 2 * self.hidden + 2 * self.head_dim  # + norms (q/k norms: Qwen3)

    def params(self) -> int:
        embed = self.vocab * self.hidden
        return self.layers * self.layer_params() + embed * (1 if self.tied else 2) + self.hidden

    def matmul_params(self) -> int:
        """Weights a forward multiplies by (the embedding is a lookup; the LM head is not)."""
        return self.layers * self.layer_params() + self.vocab * self.hidden + self.hidden

    def weight_bytes(self, dtype_bytes: int = 2) -> int:
        return self.matmul_params() * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes  # K and V


# Shapes from the models' config.json (also spelled out in zyzshishui/slime
# scripts/models/qwen3-14B.sh and qwen3-1.7B.sh; Qwen2.5 from Hugging Face configs).
QWEN3_14B = Model("Qwen3-14B", 40, 5120, 40, 8, 128, 17408, 151936, False,
                  "Qwen/Qwen3-14B config.json: 40 layers, hidden 5120, 40 q / 8 kv heads of "
                  "128, MLP 17408, vocab 151936, untied (14.8B parameters)")
QWEN3_1_7B = Model("Qwen3-1.7B", 28, 2048, 16, 8, 128, 6144, 151936, True,
                   "Qwen/Qwen3-1.7B config.json: 28 layers, hidden 2048, 16 q / 8 kv heads "
                   "of 128, MLP 6144, vocab 151936, tied (1.7B parameters)")
QWEN25_CODER_1_5B = Model("Qwen2.5-Coder-1.5B", 28, 1536, 12, 2, 128, 8960, 151936, True,
                          "Qwen/Qwen2.5-Coder-1.5B-Instruct config.json (demo target)")
QWEN25_CODER_0_5B = Model("Qwen2.5-Coder-0.5B", 24, 896, 14, 2, 64, 4864, 151936, True,
                          "Qwen/Qwen2.5-Coder-0.5B-Instruct config.json (demo draft)")
MODELS = {m.name: m for m in (QWEN3_14B, QWEN3_1_7B, QWEN25_CODER_1_5B, QWEN25_CODER_0_5B)}

# Host cost of one eager PyTorch op (dispatch + kernel launch), derived: gpt-fast's plain
# eager Llama-2-7B ran 25.5 tok/s on an A100-80GB and was "heavily CPU overhead bound"
# (pytorch.org/blog/accelerating-generative-ai-2), i.e. 39.2 ms per token for 32 layers of
# about 80 dispatched ops each (counted in its model.py: two RMSNorms of 8, fused QKV,
# two rotary embeddings of 20, cache update, repeat_interleave, SDPA, MLP of 5, ...).
US_PER_EAGER_OP = 1000.0 / 25.5 / (32 * 80) * 1000.0  # ~15.3 us


@dataclass(frozen=True)
class Engine:
    """How a forward is run: achieved fractions of the roofline, host overheads, and how
    attention touches the KV cache."""

    name: str
    bw_eff: float  # achieved / peak bandwidth over a whole forward
    flops_eff: float  # achieved / peak bf16 FLOP/s on the forward's GEMMs
    host_ops_per_layer: float  # eager ops issued per layer per pass (0: CUDA graph)
    host_ops_per_layer_per_seq: float  # more per sequence (a per-session attention loop)
    fixed_host_ops: float  # ops per pass around the forward (inputs, replay, sampling)
    static_context: int | None  # attention spans a static cache of this length (None: real)
    repeat_kv: bool  # K/V copied out to every query head before attention
    source: str

    def kv_traffic(self, model: Model, context: int) -> float:
        """Bytes of KV traffic per sequence per pass."""
        ctx = self.static_context or context
        base = ctx * model.kv_bytes_per_token()
        if self.repeat_kv:  # read the cache, write the expanded copy, read it in attention
            return base * (1 + 2 * model.heads / model.kv_heads)
        return base


# Achieved bandwidth: gpt-fast's compiled (CUDA-graph) decode of Llama-2-7B on an
# A100-80GB moved 1,397 GB/s of the 2,039 peak (its README's benchmark table): 0.685.
# GEMM efficiency 0.7 of the dense peak is an assumption (large square bf16 GEMMs reach
# ~0.8, measured 788/989 TFLOP/s on this project's H200; a pass's skinny GEMMs less).
BW_EFF = 1397.0 / 2039.0
FLOPS_EFF = 0.7

# The SpecEdge reference implementation (kaist-ina/specedge): src/specedge/engine/graph.py
# replays CUDA graphs over a static KV cache of max_len (config: 2048) with a mask, and
# src/model/qwen3.py expands K/V to all heads (transformers' repeat_kv) before SDPA.
# About 20 host ops per pass around the replay: 5 input copies, replay, logits clone,
# the mask inversion and sampling.
REFERENCE_GRAPH = Engine("reference, CUDA graph", BW_EFF, FLOPS_EFF, 0.0, 0.0, 20.0, 2048,
                         True, "kaist-ina/specedge BatchGraphEngine (CUDA graph replay)")
# The reference's server-only baseline builds its target engine with
# use_cuda_graph=False (src/script/server_only.py): the same model code run eagerly, about
# 83 ops per Qwen3 layer (counted in src/model/qwen3.py: three RMSNorms incl. q/k norms,
# rotary embedding, cache update, repeat_kv, three contiguous copies, SDPA, MLP).
REFERENCE_EAGER = replace(REFERENCE_GRAPH, name="reference, eager", host_ops_per_layer=83.0,
                          source="kaist-ina/specedge server_only.py target engine "
                                 "(use_cuda_graph=False)")
# This project's verifier engine (verifier/engine.py) on a GPU today: Hugging Face eager
# layers (about 50 ops a layer) over the real context, plus a per-session attention loop
# (slice, cache append x2, SDPA, cat: about 6 ops per session per layer).
PROJECT_EAGER = Engine("this project, eager HF", BW_EFF, FLOPS_EFF, 50.0, 6.0, 20.0, None,
                       False, "verifier/engine.py: packed rows, per-session SDPA")
# The same engine once captured in CUDA graphs (what the GPU issue asks to measure).
PROJECT_GRAPH = replace(PROJECT_EAGER, name="this project, CUDA graph", host_ops_per_layer=0.0,
                        host_ops_per_layer_per_seq=0.0,
                        source="verifier/engine.py if captured in CUDA graphs")
ENGINES = {e.name: e for e in (REFERENCE_GRAPH, REFERENCE_EAGER, PROJECT_EAGER, PROJECT_GRAPH)}


@dataclass(frozen=True)
class PassCost:
    """One forward pass, milliseconds, by what bounds it."""

    memory_ms: float
    compute_ms: float
    launch_ms: float
    fixed_ms: float

    @property
    def total_ms(self) -> float:
        return max(self.memory_ms, self.compute_ms, self.launch_ms) + self.fixed_ms

    @property
    def bound(self) -> str:
        parts = {"memory": self.memory_ms, "compute": self.compute_ms, "launch": self.launch_ms}
        return max(parts, key=parts.__getitem__)


def pass_cost(device: Device, model: Model, engine: Engine, rows: int, seqs: int = 1,
              context: int = 512) -> PassCost:
    """One forward of `rows` new tokens spread over `seqs` sequences, each with `context`
    tokens already cached."""
    if rows < 1 or seqs < 1:
        raise ValueError("a pass has at least one row and one sequence")
    ctx = engine.static_context or context
    weight_bytes = model.weight_bytes()
    kv_bytes = seqs * engine.kv_traffic(model, context)
    flops = 2.0 * model.matmul_params() * rows
    flops += 4.0 * model.layers * model.heads * model.head_dim * rows * ctx  # QK^T, AV
    memory_ms = (weight_bytes + kv_bytes) / (device.mem_bw_gbs * GB * engine.bw_eff) * 1e3
    compute_ms = flops / (device.bf16_tflops * TFLOP * engine.flops_eff) * 1e3
    ops = model.layers * (engine.host_ops_per_layer + engine.host_ops_per_layer_per_seq * seqs)
    launch_ms = ops * US_PER_EAGER_OP / 1e3
    fixed_ms = engine.fixed_host_ops * US_PER_EAGER_OP / 1e3
    return PassCost(memory_ms, compute_ms, launch_ms, fixed_ms)


def pass_ms(device: Device, model: Model, engine: Engine, rows: int, seqs: int = 1,
            context: int = 512) -> float:
    return pass_cost(device, model, engine, rows, seqs, context).total_ms


def seqs_for(rows: int, rows_per_seq: int) -> int:
    return max(1, math.ceil(rows / rows_per_seq))


# ---------------------------------------------------------------------------- calibration

# Pass sizes the curves are sampled at: piecewise-linear between them is exact enough
# for a roofline (linear between its corners) and covers any pass the network forms.
ROWS_GRID = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 33, 40, 48, 64, 66, 80, 96, 99,
             128, 132, 160, 165, 192, 198, 256, 264, 320, 384, 512, 640, 768, 1024, 1536,
             2048, 3072, 4096, 8192)
STREAMS_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)


@dataclass(frozen=True)
class GpuSetting:
    """Hardware, models, engines and workload of a simulated GPU deployment."""

    name: str
    server: Device
    edge: Device
    target: Model
    draft: Model
    verify_engine: Engine  # the SpecEdge verifier's target passes
    baseline_engine: Engine  # the server-only / autoregressive server's target passes
    draft_engine: Engine  # draft-model passes, on edges and on the server-only server
    tree_tokens: int  # draft tokens per tree (chain: N)
    depth: int  # draft forwards per tree (longest path)
    draft_rows: int  # rows of one draft forward (SpecExec's beams; a chain: 1)
    step_host_ops: float  # host ops per draft forward besides the forward (tree upkeep)
    tree_host_ops: float  # host ops per tree (budget trim, building the request)
    acceptance: float  # P(the tree holds the target's next token | path so far accepted)
    hit_given_full: float  # P(proactive bet comes true | whole path accepted)
    rtt_ms: float
    prompt_tokens: int  # prompt rows the verifier prefills (1: prefill not measured)
    max_new_tokens: int
    context: int  # mean tokens cached per sequence (engines over the real context)
    notes: tuple[str, ...] = ()

    def accepted_hist(self) -> tuple[float, ...]:
        """P(L = k) for k = 0..depth: each further position held with `acceptance`."""
        p = self.acceptance
        pmf = [p ** k * (1 - p) for k in range(self.depth)] + [p ** self.depth]
        return tuple(pmf)

    def edge_step_ms(self) -> float:
        ms = pass_ms(self.edge, self.draft, self.draft_engine, self.draft_rows, 1,
                     self.context)
        return ms + self.step_host_ops * US_PER_EAGER_OP / 1e3

    def server_draft_ms(self, streams: int) -> float:
        """Drafting one tree for each of `streams` streams on the server, batched (the
        tree bookkeeping is vectorized over the batch: host ops once per step)."""
        host = (self.depth * self.step_host_ops + self.tree_host_ops) * US_PER_EAGER_OP / 1e3
        ms = pass_ms(self.server, self.draft, self.draft_engine, streams * self.draft_rows,
                     streams, self.context)
        return self.depth * ms + host

    def verify_ms(self, rows: int) -> float:
        seqs = seqs_for(rows, self.tree_tokens + 1)
        return pass_ms(self.server, self.target, self.verify_engine, rows, seqs, self.context)

    def baseline_ms(self, rows: int) -> float:
        seqs = seqs_for(rows, self.tree_tokens + 1)
        return pass_ms(self.server, self.target, self.baseline_engine, rows, seqs,
                       self.context)


def gpu_calibration(s: GpuSetting) -> Calibration:
    """The same `Calibration` a bench JSON gives, computed from the roofline: verify pass
    cost by rows (sequences = rows / (tree + 1), as in verify passes), the baseline's
    target pass by rows, the batched decode step by streams, the node's draft forward
    and tree, the server's batched drafting by streams, and prefill per token."""
    step = s.edge_step_ms()
    hist = s.accepted_hist()
    hit = s.hit_given_full * hist[-1]
    rows = list(ROWS_GRID)
    verify = Curve.from_samples(rows, [s.verify_ms(r) for r in rows], "verify")
    baseline = Curve.from_samples(rows, [s.baseline_ms(r) for r in rows], "baseline")
    streams = list(STREAMS_GRID)
    ar = [pass_ms(s.server, s.target, s.baseline_engine, b, b, s.context) for b in streams]
    server_draft = Curve.from_samples(streams, [s.server_draft_ms(b) for b in streams],
                                      "server drafting")
    prefill = pass_ms(s.server, s.target, s.verify_engine, 512, 1, s.context) / 512
    draft_prefill = pass_ms(s.edge, s.draft, s.draft_engine, 512, 1, s.context) / 512
    return Calibration(
        draft_forward_ms=step,
        draft_tree_ms=step * (s.depth + hit),  # what `draft_step_ms` divides back out
        server_draft_tree_ms=s.server_draft_ms(1),
        verify=verify,
        ar_step=Curve.from_samples(streams, ar, "ar_step"),
        rtt_ms=s.rtt_ms,
        accepted_hist=hist,
        proactive_hit_rate=hit,
        tree_tokens=s.tree_tokens,
        depth=s.depth,
        prefill_ms_per_token=prefill,
        draft_prefill_ms_per_token=draft_prefill,
        price_server_usd_h=s.server.price_usd_h or 0.0,
        price_edge_usd_h=s.edge.price_usd_h or 0.0,
        server_draft=server_draft,
        target=verify,
        server_draft_pass=s.server_draft_ms(1) / s.depth,
        baseline=None if s.baseline_engine == s.verify_engine else baseline,
        prompt_tokens=s.prompt_tokens,
        max_new_tokens=s.max_new_tokens,
        source=f"roofline: {s.name}",
        notes=s.notes,
    )
