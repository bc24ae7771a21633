"""N-gram (prompt lookup) drafter: propose what followed the latest earlier occurrence of the context's tail.

No model: it matches the last k tokens (k from `max_ngram` down to `min_ngram`) against the rest of the
row's sequence and proposes the tokens that followed the most recent match. Deterministic, so its q is
one-hot and sampled verification stays lossless.
"""

from __future__ import annotations

from array import array

import torch

from specmtp.drafters.base import DraftContext, Drafter, Proposal
from specmtp.drafters.confidence import FREE, Price


def lookup(seq: list[int], n: int, max_ngram: int = 3, min_ngram: int = 1, window: int = 4096) -> list[int]:
    """Continuation (up to n tokens) of the most recent earlier match of seq's last k tokens."""
    return lookup_match(seq, n, max_ngram, min_ngram, window)[0]


def lookup_match(seq: list[int], n: int, max_ngram: int = 3, min_ngram: int = 1,
                 window: int = 4096) -> tuple[list[int], int]:
    """lookup's continuation and the length k of the match it follows (0 with no match): the longest k from
    max_ngram down to min_ngram that occurred earlier, its most recent occurrence."""
    size = len(seq)
    lo = max(0, size - window)
    if size - lo < 2:
        return [], 0
    # the window as 4-byte words, searched from the end by bytes.rfind (a scan in C): a match must end before the
    # last token (something follows it) and start on a word boundary
    words = array("i", seq[lo:]).tobytes()
    for k in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        tail, end = words[-4 * k :], len(words) - 4
        at = words.rfind(tail, 0, end)
        while at > 0 and at % 4:  # inside a word: look further back
            at = words.rfind(tail, 0, at + 4 * k - 1)
        if at >= 0:
            start = lo + at // 4
            return seq[start + k : start + k + n], k
    return [], 0


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def begin(self, ctx: DraftContext) -> None:
        pass

    def propose(self, ctx: DraftContext, n: int, price: Price = FREE) -> Proposal:
        rows = [lookup(seq, n, self.max_ngram, self.min_ngram) for seq in ctx.sequences]
        tokens = torch.zeros(len(rows), n, dtype=torch.long)
        for b, r in enumerate(rows):
            tokens[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        return Proposal(tokens, torch.tensor([len(r) for r in rows], dtype=torch.long))
