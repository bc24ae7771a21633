"""Confidence-aware draft lengths: calibration of draft scores, the per-row stop, copies cut by position, and the
adaptive schedule's prices."""

from __future__ import annotations

import pytest
import torch

from specmtp.drafters.base import DraftContext, Drafter, Proposal
from specmtp.drafters.confidence import BINS, FREE, Calibration, Chain, Price, TreeRound, monotone, prob_keys
from specmtp.drafters.hybrid import LookupFirst
from specmtp.drafters.ngram import lookup_match
from specmtp.sampling import SamplingParams
from specmtp.schedule import Adaptive


def test_prob_keys_bin_probabilities():
    assert prob_keys(torch.tensor([0.0, 0.04, 0.5, 0.99, 1.0])).tolist() == [0, 0, 10, 19, 19]


def test_calibration_starts_at_the_prior_and_learns_from_verified_drafts():
    cal = Calibration([0.5, 0.5], strength=2.0, decay=1.0)
    assert cal.rate(torch.tensor([0, 1])).tolist() == [0.5, 0.5]
    # row 0 drafted keys 0, 0, 1 and had 1 accepted: key 0 once accepted, once rejected; key 1 never reached
    # row 1 was not verified (-1): nothing learnt from it
    for _ in range(10):
        cal.observe([[0, 0, 1], [1, 1]], [1, -1])
    assert cal.reached.tolist() == [20.0, 0.0] and cal.hits.tolist() == [10.0, 0.0]
    assert cal.rate(torch.tensor([1]))[0] == 0.5
    cal.observe([[1, 1, 1]], [3])  # every draft accepted: all reached, all hits
    assert cal.reached[1] == 3 and cal.hits[1] == 3
    assert cal.rate(torch.tensor([1]))[0] == pytest.approx((3 + 1) / (3 + 2))


def test_chain_stops_each_row_at_the_verify_price_and_learns_only_what_was_proposed():
    cal = Calibration([0.9, 0.5], decay=1.0)
    chain = Chain(cal, 3, Price(verify=0.3))
    for _ in range(3):  # row 0 sure (0.9, 0.81, 0.73), row 1 unsure (0.5, then 0.25 < 0.3), row 2 copies 2 only
        chain.push(torch.tensor([0, 1, 0]), torch.tensor([True, True, _ < 2]))
    assert chain.num.tolist() == [3, 1, 2]
    assert chain.keys == [[0, 0, 0], [1], [0, 0]]
    chain.forget([2])  # row 2's drafts were not used
    chain.observe(torch.tensor([3, 0, 2]))
    assert cal.reached.tolist() == [3.0, 1.0] and cal.hits.tolist() == [3.0, 0.0]


def test_chain_with_a_free_price_drafts_everything():
    chain = Chain(Calibration([0.01]), 2, FREE)
    for _ in range(4):
        assert chain.worth_drafting()
        chain.push(torch.tensor([0, 0]))
    assert chain.num.tolist() == [4, 4]


def test_chain_does_not_compute_a_draft_worth_less_than_its_price():
    cal = Calibration([0.5, 0.5], decay=1.0)
    chain = Chain(cal, 1, Price(verify=0.1, draft=0.2))
    assert chain.worth_drafting()  # alive 1: a next draft is worth 0.5 - 0.1 = 0.4 >= 0.2
    chain.push(torch.tensor([0]))
    assert chain.num.tolist() == [1]  # alive 0.5 >= 0.1: proposed
    assert not chain.worth_drafting()  # alive 0.5: 0.25 - 0.1 = 0.15 < 0.2, though it would be proposed


