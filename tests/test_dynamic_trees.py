"""Dynamic trees sized by the verifier's pass cost, and bets on several verdicts.

Greedy output still equals the target's own, token for token (float32), for dynamic
trees under flat and steep cost curves and draft qualities from perfect to useless; the
cost rule grows big trees where rows are cheap and small ones where they are not; betting
on two verdicts wins at least as often as on one.
"""

from __future__ import annotations

import pytest
from node_fakes import FakeVerifier
from support import hf_greedy
from test_node_generation import reference, run_generation
from test_verifier_host import PROMPT, run_with_verifier
from verifier_client import Client

from specedge.costs import CostCurve, worth_adding
from specedge.drafter import Drafter
from specedge.engine import speculative_generate
from specedge.models import build_tiny
from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.framing import read_frame, write_frame
from specedge.protocol.ids import ADVERT_PROTOCOL
from specedge.text import eos_ids
from specedge.trees import TreeShape
from specedge.verifier.engine import TargetEngine
from specedge.verifier.host import Verifier

FLAT = CostCurve.of([(1, 0.010), (65, 0.011)])  # a GPU below its compute roof
STEEP = CostCurve.of([(1, 0.010), (2, 0.020), (65, 0.650)])  # every row costs a pass
CPU = CostCurve.of([(1, 0.010), (5, 0.011), (33, 0.022), (65, 0.040)])  # measured shape
NOISES = [0.0, 0.015, 0.05, 0.5]


@pytest.fixture(scope="module")
def drafts():
    return {noise: build_tiny(draft=True, noise=noise)[0] for noise in NOISES}


@pytest.fixture(scope="module")
def references(tiny_pair, tiny_prompts):
    target, tok = tiny_pair[1], tiny_pair[2]
    return {i: hf_greedy(target, p, 40, [tok.eos_token_id]) for i, p in enumerate(tiny_prompts)}


def test_curve_interpolates_and_never_falls():
    c = CostCurve.of([(4, 0.3), (1, 0.1), (2, 0.05)])  # unsorted, with a noisy dip
    assert c.rows == (1, 2, 4) and c.seconds == (0.1, 0.1, 0.3)
    assert c(1) == c(0) == 0.1
    assert c(3) == pytest.approx(0.2)
    assert c(6) == pytest.approx(0.5)  # past the last point: the last slope
    assert CostCurve.of([(8, 0.2)])(64) == 0.2
    with pytest.raises(ValueError):
        CostCurve((2, 1), (0.1, 0.2))


def test_worth_adding_weighs_probability_against_the_row():
    # Flat: any chance of a token is worth a free row; steep: a row doubles the round.
    assert worth_adding(0.01, 3.0, 5, FLAT)
    assert not worth_adding(0.9, 3.0, 1, STEEP)
    assert not worth_adding(0.9, 1.0, 1, STEEP)  # 1.9 tokens in 2 passes: less than 1 in 1
    assert worth_adding(0.9, 1.0, 1, STEEP, overhead_s=0.1)  # 1.9 in 0.12 s beats 1 in 0.11
    # Round overhead (network, drafting) makes rows relatively cheaper.
    assert not worth_adding(0.05, 3.0, 10, CPU)
    assert worth_adding(0.05, 3.0, 10, CPU, overhead_s=0.2)


def test_parse_dynamic_and_spec_round_trip():
    shape = TreeShape.parse("dynamic:32")
    assert shape.dynamic and shape.budget == 32 and shape.max_width == 4
    assert TreeShape.parse("dynamic:16,2") == TreeShape(16, 12, 2, dynamic=True)
    for text in ("chain:4", "tree:16,6,4", "dynamic:32,4", "dynamic:8,2"):
        assert TreeShape.parse(text).spec() == text
    for bad in ("dynamic:", "dynamic:8,2,1", "dynamic:0"):
        with pytest.raises(ValueError):
            TreeShape.parse(bad)


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("cost", [FLAT, STEEP, CPU, None], ids=["flat", "steep", "cpu", "none"])
def test_dynamic_greedy_equals_target_only(tiny_pair, tiny_prompts, references, drafts, noise,
                                           cost):
    target, tok = tiny_pair[1], tiny_pair[2]
    shape = TreeShape.parse("dynamic:24")
    for i, prompt in enumerate(tiny_prompts[:4]):
        n = 10 + 9 * i
        gen = speculative_generate(drafts[noise], target, prompt, n, shape=shape, cost=cost,
                                   eos_ids=[tok.eos_token_id], bets=1 + i % 3)
        assert gen.token_ids == references[i][:n], f"prompt {i}"


