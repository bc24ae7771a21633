"""The drafter interface: the engine proposes, verifies and reports back without knowing the drafter's kind.

Life cycle for one batch of prompts:
    drafter.begin(ctx)               after the target's prefill
    loop: p = drafter.propose(ctx, n)   up to n drafts per row (and the q they were sampled from)
          drafter.accept(num_accepted)  how many of them the target kept, per row; roll back own state
"""

from __future__ import annotations

from abc import ABC, abstractmethod
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


@dataclass
class Proposal:
    tokens: torch.Tensor  # [B, N] drafted tokens (padding beyond num[b] is ignored)
    num: torch.Tensor  # [B] valid drafts per row, each <= N
    probs: torch.Tensor | None = None  # [B, N, V] distributions the drafts were sampled from; None = one-hot


def pick_draft(logits: torch.Tensor, ctx: DraftContext) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits: [B, V] -> (draft tokens [B], the distribution q [B, V] they were sampled from; None when greedy)."""
    if ctx.sampling.greedy:
        return logits.argmax(-1), None
    q = probabilities(logits, ctx.sampling)
    return sample(q, ctx.generator), q


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