class Unsure(Drafter):
    """Proposes token 7 with a calibration that rates every draft 0.2: under a price it drafts nothing."""

    calibrated = True

    def __init__(self) -> None:
        self.calibration = Calibration([0.2])

    def begin(self, ctx: DraftContext) -> None:
        pass

    def propose(self, ctx: DraftContext, n: int, price: Price = FREE) -> Proposal:
        chain = self.new_chain(len(ctx.sequences), price)
        drafts = []
        while len(drafts) < n and chain.worth_drafting():
            chain.push(torch.zeros(len(ctx.sequences), dtype=torch.long))
            drafts.append(torch.full((len(ctx.sequences),), 7))
        tokens = torch.stack(drafts, 1) if drafts else torch.zeros(len(ctx.sequences), 0, dtype=torch.long)
        return Proposal(tokens, chain.num)


def test_lookup_first_cuts_copies_by_position_and_asks_the_inner_drafter_when_cut_to_nothing():
    drafter = LookupFirst(Unsure(), min_match=2)
    seqs = [[1, 2, 3, 4, 5, 6, 1, 2]]  # repeats "1 2": copy "3 4 5 6"
    ctx = DraftContext(seqs, torch.zeros(1, 1), None, None, SamplingParams(), None)
    assert drafter.propose(ctx, 4).tokens[0].tolist() == [3, 4, 5, 6]
    drafter.accept(torch.tensor([1]))  # position 0 accepted, position 1 rejected
    for _ in range(30):  # copies keep failing at their second token
        drafter.propose(ctx, 4, Price(verify=0.3))
        drafter.accept(torch.tensor([1]))
    p = drafter.propose(ctx, 4, Price(verify=0.3))
    assert p.num.tolist() == [1] and p.tokens[0, 0] == 3  # the copy is cut after its reliable first token
    drafter.accept(torch.tensor([1]))
    copied = []
    for _ in range(300):  # now the first copied token fails too
        p = drafter.propose(ctx, 4, Price(verify=0.3))
        copied.append(drafter.copied[0])
        assert drafter.copied[0] or p.num.tolist() == [0]  # cut copies: the inner drafter's 0.2 is not worth it
        drafter.accept(torch.tensor([0]))
    # once the first copied token's rate falls to the price, copies are only retried as the evidence decays
    assert all(copied[:40]) and sum(copied[-100:]) < 34


def test_lookup_first_rates_copies_by_the_length_of_their_match():
    """Copies after a 4-token match keep being accepted, copies after a 2-token match keep failing: with keys by
    match length the first still pass the price and the second are cut; keyed by position alone, one rate blends
    them and the sure copies are cut too."""
    seqs = {4: [[1, 2, 3, 4, 5, 6, 1, 2, 3, 4]], 2: [[1, 2, 3, 9, 5, 6, 8, 2, 3]]}  # tails "1 2 3 4" and "2 3"
    results = {}
    for by_match in (True, False):
        drafter = LookupFirst(Unsure(), min_match=2, by_match=by_match)
        for _ in range(40):  # alternate: the long match's copy accepted, the short one's rejected
            for m, accepted in ((4, 1), (2, 0)):
                drafter.propose(DraftContext(seqs[m], torch.zeros(1, 1), None, None, SamplingParams(), None), 1)
                drafter.accept(torch.tensor([accepted]))
        results[by_match] = [drafter.propose(DraftContext(seqs[m], torch.zeros(1, 1), None, None, SamplingParams(),
                                                          None), 1, Price(verify=0.6)).num.item() for m in (4, 2)]
        drafter.accept(torch.tensor([0]))
    assert results[True] == [1, 0]  # 4-token matches: rate near 1; 2-token matches: near 0
    assert results[False] == [0, 0]  # one blended rate near 0.5, under the price


def test_a_copy_after_one_matching_token_never_replaces_the_inner_drafters_chain():
    """Only in a tree does a copy follow a single matching token (there it competes by its own rate)."""
    assert lookup_match([1, 5, 1], 2, max_ngram=4, min_ngram=1) == ([5, 1], 1)
    drafter = LookupFirst(Unsure())  # chains: copies need 2 matching tokens by default
    ctx = DraftContext([[1, 5, 1]], torch.zeros(1, 1), None, None, SamplingParams(), None)
    assert drafter.propose(ctx, 2).tokens[0].tolist() == [7, 7] and not drafter.copied[0]


