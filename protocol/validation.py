"""Checks for every message, one function each.

The verifier trusts nothing a node sends and the node trusts nothing a verifier
sends. Each function raises ProtocolError with exactly one typed code per kind of
failure and returns None when the message is fine. They are pure: the caller passes
in the state they need (vocabulary size, budgets, last sequence number), and a
refused message changes no state, so a node may retry the same seq after an error.

Which code for what, across all messages:
- MALFORMED: a required field missing or of the wrong shape (ids, digests, versions).
- TOO_LARGE: a string or list longer than its limit (the prompt included).
- INVALID_PARAMETER: a number outside its range.
- TOKEN_OUT_OF_VOCAB, BAD_TREE, TREE_TOO_LARGE, REPLAYED_SEQUENCE, SKIPPED_SEQUENCE,
  UNKNOWN_SESSION: as named, for requests.
- BAD_RESULT / BAD_RECEIPT: a result or receipt that contradicts its request.
- WRONG_PEER: a message naming a peer other than the one we talk to.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.envelopes import open_request, request_digest
from specedge.protocol.errors import ErrorCode, ProtocolError, from_error
from specedge.protocol.ids import check_version
from specedge.protocol.limits import (
    MAX_BATCH_TOKENS,
    MAX_DRAFT_MICROS,
    MAX_ERROR_MESSAGE_CHARS,
    MAX_ETA_MS,
    MAX_FREE_SLOTS,
    MAX_MODEL_ID_CHARS,
    MAX_NEW_TOKENS,
    MAX_PASS_COSTS,
    MAX_PEER_ID_CHARS,
    MAX_PROMPT_TOKENS,
    MAX_QUEUE_DEPTH,
    MAX_REASON_CHARS,
    MAX_RECEIPT_ENVELOPE_BYTES,
    MAX_RETRY_AFTER_MS,
    MAX_REVISION_CHARS,
    MAX_SESSIONS,
    MAX_STANDING,
    MAX_STANDING_ISSUERS,
    MAX_STATEMENT_BYTES,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    MAX_TOP_LOGPROBS,
    MAX_TREE_TOKENS,
    MAX_VERIFY_MICROS,
    MAX_VERSION_CHARS,
    MAX_VOCAB_SIZE,
    SESSION_ID_BYTES,
    SHA256_BYTES,
)


def _fail(code: ErrorCode, message: str) -> ProtocolError:
    return ProtocolError(code, message)


def _text(value: str, name: str, limit: int, required: bool = True) -> None:
    # Strings end up in logs, ledgers and UIs: bounded, printable, present if required.
    if len(value) > limit:
        raise _fail(ErrorCode.TOO_LARGE, f"{name} longer than {limit} characters")
    if required and not value:
        raise _fail(ErrorCode.MALFORMED, f"{name} is missing")
    if not value.isprintable():
        raise _fail(ErrorCode.MALFORMED, f"{name} contains control characters")


def _session_id(value: bytes, name: str = "session_id") -> None:
    if len(value) != SESSION_ID_BYTES:
        raise _fail(ErrorCode.MALFORMED, f"{name} must be {SESSION_ID_BYTES} bytes")


_BASE58 = re.compile(r"[1-9A-HJ-NP-Za-km-z]+")


def _peer_id(value: str, name: str) -> None:
    # Peer ids are base58 text; anything else cannot name a libp2p peer.
    _text(value, name, MAX_PEER_ID_CHARS)
    if not _BASE58.fullmatch(value):
        raise _fail(ErrorCode.MALFORMED, f"{name} is not a base58 peer id")


def _range(value: int, name: str, low: int, high: int) -> None:
    if not low <= value <= high:
        raise _fail(ErrorCode.INVALID_PARAMETER, f"{name}={value} outside [{low}, {high}]")


def _check_vocab(vocab_size: int) -> None:
    # A caller bug, not peer input: fail loudly rather than mis-validate.
    if not 0 < vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size} outside (0, {MAX_VOCAB_SIZE}]")


def _tokens_in_vocab(tokens: Sequence[int], vocab_size: int, name: str) -> None:
    if tokens and max(tokens) >= vocab_size:
        bad = next(i for i, t in enumerate(tokens) if t >= vocab_size)
        raise _fail(
            ErrorCode.TOKEN_OUT_OF_VOCAB,
            f"{name}[{bad}]={tokens[bad]} not below vocab size {vocab_size}",
        )


def validate_sampling(sampling: pb.Sampling, vocab_size: int | None = None) -> None:
    """Temperature finite in [0, MAX_TEMPERATURE], top_p in [0, 1], top_k bounded."""
    t = sampling.temperature
    if not math.isfinite(t) or not 0.0 <= t <= MAX_TEMPERATURE:
        raise _fail(ErrorCode.INVALID_PARAMETER, f"temperature {t} outside [0, {MAX_TEMPERATURE}]")
    p = sampling.top_p
    if not math.isfinite(p) or not 0.0 <= p <= 1.0:
        raise _fail(ErrorCode.INVALID_PARAMETER, f"top_p {p} outside [0, 1]")
    _range(sampling.top_k, "top_k", 0, vocab_size if vocab_size else MAX_TOP_K)


def validate_open_session(
    msg: pb.OpenSession,
    *,
    vocab_size: int | None = None,
    model_id: str | None = None,
    revision: str | None = None,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    max_context_tokens: int | None = None,
    free_slots: int | None = None,
) -> None:
    """Check an OpenSession on the verifier.

    ``model_id`` / ``revision``: what this verifier serves (UNSUPPORTED_MODEL when
    the node asks for something else; an empty requested revision accepts ours).
    ``max_context_tokens``: prompt + max_new_tokens must fit (LIMIT_REACHED).
    ``free_slots``: the verifier's free session slots (OVERLOADED at 0), checked last
    so a node learns about a bad request before being told to try elsewhere.
    The prompt must be non-empty: its last token is the pending root of the first tree.
    """
    _text(msg.client_version, "client_version", MAX_VERSION_CHARS)
    check_version(msg.client_version)
    _text(msg.model_id, "model_id", MAX_MODEL_ID_CHARS)
    _text(msg.revision, "revision", MAX_REVISION_CHARS, required=False)
    if model_id is not None and msg.model_id != model_id:
        raise _fail(
            ErrorCode.UNSUPPORTED_MODEL, f"this verifier serves {model_id!r}, not {msg.model_id!r}"
        )
    if revision is not None and msg.revision and msg.revision != revision:
        raise _fail(
            ErrorCode.UNSUPPORTED_MODEL,
            f"this verifier serves revision {revision!r}, not {msg.revision!r}",
        )
    if not msg.prompt:
        raise _fail(ErrorCode.MALFORMED, "prompt is empty")
    limit = min(max_prompt_tokens, MAX_PROMPT_TOKENS)
    if len(msg.prompt) > limit:
        raise _fail(ErrorCode.TOO_LARGE, f"prompt of {len(msg.prompt)} tokens > {limit}")
    if vocab_size is not None:
        _check_vocab(vocab_size)
        _tokens_in_vocab(msg.prompt, vocab_size, "prompt")
    validate_sampling(msg.sampling, vocab_size)
    _range(msg.max_new_tokens, "max_new_tokens", 1, MAX_NEW_TOKENS)
    _range(msg.top_logprobs, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if len(msg.standing) > MAX_STATEMENT_BYTES:
        raise _fail(ErrorCode.TOO_LARGE, "standing statement too large")
    if max_context_tokens is not None and len(msg.prompt) + msg.max_new_tokens > max_context_tokens:
        raise _fail(
            ErrorCode.LIMIT_REACHED,
            f"prompt {len(msg.prompt)} + max_new_tokens {msg.max_new_tokens} > context "
            f"{max_context_tokens}",
        )
    if free_slots is not None and free_slots <= 0:
        raise _fail(ErrorCode.OVERLOADED, "no free session slot; try another verifier")


def _pass_costs(points: Sequence[pb.PassCost]) -> None:
    if len(points) > MAX_PASS_COSTS:
        raise _fail(ErrorCode.TOO_LARGE, f"{len(points)} pass costs > {MAX_PASS_COSTS}")
    for point in points:
        _range(point.rows, "pass_costs.rows", 1, MAX_BATCH_TOKENS)
        _range(point.micros, "pass_costs.micros", 0, MAX_VERIFY_MICROS)


def validate_session_opened(msg: pb.SessionOpened, *, expected_peer: str | None = None) -> None:
    """Check a SessionOpened on the node (``expected_peer``: the stream's remote peer)."""
    _session_id(msg.session_id)
    _peer_id(msg.verifier_peer_id, "verifier_peer_id")
    if expected_peer is not None and msg.verifier_peer_id != str(expected_peer):
        raise _fail(ErrorCode.WRONG_PEER, "verifier_peer_id is not the peer on this stream")
    _range(msg.vocab_size, "vocab_size", 1, MAX_VOCAB_SIZE)
    _range(msg.max_tree_tokens, "max_tree_tokens", 1, MAX_TREE_TOKENS)
    _pass_costs(msg.pass_costs)


def validate_tree(
    tokens: Sequence[int], parents: Sequence[int], vocab_size: int, max_tree_tokens: int
) -> None:
    """A tree as lists: size within budget, parents strictly backwards, ids in vocab.

    An empty tree is allowed: it asks for one plain target step (the bonus token).
    """
    _check_vocab(vocab_size)
    budget = min(max_tree_tokens, MAX_TREE_TOKENS)
    if len(tokens) > budget:
        raise _fail(ErrorCode.TREE_TOO_LARGE, f"tree of {len(tokens)} tokens > budget {budget}")
    if len(parents) != len(tokens):
        raise _fail(ErrorCode.BAD_TREE, f"{len(tokens)} tokens but {len(parents)} parents")
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            raise _fail(ErrorCode.BAD_TREE, f"parents[{i}]={parent} is not in [-1, {i})")
    _tokens_in_vocab(tokens, vocab_size, "tokens")


def validate_verify_request(
    req: pb.VerifyRequest,
    vocab_size: int,
    max_tree_tokens: int,
    last_seq: int,
    *,
    session_id: bytes | None = None,
    tokens_left: int | None = None,
) -> None:
    """Check a VerifyRequest on the verifier, after ``open_request`` checked its signature.

    ``last_seq``: the session's last accepted seq (0 before the first request); the
    request must carry exactly ``last_seq + 1``. ``session_id``: the session open on
    this stream (UNKNOWN_SESSION if the request names another). ``tokens_left``: how
    many tokens the session may still generate (LIMIT_REACHED at 0).
    """
    _session_id(req.session_id)
    if session_id is not None and req.session_id != session_id:
        raise _fail(ErrorCode.UNKNOWN_SESSION, "request names a session not open on this stream")
    if req.seq <= last_seq:
        raise _fail(ErrorCode.REPLAYED_SEQUENCE, f"seq {req.seq} <= last seq {last_seq}")
    if req.seq != last_seq + 1:
        raise _fail(ErrorCode.SKIPPED_SEQUENCE, f"seq {req.seq} skips past {last_seq + 1}")
    if tokens_left is not None and tokens_left <= 0:
        raise _fail(ErrorCode.LIMIT_REACHED, "session has generated max_new_tokens")
    validate_tree(req.tokens, req.parents, vocab_size, max_tree_tokens)
    _range(req.draft_micros, "draft_micros", 0, MAX_DRAFT_MICROS)


def validate_verify_result(
    res: pb.VerifyResult, request: pb.VerifyRequest, vocab_size: int
) -> None:
    """Check a VerifyResult on the node against the request it answers.

    The accepted indices must form a root-to-leaf path of the request's tree: the first
    a child of the pending token (parent -1), each next a child of the previous.
    The receipt is only checked for presence and size here; open it with
    ``open_receipt`` and check it with ``validate_receipt``.
    """
    _check_vocab(vocab_size)
    if res.session_id != request.session_id or res.seq != request.seq:
        raise _fail(ErrorCode.BAD_RESULT, "result answers another request")
    n = len(request.tokens)
    if len(res.accepted) > n:
        raise _fail(ErrorCode.BAD_RESULT, "more accepted tokens than drafted")
    expected_parent = -1
    for k, index in enumerate(res.accepted):
        if index >= n or request.parents[index] != expected_parent:
            raise _fail(ErrorCode.BAD_RESULT, f"accepted[{k}]={index} does not extend the path")
        expected_parent = index
    if res.bonus_token >= vocab_size:
        raise _fail(ErrorCode.TOKEN_OUT_OF_VOCAB, f"bonus token {res.bonus_token} not in vocab")
    if not res.receipt:
        raise _fail(ErrorCode.MALFORMED, "result carries no receipt")
    if len(res.receipt) > MAX_RECEIPT_ENVELOPE_BYTES:
        raise _fail(ErrorCode.TOO_LARGE, "receipt envelope too large")


def validate_receipt(
    receipt: pb.Receipt,
    *,
    request_envelope: bytes | None = None,
    request: pb.VerifyRequest | None = None,
    result: pb.VerifyResult | None = None,
    node_peer: str | None = None,
    verifier_peer: str | None = None,
    model_id: str | None = None,
) -> None:
    """Check a Receipt's own shape and, given context, that it tells the truth.

    Call after ``open_receipt`` (which checked the verifier's signature and that
    ``verifier_peer_id`` is the signer). With ``request_envelope`` (the node's signed
    request bytes, as a ledger stores them) it also checks the digest and that the
    node named in the receipt signed that request; with ``request`` / ``result`` it
    checks the counts. Mismatches are BAD_RECEIPT, a wrong signer WRONG_PEER.
    """
    _peer_id(receipt.verifier_peer_id, "verifier_peer_id")
    _peer_id(receipt.node_peer_id, "node_peer_id")
    _session_id(receipt.session_id)
    if len(receipt.request_sha256) != SHA256_BYTES:
        raise _fail(ErrorCode.MALFORMED, "request_sha256 must be 32 bytes")
    _text(receipt.model_id, "model_id", MAX_MODEL_ID_CHARS)
    if receipt.seq < 1:
        raise _fail(ErrorCode.MALFORMED, "receipt seq must be >= 1")
    if receipt.unix_ms == 0:
        raise _fail(ErrorCode.MALFORMED, "receipt has no time")
    if receipt.drafted > MAX_TREE_TOKENS or receipt.accepted > receipt.drafted:
        raise _fail(
            ErrorCode.BAD_RECEIPT,
            f"accepted {receipt.accepted} / drafted {receipt.drafted} impossible",
        )
    if receipt.verify_micros > MAX_VERIFY_MICROS or receipt.draft_micros > MAX_DRAFT_MICROS:
        raise _fail(ErrorCode.BAD_RECEIPT, "timing outside its range")
    if node_peer is not None and receipt.node_peer_id != str(node_peer):
        raise _fail(ErrorCode.WRONG_PEER, "receipt names another node")
    if verifier_peer is not None and receipt.verifier_peer_id != str(verifier_peer):
        raise _fail(ErrorCode.WRONG_PEER, "receipt names another verifier")
    if model_id is not None and receipt.model_id != model_id:
        raise _fail(ErrorCode.BAD_RECEIPT, "receipt names another model")
    if request_envelope is not None:
        if request_digest(request_envelope) != receipt.request_sha256:
            raise _fail(ErrorCode.BAD_RECEIPT, "request_sha256 is not the digest of the request")
        _, signed = open_request(request_envelope, expected_peer=receipt.node_peer_id)
        if request is not None and signed.SerializeToString() != request.SerializeToString():
            raise _fail(ErrorCode.BAD_RECEIPT, "request differs from the signed request")
        request = signed
    if request is not None:
        if receipt.session_id != request.session_id or receipt.seq != request.seq:
            raise _fail(ErrorCode.BAD_RECEIPT, "receipt is for another request")
        if receipt.drafted != len(request.tokens):
            raise _fail(ErrorCode.BAD_RECEIPT, "drafted differs from the request's tree size")
        if receipt.draft_micros != request.draft_micros:
            raise _fail(ErrorCode.BAD_RECEIPT, "draft_micros differs from the request")
    if result is not None:
        if receipt.session_id != result.session_id or receipt.seq != result.seq:
            raise _fail(ErrorCode.BAD_RECEIPT, "receipt is for another result")
        if receipt.accepted != len(result.accepted):
            raise _fail(ErrorCode.BAD_RECEIPT, "accepted differs from the result")


def validate_close_session(msg: pb.CloseSession, *, session_id: bytes | None = None) -> None:
    """Check a CloseSession (UNKNOWN_SESSION if it names a session not on this stream)."""
    _session_id(msg.session_id)
    if session_id is not None and msg.session_id != session_id:
        raise _fail(ErrorCode.UNKNOWN_SESSION, "close names a session not open on this stream")
    _text(msg.reason, "reason", MAX_REASON_CHARS, required=False)


def validate_error(msg: pb.Error) -> None:
    """Check an Error frame. Unknown codes are allowed (newer peers); sizes are not."""
    if len(msg.message) > MAX_ERROR_MESSAGE_CHARS:
        raise _fail(ErrorCode.TOO_LARGE, "error message too long")
    if msg.session_id and len(msg.session_id) != SESSION_ID_BYTES:
        raise _fail(ErrorCode.MALFORMED, "error session_id must be empty or 16 bytes")
    _range(msg.retry_after_ms, "retry_after_ms", 0, MAX_RETRY_AFTER_MS)


def validate_progress(msg: pb.Progress, *, session_id: bytes | None = None,
                      seq: int | None = None) -> None:
    """Check a Progress frame on the node (``session_id``/``seq``: what it waits for;
    a frame about something else is BAD_RESULT: the verifier is confused or lying)."""
    _session_id(msg.session_id)
    if session_id is not None and msg.session_id != session_id:
        raise _fail(ErrorCode.BAD_RESULT, "progress names another session")
    if seq is not None and msg.seq not in (0, seq):
        raise _fail(ErrorCode.BAD_RESULT, f"progress for seq {msg.seq}, waiting for {seq}")
    _range(msg.done, "done", 0, MAX_PROMPT_TOKENS)
    _range(msg.total, "total", 0, MAX_PROMPT_TOKENS)
    if msg.done > msg.total:
        raise _fail(ErrorCode.INVALID_PARAMETER, "progress done > total")
    _range(msg.queue_position, "queue_position", 0, MAX_QUEUE_DEPTH)
    _range(msg.eta_ms, "eta_ms", 0, MAX_ETA_MS)


def validate_advertisement(msg: pb.Advertisement) -> None:
    """Check a verifier's Advertisement before ranking it (version must be compatible)."""
    _text(msg.model_id, "model_id", MAX_MODEL_ID_CHARS)
    _text(msg.revision, "revision", MAX_REVISION_CHARS, required=False)
    _text(msg.protocol_version, "protocol_version", MAX_VERSION_CHARS)
    check_version(msg.protocol_version)
    _range(msg.max_batch_tokens, "max_batch_tokens", 1, MAX_BATCH_TOKENS)
    _range(msg.free_slots, "free_slots", 0, MAX_FREE_SLOTS)
    _range(msg.queue_depth, "queue_depth", 0, MAX_QUEUE_DEPTH)
    _range(msg.mean_verify_micros, "mean_verify_micros", 0, MAX_VERIFY_MICROS)
    _range(msg.max_tree_tokens, "max_tree_tokens", 0, MAX_TREE_TOKENS)  # 0: not announced
    _range(msg.vocab_size, "vocab_size", 0, MAX_VOCAB_SIZE)
    speed = msg.prefill_tokens_per_s
    if not math.isfinite(speed) or not 0.0 <= speed <= 1e9:
        raise _fail(ErrorCode.INVALID_PARAMETER, f"prefill_tokens_per_s {speed} out of range")
    _range(msg.mean_pass_micros, "mean_pass_micros", 0, MAX_VERIFY_MICROS)
    _range(msg.sessions_open, "sessions_open", 0, MAX_SESSIONS)
    _range(msg.max_sessions, "max_sessions", 0, MAX_SESSIONS)
    _range(msg.queued_prefill_tokens, "queued_prefill_tokens", 0, MAX_QUEUE_DEPTH * 1024)
    _pass_costs(msg.pass_costs)
    _text(msg.engine, "engine", MAX_MODEL_ID_CHARS, required=False)
    if not math.isfinite(msg.your_standing) or not 0.0 <= msg.your_standing <= MAX_STANDING:
        raise _fail(ErrorCode.INVALID_PARAMETER, "your_standing out of range")
    if len(msg.standing_statement) > MAX_STATEMENT_BYTES:
        raise _fail(ErrorCode.TOO_LARGE, "standing statement too large")
    if len(msg.standing_issuers) > MAX_STANDING_ISSUERS:
        raise _fail(ErrorCode.TOO_LARGE, "too many standing issuers")
    for issuer in msg.standing_issuers:
        _peer_id(issuer, "standing_issuers")


def validate_statement(st: pb.StandingStatement, *, node: str, issuers: Sequence[str],
                       now_ms: int, max_age_s: float) -> None:
    """A standing statement a node presents: about this node (WRONG_PEER), from an
    issuer we accept (WRONG_PEER), not from the future, not stale, in range."""
    if st.node_peer_id != node:
        raise _fail(ErrorCode.WRONG_PEER, "the statement is about another node")
    if st.issuer_peer_id not in issuers:
        raise _fail(ErrorCode.WRONG_PEER, "the statement's issuer is not one we accept")
    if st.as_of_unix_ms > now_ms + 60_000:
        raise _fail(ErrorCode.INVALID_PARAMETER, "the statement is dated in the future")
    if now_ms - st.as_of_unix_ms > max_age_s * 1000:
        raise _fail(ErrorCode.INVALID_PARAMETER, "the statement is too old")
    for value, name in ((st.earned, "earned"), (st.half_life_s, "half_life_s")):
        if not math.isfinite(value) or not 0.0 <= value <= MAX_STANDING:
            raise _fail(ErrorCode.INVALID_PARAMETER, f"statement {name} out of range")


def validate_advert_query(msg: pb.AdvertQuery) -> None:
    """Check an AdvertQuery (an empty model_id asks for everything)."""
    _text(msg.model_id, "model_id", MAX_MODEL_ID_CHARS, required=False)


def expect(frame: pb.Frame, *kinds: str) -> str:
    """The frame's kind if it is one of ``kinds``.

    An Error frame the caller did not ask for is raised as the peer's RemoteError
    (its code intact); any other kind is UNEXPECTED_MESSAGE.
    """
    kind = frame.WhichOneof("body")
    if kind in kinds:
        return kind
    if kind == "error":
        raise from_error(frame.error)
    raise _fail(ErrorCode.UNEXPECTED_MESSAGE, f"expected {' or '.join(kinds)}, got {kind}")


_STATELESS = {
    "open": lambda f: validate_open_session(f.open),
    "opened": lambda f: validate_session_opened(f.opened),
    "close": lambda f: validate_close_session(f.close),
    "error": lambda f: validate_error(f.error),
    "advert": lambda f: validate_advertisement(f.advert),
    "progress": lambda f: validate_progress(f.progress),
    "advert_query": lambda f: validate_advert_query(f.advert_query),
}


def validate_frame(frame: pb.Frame) -> None:
    """The context-free checks of a frame's message.

    "verify" and "result" need context (the peer, the request) and are left to
    ``open_request`` + ``validate_verify_request`` and ``validate_verify_result``.
    """
    kind = frame.WhichOneof("body")
    if kind is None:
        raise _fail(ErrorCode.MALFORMED, "frame carries no message")
    check = _STATELESS.get(kind)
    if check is not None:
        check(frame)
