"""The drafter interface: the engine proposes, verifies and reports back without knowing the drafter's kind.

Life cycle for one batch of prompts:
    drafter.begin(ctx)               after the target's prefill
    loop: p = drafter.propose(ctx, n)   up to n drafts per row (and the q they were sampled from)
          drafter.accept(num_accepted)  how many of them the target kept, per row; roll back own state
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from specmtp.cache import KVCache
from specmtp.loader import LoadedModel
from specmtp.model import Transformer
from specmtp.sampling import SamplingParams, probabilities, sample


@dataclass
class DraftContext:
    sequences: list[list[int]]  # per row: prompt + emitted tokens; the last one is not yet in the target cache
    hidden: torch.Tensor  # [B, H] target hidden state (final-normed) that predicted each row's last token
    target: Transformer
    cache: KVCache  # the target's cache; cache.lengths[b] == len(sequences[b]) - 1
    sampling: SamplingParams
    generator: torch.Generator | None
    # The engine's schedule, where it gates drafts by confidence: given each row's confidence in its drafts so far
    # [B, k], whether the k-th is worth verifying [B]. A row stops at its first draft that is not. None: all are.
    worth: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class Proposal:
    tokens: torch.Tensor  # [B, N] drafted tokens (padding beyond num[b] is ignored)
    num: torch.Tensor  # [B] valid drafts per row, each <= N
    probs: torch.Tensor | None = None  # [B, N, V] distributions the drafts were sampled from; None = one-hot
    confidence: torch.Tensor | None = None  # [B, N] the drafter's probability of each draft (NaN: none given)
    steps: int | None = None  # draft forward passes it took (a gated round computes one it does not keep)


def pick_draft(logits: torch.Tensor, ctx: DraftContext) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """logits: [B, V] -> (draft tokens [B], the distribution q [B, V] they were sampled from (None when greedy),
    the drafter's probability of each draft [B])."""
    if ctx.sampling.greedy:
        conf, token = logits.float().softmax(-1).max(-1)
        return token, None, conf
    q = probabilities(logits, ctx.sampling)
    token = sample(q, ctx.generator)
    return token, q, q.gather(-1, token[:, None])[:, 0].float()


class DraftRound:
    """One round's drafts, collected position by position: each row stops at its first draft that `ctx.worth`
    rejects (the drafts after it would be verified only if it were accepted)."""

    def __init__(self, ctx: DraftContext) -> None:
        self.worth = ctx.worth
        bsz = len(ctx.sequences)
        self.tokens: list[torch.Tensor] = []
        self.probs: list[torch.Tensor] = []
        self.confs: list[torch.Tensor] = []
        self.alive = torch.ones(bsz, dtype=torch.bool)
        self.num = torch.zeros(bsz, dtype=torch.long)

    def add(self, token: torch.Tensor, conf: torch.Tensor, q: torch.Tensor | None = None) -> bool:
        """One more draft per row (token [B], confidence [B], q [B, V]); False once no row drafts further."""
        self.tokens.append(token)
        self.confs.append(conf)
        if q is not None:
            self.probs.append(q)
        if self.worth is not None:
            self.alive &= self.worth(torch.stack(self.confs, 1))
        self.num += self.alive
        return bool(self.alive.any())

    def proposal(self) -> Proposal:
        k = int(self.num.max())  # positions past every row's last kept draft are dropped
        steps = len(self.tokens)
        if k == 0:
            empty = torch.zeros(len(self.num), 0)
            return Proposal(empty.long(), self.num, None, empty, steps)
        probs = torch.stack(self.probs[:k], 1) if self.probs else None
        return Proposal(torch.stack(self.tokens[:k], 1), self.num, probs, torch.stack(self.confs[:k], 1), steps)


class Drafter(ABC):
    name: str = "drafter"
    default_num_draft_tokens: int | None = None  # what the drafter's own config recommends, if anything
    default_schedule: str | None = None

    def check_compatible(self, target: LoadedModel) -> None:  # noqa: B027
        """Raise SpecMTPError if this drafter cannot draft for the target (and bind to it if it must)."""

    @abstractmethod
    def begin(self, ctx: DraftContext) -> None:
        """A new batch: build whatever per-row state the drafter keeps."""

    @abstractmethod
    def propose(self, ctx: DraftContext, n: int) -> Proposal:
        """Up to `n` drafts per row, continuing ctx.sequences."""

    def accept(self, num_accepted: torch.Tensor) -> None:  # noqa: B027
        """num_accepted: [B] drafts the target kept from the last proposal."""
