"""The node's OpenAI-compatible HTTP API: `/v1/models`, `/v1/completions`,
`/v1/chat/completions`, with `stream: true` as server-sent events.

It runs on hypercorn's trio worker in the same event loop as the libp2p host, so a
request handler simply awaits `Edge.generate`: no threads, no queues between the API and
the network, and many requests proceed at once (each has its own verifier session; model
work runs in worker threads). Errors have OpenAI's JSON shape and 4xx codes for misuse,
so OpenAI clients report them as they would OpenAI's own.
"""

from __future__ import annotations

import json
import math
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from transformers import PreTrainedTokenizerBase

from specedge.audit import Facts
from specedge.node.edge import Edge
from specedge.node.errors import VerifiersBusy
from specedge.node.generation import (
    NodeError,
    NodeGeneration,
    NoVerifierError,
    VocabularyMismatch,
)
from specedge.protocol.limits import MAX_NEW_TOKENS, MAX_PROMPT_TOKENS, MAX_TOP_LOGPROBS
from specedge.sampling import SamplingParams
from specedge.text import StreamDecoder

MAX_BODY_BYTES = 4 << 20
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 512
MAX_STOPS = 4
CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")
# Accepted for compatibility only at their neutral value.
NEUTRAL = {"n": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "echo": False,
           "suffix": None, "logit_bias": None,
           "tools": None, "tool_choice": None, "functions": None, "response_format": None}


class ApiError(Exception):
    """An error to return to the client in OpenAI's shape (`retry_after`: seconds, sent as
    a Retry-After header, which OpenAI's clients honour)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = None
        if self.retry_after is not None:
            headers = {"Retry-After": str(max(1, math.ceil(self.retry_after)))}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def api_error(exc: BaseException) -> ApiError:
    """What an exception from a generation means to a client."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, VerifiersBusy):
        return ApiError(503, str(exc), "server_error", code="verifiers_busy",
                        retry_after=exc.retry_after)
    if isinstance(exc, NoVerifierError):
        return ApiError(503, str(exc), "server_error", code="no_verifier")
    if isinstance(exc, VocabularyMismatch):
        return ApiError(502, str(exc), "server_error", code="vocabulary_mismatch")
    if isinstance(exc, NodeError):
        return ApiError(502, str(exc), "server_error", code="verifier_failed")
    if isinstance(exc, ValueError):
        return ApiError(400, str(exc))
    return ApiError(500, f"internal error ({type(exc).__name__})", "server_error")


# ---------------------------------------------------------------------------- requests


@dataclass
class Job:
    """A validated request."""

    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    stops: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None = None  # alternatives per token to report; None: no logprobs


def _number(body: dict, name: str, default: float, low: float, high: float,
            integer: bool = False, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            integer and not float(value).is_integer()):
        raise ApiError(400, f"{name} must be {'an integer' if integer else 'a number'}",
                       param=name)
    above = value > low if low_open else value >= low
    if not (math.isfinite(value) and above and value <= high):
        raise ApiError(400, f"{name}={value} is outside {'(' if low_open else '['}{low}, {high}]",
                       param=name)
    return int(value) if integer else float(value)


