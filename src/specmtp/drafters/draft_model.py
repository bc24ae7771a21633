"""Draft-model drafter: a smaller model with the target's tokenizer, its own KV cache rolled back on rejection."""

from __future__ import annotations

import torch

from specmtp.cache import KVCache
from specmtp.drafters.base import DraftContext, Drafter, Proposal, pick_draft, stacked
from specmtp.drafters.confidence import FREE, Price, prob_keys
from specmtp.errors import SpecMTPError
from specmtp.loader import LoadedModel
from specmtp.model import Transformer


class DraftModelDrafter(Drafter):
    calibrated = True

    def __init__(self, model: Transformer, vocab: dict[str, int], name: str = "draft-model") -> None:
        self.model, self.vocab, self.name = model, vocab, name
        self.cache: KVCache | None = None
        self.seen: list[int] = []  # tokens of each row held in the drafter's cache
        self.ctx_len: list[int] = []  # row length when the last proposal was made

    def check_compatible(self, target: LoadedModel) -> None:
        target_vocab = target.tokenizer.vocab
        if target_vocab != self.vocab:
            raise SpecMTPError(
                f"draft model {self.name!r} has a different vocabulary from the target "
                f"({len(self.vocab)} vs {len(target_vocab)} tokens): a draft model must share the tokenizer"
            )
        if self.model.cfg.vocab_size < len(target_vocab):
            raise SpecMTPError(f"draft model {self.name!r} embeds {self.model.cfg.vocab_size} tokens, "
                               f"the target's tokenizer has {len(target_vocab)}")

    def begin(self, ctx: DraftContext) -> None:
        self.cache = self.model.new_cache(len(ctx.sequences), ctx.cache.capacity)
        # Prefill the drafter on each prompt now (all but the last token, which the first proposal feeds), so
        # that it is counted as prefill and not as the cost of a draft step.
        rows = [s[:-1] for s in ctx.sequences]
        if max(len(r) for r in rows) > 0:
            self._feed(rows, [0] * len(rows))
        self.seen = [len(r) for r in rows]

    def _feed(self, rows: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Run the drafter on each row's new tokens; return the hidden state after each row's last one. [B, H]"""
        width = max(len(r) for r in rows)  # rows may be empty (nothing new): their output is unused
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        for b, r in enumerate(rows):
            tokens[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        positions = torch.tensor(starts)[:, None] + torch.arange(width)  # [B, W]
        hidden = self.model(tokens, positions, self.cache)  # [B, W, H]
        last = torch.tensor([max(len(r) - 1, 0) for r in rows])
        return hidden[torch.arange(len(rows)), last]

    def propose(self, ctx: DraftContext, n: int, price: Price = FREE) -> Proposal:
        seqs = ctx.sequences
        self.ctx_len = [len(s) for s in seqs]
        # Always feed at least the row's last token (a finished row's sequence no longer grows).
        self.seen = [min(seen, length - 1) for seen, length in zip(self.seen, self.ctx_len, strict=True)]
        hidden = self._feed([s[self.seen[b] :] for b, s in enumerate(seqs)], self.seen)
        drafts, probs = [], []
        chain = self.new_chain(len(seqs), price)
        vocab_size = ctx.target.cfg.vocab_size
        while len(drafts) < n and chain.worth_drafting():
            if drafts:  # the previous draft enters the drafter's cache only now that another one is wanted
                positions = torch.tensor(self.ctx_len)[:, None] + len(drafts) - 1  # [B, 1]
                hidden = self.model(drafts[-1][:, None], positions, self.cache)[:, 0]
            token, q, conf = pick_draft(self.model.logits(hidden), ctx)  # [B]; q [B, V]
            chain.push(prob_keys(conf))
            if q is not None:
                probs.append(q[:, :vocab_size])
            drafts.append(token)
        self.seen = [length + max(len(drafts) - 1, 0) for length in self.ctx_len]
        return stacked(drafts, probs, chain.num)

    def accept(self, num_accepted: torch.Tensor, path: torch.Tensor | None = None) -> None:
        super().accept(num_accepted, path)  # its proposals are chains
        # Valid drafter KV: the context plus the accepted drafts it has itself consumed (at most n - 1).
        self.seen = [min(s, c + int(a)) for s, c, a in zip(self.seen, self.ctx_len, num_accepted.tolist(),
                                                          strict=True)]
