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
  across requests, so what it has measured about the hardware is not relearnt for every prompt. A tree
  drafter's widths are not probed as a chain's N is, so a slow minute's samples could price a width out for
  good (one slow sample at every width past 3 tokens held SmolLM2's trees at 2 nodes for a whole run): every
  `reprice_every` passes the prices leave out the widths not verified for `stale_after` passes (their
  cost read off the fresh widths around them, flat past the widest), so the trees may grow into them, and a
  stale width's first new sample replaces its old ones. The defaults (every 8th pass, 32 passes) are short: with
  every 32nd pass and 128, SmolLM2's trees fell from 6-7 nodes to 3 over a dozen prompts in one process, the 5-8
  token widths priced 1.12-1.56x a 4-token pass from old samples while the layer stack took 1.06-1.13x.
  With a calibrated drafter (one that scores its drafts, drafters/confidence.py) N is chosen per row
  instead: the schedule allows up to max drafts and sets the prices, and each row drafts while the
  probability that all its drafts are accepted is worth them. One more proposed draft adds its survival
  probability to the expected tokens and grows the verify pass (the slope of the measured verify table),
  so it is proposed while
      P(all drafts so far and this one accepted) >= verify_slope * tokens_per_second,
  the rate measured over recent steps; computing it costs a draft step, draft_step * tokens_per_second
  in the same unit. Easy stretches get long drafts, guesses get short ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque

import torch

from specmtp.drafters.confidence import FREE, Price, monotone
from specmtp.errors import SpecMTPError


def low_median(samples: deque[float]) -> float:
    """The lower median of recent timings: robust to one-off setup costs and to a busy CPU's upward noise."""
    ordered = sorted(samples)
    return ordered[(len(ordered) - 1) // 2]


class Schedule(ABC):
    name: str
    price: Price = FREE  # a calibrated drafter's per-row stop (confidence.py); free: never stops early

    @abstractmethod
    def next(self) -> int:
        """Number of tokens to draft this step."""

    def update(self, n: int, num_accepted: torch.Tensor, draft_s: float, verify_s: float,  # noqa: B027
               steps: int | None = None) -> None:
        """Report a finished step: drafts per row (a tree's nodes), accepted per row [B], its measured times, and
        the drafter passes it took (None: one per draft)."""


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
               steps: int | None = None) -> None:
        if n == 0:
            return
        self.n = self.n + 2 if bool((num_accepted >= n).all()) else max(1, self.n - 1)


class Adaptive(Schedule):
    name = "adaptive"

    def __init__(self, n: int, max_n: int = 12, decay: float = 0.97, explore_every: int = 8,
                 window: int = 5, calibrated: bool = False, stale_after: int = 32, reprice_every: int = 8) -> None:
        self.n, self.max_n, self.decay, self.explore_every = n, max(1, max_n), decay, explore_every
        self.calibrated = calibrated  # the drafter honours a price: rows stop by it, not at one N
        self.tokens, self.seconds = 0.0, 0.0  # decayed tokens emitted per row, and seconds, over recent steps
        self.reached = [1.0] * (self.max_n + 1)  # decayed count of rows that drafted position i (prior 1)
        self.accepted = [0.7] * (self.max_n + 1)  # decayed count of those that accepted it (prior 0.7)
        # Recent wall times, kept raw: the first call at a new shape pays one-off kernel setup and a busy CPU
        # adds noise upwards, so estimates are low medians of the last `window` samples, not running means.
        self.draft_samples: deque[float] = deque(maxlen=2 * window + 1)  # seconds per draft step
        self.verify_samples: dict[int, deque[float]] = {}  # tokens verified -> seconds
        self.window = window
        self.steps = 0
        self.passes = 0  # verify passes reported
        self.stale_after, self.reprice_every = stale_after, reprice_every
        self.sampled_at: dict[int, int] = {}  # tokens verified -> the pass that last verified that many

    @property
    def draft_cost(self) -> float | None:
        return low_median(self.draft_samples) if self.draft_samples else None

    @property
    def verify_cost(self) -> dict[int, float]:
        return {t: low_median(v) for t, v in self.verify_samples.items()}

    def fresh_verify_cost(self) -> dict[int, float]:
        """verify_cost for the widths verified within the last `stale_after` passes."""
        fresh = self.passes - self.stale_after
        return {t: low_median(v) for t, v in self.verify_samples.items() if self.sampled_at.get(t, 0) > fresh}

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

    def verify_slope(self, table: dict[int, float] | None = None) -> float:
        """Seconds a verify pass grows by per extra token: least squares over the measured table (0 until two
        widths are measured)."""
        table = self.verify_cost if table is None else table
        if len(table) < 2:
            return 0.0
        ts, vs = list(table), list(table.values())
        mt, mv = sum(ts) / len(ts), sum(vs) / len(vs)
        var = sum((t - mt) ** 2 for t in ts)
        return max(0.0, sum((t - mt) * (v - mv) for t, v in zip(ts, vs, strict=True)) / var)

    def measured_price(self, explore: bool = False) -> Price:
        """One more verified token and one more draft step, in expected accepted tokens (see the module doc);
        exploring, from the fresh widths alone."""
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        table = self.fresh_verify_cost() if explore else self.verify_cost
        # fitted non-decreasing: a few noisy samples per width, and a wider pass never costs less
        widths = range(1, self.max_n + 2)
        curve = monotone(tuple(self._interpolate(table, t) * rate for t in widths)) if len(table) > 1 else ()
        return Price(verify=self.verify_slope(table) * rate, draft=(self.draft_cost or 0.0) * rate, verify_curve=curve)

    def best(self) -> int:
        verify = self.verify_cost
        return max(range(self.max_n + 1), key=lambda n: self.expected_rate(n, verify))

    def next(self) -> int:
        if self.draft_cost is None or not self.verify_samples:
            return self.n
        if self.calibrated:
            self.price = self.measured_price(explore=self.passes % self.reprice_every == 0)
            return self.max_n
        best = self.best()
        self.steps += 1
        if self.steps % self.explore_every == 0:  # probe the less-measured neighbour
            nbrs = [m for m in (best - 1, best + 1) if 0 <= m <= self.max_n]
            best = min(nbrs, key=lambda m: len(self.verify_samples.get(m + 1, ())))
        self.n = best
        return best

    def update(self, n: int, num_accepted: torch.Tensor, draft_s: float, verify_s: float,
               steps: int | None = None) -> None:
        self.passes += 1
        samples = self.verify_samples.setdefault(n + 1, deque(maxlen=self.window))
        if self.sampled_at.get(n + 1, self.passes) <= self.passes - self.stale_after:
            samples.clear()  # another minute's: this sample starts the width afresh
        samples.append(verify_s)
        self.sampled_at[n + 1] = self.passes
        if len(num_accepted):
            accepted = num_accepted.tolist()
            self.tokens = self.decay * self.tokens + sum(accepted) / len(accepted) + 1
            self.seconds = self.decay * self.seconds + draft_s + verify_s
        if n == 0:
            return
        self.draft_samples.append(draft_s / (steps or n))
        for i in range(1, self.max_n + 1):
            self.reached[i] *= self.decay
            self.accepted[i] *= self.decay
        for a in num_accepted.tolist():
            for i in range(1, min(n, a + 1) + 1):  # positions 1..a accepted, a+1 reached and rejected
                self.reached[i] += 1
                self.accepted[i] += i <= a


class GreedyPicks:
    """How a greedy verify pass of one row takes the target's picks: one head call over all its tokens, or a walk
    (verify.greedy_walk: the root, then each accepted node, one call a depth). Which costs less depends on how the
    head is read: where it streams from memory (larger than the cache: SmolLM2's screened head is 30 MB, and a
    2-core AMD EPYC has 8 MB of L3) one call of four tokens costs 2.3-2.7 calls of one, and a walk takes 1 +
    accepted calls; where it stays in cache (an Intel Xeon with hundreds of MB of L3) 5 tokens cost 1.6 calls of
    one, and a walk costs more. Both are measured as they run: the walk's seconds per call, one call's seconds by
    its tokens (low medians of recent samples) and the calls a walk takes (1 + accepted, known after any pass);
    each pass takes the one expected to cost less, every `explore_every`-th the other, so both stay current."""

    def __init__(self, window: int = 7, explore_every: int = 16, decay: float = 0.9) -> None:
        self.window, self.explore_every, self.decay = window, explore_every, decay
        self.per_call: deque[float] = deque(maxlen=window)  # seconds per call of a walk
        self.whole: dict[int, deque[float]] = {}  # tokens -> seconds of one call over all of them
        self.levels = 2.0  # decayed mean of the calls a walk takes (1 + accepted)
        self.passes = 0

    def walk(self, tokens: int) -> bool:
        """Whether to walk a pass of `tokens` tokens (one token: a single call either way)."""
        if tokens <= 1:
            return False
        self.passes += 1
        whole = self.whole.get(tokens)
        if not self.per_call:
            return True
        if not whole:
            return False
        cheaper = low_median(self.per_call) * self.levels < low_median(whole)
        return cheaper != (self.passes % self.explore_every == 0)

    def update(self, walked: bool, tokens: int, seconds: float, calls: int, levels: int) -> None:
        """A pass's head time: walked or not, its tokens, the calls made, and the calls a walk takes for it."""
        if tokens > 1:
            if walked:
                self.per_call.append(seconds / calls)
            else:
                self.whole.setdefault(tokens, deque(maxlen=self.window)).append(seconds)
        self.levels = self.decay * self.levels + (1 - self.decay) * levels


SCHEDULES = ("constant", "heuristic", "adaptive")


def make_schedule(name: str, n: int, calibrated: bool = False) -> Schedule:
    """calibrated: the drafter scores its drafts (adaptive then sets prices for a stop per row instead of one N)."""
    if n < 0:
        raise SpecMTPError(f"num_draft_tokens must be >= 0, got {n}")
    if name == "constant":
        return Constant(n)
    if name == "heuristic":
        return Heuristic(n)
    if name == "adaptive":
        return Adaptive(n, max_n=max(12, 2 * n), calibrated=calibrated)
    raise SpecMTPError(f"unknown schedule {name!r} (choose from {', '.join(SCHEDULES)})")
