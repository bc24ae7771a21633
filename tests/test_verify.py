"""Verification with hand-built logits (exact accept/reject/bonus cases) and a distribution test for
sampled verification, with a negative control that the same test must reject."""

from __future__ import annotations

import torch

from specmtp.verify import verify_greedy, verify_sampled


def one_hot_logits(rows: list[list[int]], vocab: int = 8) -> torch.Tensor:
    out = torch.full((len(rows), len(rows[0]), vocab), -5.0)
    for b, r in enumerate(rows):
        for t, tok in enumerate(r):
            out[b, t, tok] = 5.0
    return out


def test_greedy_accept_reject_bonus():
    # target argmax per position: row0 agrees with all drafts (bonus 7); row1 rejects at 2nd; row2 at 1st
    logits = one_hot_logits([[1, 2, 3, 7], [1, 5, 3, 4], [6, 2, 3, 4]])
    drafts = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    tokens, acc = verify_greedy(logits.argmax(-1), drafts, torch.tensor([3, 3, 3]))
    assert acc.tolist() == [3, 1, 0]
    assert tokens[0, :4].tolist() == [1, 2, 3, 7]  # accepted + bonus
    assert tokens[1, :2].tolist() == [1, 5]  # accepted + recovered
    assert tokens[2, :1].tolist() == [6]  # recovered only


def test_greedy_respects_num_drafts():
    logits = one_hot_logits([[1, 2, 3, 7]])
    tokens, acc = verify_greedy(logits.argmax(-1), torch.tensor([[1, 2, 3]]), torch.tensor([1]))
    assert acc.tolist() == [1] and tokens[0, 1].item() == 2  # padding drafts never count


def test_sampled_certain_cases():
    v = 4
    p = torch.zeros(1, 3, v)
    p[0, 0, 1] = 1.0  # target surely says 1 at position 0
    p[0, 1, 2] = 1.0  # and 2 at position 1
    p[0, 2, 3] = 1.0  # and 3 as bonus
    q = torch.zeros(1, 2, v)
    q[0, 0, 1] = 1.0
    q[0, 1, 0] = 1.0  # drafter proposed 0 where the target can't
    tokens, acc = verify_sampled(p, torch.tensor([[1, 0]]), q, torch.tensor([2]), torch.Generator().manual_seed(0))
    assert acc.tolist() == [1] and tokens[0, :2].tolist() == [1, 2]  # accepted 1, recovered 2
    tokens, acc = verify_sampled(p, torch.tensor([[1, 2]]), None, torch.tensor([2]), None)
    assert acc.tolist() == [2] and tokens[0].tolist() == [1, 2, 3]  # one-hot drafts, bonus 3


def _first_token_histogram(accept_all: bool, n: int = 40000, seed: int = 0) -> torch.Tensor:
    """Distribution of the first emitted token when drafts come from q and are verified against p."""
    g = torch.Generator().manual_seed(seed)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    drafts = torch.multinomial(q.expand(n, 4), 1, replacement=True, generator=g)  # [n, 1]
    target = torch.stack([p, p], 0).expand(n, 2, 4)  # [n, N+1=2, V]
    if accept_all:  # negative control: a verifier that keeps every draft emits q, not p
        first = drafts[:, 0]
    else:
        tokens, _ = verify_sampled(target, drafts, q.expand(n, 1, 4).contiguous(), torch.ones(n, dtype=torch.long), g)
        first = tokens[:, 0]
    return torch.bincount(first, minlength=4).float(), p


def _chi2(counts: torch.Tensor, p: torch.Tensor) -> float:
    expected = p * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampled_verification_preserves_target_distribution():
    counts, p = _first_token_histogram(accept_all=False)
    assert _chi2(counts, p) < 16.27  # chi-square, 3 dof, p = 0.001


def test_negative_control_is_rejected_by_the_same_test():
    counts, p = _first_token_histogram(accept_all=True)
    assert _chi2(counts, p) > 16.27


def test_sampled_second_token_distribution():
    """Joint check over two positions: token 2's marginal given acceptance chains is still p."""
    n, g = 40000, torch.Generator().manual_seed(5)
    p = torch.tensor([0.6, 0.25, 0.1, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    drafts = torch.multinomial(q.expand(n, 4), 2, replacement=True, generator=g)  # [n, 2]
    tokens, acc = verify_sampled(p.expand(n, 3, 4), drafts, q.expand(n, 2, 4).contiguous(),
                                 torch.full((n,), 2), g)
    second = tokens[:, 1]  # always emitted when the first draft was accepted; else it is a later step
    mask = acc >= 1
    counts = torch.bincount(second[mask], minlength=4).float()
    assert _chi2(counts, p) < 16.27


def _tree_pairs(greedy_nodes: bool, n: int = 40000, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of the emitted (first, second) tokens of a draft tree whose nodes' target distributions depend on
    the path: root children 0 and 1, node 0's child 2. One emitted token (first 2 or 3) counts as second = 4."""
    from specmtp.verify import verify_tree

    g = torch.Generator().manual_seed(seed)
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1],  # at the root
                      [0.1, 0.2, 0.3, 0.4],  # after 0
                      [0.7, 0.1, 0.1, 0.1],  # after 1
                      [0.25, 0.25, 0.25, 0.25]])  # after 0 2
    drafts, parents = torch.tensor([[0, 1, 2]]).expand(n, 3), torch.tensor([[-1, -1, 0]]).expand(n, 3)
    if greedy_nodes:  # negative control: the target's argmax at the nodes below the root, not a sample
        choice = torch.cat([torch.multinomial(p[0], n, replacement=True, generator=g)[:, None],
                            p[1:].argmax(-1).expand(n, 3)], dim=1)
    else:
        choice = torch.multinomial(p.repeat(n, 1), 1, generator=g).view(n, 4)  # each node's own draw
    tokens, num, _ = verify_tree(choice, drafts, parents, torch.full((n,), 3))
    second = torch.where(num > 0, tokens[:, 1], 4)
    counts = torch.bincount(tokens[:, 0] * 5 + second, minlength=20).float()
    expected = torch.zeros(20)
    for a in range(4):
        if a < 2:
            expected[a * 5 : a * 5 + 4] = p[0, a] * p[1 + a]
        else:
            expected[a * 5 + 4] = p[0, a]
    return counts, expected


def test_sampled_tree_verification_preserves_target_distribution():
    """Each node's pick drawn from its own distribution: the emitted pairs follow p(first) p(second | first)."""
    counts, expected = _tree_pairs(greedy_nodes=False)
    keep = expected > 0
    assert counts[~keep].sum() == 0
    assert _chi2(counts[keep], expected[keep]) < 27.88  # chi-square, 10 cells - 1 = 9 dof, p = 0.001


def test_tree_negative_control_is_rejected_by_the_same_test():
    counts, expected = _tree_pairs(greedy_nodes=True)
    keep = expected > 0
    assert _chi2(counts[keep], expected[keep]) > 27.88
