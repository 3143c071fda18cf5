"""Model presets: deterministic tiny pair, pairing checks, clear loading errors."""

from __future__ import annotations

import pytest
import torch

from specedge.models import (
    ModelError,
    TinySpec,
    build_tiny,
    check_pair,
    load_model,
    tiny_tokenizer,
    vocab_size,
)


def test_tiny_presets_are_identical_on_every_call():
    a, tok = load_model("tiny-test")
    b, _ = load_model("tiny-test")
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), na
    d1, _ = load_model("tiny-test-draft")
    d2, _ = load_model("tiny-test-draft")
    assert all(torch.equal(x, y) for x, y in zip(d1.parameters(), d2.parameters(), strict=True))
    assert not torch.equal(next(a.parameters()), next(d1.parameters()))


def test_tiny_weights_are_pinned():
    """A fingerprint of the seeded weights: the presets are the same on every machine."""
    fingerprint = lambda m: sum(float(p.double().abs().sum()) for p in m.parameters())  # noqa: E731
    assert fingerprint(load_model("tiny-test")[0]) == pytest.approx(16630.347339583168, rel=1e-9)
    assert fingerprint(load_model("tiny-test-draft")[0]) == pytest.approx(16631.419036572923,
                                                                          rel=1e-9)
    assert load_model("tiny-test")[0].config.max_position_embeddings >= 4096


def test_tiny_tokenizer_round_trips_bytes_and_has_specials():
    tok = tiny_tokenizer()
    assert len(tok) == 259
    text = "héllo, wörld ✓\n\tdef f(): return 1"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 258
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                   add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_vocab_and_spec_overrides():
    model, _ = build_tiny(spec=TinySpec(hidden=32, heads=2, kv_heads=1, ffn=64), vocab_size=8)
    assert vocab_size(model) == 8


def test_dtype_and_device_are_applied():
    model, _ = load_model("tiny-test", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_vocabulary_mismatch_is_a_clear_error():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    other = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, "<unk>")))
    check_pair(tiny_tokenizer(), tiny_tokenizer())
    with pytest.raises(ModelError, match="vocabulary mismatch.*'d'.*'t'"):
        check_pair(other, tiny_tokenizer(), "d", "t")


def test_unknown_model_and_missing_gguf_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="cannot load model"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))


def test_saved_folder_loads_like_a_hugging_face_model(tmp_path):
    model, tok = build_tiny()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, ltok = load_model(str(tmp_path))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits)
    assert ltok.get_vocab() == tok.get_vocab()
