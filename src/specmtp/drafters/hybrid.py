"""Lookup first: copy from the context where it repeats itself, ask a model drafter everywhere else.

A row whose last `min_match`..`max_ngram` tokens occurred earlier in its own sequence gets the tokens that
followed that occurrence (prompt lookup, as `ngram.lookup`); the other rows get the wrapped drafter's proposal.
Text that copies (code naming its variables again, a quoted prompt, a list that repeats its pattern) is drafted
for free and often further ahead than a small model drafter reaches, while the model drafter covers new text.
With a batch of one row the model drafter is not run at all when the lookup hits.

Lossless with sampling: the choice of source depends on the context only, and a copied draft is deterministic,
so its q is one-hot (the wrapped drafter's rows keep their own q).
"""

from __future__ import annotations

import torch

from specmtp.drafters.base import DraftContext, Drafter, Proposal
from specmtp.drafters.ngram import lookup
from specmtp.loader import LoadedModel


class LookupFirst(Drafter):
    def __init__(self, inner: Drafter, min_match: int = 2, max_ngram: int = 4) -> None:
        self.inner, self.min_match, self.max_ngram = inner, min_match, max_ngram
        self.name = f"ngram+{inner.name}"
        self.default_num_draft_tokens = inner.default_num_draft_tokens
        self.default_schedule = inner.default_schedule
        self.copied: list[bool] = []  # per row: the last proposal was copied (the inner drafter's was not used)
        self.inner_ran = False

    def check_compatible(self, target: LoadedModel) -> None:
        self.inner.check_compatible(target)

    def begin(self, ctx: DraftContext) -> None:
        self.inner.begin(ctx)

    def propose(self, ctx: DraftContext, n: int) -> Proposal:
        copies = [lookup(seq, n, self.max_ngram, self.min_match) for seq in ctx.sequences]
        self.copied = [len(c) > 0 for c in copies]
        bsz = len(copies)
        self.inner_ran = not all(self.copied)
        if self.inner_ran:
            proposal = self.inner.propose(ctx, n)
            tokens, num, probs = proposal.tokens.clone(), proposal.num.clone(), proposal.probs
        else:
            tokens, num, probs = torch.zeros(bsz, n, dtype=torch.long), torch.zeros(bsz, dtype=torch.long), None
        if probs is not None:
            probs = probs.clone()  # [B, N, V]
        for b, c in enumerate(copies):
            if not c:
                continue
            tokens[b, : len(c)] = torch.tensor(c)
            tokens[b, len(c) :] = 0
            num[b] = len(c)
            if probs is not None:  # a copied draft is certain: one-hot q
                probs[b] = 0.0
                probs[b, torch.arange(len(c)), tokens[b, : len(c)]] = 1.0
        return Proposal(tokens, num, probs)

    def accept(self, num_accepted: torch.Tensor) -> None:
        if self.inner_ran:  # rows that copied accepted none of the inner drafter's own tokens
            self.inner.accept(torch.where(torch.tensor(self.copied), 0, num_accepted))
