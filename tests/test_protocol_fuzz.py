"""Fuzzing: random and mutated bytes into every decoder and validator.

Only the protocol's own error type may come out, and nothing may hang. The default
run uses hypothesis with modest example counts; the slow-marked test drives
scripts/fuzz_protocol.py with 100,000 inputs per decoder.
"""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.envelopes import open_request, seal_request
from specedge.protocol.errors import ProtocolError
from specedge.protocol.framing import FrameDecoder, encode_frame, read_frame
from specedge.protocol.identity import IdentityError
from specedge.protocol.limits import MAX_TREE_TOKENS
from specedge.protocol.validation import (
    validate_open_session,
    validate_tree,
    validate_verify_request,
    validate_verify_result,
)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_protocol.py"


def _load_fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_protocol", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_protocol"] = module
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzzer()
FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SYNC_TARGETS = [name for name in fuzz.TARGETS if name != "read_frame"]


def _only_protocol_errors(fn, data: bytes) -> None:
    try:
        fn(data)
    except (ProtocolError, IdentityError):
        pass


@pytest.mark.parametrize("name", SYNC_TARGETS)
@FAST
@given(data=st.binary(max_size=400))
def test_random_bytes(name: str, data: bytes) -> None:
    _only_protocol_errors(fuzz.TARGETS[name][0], data)


@pytest.mark.parametrize("name", SYNC_TARGETS)
@FAST
@given(seed=st.integers(0, 2**32), rounds=st.integers(1, 4))
def test_mutated_valid_inputs(name: str, seed: int, rounds: int) -> None:
    import random

    rng = random.Random(seed)
    seeds = fuzz.TARGETS[name][1]
    data = fuzz.make_input(rng, name, seeds)
    for _ in range(rounds - 1):
        data = fuzz.mutate(rng, data, seeds)
    _only_protocol_errors(fuzz.TARGETS[name][0], data)


@FAST
@given(data=st.binary(max_size=600), chunk=st.integers(1, 64))
def test_read_frame_on_random_bytes_never_hangs(data: bytes, chunk: int) -> None:
    stream = fuzz._BytesStream(data, chunk)

    async def main() -> None:
        with trio.fail_after(5):  # a hang fails the test instead of freezing it
            while True:
                await read_frame(stream, timeout=1)

    with pytest.raises(ProtocolError):
        trio.run(main)


def test_script_smoke_run() -> None:
    out = io.StringIO()
    reports = fuzz.run(per_target=300, seed=1, out=out)
    assert {r.name for r in reports} == set(fuzz.TARGETS)
    assert all(r.inputs == 300 and not r.escapes for r in reports), out.getvalue()


# ---- properties on well-formed but hostile messages ----------------------------------

U32 = st.integers(0, 2**32 - 1)
S32 = st.integers(-(2**31), 2**31 - 1)
requests = st.builds(
    pb.VerifyRequest,
    session_id=st.binary(min_size=15, max_size=17),
    seq=st.integers(0, 2**64 - 1),
    tokens=st.lists(st.one_of(st.integers(0, 300), U32), max_size=70),
    parents=st.lists(st.one_of(st.integers(-2, 70), S32), max_size=70),
    proactive=st.booleans(),
    draft_micros=st.integers(0, 2**64 - 1),
)


@FAST
@given(req=requests, last_seq=st.integers(0, 2**64 - 1))
def test_accepted_requests_are_well_formed_trees(req: pb.VerifyRequest, last_seq: int) -> None:
    try:
        validate_verify_request(req, vocab_size=256, max_tree_tokens=64, last_seq=last_seq)
    except ProtocolError:
        return
    # Whatever passes is safe to hand to the tree builder and the model.
    assert req.seq == last_seq + 1 and len(req.tokens) == len(req.parents) <= 64
    assert all(-1 <= p < i for i, p in enumerate(req.parents))
    assert all(t < 256 for t in req.tokens)


