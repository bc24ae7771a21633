"""Quantized weights: kernel correctness against the dequantized fp32 reference, exact batch invariance, and a
quantized model whose speculative output equals its own target-only output."""

from __future__ import annotations

import pytest
import torch
from conftest import prefilled_pair

from specmtp import Engine, load_model
from specmtp.drafters import DraftModelDrafter, NgramDrafter
from specmtp.errors import SpecMTPError
from specmtp.model import INVARIANT_MAX_T
from specmtp.quant import (
    _qkernels,
    available,
    dense_kernel,
    dequantize,
    pack,
    qlinear,
    quantize,
    quantize_model,
    select_rows,
    sgemm,
    unpack,
)

pytestmark = pytest.mark.skipif(not available(), reason="quantized kernels not built")

# Stated bounds. Weights: q8 rounds to 1/254 of a block's max |w|, q4 to 1/30 of its range (fp16 scales add
# ~1e-3). Products: activations are quantized to int8 per block of 32, so the kernel's result is within
# 1 % (relative Frobenius norm) of x @ dequantize(W).T for either format.
PRODUCT_RTOL = 1e-2


ISAS = ["scalar", "avx2", "vnni", "neon"]


def supported(isa: str) -> bool:
    return available() and isa in _qkernels.info()["available"]


@pytest.fixture(params=ISAS)
def path(request):
    if not supported(request.param):
        pytest.skip(f"this CPU has no {request.param}")
    _qkernels.set_isa(request.param)
    yield request.param
    _qkernels.set_isa("best")


@pytest.mark.parametrize("fmt", ["q8", "q4"])
@pytest.mark.parametrize("rows", [48, 45])  # rows are stored in groups of 8; a partial last group is padded
def test_quantize_round_trip(fmt, rows):
    w = torch.randn(rows, 32 * 7, generator=torch.Generator().manual_seed(0))
    back = dequantize(quantize(w, fmt))
    assert back.shape == w.shape
    blocks, err = w.reshape(rows, 7, 32), (back - w).abs().reshape(rows, 7, 32)
    if fmt == "q8":
        bound = blocks.abs().amax(-1, keepdim=True) / 254 * 1.01 + 1e-6
    else:
        bound = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / 30 * 1.05 + 2e-3
    assert (err <= bound).all()


@pytest.mark.parametrize("fmt", ["q8", "q4"])
@pytest.mark.parametrize("tokens", [1, 3, 6, 16, 37])
@pytest.mark.parametrize("n", [200, 203])  # whole row groups of 8; a partial last group
def test_kernel_matches_dequantized_reference(fmt, tokens, n, path):
    g = torch.Generator().manual_seed(tokens)
    w, x = torch.randn(n, 352, generator=g), torch.randn(tokens, 352, generator=g)
    bias = torch.randn(n, generator=g)
    qw = quantize(w, fmt)
    ref = x @ dequantize(qw).T + bias
    y = qlinear(x, qw, bias)
    assert y.shape == (tokens, n)
    assert (y - ref).norm() / ref.norm() < PRODUCT_RTOL


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_batch_invariance_is_exact(fmt, path):
    g = torch.Generator().manual_seed(1)
    qw = quantize(torch.randn(520, 640, generator=g), fmt)  # large enough to use every thread
    x = torch.randn(16, 640, generator=g)
    alone = torch.cat([qlinear(x[t : t + 1], qw) for t in range(16)])
    for n in (2, 4, 5, 8, 16):
        assert torch.equal(qlinear(x[:n], qw), alone[:n]), n


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_code_paths_agree_bit_for_bit(fmt, path):
    """Every path computes the same exact integer block dots and then the same float operations in the same order:
    identical results, so a model's output does not depend on which path the CPU has."""
    g = torch.Generator().manual_seed(2)
    qw = quantize(torch.randn(133, 1056, generator=g), fmt)  # 33 blocks, 17 row groups (the last one partial)
    x, bias = torch.randn(11, 1056, generator=g), torch.randn(133, generator=g)
    y = qlinear(x, qw, bias)
    _qkernels.set_isa("scalar")
    assert torch.equal(y, qlinear(x, qw, bias))


