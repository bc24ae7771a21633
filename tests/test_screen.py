"""The screened head (screen.py): greedy tokens through a q8 copy of a dense fp32 head are the full head's argmax,
bit for bit: near-ties the q8 copy cannot tell apart, exact ties (the first index), more rows left than the
screen keeps, non-finite inputs; and the engine's greedy output is the same with and without it."""

from __future__ import annotations

import pytest
import torch

from specmtp import Engine, load_model, quant, screen
from specmtp.quant import _qkernels
from specmtp.sampling import argmax

pytestmark = pytest.mark.skipif(not quant.dense_kernel(), reason="no dense kernel on this CPU")


def supported(isa: str) -> bool:
    return isa in _qkernels.info()["available"]


def full_argmax(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return argmax(quant.sgemm(x, w, None))


def near_ties(k: int = 96, v: int = 700, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A head whose best rows differ by less than q8 resolves (each a copy of row 0 nudged by ~1e-6 of its scale),
    and tokens pointing at them: the q8 logits of those rows rank them wrongly about half the time."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, k, generator=g) * 0.05
    w[1:40] = w[0] + torch.randn(39, k, generator=g) * 1e-4
    x = w[0] * 40 + torch.randn(32, k, generator=g) * 0.3
    return w.contiguous(), x.contiguous()


@pytest.mark.parametrize("isa", ["best", "avx2", "scalar"])
def test_screen_is_the_full_heads_argmax_on_near_ties(isa):
    """The q8 logits come from the screen's own VNNI product where the CPU has it, else from the q8 kernel (or, for
    a screen built for VNNI, a plain product of its layout)."""
    if isa != "best" and not supported(isa):
        pytest.skip(f"no {isa} path here")
    w, x = near_ties()
    sc = screen.build(w)  # where VNNI is, its q8 rows in the VNNI product's layout (read without it too)
    _qkernels.set_isa(isa)
    try:
        own = screen.build(w)  # built for the ISA it runs on
        assert own.pairs == (_qkernels.info()["isa"] == "vnni")
        want = full_argmax(x, w)  # (the scalar path's fp32 sums round differently: its own full product)
        for s in (sc, own):
            for t in (1, 2, 5, 8, 16):
                for i in range(0, 32, t):
                    assert torch.equal(s.argmax(x[i : i + t]), want[i : i + t]), (t, i)
    finally:
        _qkernels.set_isa("best")
    assert sc.full_rows == 0 and own.full_rows == 0  # a few rows left each time, never the whole head
    values, scales, _ = quant.quantize_rows(w, 8)
    approx = argmax(quant.qlinear(x, quant.pack(8, values, scales, None)))
    assert not torch.equal(approx, want)  # the q8 copy alone gets some of them wrong
    loose = screen.HeadScreen(sc.weight, sc.qs, sc.d, sc.sums, torch.zeros_like(sc.alpha), torch.zeros_like(sc.beta),
                              0.0, sc.pairs)
    assert not torch.equal(loose.argmax(x), want)  # so the screen's bound is what makes it exact


@pytest.mark.parametrize("k", [64, 576])
def test_screen_matches_random_heads(k):
    g = torch.Generator().manual_seed(k)
    w = torch.randn(3001, k, generator=g) * 0.05
    x = torch.randn(40, k, generator=g) * 2
    sc = screen.build(w)
    want = full_argmax(x, w)
    for t in (1, 3, 4, 9, 16, 40):
        assert torch.equal(torch.cat([sc.argmax(x[i : i + t]) for i in range(0, 40, t)]), want), t


def test_screen_ties_overflow_and_non_finite_take_the_first_largest():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2000, 64, generator=g) * 0.05
    w[1200] = w[900]  # an exact tie: the first index wins
    w[1000:1300] = w[7]  # 300 copies of row 7 (more rows than the screen keeps): the full product
    x = torch.randn(6, 64, generator=g)
    x[1] = w[900] * 50
    x[2] = w[7] * 50
    x[3, 5] = float("nan")
    sc = screen.build(w.contiguous())
    got = sc.argmax(x)
    assert torch.equal(got, full_argmax(x, w))
    assert int(got[2]) == 7
    assert sc.full_rows == 2  # the 300-way tie and the NaN row
    w[1200] = w[900] = w[1]
    assert int(screen.build(w.contiguous()).argmax(w[1][None] * 50)) == 1


def test_screen_refuses_what_it_cannot_bound():
    assert screen.build(torch.randn(100, 48)) is None  # not a multiple of 32
    bad = torch.randn(100, 64)
    bad[3, 3] = float("inf")
    assert screen.build(bad) is None
    assert screen.build(torch.randn(100, 64, dtype=torch.float64)) is None


def test_engine_greedy_output_is_the_same_with_and_without_the_screen(tiny_dir):
    target = load_model(str(tiny_dir("llama", num_hidden_layers=2)))
    model = target.model
    assert model.head_screen is not None and model.head_screen.weight is model.head_weight
    prompts = ["abcabcabcabc", "hello world, hello world, hello"]
    with_screen = [c.tokens for c in Engine(target).generate(prompts, max_new_tokens=24)]
    rows = model.head_screen.rows
    assert rows > 0  # it served those steps
    saved, model.head_screen = model.head_screen, None
    try:
        without = [c.tokens for c in Engine(target).generate(prompts, max_new_tokens=24)]
    finally:
        model.head_screen = saved
    assert with_screen == without
    h = torch.randn(2, 5, model.cfg.hidden_size)
    assert torch.equal(model.greedy(h), argmax(model.logits(h)))
