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
  a neighbouring, less measured N is tried so that the estimates stay current. Costs are low medians of
  recent samples (robust to one-off kernel setup and to noise), and an engine keeps its adaptive schedule
  across requests, so what it has measured about the hardware is not relearnt for every prompt.
  With a drafter that reports its confidence in each draft, adaptive also gates drafts one by one (as
  EAGLE-2 grows its tree by confidence): it calibrates the confidence against outcomes (acceptance by
  confidence bucket) and keeps a draft only while its chance of being reached and accepted, per second of
  verify time it adds, beats the round's tokens per second without it; the round's length is then the
  gate's (up to GATED_MAX), and exploring steps draft ungated so the calibration keeps learning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable

import torch

from specmtp.errors import SpecMTPError

CONFIDENCE_BUCKETS = 10
CALIBRATION_PRIOR = 3.0  # weight of the prior "accepted as often as the drafter is confident", per bucket
CALIBRATION_DECAY = 0.995  # per step: a memory of a few hundred steps
GATED_MAX = 8  # most drafts a gated round may make (the gate usually stops it long before)


class Schedule(ABC):
    name: str

    @abstractmethod
    def next(self) -> int:
        """Number of tokens to draft this step."""

    def update(self, n: int, num_accepted: torch.Tensor, draft_s: float, verify_s: float,  # noqa: B027
               confidence: torch.Tensor | None = None, num_drafts: torch.Tensor | None = None,
               draft_steps: int | None = None) -> None:
        """Report a finished step: drafts per row, accepted per row [B], its measured times, the drafter's
        confidence in each draft [B, n] with the valid drafts per row [B] where the drafter gives one, and the
        draft forward passes it took (default n)."""

    def gate(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """For this step, a judge of which drafts are worth verifying (see DraftContext.worth); None: all are."""
        return None


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

    def update(self, n: int, num_accepted: torch.Tensor, draft_s: float, verify_s: float,
               confidence: torch.Tensor | None = None, num_drafts: torch.Tensor | None = None,
               draft_steps: int | None = None) -> None:
        if n == 0:
            return
        self.n = self.n + 2 if bool((num_accepted >= n).all()) else max(1, self.n - 1)


class Adaptive(Schedule):
    name = "adaptive"

    def __init__(self, n: int, max_n: int = 12, decay: float = 0.97, explore_every: int = 8,
                 window: int = 5) -> None:
        self.n, self.max_n, self.decay, self.explore_every = n, max(1, max_n), decay, explore_every
        self.reached = [1.0] * (self.max_n + 1)  # decayed count of rows that drafted position i (prior 1)
        self.accepted = [0.7] * (self.max_n + 1)  # decayed count of those that accepted it (prior 0.7)
        # Recent wall times, kept raw: the first call at a new shape pays one-off kernel setup and a busy CPU
        # adds noise upwards, so estimates are low medians of the last `window` samples, not running means.
        self.draft_samples: deque[float] = deque(maxlen=2 * window + 1)  # seconds per draft step
        self.verify_samples: dict[int, deque[float]] = {}  # tokens verified -> seconds
        self.window = window
        self.steps = 0
        # Calibration of the drafter's confidence: slowly decayed counts of drafts reached / accepted by confidence
        # bucket (a property of the drafter more than of the text), on top of a fixed prior of taking the confidence
        # at its word. Gating needs a drafter that reports confidences (`confident`).
        self.cal_reached = [0.0] * CONFIDENCE_BUCKETS
        self.cal_accepted = [0.0] * CONFIDENCE_BUCKETS
        self.confident = False

    @staticmethod
    def _low_median(samples: deque[float]) -> float:
        ordered = sorted(samples)
        return ordered[(len(ordered) - 1) // 2]

    @property
    def draft_cost(self) -> float | None:
        return self._low_median(self.draft_samples) if self.draft_samples else None

    @property
    def verify_cost(self) -> dict[int, float]:
        return {t: self._low_median(v) for t, v in self.verify_samples.items()}

    @staticmethod
    def _interpolate(known: dict[int, float], t: int) -> float:
        if t in known:
            return known[t]
        below = [k for k in known if k < t]
        above = [k for k in known if k > t]
        if below and above:
            lo, hi = max(below), min(above)
            return known[lo] + (known[hi] - known[lo]) * (t - lo) / (hi - lo)
        return known[max(below)] if below else known[min(above)]  # flat beyond what was measured

    def expected_rate(self, n: int, verify: dict[int, float] | None = None) -> float:
        """Expected emitted tokens per second when drafting n tokens."""
        tokens, alive = 1.0, 1.0
        for i in range(1, n + 1):
            alive *= self.accepted[i] / self.reached[i]
            tokens += alive
        verify = verify if verify is not None else self.verify_cost
        return tokens / (n * (self.draft_cost or 0.0) + self._interpolate(verify, n + 1))

    def best(self) -> int:
        verify = self.verify_cost
        return max(range(self.max_n + 1), key=lambda n: self.expected_rate(n, verify))

    def calibrated(self, confidence: torch.Tensor) -> torch.Tensor:
        """P(a draft is accepted | it is reached, the drafter's confidence in it), elementwise."""
        prior = (torch.arange(CONFIDENCE_BUCKETS) + 0.5) / CONFIDENCE_BUCKETS
        table = (torch.tensor(self.cal_accepted) + CALIBRATION_PRIOR * prior) / (
            torch.tensor(self.cal_reached) + CALIBRATION_PRIOR)
        return table[(confidence * CONFIDENCE_BUCKETS).long().clamp(0, CONFIDENCE_BUCKETS - 1)]

    def gate(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if not self.confident or self.draft_cost is None or self.steps % self.explore_every == 0:
            return None  # no confidences, nothing measured yet, or an exploring step: draft what next() said
        return self.worth

    def worth(self, confidence: torch.Tensor) -> torch.Tensor:
        """confidence [B, k] -> [B]: whether verifying the k-th draft raises the row's expected tokens per second,
        i.e. its chance of being reached and accepted per second it adds beats the tokens per second of the round
        without it (drafts the drafter gives no confidence for, NaN, are kept)."""
        k = confidence.shape[1]
        chain = self.calibrated(confidence.nan_to_num(1.0)).cumprod(-1)  # [B, k]
        verify, draft = self.verify_cost, self.draft_cost or 0.0
        before_t = (k - 1) * draft + self._interpolate(verify, k)
        added_t = draft + self._interpolate(verify, k + 1) - self._interpolate(verify, k)
        before_tokens = 1 + chain[:, :-1].sum(-1)
        return (chain[:, -1] * before_t >= added_t * before_tokens) | confidence[:, -1].isnan()

    def next(self) -> int:
        if self.draft_cost is None or not self.verify_samples:
            return self.n
        best = self.best()
        self.steps += 1
        if self.steps % self.explore_every == 0:  # probe the less-measured neighbour
            nbrs = [m for m in (best - 1, best + 1) if 0 <= m <= self.max_n]
            best = min(nbrs, key=lambda m: len(self.verify_samples.get(m + 1, ())))
        elif self.confident and best > 0:  # drafting pays: the gate decides, draft by draft, how far to go
            best = min(self.max_n, GATED_MAX)
        self.n = best
        return best

    def update(self, n: int, num_accepted: torch.Tensor, draft_s: float, verify_s: float,
               confidence: torch.Tensor | None = None, num_drafts: torch.Tensor | None = None,
               draft_steps: int | None = None) -> None:
        self.verify_samples.setdefault(n + 1, deque(maxlen=self.window)).append(verify_s)
        if draft_steps:
            self.draft_samples.append(draft_s / draft_steps)
        if n == 0:
            return
        if confidence is not None and num_drafts is not None:
            self._calibrate(num_accepted, confidence, num_drafts)
        if not draft_steps:
            self.draft_samples.append(draft_s / n)
        for i in range(1, self.max_n + 1):
            self.reached[i] *= self.decay
            self.accepted[i] *= self.decay
        for a in num_accepted.tolist():
            for i in range(1, min(n, a + 1) + 1):  # positions 1..a accepted, a+1 reached and rejected
                self.reached[i] += 1
                self.accepted[i] += i <= a


    def _calibrate(self, num_accepted: torch.Tensor, confidence: torch.Tensor, num_drafts: torch.Tensor) -> None:
        self.confident = True
        for i in range(CONFIDENCE_BUCKETS):
            self.cal_reached[i] *= CALIBRATION_DECAY
            self.cal_accepted[i] *= CALIBRATION_DECAY
        for a, nd, conf in zip(num_accepted.tolist(), num_drafts.tolist(), confidence.tolist(), strict=True):
            for i in range(min(nd, a + 1)):  # drafts 1..a accepted, a+1 reached and rejected
                if conf[i] == conf[i]:  # not NaN
                    bucket = min(int(conf[i] * CONFIDENCE_BUCKETS), CONFIDENCE_BUCKETS - 1)
                    self.cal_reached[bucket] += 1
                    self.cal_accepted[bucket] += i < a


SCHEDULES = ("constant", "heuristic", "adaptive")


def make_schedule(name: str, n: int) -> Schedule:
    if n < 0:
        raise SpecMTPError(f"num_draft_tokens must be >= 0, got {n}")
    if name == "constant":
        return Constant(n)
    if name == "heuristic":
        return Heuristic(n)
    if name == "adaptive":
        return Adaptive(n, max_n=max(12, 2 * n))
    raise SpecMTPError(f"unknown schedule {name!r} (choose from {', '.join(SCHEDULES)})")