def test_adaptive_with_a_calibrated_drafter_allows_its_maximum_and_prices_from_measurements():
    s = Adaptive(3, max_n=10, calibrated=True)
    assert s.next() == 3 and s.price == FREE  # nothing measured yet
    for t, cost in ((1, 0.10), (3, 0.12), (5, 0.14)):  # verify grows 10 ms a token
        for _ in range(3):
            s.update(t - 1, torch.tensor([1]), 0.005 * (t - 1), cost)
    assert s.next() == 10
    assert s.verify_slope() == pytest.approx(0.01)
    rate = s.tokens / s.seconds
    assert s.price.verify == pytest.approx(0.01 * rate) and s.price.draft == pytest.approx(0.005 * rate)
    for _ in range(3):  # a noisy cheap sample at 4 tokens: the price's table stays non-decreasing around it
        s.update(3, torch.tensor([1]), 0.015, 0.09)
    s.next()
    curve = s.price.verify_curve
    assert all(a <= b for a, b in zip(curve, curve[1:], strict=False)) and curve[3] < 0.12 * rate
    plain = Adaptive(3, max_n=10)  # an uncalibrated drafter: one N for all rows, no price
    for _ in range(3):
        plain.update(3, torch.tensor([1]), 0.015, 0.12)
    plain.next()
    assert plain.price == FREE


def test_a_seeded_copy_competes_for_tree_nodes_and_merges_with_the_drafters_equal_candidates():
    drafter_cal, copy_cal = Calibration([0.5] * BINS), Calibration([0.9, 0.9, 0.9])
    tree = TreeRound(drafter_cal, 1, FREE, 4)
    tree.seed([[5, 6, 7]], copy_cal)  # alive 0.9, 0.81, 0.729; never stepped on their own
    assert tree.next_expansion(3) == [[]]
    keys = torch.full((1, 1, 2), BINS - 1)  # the root's step: 5 (= the copy's first) and 9
    tree.grow([[-1]], torch.tensor([[[5, 9]]]), torch.full((1, 1, 2), 0.99), torch.zeros(1, 1, 4))
    assert len(tree.token[0]) == 4 and tree.token[0] == [5, 6, 7, 9]  # 5 merged into the copy's node
    assert tree.marks[0][0] == [(copy_cal, 0), (drafter_cal, int(keys[0, 0, 0]))]
    assert tree.next_expansion(3) == [[0, 3]]  # the merged node has the step's state now; 6 and 7 do not
    tokens, parents, num = tree.selected()
    assert num.tolist() == [4] and tokens[0].tolist() == [5, 9, 6, 7] and parents[0].tolist() == [-1, -1, 0, 2]
    tree.observe(torch.tensor([2]), torch.tensor([[0, 2, 0, 0]]))  # 5, 6 accepted; 7 reached, rejected
    assert copy_cal.reached.tolist() == [1, 1, 1] and copy_cal.hits.tolist() == [1, 1, 0]
    assert drafter_cal.reached.sum() == 2 and drafter_cal.hits.sum() == 1  # 5 hit, 9 reached and missed


