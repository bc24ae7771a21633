"""Lookup first: copy from the context where it repeats itself, ask a model drafter everywhere else.

A row whose last `min_match`..`max_ngram` tokens occurred earlier in its own sequence gets the tokens that
followed that occurrence (prompt lookup, as `ngram.lookup`); the other rows get the wrapped drafter's proposal.
Text that copies (code naming its variables again, a quoted prompt, a list that repeats its pattern) is drafted
for free and often further ahead than a small model drafter reaches, while the model drafter covers new text.
With a batch of one row drafting chains, the model drafter is not run at all when the lookup hits.

Under a price (confidence.py) a copy is cut where it stops being worth verifying: its k-th token is scored by k and
by the length of the match it follows (a copy after 4 matching tokens is surer than one after 2), calibrated on how
often such copied tokens were accepted; a row whose copy is cut to nothing asks the wrapped drafter instead.

Under greedy decoding with a drafter that drafts trees (RecurrentDrafter, `branches` > 1) the two sources are not
alternatives but one tree: the copy is a chain of candidate nodes beside the drafter's, each scored by its
calibrated rate, and the tree round keeps whichever nodes are likeliest (a copied token the drafter also proposes
is one node). A copy that goes wrong early then still leaves the drafter's candidates, and new text still gets
the copy's long reach where it repeats. There a copy may follow a single matching token (`tree_min_match`): its
nodes carry that match's own, lower rates and are kept only where they beat the drafter's candidates. `merge=False`
keeps the alternatives (to measure the difference).

Lossless with sampling: the choice of source depends on the context only, and a copied draft is deterministic,
so its q is one-hot (the wrapped drafter's rows keep their own q).
"""

from __future__ import annotations

import torch

from specmtp.drafters.base import DraftContext, Drafter, Proposal, RecurrentDrafter
from specmtp.drafters.confidence import FREE, Calibration, Price
from specmtp.drafters.ngram import lookup_match
from specmtp.loader import LoadedModel
from specmtp.tree import chain_parents

MAX_COPY = 32  # copied tokens are scored by position (later positions share the last key) and match length


class LookupFirst(Drafter):
    def __init__(self, inner: Drafter, min_match: int = 2, max_ngram: int = 4, merge: bool = True,
                 by_match: bool = True, tree_min_match: int = 1) -> None:
        """min_match: the shortest match a copy follows where it replaces the inner drafter's drafts;
        tree_min_match: where it joins the inner drafter's tree instead (its nodes kept only where their rates,
        by match length, beat the drafter's candidates: a single matching token is enough there)."""
        self.inner, self.min_match, self.max_ngram = inner, min_match, max_ngram
        self.tree_min_match = min(tree_min_match, min_match)
        self.by_match = by_match  # copies keyed by match length and position (False: by position alone)
        self.merge = merge  # copies join a tree-drafting inner drafter's trees (greedy), instead of replacing them
        self.name = f"ngram+{inner.name}"
        self.default_num_draft_tokens = inner.default_num_draft_tokens
        self.default_schedule = inner.default_schedule
        self.calibrated = inner.calibrated
        self.taps = inner.taps
        self.branches = inner.branches
        # key: (max_ngram - the match's length) * MAX_COPY + a copied token's position in its copy
        self.calibration = Calibration([0.7] * MAX_COPY * (max_ngram - self.tree_min_match + 1))
        self.copied: list[bool] = []  # per row: the last proposal was copied (the inner drafter's was not used)
        self.inner_ran = False

    def _key(self, match: int, k: int) -> int:
        """The calibration key of the k-th token copied after a match of `match` tokens."""
        level = self.max_ngram - match if self.by_match else 0
        return level * MAX_COPY + min(k, MAX_COPY - 1)

    def set_branches(self, k: int) -> None:
        self.inner.set_branches(k)
        self.branches = self.inner.branches

    def check_compatible(self, target: LoadedModel) -> None:
        self.inner.check_compatible(target)

    def begin(self, ctx: DraftContext) -> None:
        self.inner.begin(ctx)

    def propose(self, ctx: DraftContext, n: int, price: Price = FREE) -> Proposal:
        tree = self.merge and isinstance(self.inner, RecurrentDrafter) and self.inner.branches > 1 and \
            ctx.sampling.greedy
        shortest = self.tree_min_match if tree else self.min_match
        found = [lookup_match(seq, n, self.max_ngram, shortest) for seq in ctx.sequences]
        copies = [c for c, _ in found]
        # each copied token's calibration key: [B][its copy's length]
        keys = [[self._key(m, k) for k in range(len(c))] for c, m in found]
        bsz = len(copies)
        if tree:
            self.chain, self.copied, self.inner_ran = None, [False] * bsz, True  # one tree: the inner round's
            return self.inner.propose_tree(ctx, n, price, seeds=(copies, self.calibration, keys))
        chain = self.new_chain(bsz, price)
        for k in range(max(map(len, copies), default=0)):  # cut each copy where it is no longer worth verifying
            chain.push(torch.tensor([r[k] if k < len(r) else 0 for r in keys]),
                       torch.tensor([k < len(c) for c in copies]))
        copies = [c[: int(m)] for c, m in zip(copies, chain.num, strict=True)]
        self.copied = [len(c) > 0 for c in copies]
        self.inner_ran = not all(self.copied)
        parents, steps = None, None
        if self.inner_ran:
            proposal = self.inner.propose(ctx, n, price)
            self.inner.forget([b for b, c in enumerate(self.copied) if c])
            tokens, num, probs = proposal.tokens.clone(), proposal.num.clone(), proposal.probs
            parents, steps = proposal.parents, proposal.steps
            if tokens.shape[1] < n:  # the inner drafter stopped early; copies may be longer
                tokens = torch.nn.functional.pad(tokens, (0, n - tokens.shape[1]))
                if probs is not None:
                    probs = torch.nn.functional.pad(probs, (0, 0, 0, n - probs.shape[1]))
                if parents is not None:
                    parents = torch.nn.functional.pad(parents, (0, n - parents.shape[1]), value=-1)
        else:
            tokens, num, probs = torch.zeros(bsz, n, dtype=torch.long), torch.zeros(bsz, dtype=torch.long), None
        if probs is not None:
            probs = probs.clone()  # [B, N, V]
        if parents is not None:
            parents = parents.clone()  # [B, N] the inner drafter's trees; copies are chains
        for b, c in enumerate(copies):
            if not c:
                continue
            tokens[b, : len(c)] = torch.tensor(c)
            tokens[b, len(c) :] = 0
            num[b] = len(c)
            if probs is not None:  # a copied draft is certain: one-hot q
                probs[b] = 0.0
                probs[b, torch.arange(len(c)), tokens[b, : len(c)]] = 1.0
            if parents is not None:
                parents[b] = chain_parents(1, n)[0]
        return Proposal(tokens, num, probs, parents, steps)

    def accept(self, num_accepted: torch.Tensor, path: torch.Tensor | None = None) -> None:
        super().accept(num_accepted)  # the copies' calibration (rows that did not copy drafted no copied token)
        if self.inner_ran:  # rows that copied accepted none of the inner drafter's own tokens
            self.inner.accept(torch.where(torch.tensor(self.copied), 0, num_accepted) if any(self.copied)
                              else num_accepted, path)
