"""Draft-length schedules: how many tokens to draft before the next verify pass.

- constant: always N.
- heuristic: transformers' rule: +2 after a step where every draft was accepted, -1 otherwise (min 1).
- adaptive: ours. Each step pick the N in [0, max] that maximizes expected emitted tokens per second,
      E[tokens](N) = 1 + sum_{k<=N} prod_{i<=k} alpha_i
      cost(N)      = N * draft_step_seconds + verify_seconds(N + 1)
  from the measured conditional acceptance alpha_i at each draft position (decayed counts, so it tracks
  the text) and the measured wall time of a draft step and of verifying T tokens (a table by T: on a
  CPU a 2-token forward can cost more than an 8-token one, so nothing is assumed about its shape).
  N = 0 (plain decoding) is a choice too, so a drafter that keeps failing is backed off; every few steps
  a neighbouring, less measured N is tried so that the estimates stay current.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from specmtp.errors import SpecMTPError


class Schedule(ABC):
    name: str

    @abstractmethod
    def next(self) -> int:
        """Number of tokens to draft this step."""

    def update(self, n: int, num_accepted: torch.Tensor, draft_s: float, verify_s: float) -> None:  # noqa: B027
        """Report a finished step: drafts per row, accepted per row [B], and its measured times."""


class Constant(Schedule):
    name = "constant"

    def __init__(self, n: int) -> None:
        self.n = n

    def next(self) -> int:
        return self.n


class Heuristic(Schedule):
    name = "heuristic"

    def __init__(self, n: int) -> None:
        self.n = max(1, n)

    def next(self) -> int:
        return self.n

    def update(self, n: int, num_accepted: torch.Tensor, draft_s: float, verify_s: float) -> None:
        if n == 0:
            return
        self.n = self.n + 2 if bool((num_accepted >= n).all()) else max(1, self.n - 1)


class Adaptive(Schedule):
    name = "adaptive"

    def __init__(self, n: int, max_n: int = 12, decay: float = 0.97, explore_every: int = 8) -> None:
        self.n, self.max_n, self.decay, self.explore_every = n, max(1, max_n), decay, explore_every
        self.reached = [1.0] * (self.max_n + 1)  # decayed count of rows that drafted position i (prior 1)
        self.accepted = [0.7] * (self.max_n + 1)  # decayed count of those that accepted it (prior 0.7)
        self.draft_cost: float | None = None  # seconds per draft step
        self.verify_cost: dict[int, float] = {}  # tokens verified -> seconds (EMA)
        self.steps = 0

    def _verify(self, t: int) -> float:
        known = self.verify_cost
        if t in known:
            return known[t]
        below = [k for k in known if k < t]
        above = [k for k in known if k > t]
        if below and above:
            lo, hi = max(below), min(above)
            return known[lo] + (known[hi] - known[lo]) * (t - lo) / (hi - lo)
        return known[max(below)] if below else known[min(above)]  # flat beyond what was measured

    def expected_rate(self, n: int) -> float:
        """Expected emitted tokens per second when drafting n tokens."""
        tokens, alive = 1.0, 1.0
        for i in range(1, n + 1):
            alive *= self.accepted[i] / self.reached[i]
            tokens += alive
        return tokens / (n * (self.draft_cost or 0.0) + self._verify(n + 1))

    def next(self) -> int:
        if self.draft_cost is None or not self.verify_cost:
            return self.n
        best = max(range(self.max_n + 1), key=self.expected_rate)
        self.steps += 1
        if self.steps % self.explore_every == 0:  # probe the least-measured neighbour
            nbrs = [m for m in (best - 1, best + 1) if 0 <= m <= self.max_n]
            best = min(nbrs, key=lambda m: (m + 1) in self.verify_cost)
        self.n = best
        return best

    def update(self, n: int, num_accepted: torch.Tensor, draft_s: float, verify_s: float) -> None:
        t = n + 1
        old = self.verify_cost.get(t)
        self.verify_cost[t] = verify_s if old is None else 0.7 * old + 0.3 * verify_s
        if n == 0:
            return
        per_step = draft_s / n
        self.draft_cost = per_step if self.draft_cost is None else 0.8 * self.draft_cost + 0.2 * per_step
        for i in range(1, self.max_n + 1):
            self.reached[i] *= self.decay
            self.accepted[i] *= self.decay
        for a in num_accepted.tolist():
            for i in range(1, min(n, a + 1) + 1):  # positions 1..a accepted, a+1 reached and rejected
                self.reached[i] += 1
                self.accepted[i] += i <= a


SCHEDULES = ("constant", "heuristic", "adaptive")


def make_schedule(name: str, n: int) -> Schedule:
    if n < 0:
        raise SpecMTPError(f"num_draft_tokens must be >= 0, got {n}")
    if name == "constant":
        return Constant(n)
    if name == "heuristic":
        return Heuristic(n)
    if name == "adaptive":
        return Adaptive(n, max_n=max(8, 2 * n))
    raise SpecMTPError(f"unknown schedule {name!r} (choose from {', '.join(SCHEDULES)})")