def _common(body: dict, prompt_ids: list[int], default_tokens: int, vocab: int) -> Job:
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] != neutral and not (
                name in ("n", "best_of") and body[name] is None):
            raise ApiError(400, f"{name}={body[name]!r} is not supported by this server",
                           param=name, code="unsupported_parameter")
    if not prompt_ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if len(prompt_ids) > MAX_PROMPT_TOKENS:
        raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; the limit is "
                       f"{MAX_PROMPT_TOKENS}", param="prompt", code="context_length_exceeded")
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is not in the vocabulary", param="prompt")
    tokens_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _number(body, tokens_name, default_tokens, 1, MAX_NEW_TOKENS, integer=True)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    top_k = _number(body, "top_k", 0, 0, vocab, integer=True)
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(63)
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise ApiError(400, "seed must be an integer", param="seed")
    seed %= 2**64  # OpenAI allows negative seeds
    stops = body.get("stop")
    if stops is None:
        stops = []
    elif isinstance(stops, str):
        stops = [stops]
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(
            isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop must be a non-empty string or a list of up to {MAX_STOPS}",
                       param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    params = SamplingParams(temperature, top_p, int(top_k), seed)
    return Job(prompt_ids, int(max_tokens), params, stops, stream,
               bool(options.get("include_usage")))


def completion_job(body: dict, edge: Edge) -> Job:
    tok = edge.tokenizer
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tok(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    elif isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    elif isinstance(prompt, list):
        raise ApiError(400, "only one prompt per request is supported", param="prompt")
    else:
        raise ApiError(400, "prompt must be a string or a list of token ids", param="prompt")
    job = _common(body, ids, DEFAULT_COMPLETION_TOKENS, len(tok))
    if body.get("logprobs") is not None:  # the legacy API: an integer, alternatives wanted
        job.logprobs = int(_number(body, "logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True))
    return job



def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                   param="messages")


def chat_job(body: dict, edge: Edge) -> Job:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise ApiError(400, f"messages[{i}] needs a role, one of {', '.join(CHAT_ROLES)}",
                           param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        turns.append({"role": role, "content": _content(m, i)})
    tok = edge.tokenizer
    try:
        ids = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # jinja errors from the template (e.g. role order)
        raise ApiError(400, f"the chat template refused these messages: {exc}",
                       param="messages") from None
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    job = _common(body, list(ids), DEFAULT_CHAT_TOKENS, len(tok))
    want = body.get("logprobs")
    if want is not None and not isinstance(want, bool):
        raise ApiError(400, "logprobs must be a boolean", param="logprobs")
    top = body.get("top_logprobs")
    if top is not None and not want:
        raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    if want:
        job.logprobs = int(_number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True))
    return job


# ---------------------------------------------------------------------------- logprobs


def token_facts(gen: NodeGeneration) -> list[Facts]:
    """The target's facts for each generated token, from the receipts (in order)."""
    facts = [f for r in gen.receipts for f in r.facts]
    return facts[:len(gen.token_ids)]


def logprobs_object(gen: NodeGeneration, job: Job, tok: PreTrainedTokenizerBase,
                    chat: bool) -> dict | None:
    """OpenAI's `logprobs` of a choice, from the verifier-signed receipts: the target's
    log-probability of each token (and of the `job.logprobs` likeliest alternatives)."""
    if job.logprobs is None:
        return None
    return logprobs_of(token_facts(gen), job.logprobs, tok, chat,
                       len(tok.decode(job.prompt_ids)))


def logprobs_of(facts: list[Facts], k: int, tok: PreTrainedTokenizerBase, chat: bool,
                offset: int) -> dict:
    """The `logprobs` object for these tokens (a whole answer, or a streamed chunk's);
    `offset`: the completion API's text offset of the first one."""

    def text(t: int) -> str:
        return tok.decode([t])

    if chat:
        return {"content": [
            {"token": text(f.token), "logprob": f.logprob, "bytes": list(text(f.token).encode()),
             "top_logprobs": [{"token": text(t), "logprob": lp, "bytes": list(text(t).encode())}
                              for t, lp in zip(f.top_tokens[:k], f.top_logprobs[:k],
                                               strict=True)]}
            for f in facts]}
    offsets, at = [], offset
    for f in facts:
        offsets.append(at)
        at += len(text(f.token))
    return {"tokens": [text(f.token) for f in facts],
            "token_logprobs": [f.logprob for f in facts],
            "top_logprobs": [{text(t): lp for t, lp in zip(f.top_tokens[:k], f.top_logprobs[:k],
                                                         strict=True)} for f in facts],
            "text_offset": offsets}


class StreamedLogprobs:
    """Facts of streamed tokens, handed out with the chunk that carries their text.

    Each round's facts arrive with its "round" event, just before its tokens; the text
    of some tokens is held back (a possible stop string), so their logprobs wait for the
    next chunk that has text, or the last one."""

    def __init__(self, job: Job, tok: PreTrainedTokenizerBase, chat: bool) -> None:
        self.job, self.tok, self.chat = job, tok, chat
        self.round: list[Facts] = []
        self.owed: list[Facts] = []
        self.offset = len(tok.decode(job.prompt_ids))

    def heard(self, facts: list[Facts]) -> None:
        self.round = list(facts)

    def tokens(self, ids: list[int]) -> None:
        self.owed += self.round[: len(ids)]  # a round's tokens may be cut at the end
        self.round = []

    def take(self) -> dict | None:
        if self.job.logprobs is None:
            return None
        out = logprobs_of(self.owed, self.job.logprobs, self.tok, self.chat, self.offset)
        self.offset += sum(len(self.tok.decode([f.token])) for f in self.owed)
        self.owed = []
        return out


# ---------------------------------------------------------------------------- text


class TextStream:
    """Token ids in, text deltas out, cut at the first stop string.

    Text that might be the start of a stop string is held back until it is clear
    either way, so a streamed client never sees a stop string's first half.
    """

    def __init__(self, tok: PreTrainedTokenizerBase, stops: list[str]) -> None:
        self.decoder = StreamDecoder(tok)
        self.stops = stops
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def _cut(self, final: bool) -> str:
        if self.stopped:
            return ""
        start = max(0, self.emitted - max((len(s) for s in self.stops), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            end = len(self.text)
        elif final:
            end = len(self.text)
        else:
            hold = 0
            for s in self.stops:
                for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                    if self.text.endswith(s[:k]):
                        hold = k
                        break
            end = len(self.text) - hold
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta

    def push(self, ids: list[int]) -> str:
        if self.stopped:
            return ""
        self.text += self.decoder.push(ids)
        return self._cut(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self.decoder.flush()
        return self._cut(final=True)


# ---------------------------------------------------------------------------- responses


def _usage(job: Job, generated: int) -> dict:
    return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": generated,
            "total_tokens": len(job.prompt_ids) + generated}


class _Shape:
    """The JSON objects of one endpoint (completion or chat), whole and as chunks."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _base(self, chunk: bool) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if chunk and self.chat else ""),
                "created": self.created, "model": self.model}

    def whole(self, text: str, finish: str, usage: dict, extra: dict,
              logprobs: dict | None = None) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {**self._base(False), "choices": [choice], "usage": usage, "specedge": extra}

    def chunk(self, text: str | None, finish: str | None = None, role: bool = False,
              logprobs: dict | None = None) -> dict:
        if self.chat:
            delta: dict = {"role": "assistant", "content": ""} if role else (
                {} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": logprobs,
                      "finish_reason": finish}
        return {**self._base(True), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._base(True), "choices": [], "usage": usage}


def _sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class EventStream(Response):
    """Server-sent events from a producer running in this response's own nursery.

    The status line waits for the producer's first event, so a failure before any
    output (no verifier) still gets a proper JSON error with its status code. The
    client going away cancels the producer, which closes its verifier session.
    """

    media_type = "text/event-stream"

    def __init__(self, produce: Callable[[Callable[[bytes], None]], Awaitable[None]]) -> None:
        super().__init__(status_code=200, media_type=self.media_type)
        self.produce = produce

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        events, inbox = trio.open_memory_channel(math.inf)

        async def producer() -> None:
            with events:
                try:
                    await self.produce(events.send_nowait)
                except Exception as exc:
                    events.send_nowait(api_error(exc))

        async def watch(scope_: trio.CancelScope) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            scope_.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            nursery.start_soon(watch, nursery.cancel_scope)
            started = False
            async for item in inbox:
                if isinstance(item, ApiError):
                    if not started:
                        await item.response()(scope, receive, send)
                        nursery.cancel_scope.cancel()
                        return
                    item = _sse(item.body())
                if not started:
                    await send({"type": "http.response.start", "status": 200, "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
                    started = True
                await send({"type": "http.response.body", "body": item, "more_body": True})
            await send({"type": "http.response.body", "body": _sse("[DONE]"),
                        "more_body": False})
            nursery.cancel_scope.cancel()


def _extra(gen: NodeGeneration) -> dict:
    s = gen.stats
    return {"verifiers": s.verifiers, "failovers": s.failovers, "rounds": s.rounds,
            "acceptance": round(s.acceptance, 4), "proactive_hits": s.proactive_hits,
            "proactive_bets": s.proactive_bets,
            "first_token_from_prefill": s.first_token_from_prefill,
            "first_guess_hit": s.first_guess_hit,
            "draft_prefix_reused": s.draft_prefix_reused,
            "open_wait_ms": s.open_wait_ms,
            "time_to_first_token_ms": s.time_to_first_token_ms,
            "inter_token_latency_ms": s.inter_token_latency_ms,
            "wall_s": round(s.wall_s, 4),
            "round_time_s": {"draft_critical": round(s.draft_critical_s, 4),
                             "draft_hidden": round(s.draft_hidden_s, 4),
                             "round_trip": round(s.round_trip_s, 4),
                             "verify": round(s.verify_s, 4),
                             "bet_wait": round(s.bet_wait_s, 4)},
            "token_ids": gen.token_ids}


async def _serve(request: Request, edge: Edge, model: str, chat: bool) -> Response:
    body = await _json(request)
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "you must provide a model parameter", param="model")
    if name != model:
        raise ApiError(404, f"the model {name!r} does not exist; this node serves {model!r}",
                       param="model", code="model_not_found")
    job = chat_job(body, edge) if chat else completion_job(body, edge)
    shape = _Shape(chat, model)
    text = TextStream(edge.tokenizer, job.stops)
    if not job.stream:
        gen = await edge.generate(job.prompt_ids, job.max_tokens, job.params,
                                  on_tokens=text.push, stop=lambda: text.stopped,
                                  top_logprobs=job.logprobs or 0)
        finish = "stop" if text.stopped else gen.finish_reason
        text.finish()
        return JSONResponse(shape.whole(text.text, finish, _usage(job, len(gen.token_ids)),
                                        _extra(gen),
                                        logprobs_object(gen, job, edge.tokenizer, chat)))

    logprobs = StreamedLogprobs(job, edge.tokenizer, chat)

    async def produce(emit: Callable[[bytes], None]) -> None:
        def on_tokens(ids: list[int]) -> None:
            logprobs.tokens(ids)
            delta = text.push(ids)
            if delta:
                emit(_sse(shape.chunk(delta, logprobs=logprobs.take())))

        def on_event(kind: str, info: dict) -> None:
            if kind == "session" and chat and not produce.started:
                produce.started = True
                emit(_sse(shape.chunk(None, role=True)))
            elif kind == "round":
                logprobs.heard(info.get("facts", []))

        produce.started = False
        gen = await edge.generate(job.prompt_ids, job.max_tokens, job.params,
                                  on_tokens=on_tokens, on_event=on_event,
                                  stop=lambda: text.stopped, top_logprobs=job.logprobs or 0)
        finish = "stop" if text.stopped else gen.finish_reason
        tail = text.finish()
        if tail or logprobs.owed:
            emit(_sse(shape.chunk(tail, logprobs=logprobs.take())))
        emit(_sse(shape.chunk(None, finish=finish)))
        if job.include_usage:
            emit(_sse(shape.usage_chunk(_usage(job, len(gen.token_ids)))))

    return EventStream(produce)


async def _json(request: Request) -> dict:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def create_app(edge: Edge, model: str | None = None) -> Starlette:
    """The ASGI app; `model` is the name clients use (default: the target model's)."""
    model = model or edge.models.target_name
    created = int(time.time())
    card = {"id": model, "object": "model", "created": created, "owned_by": "specedge"}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [card]})

    async def one_model(request: Request) -> Response:
        if request.path_params["name"] != model:
            raise ApiError(404, f"the model {request.path_params['name']!r} does not exist",
                           param="model", code="model_not_found")
        return JSONResponse(card)

    def endpoint(chat: bool) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            try:
                return await _serve(request, edge, model, chat)
            except Exception as exc:  # every failure becomes an OpenAI-shaped answer
                return api_error(exc).response()
        return handle

    async def health(request: Request) -> Response:
        a = edge.activity
        return JSONResponse({"status": "ok", "active": a.active, "completed": a.completed})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                        code=code).response()

    async def app_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    routes = [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", one_model, methods=["GET"]),
        Route("/v1/completions", endpoint(False), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(True), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
    return Starlette(routes=routes,
                     exception_handlers={HTTPException: http_error, ApiError: app_error})


async def serve_api(app: Starlette, bind: str, shutdown: trio.Event, *,
                    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Run `app` on hypercorn's trio worker at `bind` (HOST:PORT; port 0 picks one) until
    `shutdown` is set. `task_status.started` gets the base URL, e.g. http://127.0.0.1:8000."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [bind]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 2.0

    async def run(task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(run)
        task_status.started(binds[0])