@pytest.mark.parametrize("fmt", ["q8", "q4", "dense"])
def test_pre_ops_agree_bit_for_bit(fmt, path):
    """SwiGLU's e^x is the kernel's own and RMSNorm's sum of squares runs in 8 lanes, the same operations in the
    same order on every path: the same bits, so the blocks quantized after them (and a model's output) do not depend
    on the CPU. Gate values span e^x's clamps (|x| past 87) and a NaN-free wide range."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(96, 128, generator=g)
    qw = w if fmt == "dense" else quantize(w, fmt)
    if fmt == "dense" and (not supported("avx2") or path == "scalar"):
        pytest.skip("specmtp's fp32 products are its own (the same bits on every vector path) only with AVX2")
    gate_up = torch.randn(7, 256, generator=g) * 6
    gate_up[0, :8] = torch.tensor([-100.0, -88.5, -87.5, -1e-3, 0.0, 87.5, 88.5, 100.0])
    x, norm = torch.randn(7, 128, generator=g) * 3, torch.rand(128, generator=g) + 0.5
    y = qlinear(gate_up, qw, pre="swiglu")
    yn = qlinear(x, qw, pre="rms_norm", norm=norm, eps=1e-6)
    _qkernels.set_isa("avx2" if fmt == "dense" else "scalar")
    assert torch.equal(y, qlinear(gate_up, qw, pre="swiglu"))
    assert torch.equal(yn, qlinear(x, qw, pre="rms_norm", norm=norm, eps=1e-6))


def test_swiglu_exp_is_accurate():
    """The kernel's SwiGLU (through an identity weight, whose product is exact) within 2 ulp of silu(g) * u."""
    if not dense_kernel():
        pytest.skip("specmtp's fp32 kernel has no vector path on this CPU")
    g = torch.cat([torch.linspace(-80, 80, 8192), torch.randn(8192, generator=torch.Generator().manual_seed(5)) * 5])
    gate, up = g.view(-1, 128), torch.rand(128, 128, generator=torch.Generator().manual_seed(6)) + 0.5
    y = qlinear(torch.cat([gate, up], 1), torch.eye(128), pre="swiglu").double()
    ref = gate.double() * torch.sigmoid(gate.double()) * up.double()
    assert ((y - ref).abs() / ref.abs().clamp(min=1e-30)).max() < 2 * 2.0**-23


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_interleaved_layout_round_trips_and_selects_rows(fmt):
    g = torch.Generator().manual_seed(3)
    qw = quantize(torch.randn(21, 96, generator=g), fmt)
    q, d, m = unpack(qw)
    assert q.shape == (21, 3, 32) and d.shape == (21, 3)
    again = pack(qw.fmt, q, d, m)
    assert torch.equal(again.qs, qw.qs) and torch.equal(again.d, qw.d)
    rows = torch.tensor([20, 3, 7, 8])
    assert torch.equal(dequantize(select_rows(qw, rows)), dequantize(qw)[rows])


def test_unsupported_code_path_is_refused():
    with pytest.raises(ValueError, match="not known or not supported"):
        _qkernels.set_isa("sse9")


def test_bad_shapes_are_refused():
    with pytest.raises(SpecMTPError, match="multiple of 32"):
        quantize(torch.randn(4, 40), "q4")
    with pytest.raises(SpecMTPError, match="unknown weight format"):
        quantize(torch.randn(4, 64), "q3")


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_quantized_model_speculative_equals_target_only(tiny_dir, fmt):
    target = load_model(str(tiny_dir("llama", num_hidden_layers=2)))
    dense = Engine(target).generate(["hello world, hello"], max_new_tokens=16)[0].tokens
    nbytes = quantize_model(target.model, fmt)
    assert nbytes > 0 and target.model.head_q is not None
    assert all(m.weight.numel() == 0 for m in target.model.layers[0].modules() if hasattr(m, "qweight")
               and m.qweight is not None)
    prompts = ["abcabcabcabc", "hello world, hello world, hello", "the cat sat on the mat and the cat"]
    base = [c.tokens for c in Engine(target).generate(prompts, max_new_tokens=20)]
    for drafter in (NgramDrafter(), DraftModelDrafter(target.model, target.tokenizer.vocab, "self")):
        for n in (1, 4, 8):
            spec = Engine(target, drafter, n).generate(prompts, max_new_tokens=20)
            assert [c.tokens for c in spec] == base
    assert len(dense) == 16  # the dense model ran before quantization


