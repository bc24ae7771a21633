"""Verification: which drafted tokens the target accepts, and the token the target adds itself.

Words used here and throughout specmtp:
- *drafts*: the N tokens a drafter proposed for a row, d_1..d_N (a row may have fewer valid ones).
- *accepted*: the longest prefix d_1..d_a that the target keeps (greedy: equal to the target's argmax;
  sampled: each kept with probability min(1, p(d)/q(d))).
- *recovered*: when d_{a+1} is rejected, the target's replacement for it, sampled from the normalized
  residual max(0, p - q) (greedy: the target's argmax).
- *bonus*: when all valid drafts are accepted, the target's own next token after them, sampled from p.
Each verify pass therefore emits a + 1 tokens per row: the accepted drafts, then one recovered or bonus
token. With q the exact distribution each draft was sampled from (one-hot for a greedy or n-gram
drafter), the emitted tokens are distributed exactly as target-only sampling (Leviathan et al. 2023,
Chen et al. 2023). Both functions have fixed output shapes: tokens [B, N+1] and counts [B].

A draft tree (specmtp.tree) offers several candidates per position. The target picks its own token at every
node (its argmax, or a sample of its distribution there); starting at the root, a child is *accepted* when its
token is the one the target picked at its parent, and the walk goes on from it; the target's pick at the last
accepted node is the bonus/recovered token. Each emitted token is then the target's own pick given the tokens
before it, whatever the tree held, so the output is distributed as target-only decoding (with sampling, every
node's pick is an independent draw; the tree is chosen before the target's distributions are seen).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def verify_greedy(
    target: torch.Tensor,  # [B, N+1] the target's greedy tokens at the last context token and at each draft
    drafts: torch.Tensor,  # [B, N]
    num_drafts: torch.Tensor,  # [B] valid drafts per row
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [B, N+1], num_accepted [B]
    """Emitted tokens of row b are tokens[b, : num_accepted[b] + 1]. (The target's greedy tokens: the argmax of
    its logits, Transformer.greedy.)"""
    n = drafts.shape[1]
    valid = torch.arange(n, device=drafts.device) < num_drafts[:, None]  # [B, N]
    match = (drafts == target[:, :n]) & valid
    num_accepted = match.long().cumprod(dim=1).sum(dim=1)  # [B]
    # Accepted drafts equal the target's argmax, and the next position holds the recovered/bonus token,
    # so the target's argmax row is exactly the emitted sequence.
    return target, num_accepted


def _first_children(tokens: list[int], parents: list[int], num: int) -> dict[tuple[int, int], int]:
    """One row's (parent node, token) -> the first of its valid nodes with them: of siblings with the same token
    only the first can be accepted."""
    first: dict[tuple[int, int], int] = {}
    for j in range(num):
        first.setdefault((parents[j], tokens[j]), j)
    return first


def greedy_walk(
    greedy: Callable[[torch.Tensor], torch.Tensor],  # hidden [K, H] -> the target's greedy tokens [K]
    hidden: torch.Tensor,  # [B, N+1, H] a verify pass's final hidden states (input 0: the root)
    drafts: torch.Tensor,  # [B, N]
    parents: torch.Tensor | None,  # [B, N] a tree's parents (-1: the root); None: chains
    num_drafts: torch.Tensor,  # [B] valid drafts per row
) -> tuple[torch.Tensor, int]:  # picks [B, N+1] (-1 where not taken), greedy calls made
    """The target's greedy picks only where verification reads them: at the root, then at each accepted node, one
    depth a call (every row's node of that depth together). verify_greedy and verify_tree read a pick only there
    (a chain's picks past its first mismatch drop out of the accepted prefix, and -1 matches no draft), so they
    give the same result from these as from every pick. Where each greedy call costs about the same for one token
    as for several (a head read from memory), this takes 1 + accepted calls' worth of the head instead of one call
    over every node."""
    b, n = drafts.shape
    toks, nums = drafts.tolist(), num_drafts.tolist()
    pars = parents.tolist() if parents is not None else [[j - 1 for j in range(n)]] * b
    child = [_first_children(t, p, k) for t, p, k in zip(toks, pars, nums, strict=True)]
    picks = torch.full((b, n + 1), -1, dtype=torch.long)
    frontier, calls = [(r, -1) for r in range(b)], 0  # (row, node whose pick is needed; -1: the root)
    while frontier:
        rows = torch.tensor([r for r, _ in frontier])
        inputs = torch.tensor([node + 1 for _, node in frontier])
        got = greedy(hidden[rows, inputs]).tolist()
        calls += 1
        picks[rows, inputs] = torch.tensor(got, dtype=torch.long)
        frontier = [(r, nxt) for (r, node), pick in zip(frontier, got, strict=True)
                    if (nxt := child[r].get((node, pick))) is not None]
    return picks, calls


def verify_sampled(
    target_probs: torch.Tensor,  # [B, N+1, V] processed target distributions p
    drafts: torch.Tensor,  # [B, N]
    draft_probs: torch.Tensor | None,  # [B, N, V] distributions q the drafts were sampled from; None = one-hot
    num_drafts: torch.Tensor,  # [B]
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [B, N+1], num_accepted [B]
    b, n1, v = target_probs.shape
    n = n1 - 1
    rows = torch.arange(b, device=drafts.device)
    if draft_probs is None:  # deterministic drafter: q is one-hot at the draft
        draft_probs = torch.zeros(b, n, v, dtype=target_probs.dtype, device=drafts.device)
        draft_probs.scatter_(-1, drafts[..., None], 1.0)
    p_draft = target_probs[:, :n].gather(-1, drafts[..., None]).squeeze(-1)  # [B, N]
    q_draft = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)  # [B, N]
    u = torch.rand(b, n, generator=generator, device=drafts.device)
    valid = torch.arange(n, device=drafts.device) < num_drafts[:, None]
    accept = (u * q_draft < p_draft) & valid  # u < p/q without dividing by q
    num_accepted = accept.long().cumprod(dim=1).sum(dim=1)  # [B]
    # The distribution of the token at position a: residual after a rejection, p itself for the bonus.
    p_next = target_probs[rows, num_accepted]  # [B, V]
    q_pad = torch.cat([draft_probs, draft_probs.new_zeros(b, 1, v)], dim=1)  # [B, N+1, V]
    rejected = (num_accepted < num_drafts)[:, None]  # [B, 1]
    residual = torch.where(rejected, (p_next - q_pad[rows, num_accepted]).clamp_min(0), p_next)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_next)  # p == q: no residual mass
    extra = torch.multinomial(residual, 1, generator=generator).squeeze(-1)  # [B]
    tokens = torch.cat([drafts, drafts.new_zeros(b, 1)], dim=1)  # [B, N+1]
    tokens[rows, num_accepted] = extra
    return tokens, num_accepted


def verify_tree(
    choice: torch.Tensor,  # [B, N+1] the target's pick at the root (input 0) and at each draft node
    drafts: torch.Tensor,  # [B, N] tokens of the tree's nodes
    parents: torch.Tensor,  # [B, N] index of each node's parent node (-1: the root), parents[b, j] < j
    num_drafts: torch.Tensor,  # [B] valid nodes per row (the first num_drafts[b])
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # tokens [B, N+1], num_accepted [B], path [B, N]
    """Emitted tokens of row b are tokens[b, : num_accepted[b] + 1]; path[b, : num_accepted[b]] are the accepted
    nodes, root-down. Of siblings with the same token only the first can be accepted."""
    b, n = drafts.shape
    picks, tokens_l, parents_l, nums = choice.tolist(), drafts.tolist(), parents.tolist(), num_drafts.tolist()
    order, counts, emitted = [], [], []  # per row: accepted nodes root-down then the others; how many; tokens
    for pick, toks, par, num in zip(picks, tokens_l, parents_l, nums, strict=True):  # a walk of a few nodes
        child = _first_children(toks, par, num)
        walk, node = [], -1  # node: the last accepted draft (-1: the root)
        while (nxt := child.get((node, pick[node + 1]))) is not None:
            walk.append(nxt)
            node = nxt
        kept = set(walk)
        row = walk + [j for j in range(n) if j not in kept]
        order.append(row)
        counts.append(len(walk))
        out = [toks[j] for j in row] + [0]
        out[len(walk)] = pick[node + 1]  # the target's own pick after the last accepted node (or the root)
        emitted.append(out)
    device = drafts.device
    num_accepted = torch.tensor(counts, dtype=torch.long, device=device)  # [B]
    path = torch.tensor(order, dtype=torch.long, device=device).view(b, n)  # [B, N]
    tokens = torch.tensor(emitted, dtype=drafts.dtype, device=device).view(b, n + 1)  # [B, N+1]
    return tokens, num_accepted, path