@st.composite
def valid_trees(draw) -> tuple[list[int], list[int]]:
    n = draw(st.integers(0, 40))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    tokens = draw(st.lists(st.integers(0, 255), min_size=n, max_size=n))
    return tokens, parents


@FAST
@given(tree=valid_trees())
def test_every_valid_tree_is_accepted(tree: tuple[list[int], list[int]]) -> None:
    validate_tree(tree[0], tree[1], vocab_size=256, max_tree_tokens=MAX_TREE_TOKENS)


@FAST
@given(tree=valid_trees(), accepted=st.lists(st.integers(0, 50), max_size=8),
       bonus=st.integers(0, 300))
def test_accepted_results_are_paths(tree, accepted: list[int], bonus: int) -> None:
    tokens, parents = tree
    req = pb.VerifyRequest(session_id=b"s" * 16, seq=1, tokens=tokens, parents=parents)
    res = pb.VerifyResult(session_id=b"s" * 16, seq=1, accepted=accepted, bonus_token=bonus,
                          receipt=b"r")
    try:
        validate_verify_result(res, req, vocab_size=256)
    except ProtocolError:
        return
    prev = -1
    for index in accepted:
        assert parents[index] == prev
        prev = index


opens = st.builds(
    pb.OpenSession,
    model_id=st.text(max_size=20),
    revision=st.text(max_size=5),
    prompt=st.lists(U32, max_size=20),
    sampling=st.builds(pb.Sampling, temperature=st.floats(width=32), top_p=st.floats(width=32),
                       top_k=U32, seed=st.integers(0, 2**64 - 1)),
    client_version=st.sampled_from(["1.0.0", "1.2.3", "2.0.0", "", "x"]),
    max_new_tokens=U32,
)


@FAST
@given(msg=opens)
def test_open_session_validator_only_raises_protocol_errors(msg: pb.OpenSession) -> None:
    try:
        validate_open_session(msg, vocab_size=256, max_context_tokens=1000)
    except ProtocolError:
        return
    assert 0 < len(msg.prompt) and max(msg.prompt) < 256
    assert 0 <= msg.sampling.temperature and 0 <= msg.sampling.top_p <= 1


@FAST
@given(frames=st.lists(st.sampled_from(fuzz.FRAMES), min_size=1, max_size=6),
       cuts=st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_decoder_is_independent_of_chunking(frames: list[pb.Frame], cuts: list[int]) -> None:
    data = b"".join(encode_frame(f) for f in frames)
    decoder = FrameDecoder()
    out: list[pb.Frame] = []
    pos, i = 0, 0
    while pos < len(data):
        step = cuts[i % len(cuts)]
        out += decoder.feed(data[pos : pos + step])
        pos, i = pos + step, i + 1
    decoder.finish()
    assert out == frames


@FAST
@given(pos=st.integers(0, 10_000), value=st.integers(1, 255), extra=st.binary(max_size=3))
def test_a_modified_envelope_never_opens(pos: int, value: int, extra: bytes) -> None:
    """Any change to a signed request's bytes is refused: one signature, one encoding."""
    original = fuzz.REQUEST_ENV
    data = bytearray(original)
    data[pos % len(data)] ^= value
    for candidate in (bytes(data), original + extra if extra else bytes(data)):
        with pytest.raises(ProtocolError):
            open_request(candidate)


@FAST
@given(req=requests)
def test_any_request_round_trips_through_an_envelope(req: pb.VerifyRequest) -> None:
    opened, back = open_request(seal_request(fuzz.NODE, req), expected_peer=fuzz.NODE_ID)
    assert back == req and opened.peer_id == fuzz.NODE_ID


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_hundred_thousand_inputs_per_decoder() -> None:
    out = io.StringIO()
    reports = fuzz.run(per_target=100_000, seed=0, out=out)
    print(out.getvalue())
    for report in reports:
        assert report.inputs >= 100_000, report.name
        assert not report.escapes, (report.name, report.escapes)
        assert report.slowest_s < fuzz.SLOW_INPUT_S, (report.name, report.slowest_s)
