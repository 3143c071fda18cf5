"""Prompts in, text out: tokenising a prompt and decoding a token stream incrementally."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def encode_prompt(tok: PreTrainedTokenizerBase, text: str, chat: bool = False) -> list[int]:
    """Token ids for a plain prompt, or with `chat` for one user turn in the chat template."""
    if chat:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)
    else:
        ids = tok(text, add_special_tokens=True)["input_ids"]
    if not ids:
        raise ValueError("the prompt is empty: give at least one character")
    return ids


def eos_ids(tok: PreTrainedTokenizerBase, model_config=None) -> list[int]:
    """Every id that ends a generation: the tokenizer's and the model's generation config's."""
    ids: set[int] = set()
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    cfg_eos = getattr(model_config, "eos_token_id", None)
    if isinstance(cfg_eos, int):
        ids.add(cfg_eos)
    elif isinstance(cfg_eos, list | tuple):
        ids.update(int(x) for x in cfg_eos)
    return sorted(ids)


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, holding back a partial
    multi-byte character until the token that completes it arrives."""

    def __init__(self, tok: PreTrainedTokenizerBase) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self.emitted = 0  # characters already returned

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta = text[self.emitted :]
        self.emitted = len(text)
        return delta

    def flush(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        delta = text[self.emitted :]
        self.emitted = len(text)
        return delta
