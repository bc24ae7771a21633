"""Confidence-aware draft lengths: each row drafts while its drafts so far are likely enough to all be accepted.

A fixed draft length N per step spends the same verify width on a run of boilerplate the drafter is sure of
and on a token it is guessing. Instead, a drafter scores each draft (a model drafter: the probability it gave
the token it drafted; a copy from the context: its position in the copy), and `Calibration` turns a score
into the probability that the target accepts that draft, learnt online from verification outcomes (decayed
counts per score bin, starting from a prior). A row's chain survives with probability alive = prod of its
drafts' calibrated rates. Two prices, in accepted tokens, come from the adaptive schedule's measurements of
the hardware (see schedule.py): verifying one more token, and computing one more draft. `Chain` proposes a
draft only while alive stays at or above the verify price (it adds alive tokens to the expectation and
costs the price), and computes the next draft only if its expected worth, over the drafter's usual scores,
exceeds the draft price; with both prices 0 every row drafts n tokens.

Lossless with sampling: the stop depends only on the drafter's own scores and on past outcomes, never on
the target's distribution at the drafted positions, so verification sees an ordinary proposal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BINS = 20  # probability bins of a model drafter's score


@dataclass(frozen=True)
class Price:
    """What one more token costs, in expected accepted tokens (cost in seconds x tokens per second)."""

    verify: float = 0.0  # the verify pass's growth by one token
    draft: float = 0.0  # one draft step

    @property
    def free(self) -> bool:
        return self.verify <= 0 and self.draft <= 0


FREE = Price()


def prob_keys(conf: torch.Tensor) -> torch.Tensor:
    """conf: [B] probabilities in [0, 1] -> calibration keys [B] (their bin)."""
    return (conf.float() * BINS).long().clamp(0, BINS - 1)


class Calibration:
    """P(target accepts a draft | its key), as decayed counts of verified drafts per key over a prior."""

    def __init__(self, prior: list[float], strength: float = 2.0, decay: float = 0.998) -> None:
        self.prior = torch.tensor(prior, dtype=torch.float64)  # [K] rate assumed before any evidence
        self.strength, self.decay = strength, decay
        self.reached = torch.zeros(len(prior), dtype=torch.float64)  # [K] decayed drafts verified
        self.hits = torch.zeros(len(prior), dtype=torch.float64)  # [K] decayed drafts accepted

    @classmethod
    def for_probabilities(cls) -> Calibration:
        return cls([(i + 0.5) / BINS for i in range(BINS)])  # a calibrated drafter's score is its rate

    def rate(self, keys: torch.Tensor) -> torch.Tensor:
        """keys: [B] -> acceptance probabilities [B]."""
        k = keys.clamp(0, len(self.prior) - 1)
        return ((self.hits[k] + self.strength * self.prior[k]) / (self.reached[k] + self.strength)).float()

    def expected_gain(self, alive: torch.Tensor, verify_price: float) -> torch.Tensor:
        """alive: [B] -> [B] expected net worth of computing a row's next draft: over the keys drafts usually
        get (the verified drafts' key frequencies; the prior's keys alike before any), what proposing it
        adds (alive x rate) beyond the verify price, when it is proposed at all."""
        weight = self.reached + 1.0 / len(self.prior)  # [K]
        rate = self.rate(torch.arange(len(self.prior)))  # [K]
        worth = (alive[:, None] * rate[None, :] - verify_price).clamp(min=0)  # [B, K]
        return (worth * (weight / weight.sum()).float()).sum(-1)

    def observe(self, keys: list[list[int]], accepted: list[int]) -> None:
        """Per row: the keys of the drafts it proposed, and how many the target accepted (-1: not verified)."""
        self.reached *= self.decay
        self.hits *= self.decay
        for row, a in zip(keys, accepted, strict=True):
            if a < 0:
                continue
            for i, k in enumerate(row[: a + 1]):  # drafts 1..a accepted; draft a+1 (if any) reached and rejected
                k = min(k, len(self.prior) - 1)
                self.reached[k] += 1
                self.hits[k] += i < a


class Chain:
    """One round of drafting for a batch: which rows are still drafting and how many drafts each proposes."""

    def __init__(self, calibration: Calibration, batch_size: int, price: Price) -> None:
        self.calibration, self.price = calibration, price
        self.alive = torch.ones(batch_size)  # [B] estimated P(every draft so far is accepted)
        self.live = torch.ones(batch_size, dtype=torch.bool)  # [B] still drafting
        self.num = torch.zeros(batch_size, dtype=torch.long)  # [B] drafts proposed
        self.keys: list[list[int]] = [[] for _ in range(batch_size)]

    def worth_drafting(self) -> bool:
        """Is computing the next draft worth its price for some live row? (False once no row is live: with a
        free price no row ever stops.)"""
        if self.price.free:
            return True
        gain = self.calibration.expected_gain(self.alive[self.live], self.price.verify)
        return bool((gain >= self.price.draft).any()) if len(gain) else False

    def push(self, keys: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """keys: [B] calibration keys of this round's next draft per row; rows whose chain falls below the
        verify price stop here (this draft not proposed), as do rows without a next draft (valid [B] False)."""
        self.alive = self.alive * self.calibration.rate(keys)
        self.live &= self.alive >= self.price.verify
        if valid is not None:
            self.live &= valid
        self.num += self.live.long()
        for b in torch.nonzero(self.live).flatten().tolist():
            self.keys[b].append(int(keys[b]))

    def forget(self, rows: list[int]) -> None:
        """Rows whose proposals were not used this round: nothing to learn from them."""
        for b in rows:
            self.keys[b] = []

    def observe(self, num_accepted: torch.Tensor) -> None:
        self.calibration.observe(self.keys, [a if keys else -1 for a, keys in zip(num_accepted.tolist(), self.keys,
                                                                                   strict=True)])