def test_cost_sizes_the_tree(tiny_pair, tiny_prompts):
    draft = tiny_pair[0]
    sizes = {}
    for name, cost in (("flat", FLAT), ("cpu", CPU), ("steep", STEEP)):
        d = Drafter(draft, TreeShape.parse("dynamic:32"))
        d.cost = cost
        sizes[name] = [len(d.draft(list(p))) for p in tiny_prompts]
    assert all(n >= 12 for n in sizes["flat"])  # nearly free rows: big trees
    assert all(n == 1 for n in sizes["steep"])  # each row a pass: one node, never none
    assert all(1 <= n < 32 for n in sizes["cpu"])
    assert sum(sizes["steep"]) < sum(sizes["cpu"]) < sum(sizes["flat"])


def test_two_bets_win_more_than_one(tiny_pair, tiny_prompts, references):
    draft, target, tok = tiny_pair
    hits = {}
    for bets in (1, 2, 3):
        h = b = 0
        for i, prompt in enumerate(tiny_prompts):
            gen = speculative_generate(draft, target, prompt, 40, shape=TreeShape.chain(4),
                                       bets=bets, eos_ids=[tok.eos_token_id])
            assert gen.token_ids == references[i][:40]
            h, b = h + gen.stats.proactive_hits, b + gen.stats.proactive_bets
        hits[bets] = h / b
    assert hits[1] < hits[2] <= hits[3], hits


def test_probe_measures_the_engine_by_rows(tiny_pair):
    from specedge.verifier.costprobe import measure_pass_costs, probe_rows

    assert probe_rows(17) == [1, 2, 4, 8, 16, 17] and probe_rows(1) == [1]
    costs = measure_pass_costs(TargetEngine(tiny_pair[1]), 259, 17)
    assert [r for r, _ in costs] == probe_rows(17)
    assert all(us > 0 for _, us in costs)


def test_verifier_advertises_its_pass_cost(tiny_pair):
    curve = [(1, 900), (8, 1500), (17, 2600)]

    async def body(verifier: Verifier, client: Client) -> None:
        conn = await client.session(PROMPT, 4)
        opened = conn.opened
        assert [(p.rows, p.micros) for p in opened.pass_costs] == curve
        stream = await client.stream(ADVERT_PROTOCOL)
        await write_frame(stream, pb.Frame(advert_query=pb.AdvertQuery()))
        advert = (await read_frame(stream, timeout=10)).advert
        assert [(p.rows, p.micros) for p in advert.pass_costs] == curve
        await conn.close()

    run_with_verifier((tiny_pair[1], tiny_pair[0]), body, pass_costs=curve)


@pytest.mark.parametrize("micros", [[(1, 1000), (65, 1100)], [(1, 1000), (2, 2000), (65, 65000)]],
                         ids=["flat", "steep"])
def test_node_sizes_dynamic_trees_by_the_verifiers_curve(tiny_pair, tiny_prompts, micros):
    draft, target, tok = tiny_pair
    stop = eos_ids(tok, target.generation_config)
    prompt = tiny_prompts[0]
    gen, _, _ = run_generation(draft, [FakeVerifier(target, pass_costs=micros)], prompt, 40,
                               shape=TreeShape.parse("dynamic:24"), eos_ids=stop)
    assert gen.token_ids == reference(target, tok, prompt, 40)
    sizes = [r.drafted for r in gen.receipts if r.drafted]
    if micros[-1][1] > 10000:
        assert set(sizes) == {1}  # every row costs a pass: one node a round
    else:
        assert min(sizes) >= 4 and max(sizes) > 8
    s = gen.stats
    # Where the rounds' time went: every figure measured, verify inside the round trip.
    assert s.round_trip_s > s.verify_s > 0 and s.draft_critical_s > 0
    assert s.bet_wait_s >= 0
    assert s.draft_critical_s + s.round_trip_s + s.bet_wait_s < s.wall_s
