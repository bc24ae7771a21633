"""Draft-length schedules and the n-gram lookup, on synthetic measurements."""

from __future__ import annotations

import random

import torch

from specmtp.drafters.ngram import lookup, lookup_match
from specmtp.schedule import Adaptive, Heuristic


def test_heuristic_rule():
    s = Heuristic(3)
    s.update(3, torch.tensor([3]), 0.0, 0.0)
    assert s.next() == 5  # all accepted: +2
    s.update(5, torch.tensor([2]), 0.0, 0.0)
    assert s.next() == 4  # a rejection: -1
    for _ in range(10):
        s.update(s.next(), torch.tensor([0]), 0.0, 0.0)
    assert s.next() == 1  # never below 1


def feed(s: Adaptive, accept_prob: float, draft_cost: float, verify_cost, steps: int = 200) -> int:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        n = s.next()
        a = 0
        while a < n and torch.rand((), generator=g).item() < accept_prob:
            a += 1
        s.update(n, torch.tensor([a]), n * draft_cost, verify_cost(n + 1))
    return s.best()


def test_adaptive_drafts_long_when_drafts_are_cheap_and_good():
    assert feed(Adaptive(2, max_n=12), 0.9, 0.01, lambda t: 1.0 + 0.01 * t) >= 6


def test_adaptive_backs_off_to_plain_decoding_when_drafts_fail():
    assert feed(Adaptive(4, max_n=12), 0.0, 0.05, lambda t: 1.0 + 0.05 * t) == 0


def test_adaptive_uses_measured_verify_cost_shape():
    # verifying 2..4 tokens is expensive, 5+ cheap again (as small GEMMs can be on a CPU)
    cost = {1: 1.0, 2: 2.0, 3: 2.0, 4: 2.0}
    best = feed(Adaptive(4, max_n=8), 0.6, 0.0, lambda t: cost.get(t, 1.1), steps=400)
    assert best >= 4


def test_adaptive_forgets_widths_a_slow_minute_priced_out():
    # One slow sample at every width past 3 tokens (another tenant's busy minute) while passes of 2-3 tokens cost
    # 1.0: a tree drafter (calibrated) then stops its trees where the priced curve rises, so those widths would
    # never be verified again; past `stale_after` passes the exploring passes leave them out of the prices.
    s = Adaptive(2, max_n=12, calibrated=True, stale_after=50)
    for t in range(4, 14):
        s.update(t - 1, torch.tensor([0]), 0.001, 10.0)
    curves = []
    for i in range(96):  # the small trees the slow samples allow
        s.update(1 + i % 2, torch.tensor([1]), 0.001, 1.0)
        s.next()
        curves.append((s.passes, s.price.verify_curve))
    # passes between the repricing ones keep every sample: the slow minute's widths stay dear there
    assert all(c[5] > 5 * c[1] for p, c in curves if p % s.reprice_every)
    # once the slow samples are `stale_after` passes old, the repricing passes leave them out: flat past the widest
    # fresh width, so the trees may grow
    late = [c for p, c in curves if p % s.reprice_every == 0 and p > 10 + s.stale_after]
    assert late and all(c[5] == c[1] == c[11] for c in late)
    s.update(7, torch.tensor([2]), 0.001, 1.1)  # the 8-token pass an exploring tree verifies
    assert s.verify_cost[8] == 1.1  # replaces the slow minute's sample


def test_ngram_lookup_prefers_longest_latest_match():
    seq = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert lookup(seq, 2) == [7, 8]  # "2 3" last seen before the tail at index 5 -> continues 7 8
    assert lookup([1, 2, 3], 2) == []
    assert lookup([5, 6, 5], 3) == [6, 5]


def test_ngram_lookup_matches_a_plain_scan():
    """The byte search finds what a scan of the list from the end finds: whole tokens only (ids whose bytes
    straddle their neighbours' included), the longest n-gram first, within the window."""

    def scan(seq, n, max_ngram, min_ngram, window):
        lo = max(0, len(seq) - window)
        for k in range(min(max_ngram, len(seq) - 1), min_ngram - 1, -1):
            for start in range(len(seq) - k - 1, lo - 1, -1):
                if seq[start : start + k] == seq[len(seq) - k :]:
                    return seq[start + k : start + k + n], k
        return [], 0

    rng = random.Random(0)
    for _ in range(3000):
        ids = rng.choice([[0, 1, 256, 257, 65536, 65792, 16777216], list(range(3)), list(range(70000))])
        seq = [rng.choice(ids) for _ in range(rng.randint(0, 40))]
        grams, window = rng.choice([(3, 1), (4, 2), (1, 1)]), rng.choice([4096, 6])
        assert lookup_match(seq, 4, *grams, window) == scan(seq, 4, *grams, window), (seq, grams, window)


def test_adaptive_ignores_one_off_slow_samples():
    # The first verify at each T pays a 10x setup cost (as a new GEMM shape can) and the first draft step a
    # 2000x one (a drafter catching up on a prompt): neither may keep the schedule stuck at plain decoding (a
    # running mean of the costs did: it settled on N = 0).
    seen: set[int] = set()

    def cost(t: int) -> float:
        first = t not in seen
        seen.add(t)
        return (10.0 if first else 1.0) + 0.02 * t

    s, g = Adaptive(4, max_n=8), torch.Generator().manual_seed(0)
    for step in range(40):
        n = s.next()
        a = 0
        while a < n and torch.rand((), generator=g).item() < 0.9:
            a += 1
        s.update(n, torch.tensor([a]), n * 0.05 + (100.0 if step == 0 else 0.0), cost(n + 1))
    assert s.best() >= 2


def test_greedy_picks_walk_where_the_head_reads_from_memory():
    """A walk (1 + accepted calls of one token) is taken where it costs less than one call over every token, as
    measured, with the other way tried now and then; one token is never walked."""
    from specmtp.schedule import GreedyPicks

    for per_call, whole, walk_wins in ((2.0, 5.0, True), (1.1, 1.7, False)):  # ms; ~2 calls a walk
        picks = GreedyPicks(explore_every=16)
        assert picks.walk(4)  # nothing measured: a walk first, then one call
        picks.update(True, 4, 2 * per_call, 2, 2)
        assert not picks.walk(4)
        picks.update(False, 4, whole, 1, 2)
        choices = []
        for _ in range(64):
            w = picks.walk(4)
            choices.append(w)
            picks.update(w, 4, 2 * per_call if w else whole, 2 if w else 1, 2)
        assert sum(c == walk_wins for c in choices) == 60  # the cheaper way, the other every 16th pass
        assert not picks.walk(1)
