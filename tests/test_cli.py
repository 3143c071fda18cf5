"""`specedge generate` end to end, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from specedge.engine import autoregressive_generate
from specedge.models import build_tiny
from specedge.text import StreamDecoder, encode_prompt, eos_ids


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specedge.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_generate_json_matches_target_only():
    res = run_cli("generate", "--prompt", "def add(a, b):", "--max-new-tokens", "24", "--json",
                  "--tree", "tree:8,4,2")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    target, tok = build_tiny()
    ref = autoregressive_generate(target, encode_prompt(tok, "def add(a, b):"), 24,
                                  eos_ids=eos_ids(tok, target.generation_config))
    assert out["token_ids"] == ref.token_ids
    assert out["text"] == tok.decode(ref.token_ids, skip_special_tokens=True)
    for key in ("rounds", "drafted", "accepted", "acceptance", "mean_accepted_length",
                "proactive_hits"):
        assert key in out["stats"]
    assert 0 < out["stats"]["acceptance"] < 1


def test_generate_streams_text():
    res = run_cli("generate", "--prompt", "hello", "--max-new-tokens", "12", "--chat",
                  "--temperature", "0.8", "--seed", "3")
    assert res.returncode == 0, res.stderr
    assert "12 tokens" in res.stderr and res.stdout.strip()


@pytest.mark.parametrize("args, message", [
    (["--tree", "star:3"], "tree shape"),
    (["--temperature", "0.5", "--top-p", "2"], "top_p"),
    (["--prompt", ""], "prompt is empty"),
])
def test_generate_reports_bad_input_clearly(args, message):
    base = ["generate", "--prompt", "x", "--max-new-tokens", "4"]
    res = run_cli(*base, *args)
    assert res.returncode == 2
    assert message in res.stderr


def test_stream_decoder_holds_back_partial_characters():
    _, tok = build_tiny()
    ids = tok("é✓")["input_ids"]
    dec = StreamDecoder(tok)
    pieces = [dec.push([i]) for i in ids]
    assert "".join(pieces) + dec.flush() == "é✓"
    assert "\ufffd" not in "".join(pieces)
