"""Quantized weights on the CPU: specmtp's q8 and q4 block formats and the linear op that reads them.

    q8: blocks of 32 weights per row, int8 values and an fp16 scale          w = d * q           1.06 bytes/weight
    q4: blocks of 32 weights per row, 4-bit values, fp16 scale and offset     w = d * q + m       0.63 bytes/weight

Rows are stored interleaved in groups of 8 (see _interleave), so that one 32-byte vector holds 4 consecutive
weights of each of 8 rows and one integer dot-product instruction advances 8 rows at once: a token's activations
are read as broadcast 4-byte words, and no horizontal sums are needed. A weight whose row count is not a multiple
of 8 is padded with zero rows that the kernels never write out.

The loader quantizes each linear layer's weight as it reads it from the checkpoint (`quantize_tensor`), so the
dense model never exists in memory; `quantize_model` then does the output head (and any model built dense) in
place. The model code does not change (`linear.Linear` and `linear.linear`
dispatch on the weight's type). The kernels (kernels/qkernels.c, built on install) quantize activations per
token to int8 and are batch-invariant: a token's result does not depend on how many tokens share the call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specmtp.errors import SpecMTPError

try:
    from specmtp import _qkernels
except ImportError as _e:  # built on install; absent only where no C compiler was available
    _qkernels = None
    _IMPORT_ERROR: str | None = str(_e)
else:
    _IMPORT_ERROR = None

QK = 32
FORMATS = {"q8": 8, "q4": 4}


@dataclass
class QuantWeight:
    fmt: int  # 8 or 4
    shape: tuple[int, int]  # (N out, K in)
    qs: torch.Tensor  # q8: int8 [N8, K/32, 8, 32]; q4: uint8 [N8, K/32, 4, 32] (N8 = ceil(N / 8) row groups)
    d: torch.Tensor  # fp16 [N8, K/32, 8]: the scale of row 8 g + r, block b at [g, b, r]
    m: torch.Tensor | None  # fp16 [N8, K/32, 8] (q4 only)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)


def available() -> bool:
    return _qkernels is not None


def require() -> None:
    if _qkernels is None:
        raise SpecMTPError(f"the quantized kernels are not built ({_IMPORT_ERROR}); reinstall specmtp with a C "
                           "compiler available (make clean && make test), or use --weights fp32")


_DENSE: bool | None = None


def dense_kernel() -> bool:
    """specmtp's fp32 kernel for decode-sized products is built and has its vector path (x86 AVX2) here."""
    global _DENSE
    if _DENSE is None:
        _DENSE = _qkernels is not None and _qkernels.info()["best"] in ("avx2", "vnni")
    return _DENSE


def sgemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: [T, K] fp32, w: [N, K] fp32 (contiguous), bias: [N] -> [T, N], on specmtp's thread pool. Every weight
    is read once for all T rows, and each output is the same sum in the same order whatever T (bit-identical
    to the one-row product)."""
    t, k = x.shape
    x = x.contiguous()
    bias = bias.contiguous() if bias is not None else None  # held here while the kernel reads it
    y = torch.empty(t, w.shape[0], dtype=torch.float32)
    _qkernels.sgemm(x.data_ptr(), t, k, w.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
                    w.shape[0])
    return y


ROWS_PER_CHUNK = 4096  # quantize() works through large matrices in slices (of whole row groups of 8), so its
# temporaries stay small


def quantize(w: torch.Tensor, fmt: str) -> QuantWeight:
    """w: [N, K] float -> QuantWeight (round to nearest; q4 spans each block's min..max)."""
    if fmt not in FORMATS:
        raise SpecMTPError(f"unknown weight format {fmt!r} (choose from {', '.join(FORMATS)})")
    n, k = w.shape
    if k % QK:
        raise SpecMTPError(f"cannot quantize a weight with {k} inputs: not a multiple of {QK}")
    bits = FORMATS[fmt]
    parts = [pack(bits, *quantize_rows(w[i : i + ROWS_PER_CHUNK], bits)) for i in range(0, n, ROWS_PER_CHUNK)]
    if len(parts) == 1:
        return parts[0]
    m = torch.cat([q.m for q in parts]) if parts[0].m is not None else None  # chunks are whole row groups
    return QuantWeight(bits, (n, k), torch.cat([q.qs for q in parts]), torch.cat([q.d for q in parts]), m)


def quantize_rows(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w: [n, K] -> values [n, K/32, 32], fp16 scales [n, K/32] (and q4's fp16 offsets)"""
    n, k = w.shape
    blocks = w.detach().float().reshape(n, k // QK, QK)
    if bits == 8:
        d = blocks.abs().amax(-1) / 127.0  # [N, B]
        d16 = d.half()
        inv = torch.where(d16.float() > 0, 1.0 / d16.float(), torch.zeros_like(d))
        return torch.round(blocks * inv[..., None]).clamp(-127, 127).to(torch.int8), d16, None
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    m16 = lo.half()
    d16 = ((hi - m16.float()) / 15.0).half()
    inv = torch.where(d16.float() > 0, 1.0 / d16.float(), torch.zeros_like(lo))
    q = torch.round((blocks - m16.float()[..., None]) * inv[..., None]).clamp(0, 15).to(torch.uint8)
    return q, d16, m16


def pack(fmt: int, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> QuantWeight:
    """Row-major values q [N, B, 32] (int8, or uint8 0..15 for q4), scales d [N, B] and offsets m [N, B] (fp16)
    -> the kernels' interleaved QuantWeight."""
    n, nb, _ = q.shape
    return QuantWeight(fmt, (n, nb * QK), _interleave(q, fmt), group_rows(d), group_rows(m) if m is not None else None)


def unpack(qw: QuantWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The inverse of pack: (q [N, B, 32], d [N, B], m [N, B] or None)."""
    n, k = qw.shape
    m = _ungroup(qw.m, n) if qw.m is not None else None
    return _deinterleave(qw.qs, n, k // QK, qw.fmt), _ungroup(qw.d, n), m


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    n = t.shape[0]
    if n % 8 == 0:
        return t
    return torch.cat([t, t.new_zeros((8 - n % 8, *t.shape[1:]))])


def group_rows(d: torch.Tensor) -> torch.Tensor:  # [N, B] -> [N8, B, 8]
    d = _pad_rows(d)
    return d.reshape(-1, 8, d.shape[1]).transpose(1, 2).contiguous()


def _ungroup(g: torch.Tensor, n: int) -> torch.Tensor:  # [N8, B, 8] -> [N, B]
    return g.transpose(1, 2).reshape(-1, g.shape[1])[:n].contiguous()


def _interleave(q: torch.Tensor, fmt: int) -> torch.Tensor:
    """q [N, B, 32] -> [N8, B, C, 32] with C = 8 (q8) or 4 (q4) chunks of 32 bytes per group of 8 rows and block.
    q8: byte 4 r + p of chunk c is element 4 c + p of row r. q4: byte 4 r + p of chunk c holds element 8 c + p of
    row r in its low nibble and element 8 c + 4 + p in its high one."""
    q = _pad_rows(q)
    n8, nb = q.shape[0] // 8, q.shape[1]
    words = q.reshape(n8, 8, nb, 8, 4).permute(0, 2, 3, 1, 4)  # [N8, B, 8 words, 8 rows, 4 bytes]
    if fmt == 8:
        return words.reshape(n8, nb, 8, QK).contiguous()
    pairs = words.reshape(n8, nb, 4, 2, 8, 4)  # word 2c (low nibbles) and 2c + 1 (high) of chunk c
    return (pairs[:, :, :, 0] | (pairs[:, :, :, 1] << 4)).reshape(n8, nb, 4, QK).contiguous()


def _deinterleave(qs: torch.Tensor, n: int, nb: int, fmt: int) -> torch.Tensor:  # -> [N, B, 32]
    n8 = qs.shape[0]
    if fmt == 8:
        words = qs.reshape(n8, nb, 8, 8, 4)
    else:
        c = qs.reshape(n8, nb, 4, 1, 8, 4)
        words = torch.cat([c & 0x0F, c >> 4], dim=3).reshape(n8, nb, 8, 8, 4)
    return words.permute(0, 3, 1, 2, 4).reshape(n8 * 8, nb, QK)[:n].contiguous()


def dequantize(qw: QuantWeight) -> torch.Tensor:
    """The fp32 weight a QuantWeight stands for (the reference the kernels are tested against)."""
    n, k = qw.shape
    q, d, m = unpack(qw)
    w = q.float() * d.float()[..., None]
    if m is not None:
        w = w + m.float()[..., None]
    return w.reshape(n, k)


PRE = {None: 0, "rms_norm": 1, "swiglu": 2, "tap_norm": 3}
DENSE_FORMAT = 32  # the kernels' format code for dense fp32 weights (FMT_F32)


def qlinear(
    x: torch.Tensor,  # [..., K] ([..., 2K] with pre="swiglu": gate then up)
    qw: QuantWeight | torch.Tensor,  # or a dense fp32 weight [N, K] (contiguous), through specmtp's fp32 kernel
    bias: torch.Tensor | None = None,
    pre: str | None = None,  # what the kernel applies to each token first: None, "rms_norm" (with norm, eps), "swiglu",
    # "tap_norm" (x: K / segment parts, each but the last RMS-normed on its own with its part of norm [K - segment])
    norm: torch.Tensor | None = None,  # [K] the RMSNorm weight
    eps: float = 0.0,
    residual: torch.Tensor | None = None,  # [..., N] added to the result
    segment: int = 0,  # tap_norm's part width (a multiple of 32)
) -> torch.Tensor:  # [..., N]
    """pre(x) @ W.T + bias + residual through the quantized kernels (fp32 in and out); a dense weight's product
    through `sgemm`'s kernel, after the same pre-op (so a dense plain layer runs as the same calls as a quantized
    one, and as one kernel call for the stack)."""
    require()
    n, k = qw.shape
    if isinstance(qw, torch.Tensor):
        fmt, ptrs = DENSE_FORMAT, (qw.data_ptr(), 0, 0)
    else:
        fmt, ptrs = qw.fmt, (qw.qs.data_ptr(), qw.d.data_ptr(), qw.m.data_ptr() if qw.m is not None else 0)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    b = bias.float().contiguous() if bias is not None else None
    if norm is not None:
        norm = norm.float().contiguous()
    r = residual.reshape(-1, n).float().contiguous() if residual is not None else None
    _qkernels.gemm(fmt, x2.data_ptr(), x2.shape[0], k, *ptrs, _ptr(b), y.data_ptr(), n, PRE[pre], _ptr(norm), eps,
                   _ptr(r), segment)
    return y.reshape(*shape[:-1], n)


def attend(
    qkv: torch.Tensor,  # [1, T, (Hq + 2 Hkv) D] fp32 contiguous: q, k, v of one row's new tokens (rotated in place)
    pos0: int,  # slot (and position) of the first of them; they fill slots pos0 .. pos0 + T - 1
    cos: torch.Tensor,  # [1, T, 1, D] fp32 contiguous
    sin: torch.Tensor,
    k_cache: torch.Tensor,  # [1, Hkv, S, D] fp32 contiguous: the layer's cache (written at pos0 .. pos0 + T - 1)
    v_cache: torch.Tensor,
    heads: int,
    window: int | None,
    scale: float,
    parents: torch.Tensor | None = None,  # [T] int64 contiguous: a draft tree (token 0 its root), None: a chain
) -> torch.Tensor:  # [1, T, Hq D]
    """Attention of one row's new tokens in the kernels' batch-invariant way: RoPE, cache write, and each query
    over exactly the slots a one-token step at its position reads (quantized mode's Llama/Qwen2 layers). In a tree,
    token i sits at position pos0 + depth(i) (cos/sin at it) and sees the slots before pos0 and its ancestors."""
    _, t, width = qkv.shape
    _, kv_heads, slots, d = k_cache.shape
    out = torch.empty(1, t, heads * d, dtype=torch.float32)
    _qkernels.attend(qkv.data_ptr(), t, heads, kv_heads, d, cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
                     v_cache.data_ptr(), slots, pos0, window or 0, scale, out.data_ptr(), _ptr(parents))
    return out


LAYER_FIELDS = 32  # int64 fields per layer in a stack descriptor (kernels/qkernels.c, LF_*)
ROPE_INDEX = {"full_attention": 0, "sliding_attention": 1}


def stack_descriptor(layers) -> torch.Tensor | None:
    """The kernels' description of a stack of plain layers (model.Layer with `fused` set: quantized, or dense fp32;
    fp32 norms), as int64 [L, LAYER_FIELDS]: per matrix (qkv, o, gate_up, down) format, weight/scale/offset pointers
    and rows, then biases, norms, heads, head dim, window and RoPE kind. None where a layer does not qualify. The
    pointers are into the layers' own tensors, which are never replaced after loading."""
    rows = []
    for layer in layers:
        mats = (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)
        norms = (layer.attn_norm, layer.mlp_norm)
        biases = [m.bias for m in mats[:2]]
        # a layer of its own K/V, or a drafter's full-attention layer querying another model's (kernels: LF_QUERY_ONLY)
        query_only = (layer.cfg.external_kv and not layer.own_kv and layer.query_only_plain()
                      and layer.kind == "full_attention")
        small = [*norms, *(b for b in biases if b is not None)]
        if not layer.fused or not (layer.own_kv or query_only) or any(
                t.dtype != torch.float32 or not t.is_contiguous() for t in small):
            return None
        f = [0] * LAYER_FIELDS
        for i, m in enumerate(mats):  # (a dense weight: fp32, fuse_dense_layers checked it)
            f[5 * i : 5 * i + 5] = matrix_fields(m.kernel_weight)
        f[20:30] = [_ptr(biases[0]), _ptr(biases[1]), norms[0].data_ptr(), norms[1].data_ptr(), layer.cfg.num_heads,
                    layer.kv_heads, layer.head_dim, layer.window or 0, ROPE_INDEX[layer.kind], int(query_only)]
        rows.append(f)
    return torch.tensor(rows, dtype=torch.int64)


def _ptr(t: torch.Tensor | None) -> int:
    return t.data_ptr() if t is not None else 0


def run_stack(
    desc: torch.Tensor,  # [L, LAYER_FIELDS] from stack_descriptor
    x: torch.Tensor,  # [T, H] fp32 contiguous: one row's new tokens, updated in place through every layer
    pos0: int,  # slot (and position) of the first token; they fill slots pos0 .. pos0 + T - 1
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]],  # kind -> cos, sin [.., T, .., D] fp32 contiguous
    kv: torch.Tensor,  # [L, 2] int64: each layer's K and V cache pointers, [Hkv, S, D] fp32 (KVCache.pointers)
    slots: int,  # S
    eps: float,
    scale: float,
    parents: torch.Tensor | None = None,  # [T] int64 contiguous: a draft tree (as `attend`), None: a chain
    taps: torch.Tensor | None = None,  # [n] int64 contiguous: ascending layer indices of the stack
    tap_out: torch.Tensor | None = None,  # [T, n, H] fp32 contiguous <- x after each of those layers
) -> None:
    """All layers of the stack in one kernel call: the same kernel calls the per-layer path makes, in C. A drafter's
    query-only layers (stack_descriptor) read the caches `kv` names, each token at position pos0 over slots [0, pos0),
    and write nothing."""
    full = rope.get("full_attention") or rope["sliding_attention"]
    sliding = rope.get("sliding_attention") or full
    t, h = x.shape
    _qkernels.layers(desc.data_ptr(), desc.shape[0], x.data_ptr(), t, h, pos0, full[0].data_ptr(), full[1].data_ptr(),
                     sliding[0].data_ptr(), sliding[1].data_ptr(), kv.data_ptr(), slots, eps, scale, _ptr(parents),
                     _ptr(taps), _ptr(tap_out), 0 if taps is None else taps.numel())


def run_stack_rows(
    desc: torch.Tensor,  # [L, LAYER_FIELDS] from stack_descriptor (a target's layers: none query-only)
    x: torch.Tensor,  # [B, H] fp32 contiguous: each row's one new token, updated in place through every layer
    positions: torch.Tensor,  # [B] int64 contiguous: each row's position (and slot) in its own cache rows
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]],  # kind -> cos, sin [B, .., D] fp32 contiguous
    kv: torch.Tensor,  # [L, 2] int64: each layer's K and V cache pointers, [B, Hkv, S, D] fp32 (KVCache.pointers)
    slots: int,  # S
    eps: float,
    scale: float,
    taps: torch.Tensor | None = None,  # [n] int64 contiguous: ascending layer indices of the stack
    tap_out: torch.Tensor | None = None,  # [B, n, H] fp32 contiguous <- x after each of those layers
) -> None:
    """A batched decode step (B rows, one token each, each at its own position) through the whole stack in one
    kernel call: the products over all B tokens at once, each row's attention as a one-row step computes it, so
    every row gets the bits a one-row step would give it."""
    full = rope.get("full_attention") or rope["sliding_attention"]
    sliding = rope.get("sliding_attention") or full
    b, h = x.shape
    _qkernels.layers_rows(desc.data_ptr(), desc.shape[0], x.data_ptr(), b, h, positions.data_ptr(), full[0].data_ptr(),
                          full[1].data_ptr(), sliding[0].data_ptr(), sliding[1].data_ptr(), kv.data_ptr(), slots,
                          eps, scale, _ptr(taps), _ptr(tap_out), 0 if taps is None else taps.numel())


def matrix_fields(qw: QuantWeight | torch.Tensor) -> list[int]:
    """A matrix as the kernels' descriptors hold it: format, weight / scale / offset pointers, rows."""
    if isinstance(qw, torch.Tensor):
        return [DENSE_FORMAT, qw.data_ptr(), 0, 0, qw.shape[0]]
    return [qw.fmt, qw.qs.data_ptr(), qw.d.data_ptr(), _ptr(qw.m), qw.shape[0]]


def draft_step(
    tokens: torch.Tensor,  # [W] int64 contiguous: one row's branches' tokens
    embedding: torch.Tensor,  # [V, Ht] fp32 contiguous: the target's embedding table
    emb_scale: float,
    hidden: torch.Tensor,  # [W, Ht] fp32 contiguous: the branches' hidden states
    mats: torch.Tensor,  # [15] int64: matrix_fields of pre_projection, post_projection and the head
    head_rows: int,  # K
    norm: torch.Tensor,  # [Ha] fp32: the final RMSNorm's weight
    desc: torch.Tensor,  # [L, LAYER_FIELDS] the drafter's query-only layers (stack_descriptor)
    rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin [P, D] fp32 contiguous: RoPE rows of positions 0 .. P - 1
    kv: torch.Tensor,  # [L, 2] int64: the target cache's K and V pointers each layer reads
    slots: int,
    position: int,  # every branch's (below P and slots)
    eps: float,
    scale: float,
    top: int = 0,  # > 0: instead of the logits, each branch's `top` likeliest tokens and their probabilities
    vocab: torch.Tensor | None = None,  # [K] int64 contiguous: the head rows' token ids (None: the row indices)
    fuse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,  # (matrix_fields [5] int64 of a quantized
    # weight, tap norms [n, Ht], taps [n, Ht] fp32 contiguous): one branch whose hidden state is weight @ [tap-normed
    # taps ++ hidden] (an MTP drafter's first state, as qlinear(..., "tap_norm") computes it)
) -> tuple[torch.Tensor, ...]:  # logits [W, K], next hidden [W, Ht]; with top: probs [W, top], ids [W, top], hidden
    """A drafter's step in one kernel call: embedding ++ hidden -> pre_projection -> layers -> norm + post_projection
    (the next hidden) -> head rows (the logits); the kernel calls of the step's four-call form, in its order. With
    `top`, the softmax's largest probabilities are computed in the kernel too (its own e^x: within a few ulp of
    torch.softmax's), and the logits are not returned."""
    w, ht = hidden.shape
    cos, sin = rope
    if not 0 <= position < cos.shape[0]:
        raise ValueError(f"draft_step: position {position} outside the RoPE table of {cos.shape[0]} rows")
    row = position * cos.shape[1] * 4  # the position's row, in bytes: no tensor op for a pointer
    out = torch.empty(w, ht, dtype=torch.float32)
    args = (tokens.data_ptr(), w, embedding.data_ptr(), embedding.shape[0], emb_scale, hidden.data_ptr(), ht,
            mats.data_ptr(), norm.data_ptr(), desc.data_ptr(), desc.shape[0], cos.data_ptr() + row,
            sin.data_ptr() + row, kv.data_ptr(), slots, position, eps, scale)
    fused = (0, 0, 0, 0)
    if fuse is not None:
        fields, norms, taps = fuse
        if w != 1 or taps.shape[-1] != ht:
            raise ValueError("draft_step: a fused first state is one branch's")
        fused = (fields.data_ptr(), norms.data_ptr(), taps.data_ptr(), taps.shape[0])
    if not top:
        logits = torch.empty(w, head_rows, dtype=torch.float32)
        _qkernels.draft_step(*args, logits.data_ptr(), out.data_ptr(), 0, 0, 0, 0, *fused)
        return logits, out
    probs, ids = torch.empty(w, top, dtype=torch.float32), torch.empty(w, top, dtype=torch.long)
    _qkernels.draft_step(*args, 0, out.data_ptr(), top, _ptr(vocab), ids.data_ptr(), probs.data_ptr(), *fused)
    return probs, ids, out


def move_slots(planes: torch.Tensor, src: list[int], dst: list[int]) -> None:
    """planes [..., S, D] fp32 contiguous (the trailing two dims of every plane): slot src[i] -> dst[i] in each, in
    order (a tree's accepted path moving down: each src past every earlier dst)."""
    s, d = planes.shape[-2:]
    outer = planes.numel() // (s * d)
    a, b = torch.tensor(src, dtype=torch.long), torch.tensor(dst, dtype=torch.long)
    _qkernels.move_slots(planes.data_ptr(), outer, s * d, s, d, a.data_ptr(), b.data_ptr(), len(src))


def argmax_rows(x: torch.Tensor, out: torch.Tensor) -> None:
    """x: [R, N] fp32 contiguous, out: [R] int64 <- the first index of each row's largest value."""
    _qkernels.argmax(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())


def screen_pairs() -> bool:
    """Whether a head screen built now keeps its q8 rows in the layout of the kernel's VNNI product (pair_words)."""
    return _qkernels is not None and _qkernels.info()["isa"] == "vnni"


def pair_words(qs: torch.Tensor) -> torch.Tensor:
    """q8 qs [N8, B, 8, 32] (chunk c: word c of rows 0..7) -> the same shape in the screen's VNNI layout: in each
    64-byte vector c (chunks 2c, 2c + 1), 4-byte lanes 2r and 2r + 1 hold row r's words 2c and 2c + 1 (qkernels.c,
    screen_q8)."""
    n8, nb = qs.shape[0], qs.shape[1]
    words = qs.contiguous().view(torch.int32).reshape(n8, nb, 4, 2, 8)  # [N8, B, vector, word in pair, row]
    return words.transpose(3, 4).contiguous().view(torch.int8).reshape(qs.shape)


def screen_argmax(x: torch.Tensor, screen, out: torch.Tensor) -> int:
    """x: [R, K] fp32 contiguous (R <= 64), screen: a screen.HeadScreen, out: [R] int64 <- each row's greedy token
    (screen.py). Returns how many rows took the full fp32 product (too many rows left by the screen)."""
    return _qkernels.screen_argmax(x.data_ptr(), x.shape[0], x.shape[1], screen.qs.data_ptr(), screen.d.data_ptr(),
                                   screen.sums.data_ptr(), screen.pairs, screen.weight.data_ptr(),
                                   screen.alpha.data_ptr(), screen.beta.data_ptr(), screen.g, screen.weight.shape[0],
                                   out.data_ptr())


def park() -> None:
    """The kernels' idle workers sleep now instead of spinning: torch's own threads are about to need the cores."""
    if _qkernels is not None:
        _qkernels.park()


def set_threads(n: int) -> None:
    if _qkernels is not None:
        _qkernels.set_threads(n)


LINEAR_WEIGHTS = ("wqkv.weight", "wo.weight", "w_gate_up.weight", "w_down.weight")  # a Transformer's Linear layers


def quantize_tensor(name: str, t: torch.Tensor, fmt: str) -> torch.Tensor | QuantWeight:
    """One checkpoint tensor as the loader adopts it for a quantized model: a linear layer's weight quantized
    (when its input width allows), anything else copied into memory of its own (so no tensor keeps the
    checkpoint file mapped)."""
    if name.endswith(LINEAR_WEIGHTS) and t.dim() == 2 and t.shape[1] % QK == 0:
        return quantize(t, fmt)
    return t.clone()


def quantize_model(model: torch.nn.Module, fmt: str, head: bool = True) -> int:
    """Quantize every linear layer of a Transformer in place (and its output head); returns bytes of weights.
    Layers already quantized (by the loader, tensor by tensor) are kept. The embedding table stays for lookups,
    in bf16 when the head no longer shares it."""
    from specmtp.linear import Linear

    require()
    total = 0
    if head and getattr(model, "head_q", None) is None:
        model.head_q = quantize(model.head_weight.data, fmt)
        if model.lm_head is not None:
            model.lm_head.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        model.embed.weight = torch.nn.Parameter(model.embed.weight.data.to(torch.bfloat16), requires_grad=False)
    if head and model.head_q is not None:
        total += model.head_q.nbytes
    for module in model.modules():
        if isinstance(module, Linear) and module is not getattr(model, "lm_head", None):
            if module.qweight is None and module.weight.shape[1] % QK == 0:
                module.qweight = quantize(module.weight.data, fmt)
                module.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)  # free the dense copy
            if module.qweight is not None:
                total += module.qweight.nbytes
    for layer in getattr(model, "layers", []):
        layer.batch_invariant = True  # attention too, so speculative output is bit-identical to target-only
        layer.fused_attention = layer.plain_attention()
        linears = (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)
        plain = layer.plain_layer() or layer.query_only_plain()
        layer.fused = plain and all(m.qweight is not None for m in linears)
    if hasattr(model, "stack"):
        model.stack = stack_descriptor(model.layers)
    return total


