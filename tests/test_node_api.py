"""The node's OpenAI-compatible API, in one process: hypercorn on trio with in-process
verifiers behind it, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from node_fakes import FakeConnector, FakeVerifier

from specedge.engine import autoregressive_generate
from specedge.node.api import TextStream, create_app, serve_api
from specedge.node.edge import Edge, Models
from specedge.text import encode_prompt

EOS = [258]


class Server:
    """The API in a background thread running its own trio loop."""

    def __init__(self, tiny_pair) -> None:
        self.draft, self.target, self.tok = tiny_pair
        self.verifiers = [FakeVerifier(self.target)]
        self._urls: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        self.url = self._urls.get(timeout=30)

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.connector = FakeConnector(nursery, create_new_key_pair(), self.verifiers)
            models = Models(self.draft, self.tok, EOS, "tiny-test", "tiny-test-draft")
            self.edge = Edge(models, self.connector)
            url = await nursery.start(serve_api, create_app(self.edge), "127.0.0.1:0", self.stop)
            self._urls.put(url)
            await self.stop.wait()
            nursery.cancel_scope.cancel()

    def close(self) -> None:
        trio.from_thread.run_sync(self.stop.set, trio_token=self.token)
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tiny_pair):
    s = Server(tiny_pair)
    yield s
    s.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


def greedy_text(server, prompt_ids, n):
    ref = autoregressive_generate(server.target, prompt_ids, n, eos_ids=EOS)
    return server.tok.decode(ref.token_ids, skip_special_tokens=True), ref.token_ids


def test_models_lists_the_target(client):
    assert [m.id for m in client.models.list().data] == ["tiny-test"]
    assert client.models.retrieve("tiny-test").id == "tiny-test"


def test_greedy_completion_equals_target_only(client, server):
    prompt = "def fibonacci(n):"
    res = client.completions.create(model="tiny-test", prompt=prompt, max_tokens=24,
                                    temperature=0)
    text, ids = greedy_text(server, encode_prompt(server.tok, prompt), 24)
    assert res.choices[0].text == text
    assert res.usage.completion_tokens == len(ids)
    assert res.choices[0].finish_reason in ("length", "stop")
    assert res.model_extra["specedge"]["token_ids"] == ids


def test_streamed_chat_equals_the_whole_answer(client, server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model="tiny-test", messages=messages,
                                           max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(
        model="tiny-test", messages=messages, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == whole.choices[0].finish_reason and not any(finals[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    ids = server.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert text == greedy_text(server, list(ids), 20)[0]


def test_stop_string_cuts_the_text(client, server):
    prompt = "The quick brown fox"
    text, _ = greedy_text(server, encode_prompt(server.tok, prompt), 30)
    stop = text[10:13]
    assert stop and text.find(stop) >= 5
    res = client.completions.create(model="tiny-test", prompt=prompt, max_tokens=30,
                                    temperature=0, stop=[stop])
    assert res.choices[0].text == text[: text.find(stop)]
    assert res.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-test", prompt=prompt, max_tokens=30, temperature=0, stop=stop,
        stream=True))
    assert streamed == text[: text.find(stop)]


def test_several_requests_at_once(client, server):
    prompts = ["Once upon a time", "import numpy", "SELECT name", "x = 1"]

    def ask(p):
        return client.completions.create(model="tiny-test", prompt=p, max_tokens=16,
                                         temperature=0).choices[0].text

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, prompts))
    assert got == [greedy_text(server, encode_prompt(server.tok, p), 16)[0] for p in prompts]


def target_logprobs(server, prompt_ids, ids):
    """The target's own log-probabilities of `ids` after `prompt_ids`, [len(ids), V]."""
    import torch

    with torch.inference_mode():
        logits = server.target(torch.tensor([prompt_ids + ids[:-1]])).logits[0]
    return torch.log_softmax(logits[len(prompt_ids) - 1:].float(), dim=-1)