def test_a_tree_step_is_worth_its_likeliest_child_not_an_average_one():
    """A step's children differ by rank (its first candidate is accepted far more often than its third), so the
    decision to step a node weighs each rank's usual keys: an average child would undervalue the step."""
    cal = Calibration([(i + 0.5) / BINS for i in range(BINS)], decay=1.0)  # key k rated (k + 0.5) / BINS
    alive = torch.tensor([0.5])
    assert cal.step_gain(alive, 0.05).tolist() == cal.expected_gain(alive, 0.05).tolist()  # no tree step seen yet
    conf = torch.tensor([[[0.93, 0.03, 0.02], [0.0, 0.0, 0.0]], [[0.91, 0.04, 0.01], [0.92, 0.02, 0.01]]])
    pick = torch.arange(12).view(2, 2, 3)
    for _ in range(100):  # row 0 steps one node (its second branch is padding), row 1 two
        tree = TreeRound(cal, 2, Price(verify=0.05, draft=0.2), 6)
        tree.grow([[-1], [-1, -1]], pick, conf, torch.zeros(2, 2, 4))
    assert cal.produced.shape == (3, BINS) and cal.produced.sum(-1).tolist() == [300, 300, 300]
    assert cal.produced[0, 18].item() == 300 and cal.produced[1:, :1].sum().item() == 600
    # the first child, rated 0.925, is worth 0.5 * 0.925 - 0.05 = 0.41; the other two (0.025) nothing
    assert cal.step_gain(alive, 0.05).item() == pytest.approx(0.4125, abs=0.005)
    assert cal.expected_gain(alive, 0.05).item() < 0.3  # one average child of the same steps
    # the unlikely children fell below the verify price (never proposed); each row's likely ones are worth a step
    assert tree.token == [[0], [6, 9]] and tree.next_expansion(3) == [[0], [0, 1]]


def test_verify_costs_are_fitted_non_decreasing_and_price_a_steps_children_where_the_tree_stands():
    """A few noisy samples per width: a wider pass never costs less (pooled adjacent violators), and a step's
    children pay the pass's growth from the size worth verifying now, not one slope over every width."""
    assert monotone((1.5, 1.5, 1.6, 1.6, 1.78, 1.72, 1.64, 1.83)) == pytest.approx(
        (1.5, 1.5, 1.6, 1.6, 1.7133, 1.7133, 1.7133, 1.83), abs=1e-3)
    assert monotone(()) == () and monotone((3.0, 1.0)) == (2.0, 2.0)
    flat_then_steep = (1.0, 1.0, 1.01, 1.01, 1.02, 1.02, 1.03, 1.03, 1.6, 1.6, 1.61, 1.61, 1.62)  # an 8-token tile
    tree = TreeRound(Calibration.for_probabilities(), 1, Price(verify=0.05, draft=0.1, verify_curve=flat_then_steep),
                     12)
    tree.grow([[-1]], torch.tensor([[[4, 5, 6]]]), torch.tensor([[[0.9, 0.3, 0.1]]]), torch.zeros(1, 1, 4))
    m = tree.size(1)
    assert m == 3  # all three candidates: the pass barely grows
    assert tree._child_price(1, 3) == pytest.approx((flat_then_steep[6] - flat_then_steep[3]) / 3)  # inside the tile
    full = TreeRound(Calibration.for_probabilities(), 1, Price(verify=0.05, draft=0.1, verify_curve=flat_then_steep),
                     12)
    full.grow([[-1, -1, -1]], torch.arange(9).view(1, 3, 3), torch.full((1, 3, 3), 0.9), torch.zeros(1, 3, 4))
    assert full.size(1) == 7  # 9 likely candidates, but the 8th and 9th would start a second tile
    assert full._child_price(1, 3) == pytest.approx((flat_then_steep[10] - flat_then_steep[7]) / 3)  # past it: dear
    assert TreeRound(Calibration.for_probabilities(), 1, Price(verify=0.05), 4)._child_price(0, 3) == 0.05  # no curve


def test_calibration_tables_follow_observations():
    """The per-key tables a round reads (kept between observations) are rebuilt after each observation."""
    cal = Calibration.for_probabilities()
    before, gain = cal.rate_list()[10], cal.expected_gain(torch.tensor([0.9]), 0.1).item()
    cal.observe_nodes([[(10, False)] * 50])
    assert cal.rate_list()[10] < before and cal.rates()[10].item() == cal.rate(torch.tensor([10])).item()
    assert cal.expected_gain(torch.tensor([0.9]), 0.1).item() != gain
    cal.note_produced(torch.tensor([[19, 1, 0]]))
    first = cal.step_gain(torch.tensor([0.9]), 0.1).item()
    cal.note_produced(torch.tensor([[0, 0, 0]] * 40))
    assert cal.step_gain(torch.tensor([0.9]), 0.1).item() < first
