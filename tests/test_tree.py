"""Draft trees: the target's tree pass, verification and cache compaction, and exact speculative output."""

import pytest
import torch
from conftest import prefilled_pair

from specmtp.cache import KVCache
from specmtp.loader import load_model
from specmtp.quant import dense_kernel, quantize_model
from specmtp.tree import ancestors, chain_parents, depths, input_parents
from specmtp.verify import greedy_walk, verify_greedy, verify_tree

TREE = torch.tensor([[-1, 0, 0, 1, 1, 2, 4]])  # inputs' parents: the root, two children, ...
PATH = [0, 1, 4, 6]  # root -> 1 -> 4 -> 6


def test_tree_helpers():
    assert depths(TREE).tolist() == [[0, 1, 1, 2, 2, 2, 3]]
    anc = ancestors(TREE)[0]
    assert anc[6].nonzero().flatten().tolist() == [0, 1, 4, 6]
    assert anc[5].nonzero().flatten().tolist() == [0, 2, 5]
    assert input_parents(chain_parents(2, 3)).tolist() == [[-1, 0, 1, 2]] * 2


@pytest.mark.parametrize("family,weights", [("llama", "dense"), ("qwen2", "dense"), ("llama", "q4"),
                                            ("gemma3", "dense"), ("gemma3", "q4")])
def test_a_tree_pass_gives_each_path_what_token_by_token_steps_give(tiny_dir, family, weights):
    """Every node of a tree pass gets the logits a one-token step along its path gets, and after keep_path the
    cache holds the path's K/V where those steps put them: bit for bit where specmtp's attention kernel serves the
    row (Llama/Qwen2), to rounding elsewhere."""
    exact = family != "gemma3" and (weights == "q4" or dense_kernel())
    target = load_model(str(tiny_dir(family)))
    model = target.model
    if weights == "q4":
        quantize_model(model, "q4")
    caches, block = prefilled_pair(model)
    tree_logits = model.logits(model.features(block, 40 + depths(TREE), caches[0], (), TREE)[0])
    caches[0].keep_path(torch.tensor([40]), torch.tensor([PATH[1:]]), torch.tensor([3]))
    step_logits = torch.cat([model.logits(model(block[:, i : i + 1], torch.tensor([[40 + d]]), caches[1]))
                             for d, i in enumerate(PATH)], dim=1)
    check = torch.equal if exact else lambda a, b: torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert check(tree_logits[:, PATH], step_logits)
    for k0, k1 in zip(caches[0].k, caches[1].k, strict=True):
        assert check(k0[:, :, :44], k1[:, :, :44])


@pytest.mark.parametrize("shapes", [[(2, 4)] * 3, [(2, 4), (1, 8), (2, 4)]])  # one block for all; a tensor each
def test_keep_path_moves_the_accepted_slots_of_every_layer(shapes):
    cache = KVCache(2, 16, shapes)
    g = torch.Generator().manual_seed(0)
    for t in (*cache.k, *cache.v):
        t.copy_(torch.randn(t.shape, generator=g))
    before = [t.clone() for t in (*cache.k, *cache.v)]
    # row 0: the root in slot 3, its accepted drafts in slots 3 + 2 and 3 + 4 -> slots 4 and 5; row 1: already in place
    cache.keep_path(torch.tensor([3, 5]), torch.tensor([[2, 4], [1, 3]]), torch.tensor([2, 1]))
    for t, t0 in zip((*cache.k, *cache.v), before, strict=True):
        assert torch.equal(t[0, :, 4], t0[0, :, 5]) and torch.equal(t[0, :, 5], t0[0, :, 7])
        assert torch.equal(t[0, :, :4], t0[0, :, :4]) and torch.equal(t[1], t0[1])
    cache.row(1).keep_path(torch.tensor([5]), torch.tensor([[2]]), torch.tensor([1]))  # a row's view moves its slots
    for t, t0 in zip((*cache.k, *cache.v), before, strict=True):
        assert torch.equal(t[1, :, 6], t0[1, :, 7]) and torch.equal(t[0, :, 4], t0[0, :, 5])


def test_keep_path_of_one_row_moves_the_same_slots_as_indexing():
    """One row (the engine's case): the slots move by plain copies in the kernels' module, the same as indexing."""
    cache = KVCache(1, 24, [(3, 8)] * 4)
    g = torch.Generator().manual_seed(0)
    for t in (*cache.k, *cache.v):
        t.copy_(torch.randn(t.shape, generator=g))
    before = [t.clone() for t in (*cache.k, *cache.v)]
    cache.keep_path(torch.tensor([10]), torch.tensor([[2, 3, 6, 9]]), torch.tensor([4]))  # 12, 13, 16, 19 -> 11..14
    for t, t0 in zip((*cache.k, *cache.v), before, strict=True):
        assert torch.equal(t[0, :, 11:15], t0[0, :, [12, 13, 16, 19]])
        assert torch.equal(t[0, :, :11], t0[0, :, :11]) and torch.equal(t[0, :, 15:], t0[0, :, 15:])