def test_completion_logprobs_are_the_targets_from_the_receipts(client, server):
    prompt = "def fibonacci(n):"
    res = client.completions.create(model="tiny-test", prompt=prompt, max_tokens=12,
                                    temperature=0, logprobs=3)
    ids = res.specedge["token_ids"] if hasattr(res, "specedge") else res.model_extra[
        "specedge"]["token_ids"]
    lp = res.choices[0].logprobs
    want = target_logprobs(server, encode_prompt(server.tok, prompt), ids)
    assert len(lp.token_logprobs) == len(ids) == 12
    for i, t in enumerate(ids):
        assert abs(lp.token_logprobs[i] - float(want[i, t])) < 1e-4
        assert 1 <= len(lp.top_logprobs[i]) <= 3  # keyed by text: byte tokens may collide
        assert max(lp.top_logprobs[i].values()) <= lp.token_logprobs[i] + 1e-6  # greedy
    assert "".join(lp.tokens) == server.tok.decode(ids)
    chunks = client.completions.create(model="tiny-test", prompt=prompt, max_tokens=12,
                                       temperature=0, logprobs=3, stream=True)
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs
                for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs


def test_chat_logprobs_and_top_logprobs(client, server):
    res = client.chat.completions.create(
        model="tiny-test", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
        temperature=0.7, seed=3, logprobs=True, top_logprobs=2)
    content = res.choices[0].logprobs.content
    assert len(content) == 6
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-test", messages=[{"role": "user",
                                       "content": "hi"}], max_tokens=2, top_logprobs=2)
    # Streamed: each chunk carries its tokens' logprobs; together, the same as whole.
    chunks = client.chat.completions.create(
        model="tiny-test", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
        temperature=0.7, seed=3, logprobs=True, top_logprobs=2, stream=True)
    streamed = [item for c in chunks if c.choices and c.choices[0].logprobs
                for item in c.choices[0].logprobs.content]
    assert [(i.token, i.logprob) for i in streamed] == [(i.token, i.logprob) for i in content]


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="tiny-test", prompt="hello", max_tokens=12, temperature=0.8, seed=5)
    assert client.completions.create(**kw).choices[0].text == \
        client.completions.create(**kw).choices[0].text


@pytest.mark.parametrize("kwargs, error, param", [
    ({"model": "gpt-4"}, openai.NotFoundError, "model"),
    ({"temperature": 3}, openai.BadRequestError, "temperature"),
    ({"top_p": 0}, openai.BadRequestError, "top_p"),
    ({"n": 2}, openai.BadRequestError, "n"),
    ({"max_tokens": 0}, openai.BadRequestError, "max_tokens"),
    ({"logprobs": 21}, openai.BadRequestError, "logprobs"),
    ({"prompt": ""}, openai.BadRequestError, "prompt"),
    ({"prompt": ["a", "b"]}, openai.BadRequestError, "prompt"),
    ({"prompt": [5, 100000]}, openai.BadRequestError, "prompt"),
    ({"stop": ["a", "b", "c", "d", "e"]}, openai.BadRequestError, "stop"),
])
def test_completion_misuse_is_a_4xx_openai_error(client, kwargs, error, param):
    args = {"model": "tiny-test", "prompt": "hi", "max_tokens": 4, **kwargs}
    with pytest.raises(error) as info:
        client.completions.create(**args)
    assert info.value.body["param"] == param and info.value.body["message"]


@pytest.mark.parametrize("messages", [[], [{"role": "wizard", "content": "x"}],
                                      [{"role": "user", "content": [{"type": "image_url"}]}]])
def test_chat_misuse_is_a_400(client, messages):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-test", messages=messages)


def test_raw_http_errors_have_openai_shape(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        r = http.post("/v1/completions", content=b"{not json")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        r = http.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = http.get("/v1/completions")
        assert r.status_code == 405 and "error" in r.json()


def test_no_verifier_is_a_503(client, server):
    saved = list(server.verifiers)
    server.verifiers.clear()
    try:
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model="tiny-test", prompt="hi", max_tokens=4)
        assert info.value.status_code == 503 and info.value.body["code"] == "no_verifier"
        with pytest.raises(openai.InternalServerError) as info:  # before any event
            list(client.completions.create(model="tiny-test", prompt="hi", max_tokens=4,
                                           stream=True))
        assert info.value.status_code == 503
    finally:
        server.verifiers.extend(saved)


def test_text_stream_holds_back_a_possible_stop(tiny_pair):
    tok = tiny_pair[2]
    ts = TextStream(tok, ["END"])
    out = [ts.push(tok(piece)["input_ids"]) for piece in ["abc E", "N", "D tail"]]
    assert out == ["abc ", "", ""] and ts.stopped and ts.text == "abc "
    ts = TextStream(tok, ["END"])
    out = [ts.push(tok(piece)["input_ids"]) for piece in ["abc E", "Nx"]] + [ts.finish()]
    assert "".join(out) == "abc ENx" and not ts.stopped