def fuse_dense_layers(model: torch.nn.Module) -> bool:
    """A dense fp32 model on a CPU with specmtp's kernels: its plain (Llama/Qwen2) layers attend through `attend`
    for one row, as quantized layers do (one kernel call for RoPE, the cache write and attention; a verify pass
    then computes each of its tokens exactly as a one-token step does, so speculative output is bit-identical to
    target-only), and for decode-sized passes their whole forward runs as the fused kernel calls of `qlinear`
    (norm, SwiGLU and residual add in the calls) and, for one row, the whole stack as one call (`run_stack`):
    no interpreter or torch op between the products. A prefill keeps torch's norms and oneDNN's products."""
    from specmtp.linear import Linear

    layers = getattr(model, "layers", [])
    dense = all(isinstance(m, Linear) and m.qweight is None and m.weight.dtype == torch.float32
                and m.weight.device.type == "cpu" and m.weight.is_contiguous()
                for layer in layers for m in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down))
    if not (layers and dense and dense_kernel()):
        return False
    for layer in layers:
        layer.fused_attention = layer.plain_attention()
        widths = (layer.wqkv.weight.shape[1], layer.wo.weight.shape[1], layer.w_down.weight.shape[1])
        layer.fused = layer.plain_layer() and all(w % QK == 0 for w in widths)  # the kernels prepare blocks of 32
    if hasattr(model, "stack"):
        model.stack = stack_descriptor(model.layers)
    return True


def select_rows(w, rows: torch.Tensor):
    """Rows of a dense or quantized weight (an MTP drafter's reduced head)."""
    if isinstance(w, torch.Tensor):
        return w[rows].contiguous()
    groups, where = torch.unique(rows // 8, return_inverse=True)  # unpack only the row groups that are asked for
    sub = QuantWeight(w.fmt, (8 * len(groups), w.shape[1]), w.qs[groups], w.d[groups],
                      w.m[groups] if w.m is not None else None)
    q, d, m = unpack(sub)
    local = where * 8 + rows % 8  # each row's index within `sub`
    return pack(w.fmt, q[local], d[local], m[local] if m is not None else None)