def test_verify_tree_walks_the_targets_picks():
    drafts = torch.tensor([[5, 6, 7, 8, 9, 3]])  # nodes 0..5 (inputs 1..6) of TREE
    parents = TREE[:, 1:] - 1  # [-1, -1, 0, 0, 1, 3]
    # by input: the root picks 6 (node 1, the second child); node 1 picks 3, but its only child (node 4) is 9
    choice = torch.tensor([[6, 0, 3, 0, 0, 0, 4]])
    tokens, num, path = verify_tree(choice, drafts, parents, torch.tensor([6]))
    assert num.tolist() == [1] and path[0, :1].tolist() == [1] and tokens[0, :2].tolist() == [6, 3]
    # node 0 (token 5) picked at the root, node 3 (token 8) after it, node 5 (token 3) after that, then 7 (bonus)
    tokens, num, path = verify_tree(torch.tensor([[5, 8, 0, 0, 3, 0, 7]]), drafts, parents, torch.tensor([6]))
    assert num.tolist() == [3] and path[0, :3].tolist() == [0, 3, 5] and tokens[0, :4].tolist() == [5, 8, 3, 7]
    # the same tree with node 5 not valid (num_drafts 5): the walk stops at node 3, whose pick (3) is the bonus
    tokens, num, path = verify_tree(torch.tensor([[5, 8, 0, 0, 3, 0, 7]]), drafts, parents, torch.tensor([5]))
    assert num.tolist() == [2] and tokens[0, :3].tolist() == [5, 8, 3]
    chain = chain_parents(1, 3)
    logits = torch.nn.functional.one_hot(torch.tensor([[4, 5, 9, 2]]), 10).float()
    d = torch.tensor([[4, 5, 1]])
    t1, n1 = verify_greedy(logits.argmax(-1), d, torch.tensor([3]))
    t2, n2, p2 = verify_tree(logits.argmax(-1), d, chain, torch.tensor([3]))
    assert n1.tolist() == n2.tolist() == [2] and t1[0, :3].tolist() == t2[0, :3].tolist() == [4, 5, 9]


def test_verify_tree_accepts_one_of_equal_siblings():
    drafts, parents = torch.tensor([[4, 4, 7]]), torch.tensor([[-1, -1, 1]])
    tokens, num, path = verify_tree(torch.tensor([[4, 9, 7, 0]]), drafts, parents, torch.tensor([3]))
    assert num.tolist() == [1] and path[0, 0].item() == 0 and tokens[0, :2].tolist() == [4, 9]


def test_greedy_walk_verifies_as_every_pick_does():
    """Picks taken only at the root and at accepted nodes (one call a depth) give chains and trees the same accepted
    drafts and emitted tokens as the picks at every node, in 1 + (most accepted) calls; untaken picks are -1."""
    g = torch.Generator().manual_seed(5)
    for trial in range(300):
        b, n = 3, 7
        full = torch.randint(0, 3, (b, n + 1), generator=g)  # the target's pick at every input (3 tokens: many hits)
        hidden = torch.stack(torch.meshgrid(torch.arange(b), torch.arange(n + 1), indexing="ij"), -1).float()
        drafts = torch.randint(0, 3, (b, n), generator=g)
        num = torch.randint(0, n + 1, (b,), generator=g)
        looked = []

        def greedy(h: torch.Tensor, full=full, looked=looked) -> torch.Tensor:  # h [K, 2]: (row, input) -> pick
            looked.append(h.shape[0])
            return full[h[:, 0].long(), h[:, 1].long()]

        if trial % 2:  # a tree: each node's parent an earlier node or the root
            parents = torch.stack([torch.randint(-1, max(j, 0), (b,), generator=g) if j else torch.full((b,), -1)
                                   for j in range(n)], 1)
            picks, calls = greedy_walk(greedy, hidden, drafts, parents, num)
            want, got = verify_tree(full, drafts, parents, num), verify_tree(picks, drafts, parents, num)
            assert all(torch.equal(x, y) for x, y in zip(want, got, strict=True)), trial
            accepted = want[1]
        else:
            picks, calls = greedy_walk(greedy, hidden, drafts, None, num)
            (tok_w, acc_w), (tok_g, acc_g) = verify_greedy(full, drafts, num), verify_greedy(picks, drafts, num)
            assert torch.equal(acc_w, acc_g), trial
            for r in range(b):
                assert torch.equal(tok_w[r, : acc_w[r] + 1], tok_g[r, : acc_g[r] + 1]), trial
            accepted = acc_w
        assert calls == len(looked) == 1 + int(accepted.max()), trial
        assert sum(looked) == b + int(accepted.sum())  # one pick per row at the root and at each accepted node
        assert int((picks >= 0).sum()) == sum(looked)  # and no other