@pytest.mark.parametrize("family,weights", [("llama", "q4"), ("qwen2", "q4"), ("gemma3", "q4"), ("llama", "dense"),
                                            ("qwen2", "dense")])
def test_forward_is_bit_identical_in_one_call_or_token_by_token(tiny_dir, family, weights):
    """What makes speculative output exact: a verify pass over T tokens gives each token the very logits a
    one-token step gives it (kernels and attention alike), with quantized weights and with dense fp32 ones
    (Llama/Qwen2 layers: specmtp's fp32 kernel and its attention kernel)."""
    if weights == "dense" and not dense_kernel():
        pytest.skip("specmtp's fp32 kernel needs AVX2")
    target = load_model(str(tiny_dir(family)))
    model = target.model
    if weights == "dense":
        assert all(layer.fused_attention for layer in model.layers)
    else:
        quantize_model(model, "q4")
    caches, block = prefilled_pair(model)
    together = model.logits(model(block, torch.arange(40, 47)[None], caches[0]))
    alone = torch.cat([model.logits(model(block[:, i : i + 1], torch.tensor([[40 + i]]), caches[1]))
                       for i in range(7)], dim=1)
    assert torch.equal(together, alone)


@pytest.mark.parametrize("weights", ["q4", "dense"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prefill_through_the_stack_is_token_by_token(tiny_dir, family, weights):
    """A prefill of one row runs as the stack's kernel calls in pieces of INVARIANT_MAX_T tokens (dense fp32 weights
    too, outside autograd): every token's hidden state, tapped features and K/V are those of one-token steps."""
    needs_dense_kernel(weights)
    model = load_model(str(tiny_dir(family)), weights=weights).model
    assert model.stack is not None
    n, taps = INVARIANT_MAX_T + 9, (0,)  # two pieces
    tokens = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(1))
    caches = [model.new_cache(1, n + 4) for _ in range(2)]
    with torch.inference_mode():
        hidden, tapped = model.features(tokens, torch.arange(n)[None], caches[0], taps)
        steps = [model.features(tokens[:, i : i + 1], torch.tensor([[i]]), caches[1], taps) for i in range(n)]
    assert torch.equal(hidden, torch.cat([h for h, _ in steps], 1))
    assert torch.equal(tapped, torch.cat([t for _, t in steps], 1))
    a, b = caches
    assert all(torch.equal(x[:, :, :n], y[:, :, :n]) for x, y in zip(a.k + a.v, b.k + b.v, strict=True))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_loader_quantizes_each_layer_as_it_reads(tiny_dir, family):
    """--weights q4 quantizes tensor by tensor while reading the checkpoint (the dense model never exists), with
    the very weights quantize_model would give the dense model, and keeps no tensor of the mapped file."""
    path = str(tiny_dir(family))
    streamed = load_model(path, weights="q4").model
    dense = load_model(path).model
    quantize_model(dense, "q4")
    for (name, a), b in zip(streamed.named_modules(), dense.modules(), strict=True):
        if getattr(a, "qweight", None) is not None:
            assert a.weight.numel() == 0, name
            assert torch.equal(a.qweight.qs, b.qweight.qs) and torch.equal(a.qweight.d, b.qweight.d), name
    assert torch.equal(streamed.head_q.qs, dense.head_q.qs)
    tokens = torch.randint(0, 256, (1, 12))
    out = [m.logits(m(tokens, torch.arange(12)[None], m.new_cache(1, 16))) for m in (streamed, dense)]
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("d,slots,pos0", [(16, 32, 11), (128, 96, 70)])  # short; two 64-dim output chunks, 74 slots
@pytest.mark.parametrize("window", [None, 5])
def test_fused_attention_matches_reference(path, window, d, slots, pos0):
    """quant.attend (RoPE, cache write, attention of one row's new tokens) against rope + SDPA over the slots each
    query may see; and each token's output is the same computed alone or with the others (batch invariance)."""
    from specmtp.model import apply_rope, rope_cos_sin
    from specmtp.quant import attend

    g = torch.Generator().manual_seed(0)
    hq, hkv, t = 6, 2, 4
    qkv = torch.randn(1, t, (hq + 2 * hkv) * d, generator=g)
    cache = [torch.randn(1, hkv, slots, d, generator=g) for _ in range(2)]
    cos, sin = rope_cos_sin(1.0 / (10000 ** (torch.arange(0, d, 2) / d)), torch.arange(pos0, pos0 + t)[None])
    ref_k, ref_v = cache[0].clone(), cache[1].clone()
    q = apply_rope(qkv[..., : hq * d].view(1, t, hq, d), cos, sin)
    k = apply_rope(qkv[..., hq * d : (hq + hkv) * d].view(1, t, hkv, d), cos, sin)
    ref_k[0, :, pos0 : pos0 + t] = k[0].transpose(0, 1)
    ref_v[0, :, pos0 : pos0 + t] = qkv[..., (hq + hkv) * d :].view(1, t, hkv, d)[0].transpose(0, 1)
    ref = []
    for i in range(t):
        p = pos0 + i
        lo = max(0, p - window + 1) if window else 0
        ref.append(torch.nn.functional.scaled_dot_product_attention(
            q[:, i : i + 1].transpose(1, 2), ref_k[:, :, lo : p + 1], ref_v[:, :, lo : p + 1], scale=0.3,
            enable_gqa=True).transpose(1, 2).reshape(1, 1, hq * d))
    kc, vc = cache[0].clone(), cache[1].clone()
    out = attend(qkv.clone(), pos0, cos, sin, kc, vc, hq, window, 0.3)
    assert torch.allclose(out, torch.cat(ref, 1), atol=1e-5)
    assert torch.allclose(kc, ref_k, atol=1e-6) and torch.equal(vc, ref_v)
    for i in range(t):  # token by token, as decode steps: the same bits
        one = attend(qkv[:, i : i + 1].clone(), pos0 + i, cos[:, i : i + 1].contiguous(),
                     sin[:, i : i + 1].contiguous(), kc, vc, hq, window, 0.3)
        assert torch.equal(one[0, 0], out[0, i]), i


@pytest.mark.parametrize("hq,hkv", [(9, 3), (12, 2), (8, 2)])  # 3, 6 and 4 query heads a KV head
@pytest.mark.parametrize("window", [None, 37])
def test_fused_tree_attention_matches_its_paths(path, hq, hkv, window):
    """A draft tree's queries, attended in groups that share a KV head's blocks of slots, against SDPA over the slots
    each may see; and each is the same bits as the last token of its own path run as a chain (what decode steps
    along the accepted path compute). 150 slots before the tree: blocks of 64, a last one not a multiple of 4."""
    from specmtp.model import apply_rope, rope_cos_sin
    from specmtp.quant import attend
    from specmtp.tree import depths

    g = torch.Generator().manual_seed(1)
    d, slots, pos0 = 64, 192, 150
    parents = torch.tensor([-1, 0, 0, 0, 1, 1, 2, 4, 7, 3, 9])  # 11 tokens, depths up to 4
    t = parents.shape[0]
    depth = depths(parents[None])[0]
    qkv = torch.randn(1, t, (hq + 2 * hkv) * d, generator=g)
    cache = [torch.randn(1, hkv, slots, d, generator=g) for _ in range(2)]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2) / d))
    cos, sin = rope_cos_sin(inv_freq, (pos0 + depth)[None])
    kc, vc = cache[0].clone(), cache[1].clone()
    out = attend(qkv.clone(), pos0, cos, sin, kc, vc, hq, window, 0.125, parents)
    q = apply_rope(qkv[..., : hq * d].view(1, t, hq, d), cos, sin)
    k = apply_rope(qkv[..., hq * d : (hq + hkv) * d].view(1, t, hkv, d), cos, sin)
    v = qkv[..., (hq + hkv) * d :].view(1, t, hkv, d)
    for i in range(t):
        chain = [i]
        while parents[chain[-1]] >= 0:
            chain.append(int(parents[chain[-1]]))
        chain.reverse()  # root first
        p = pos0 + int(depth[i])
        lo = max(0, p - window + 1) if window else 0
        keys = torch.cat([cache[0][0, :, lo:pos0], k[0, chain].transpose(0, 1)], 1)[:, -(p + 1 - lo):]
        values = torch.cat([cache[1][0, :, lo:pos0], v[0, chain].transpose(0, 1)], 1)[:, -(p + 1 - lo):]
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[:, i : i + 1].transpose(1, 2), keys[None], values[None], scale=0.125, enable_gqa=True)
        assert torch.allclose(out[0, i], ref.transpose(1, 2).reshape(hq * d), atol=1e-5), i
        ck, cv = cache[0].clone(), cache[1].clone()  # the path as a chain of decode steps' inputs
        c_cos, c_sin = rope_cos_sin(inv_freq, torch.arange(pos0, p + 1)[None])
        alone = attend(qkv[:, chain].clone(), pos0, c_cos, c_sin, ck, cv, hq, window, 0.125)
        assert torch.equal(alone[0, -1], out[0, i]), i


