"""The drafter interface: the engine proposes, verifies and reports back without knowing the drafter's kind.

Life cycle for one batch of prompts:
    drafter.begin(ctx)               after the target's prefill
    loop: p = drafter.propose(ctx, n, price)   up to n drafts per row (and the q they were sampled from);
                                                a calibrated drafter stops a row early (confidence.py), and
                                                a branching one may propose a tree of up to n nodes (tree.py)
          drafter.accept(num_accepted, path)  how many of them the target kept, per row (and which, in a
                                              tree); roll back own state
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from specmtp.cache import KVCache
from specmtp.drafters.confidence import FREE, Calibration, Chain, Price, TreeRound, prob_keys
from specmtp.errors import SpecMTPError
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
    taps: torch.Tensor | None = None  # [B, n, H] the target's layers `drafter.taps` at that position (None: none)


@dataclass
class Proposal:
    tokens: torch.Tensor  # [B, N] drafted tokens (padding beyond num[b] is ignored)
    num: torch.Tensor  # [B] valid drafts per row, each <= N
    probs: torch.Tensor | None = None  # [B, N, V] distributions the drafts were sampled from; None = one-hot
    parents: torch.Tensor | None = None  # [B, N] a draft tree (tree.py): each draft's parent, -1 the root; None: chains
    steps: int | None = None  # drafter forward passes it took (None: one per draft position)


def pick_draft(logits: torch.Tensor, ctx: DraftContext) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """logits: [B, V] -> (draft tokens [B], the distribution q [B, V] they were sampled from (None when greedy),
    the drafter's probability of each draft [B]: its confidence score)."""
    if ctx.sampling.greedy:
        conf, token = torch.softmax(logits.float(), -1).max(-1)
        return token, None, conf
    q = probabilities(logits, ctx.sampling)
    token = sample(q, ctx.generator)
    return token, q, q.gather(-1, token[:, None])[:, 0]


class Drafter(ABC):
    name: str = "drafter"
    default_num_draft_tokens: int | None = None  # what the drafter's own config recommends, if anything
    default_schedule: str | None = None
    calibrated: bool = False  # scores its drafts and honours propose's price
    chain: Chain | TreeRound | None = None  # a calibrated drafter's last round
    calibration: Calibration | None = None  # what its scores are worth; kept across requests
    taps: tuple[int, ...] = ()  # target layers whose outputs it reads besides the final hidden state (ctx.taps)
    branches: int = 1  # candidate children per node where the drafter drafts trees (RecurrentDrafter); 1: chains

    def set_branches(self, k: int) -> None:
        if k < 1:
            raise SpecMTPError(f"branches must be >= 1, got {k}")
        self.branches = k

    def check_compatible(self, target: LoadedModel) -> None:  # noqa: B027
        """Raise SpecMTPError if this drafter cannot draft for the target (and bind to it if it must)."""

    @abstractmethod
    def begin(self, ctx: DraftContext) -> None:
        """A new batch: build whatever per-row state the drafter keeps."""

    @abstractmethod
    def propose(self, ctx: DraftContext, n: int, price: Price = FREE) -> Proposal:
        """Up to `n` drafts per row, continuing ctx.sequences. A calibrated drafter stops a row once the
        estimated probability that all its drafts are accepted is no longer worth `price` (free: n a row)."""

    def accept(self, num_accepted: torch.Tensor, path: torch.Tensor | None = None) -> None:
        """num_accepted: [B] drafts the target kept from the last proposal; path: [B, N] which, root-down, when it
        was a tree (None: the first num_accepted). Subclasses with state of their own extend this (and call it:
        it is how a calibrated drafter learns what its scores are worth)."""
        if self.chain is not None:
            self.chain.observe(num_accepted, path)
            self.chain = None

    def forget(self, rows: list[int]) -> None:
        """The last proposal's drafts for these rows were not verified (another drafter's were used)."""
        if self.chain is not None:
            self.chain.forget(rows)

    def new_chain(self, batch_size: int, price: Price) -> Chain:
        """A calibrated drafter's round: call `chain.worth_drafting()` before and `chain.push` after each draft."""
        if self.calibration is None:
            self.calibration = Calibration.for_probabilities()
        self.chain = Chain(self.calibration, batch_size, price)
        return self.chain


def stacked(drafts: list[torch.Tensor], probs: list[torch.Tensor], num: torch.Tensor) -> Proposal:
    """Per-draft [B] tokens and [B, V] distributions -> a Proposal with `num` [B] valid drafts per row."""
    tokens = torch.stack(drafts, 1) if drafts else torch.zeros(num.shape[0], 0, dtype=torch.long)  # [B, N]
    return Proposal(tokens, num, torch.stack(probs, 1) if probs else None)


class RecurrentDrafter(Drafter):
    """A drafter that steps on (last token, a hidden state) at the round's fixed position, feeding its own output
    back as the next hidden state: specmtp's MTP drafters and the Gemma 4 assistant.

    With `branches` > 1 and greedy decoding it drafts a tree of up to n nodes: a node's candidate children are
    its step's `branches` most likely tokens, and since every step of a round queries from the same position with
    no cache of its own, the nodes of one depth are drafted side by side in one step (TreeRound keeps the likeliest
    nodes, and under a price only those worth verifying)."""

    calibrated = True
    vocab: torch.Tensor | None = None  # [K] token ids of step's logit columns (a reduced head); None: all of them

    @abstractmethod
    def step(self, token: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
             ctx: DraftContext) -> tuple[torch.Tensor, torch.Tensor]:
        """token [B, W] (W branches per row) at positions [B] (not yet cached), hidden [B, W, Ht] ->
        logits [B, W, K], next hidden [B, W, Ht]."""

    def step_top(self, token: torch.Tensor, hidden: torch.Tensor | None, positions: torch.Tensor, ctx: DraftContext,
                 k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """step's k likeliest tokens per branch: probabilities [B, W, k], target token ids [B, W, k], and the next
        hidden [B, W, Ht]. hidden None: a round's first step (one branch), from first_state(ctx)."""
        if hidden is None:
            hidden = self.first_state(ctx)[:, None]  # [B, 1, Ht]
        logits, out = self.step(token, hidden, positions, ctx)  # [B, W, K], [B, W, Ht]
        conf, pick = torch.softmax(logits.float(), -1).topk(k, -1)  # [B, W, k]
        return conf, pick if self.vocab is None else self.vocab[pick], out

    def first_state(self, ctx: DraftContext) -> torch.Tensor:
        """The hidden state a round's first step reads: the target's [B, Ht] (a drafter with taps fuses them in)."""
        return ctx.hidden

    def propose(self, ctx: DraftContext, n: int, price: Price = FREE) -> Proposal:
        if self.branches > 1 and ctx.sampling.greedy:
            return self.propose_tree(ctx, n, price)
        bsz = len(ctx.sequences)
        token = torch.tensor([s[-1] for s in ctx.sequences])  # [B]
        positions = torch.tensor([len(s) - 1 for s in ctx.sequences])  # [B] fixed for the whole round
        hidden = self.first_state(ctx)
        vocab_size = ctx.target.cfg.vocab_size
        drafts, probs = [], []
        chain = self.new_chain(bsz, price)
        while len(drafts) < n and chain.worth_drafting():
            logits, hidden = self.step(token[:, None], hidden[:, None], positions, ctx)  # [B, 1, K], [B, 1, Ht]
            logits, hidden = logits[:, 0], hidden[:, 0]
            pick, q, conf = pick_draft(logits, ctx)  # q: [B, K], the distribution actually sampled from
            chain.push(prob_keys(conf))
            if q is not None:
                if self.vocab is not None:
                    q = torch.zeros(bsz, vocab_size, dtype=q.dtype).index_copy_(1, self.vocab, q)
                probs.append(q[:, :vocab_size])
            token = pick if self.vocab is None else self.vocab[pick]
            drafts.append(token)
        return stacked(drafts, probs, chain.num)

    def propose_tree(self, ctx: DraftContext, n: int, price: Price,
                     seeds: tuple[list[list[int]], Calibration, list[list[int]]] | None = None) -> Proposal:
        """A tree of up to n nodes per row: each depth, the round's best unexpanded nodes (at most `branches`
        per row) are stepped side by side and their children scored; TreeRound keeps the nodes worth verifying.
        seeds: per row a chain from another source (a copy from the context), the calibration that scores it and
        per row its tokens' keys there; it competes for the n nodes, and merges where the steps propose the same
        tokens."""
        bsz = len(ctx.sequences)
        positions = torch.tensor([len(s) - 1 for s in ctx.sequences])  # [B]
        if self.calibration is None:
            self.calibration = Calibration.for_probabilities()
        tree = self.chain = TreeRound(self.calibration, bsz, price, n)
        if seeds is not None:
            tree.seed(*seeds)
        token = torch.tensor([s[-1] for s in ctx.sequences])[:, None]  # [B, 1] the roots
        hidden = None  # the roots': first_state's (step_top computes it, in the step's call where it can)
        expand = [[-1] for _ in range(bsz)]  # per row: the nodes stepped now (-1: the root)
        steps = 0
        while True:
            conf, pick, out = self.step_top(token, hidden, positions, ctx, self.branches)  # [B, W, branches] x2
            steps += 1
            tree.grow(expand, pick, conf, out)
            expand = tree.next_expansion(self.branches, steps)
            if not any(expand):
                break
            width = max(map(len, expand))
            zero = out.new_zeros(out.shape[-1])
            # padding branches step on token 0 (and a zero state) and are ignored
            token = torch.tensor([[tree.token[b][i] for i in nodes] + [0] * (width - len(nodes))
                                  for b, nodes in enumerate(expand)])  # [B, W]
            hidden = torch.stack([torch.stack([tree.feed[b][i] for i in nodes] + [zero] * (width - len(nodes)))
                                  for b, nodes in enumerate(expand)])  # [B, W, Ht]
        tokens, parents, num = tree.selected(steps)
        return Proposal(tokens, num, None, parents, steps)
