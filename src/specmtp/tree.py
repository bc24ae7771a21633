"""Draft trees: several candidate continuations verified in one target pass (EAGLE-2's dynamic tree, SpecInfer).

A row's tree is its last emitted token (the root, not yet cached) and the drafts below it. It is stored flat, in
an order where every node comes after its parent, as the index of each node's parent:

    drafts  [B, N]   token of each draft node
    parents [B, N]   index of its parent draft, -1 for a child of the root

A chain is the tree whose parents are -1, 0, 1, ...: everything that handles trees handles chains. The target sees
the root and the drafts as N + 1 tokens ("inputs": the root is input 0, draft j is input j + 1) in consecutive
cache slots from the row's length, each at the position of its depth (root: the row's length), attending to the
cached slots before the root and to its own ancestors. After verification the accepted path's K/V are moved down
to the slots their positions name (`KVCache.keep_path`), so the cache stays indexed by position.
"""

from __future__ import annotations

import torch


def chain_parents(batch_size: int, n: int) -> torch.Tensor:
    """[B, N] the parents of a chain of n drafts: -1, 0, 1, ..."""
    return (torch.arange(n) - 1).expand(batch_size, n).clone()


def input_parents(parents: torch.Tensor) -> torch.Tensor:
    """Draft parents [B, N] -> the target's inputs' parents [B, N + 1]: the root (input 0) has -1."""
    root = torch.full_like(parents[:, :1], -1)
    return torch.cat([root, parents + 1], dim=1)


def depths(tree: torch.Tensor) -> torch.Tensor:
    """Inputs' parents [B, T] (root first, -1) -> depth of each input [B, T] (root 0)."""
    rows = []
    for par in tree.tolist():  # parents come first: one pass in index order (a few nodes: Python beats tensor ops)
        d = [0] * len(par)
        for i in range(1, len(par)):
            d[i] = d[max(par[i], 0)] + 1
        rows.append(d)
    return torch.tensor(rows, dtype=tree.dtype, device=tree.device).view(tree.shape)


def ancestors(tree: torch.Tensor) -> torch.Tensor:
    """Inputs' parents [B, T] -> [B, T, T] bool: [b, i, j] when input j is input i or one of its ancestors."""
    b, t = tree.shape
    anc = torch.eye(t, dtype=torch.bool).expand(b, t, t).clone()
    rows = torch.arange(b)
    for i in range(1, t):
        anc[:, i] |= anc[rows, tree[:, i].clamp(min=0)]
    return anc


def last_input(path: torch.Tensor, num_accepted: torch.Tensor) -> torch.Tensor:
    """Accepted drafts root-down path [B, N] (draft indices), how many num_accepted [B] -> the input index of each
    row's last accepted token [B] (0: the root, when none was accepted)."""
    rows = path.tolist()  # a few values: Python, not four tensor ops (each cold after a verify pass)
    return torch.tensor([rows[b][a - 1] + 1 if a > 0 else 0 for b, a in enumerate(num_accepted.tolist())],
                        dtype=path.dtype)


def is_chain(parents: torch.Tensor) -> bool:
    """parents [B, N]: does every row hold a chain?"""
    return all(row == list(range(-1, len(row) - 1)) for row in parents.tolist())