def needs_dense_kernel(weights: str) -> None:
    if weights == "dense" and not dense_kernel():
        pytest.skip("specmtp's fp32 kernel has no vector path on this CPU: dense layers are not fused")


@pytest.mark.parametrize("weights", ["q4", "dense"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_layers_match_unfused(tiny_dir, family, weights):
    needs_dense_kernel(weights)
    model = load_model(str(tiny_dir(family)), weights=weights).model
    assert all(layer.fused_attention and layer.fused for layer in model.layers)
    tokens = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    outs = []
    stack = model.stack
    for fused in (True, False):
        for layer in model.layers:
            layer.fused_attention = layer.fused = fused
        model.stack = stack if fused else None
        cache = model.new_cache(1, 40)
        prefix = model(tokens[:, :24], torch.arange(24)[None], cache)
        step = model(tokens[:, 24:], torch.arange(24, 30)[None], cache)  # a verify-sized pass
        outs.append(torch.cat([prefix, step], 1))
    # equal to rounding; a rounding difference can move an activation across an int8 step, hence the norm bound
    assert (outs[0] - outs[1]).norm() / outs[1].norm() < (PRODUCT_RTOL if weights == "q4" else 1e-5)


@pytest.mark.parametrize("weights", ["q4", "dense"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_layer_stack_in_one_call_is_bit_identical_to_layer_by_layer(tiny_dir, family, weights):
    """Plain quantized or dense fp32 layers run as one kernel call per forward (quant.run_stack) with the very
    results of one Python call per layer: prefill, a step and a verify-sized pass, hidden states and cache alike."""
    needs_dense_kernel(weights)
    model = load_model(str(tiny_dir(family)), weights=weights).model
    assert model.stack is not None and model.stack.shape[0] == len(model.layers)
    tokens = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    runs = []
    for stack in (model.stack, None):
        model.stack = stack
        cache = model.new_cache(1, 40)
        out = [model(tokens[:, :20], torch.arange(20)[None], cache),
               model(tokens[:, 20:21], torch.tensor([[20]]), cache),
               model(tokens[:, 21:26], torch.arange(21, 26)[None], cache)]
        runs.append((out, cache))
    (a, ca), (b, cb) = runs
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(torch.equal(x[:, :, :26], y[:, :, :26]) for x, y in zip(ca.k + ca.v, cb.k + cb.v, strict=True))


@pytest.mark.parametrize("weights", ["q4", "dense"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_batched_decode_step_through_the_stack_is_row_by_row(tiny_dir, family, weights):
    """A batched decode step (rows of one token each at their own positions: batched generation, the training data's
    answering) runs as one stack call (quant.run_stack_rows): each row's hidden state, tapped features and K/V are
    those of a one-row step over that row's cache alone, bit for bit."""
    needs_dense_kernel(weights)
    model = load_model(str(tiny_dir(family)), weights=weights).model
    g = torch.Generator().manual_seed(2)
    lengths, taps = [5, 17, 11], (0,)
    prompts = [torch.randint(0, 256, (1, n), generator=g) for n in lengths]
    nxt = torch.randint(0, 256, (len(lengths), 1), generator=g)
    batch = model.new_cache(len(lengths), 24)
    alone = [model.new_cache(1, 24) for _ in lengths]
    with torch.inference_mode():
        for r, p in enumerate(prompts):  # each row prefilled on its own, into both caches
            for cache in (batch.row(r), alone[r]):
                model.features(p, torch.arange(p.shape[1])[None], cache)
        pos = torch.tensor(lengths)[:, None]
        hidden, tapped = model.features(nxt, pos, batch, taps)
        steps = [model.features(nxt[r : r + 1], pos[r : r + 1], alone[r], taps) for r in range(len(lengths))]
    assert torch.equal(hidden, torch.cat([h for h, _ in steps]))
    assert torch.equal(tapped, torch.cat([t for _, t in steps]))
    for r, n in enumerate(lengths):
        for x, y in zip(batch.k + batch.v, alone[r].k + alone[r].v, strict=True):
            assert torch.equal(x[r, :, : n + 1], y[0, :, : n + 1])


def test_layer_stack_only_for_plain_layers(tiny_dir):
    assert load_model(str(tiny_dir("gemma3")), weights="q4").model.stack is None  # sandwich norms, q/k norms
    assert load_model(str(tiny_dir("gemma3"))).model.stack is None
    assert load_model(str(tiny_dir("llama")), dtype="bf16").model.stack is None  # the fp32 kernel's weights only
    assert (load_model(str(tiny_dir("llama"))).model.stack is not None) == dense_kernel()


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_kernel_pre_ops_and_residual(fmt, path):
    """The kernel's RMSNorm / SwiGLU of each token before quantizing it, and the residual added to the result."""
    g = torch.Generator().manual_seed(3)
    qw = quantize(torch.randn(96, 128, generator=g), fmt)
    check_pre_ops_and_residual(qw, g, PRODUCT_RTOL)


def test_dense_kernel_pre_ops_and_residual():
    """The same calls with a dense fp32 weight (a dense plain layer's fused path): the products through sgemm's kernel,
    bit for bit, after the same pre-ops."""
    if not dense_kernel():
        pytest.skip("specmtp's fp32 kernel has no vector path on this CPU")
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 128, generator=g)
    check_pre_ops_and_residual(w, g, 1e-6)
    x, b = torch.randn(5, 128, generator=g), torch.randn(96, generator=g)
    assert torch.equal(qlinear(x, w, b), sgemm(x, w, b))


def check_pre_ops_and_residual(qw, g, rtol):
    x, norm, res = torch.randn(5, 128, generator=g), torch.rand(128, generator=g) + 0.5, torch.randn(5, 96, generator=g)
    ref = qlinear(torch.nn.functional.rms_norm(x, (128,), norm, 1e-6), qw)
    y = qlinear(x, qw, pre="rms_norm", norm=norm, eps=1e-6)
    assert (y - ref).norm() / ref.norm() < rtol
    gate_up = torch.randn(5, 256, generator=g)
    ref = qlinear(torch.nn.functional.silu(gate_up[:, :128]) * gate_up[:, 128:], qw)
    y = qlinear(gate_up, qw, pre="swiglu")
    assert (y - ref).norm() / ref.norm() < rtol
    assert torch.equal(qlinear(x, qw, residual=res), qlinear(x, qw) + res)
    assert torch.equal(qlinear(x, qw, pre="rms_norm", norm=norm, eps=1e-6)[2:3],
                       qlinear(x[2:3], qw, pre="rms_norm", norm=norm, eps=1e-6))  # per token: batch-invariant
    taps = (x * torch.tensor([3.0, 0.2]).repeat_interleave(64)).view(5, 2, 64)  # two parts of 64 normed on their
    # own (far from unit RMS) and scaled, then a part left as it is
    tap_norm, hidden = torch.rand(2, 64, generator=g) + 0.5, torch.randn(5, 64, generator=g)
    normed = torch.nn.functional.rms_norm(taps, (64,), None, 1e-6) * tap_norm
    w3 = torch.cat([qw if isinstance(qw, torch.Tensor) else dequantize(qw), torch.randn(96, 64, generator=g)], 1)
    w3 = w3 if isinstance(qw, torch.Tensor) else quantize(w3, f"q{qw.fmt}")
    ref = qlinear(torch.cat([normed.flatten(1), hidden], 1), w3)
    y = qlinear(torch.cat([taps.flatten(1), hidden], 1), w3, pre="tap_norm", norm=tap_norm.flatten(), eps=1e-6,
                segment=64)
    assert (y - ref).norm() / ref.norm() < rtol
    with pytest.raises(ValueError, match="segment"):
        qlinear(torch.cat([x, hidden], 1), w3, pre="tap_norm", norm=tap_norm.flatten(), eps=1e-6, segment=48)


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_quantizing_in_slices_equals_quantizing_at_once(fmt, monkeypatch):
    import specmtp.quant as quant

    w = torch.randn(45, 96, generator=torch.Generator().manual_seed(4))
    whole = quantize(w, fmt)
    monkeypatch.setattr(quant, "ROWS_PER_CHUNK", 16)  # three slices of whole row groups, the last one partial
    sliced = quantize(w, fmt)
    assert sliced.shape == whole.shape and torch.equal(sliced.qs, whole.qs) and torch.equal(sliced.d, whole.d)
    assert torch.equal(dequantize(sliced), dequantize(whole))


# ---- the dense fp32 kernel for decode-sized products (linear.SMALL_ROWS rows or fewer) -------------------------
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8, 12])
@pytest.mark.parametrize("n,k", [(200, 352), (203, 353)])  # whole tiles; a partial last tile and a ragged tail
def test_dense_kernel_matches_matmul(tokens, n, k, path):
    g = torch.Generator().manual_seed(tokens * n)
    w, x, bias = torch.randn(n, k, generator=g), torch.randn(tokens, k, generator=g), torch.randn(n, generator=g)
    ref = x.double() @ w.double().T + bias.double()
    assert torch.allclose(sgemm(x, w, bias).double(), ref, rtol=0, atol=1e-4)
    assert torch.allclose(sgemm(x, w, None).double(), ref - bias.double(), rtol=0, atol=1e-4)


def test_dense_kernel_is_batch_invariant(path):
    """A verify pass of T tokens computes bit for bit what T one-token steps would."""
    g = torch.Generator().manual_seed(4)
    for k in (576, 353):  # 353: products past the last whole 8-float chunk
        w, x = torch.randn(1030, k, generator=g), torch.randn(41, k, generator=g)  # large enough to use every thread
        alone = torch.cat([sgemm(x[t : t + 1], w, None) for t in range(41)])
        # tiles of 2 and (with AVX-512) of 4, 8 and 16 tokens, spare ones included, and groups of both wide tiles
        for t in (2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 24, 25, 26, 30, 32, 41):
            assert torch.equal(sgemm(x[:t], w, None), alone[:t]), (k, t)


def test_dense_kernel_vector_paths_agree_bit_for_bit():
    if not (supported("avx2") and supported("vnni")):
        pytest.skip("needs both x86 vector paths")
    g = torch.Generator().manual_seed(6)
    w, x, bias = torch.randn(203, 353, generator=g), torch.randn(11, 353, generator=g), torch.randn(203, generator=g)
    _qkernels.set_isa("avx2")
    try:
        y = sgemm(x, w, bias)
    finally:
        _qkernels.set_isa("best")
    assert torch.equal(sgemm(x, w, bias), y)


def test_dense_kernel_tiles_agree_bit_for_bit():
    """1 to 4 tokens go through the narrow tiles or the 8-token one (spare tokens), 5 to 8 through the 8-token tile
    or the pair tile, whichever runs faster at the time (measured per weight shape); with AVX2 alone, the 4 x 2
    tile (narrow) or the 3-row tiles: all give the same bits, so the choice never changes an output."""
    if not (supported("vnni") or supported("avx2")):
        pytest.skip("the wide tiles need AVX2")
    g = torch.Generator().manual_seed(7)
    w, x = torch.randn(1030, 353, generator=g), torch.randn(8, 353, generator=g)  # every thread; a ragged tail
    counts = range(1, 9)
    out = {}
    try:
        for mode in ("narrow", "wide", "measured"):
            _qkernels.sgemm_tiles(mode)
            out[mode] = [sgemm(x[:t], w, None) for t in counts for _ in range(20)]
    finally:
        _qkernels.sgemm_tiles("measured")
    ref = x.double() @ w.double().T
    for i, t in enumerate(t for t in counts for _ in range(20)):
        assert torch.equal(out["narrow"][i], out["wide"][i]) and torch.equal(out["narrow"][i], out["measured"][i]), t
        assert torch.allclose(out["wide"][i].double(), ref[:t], rtol=0, atol=1e-3), t
        assert torch.equal(out["narrow"][i][:1], out["narrow"][0][:1])  # batch-invariant: token 0's row alone
    with pytest.raises(ValueError, match="unknown tile mode"):
        _qkernels.sgemm_tiles("fast")


def test_dense_kernel_thread_split_never_changes_bits(path):
    """The threads claim chunks of rows as they go (or take a fixed share each): every row, once, with the bits
    any split gives it, including a last chunk that is short and rows past the last whole tile."""
    g = torch.Generator().manual_seed(8)
    w, x = torch.randn(1030, 353, generator=g), torch.randn(17, 353, generator=g)
    ref = x.double() @ w.double().T
    out, before = {}, _qkernels.sgemm_chunks(0)
    try:
        for chunks in (0, 1, 6, 50):
            _qkernels.sgemm_chunks(chunks)
            out[chunks] = [sgemm(x[:t], w, None) for t in (1, 2, 4, 5, 8, 9, 17)]
    finally:
        _qkernels.sgemm_chunks(before)
    for chunks, ys in out.items():
        for y, y0 in zip(ys, out[0], strict=True):
            assert torch.equal(y, y0), chunks
            assert torch.allclose(y.double(), ref[: y.shape[0]], rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="chunks must be"):
        _qkernels.sgemm_chunks(-1)


def test_linear_gives_torch_its_threads_back_for_large_products():
    from specmtp import linear as L

    if not (L.quant.dense_kernel() and L._ONEDNN):
        pytest.skip("no vector path for the dense kernel on this CPU")
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(5)
        w, x = torch.randn(64, 96, generator=g), torch.randn(40, 96, generator=g)
        with torch.inference_mode():
            small = L.linear(x[:4], w)
            assert torch.get_num_threads() == 1  # our pool does the small products
            large = L.linear(x, w)
            assert torch.get_num_threads() == 2  # torch's pool the large ones
        assert torch.allclose(small, x[:4] @ w.T, atol=1e-4) and torch.allclose(large, x @ w.T, atol=1e-4)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("n", [1, 13, 32, 40, 1000, 49152])
def test_argmax_kernel_is_torch_argmax(n, path):
    """The greedy pick through the kernel: torch.argmax's index, the first of equal maxima, whatever the row length
    (32-lane chunks, then the tail) and code path."""
    from specmtp.sampling import argmax

    g = torch.Generator().manual_seed(n)
    x = torch.randn(7, n, generator=g)
    assert torch.equal(argmax(x), x.argmax(-1))
    ties = torch.randint(0, 3, (7, n), generator=g).float()  # many equal maxima per row
    assert torch.equal(argmax(ties), ties.argmax(-1))
    assert argmax(x[None]).shape == (1, 7)
