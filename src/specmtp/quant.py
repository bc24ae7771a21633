"""Quantized weights on the CPU: specmtp's q8 and q4 block formats and the linear op that reads them.

    q8: blocks of 32 weights per row, int8 values and an fp16 scale          w = d * q           1.06 bytes/weight
    q4: blocks of 32 weights per row, 4-bit values, fp16 scale and offset     w = d * q + m       0.63 bytes/weight
        (nibbles of two neighbouring blocks share bytes: see _pack4)

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
    qs: torch.Tensor  # q8: int8 [N, K]; q4: uint8 [N, K/2]
    d: torch.Tensor  # fp16 [N, K/32]
    m: torch.Tensor | None  # fp16 [N, K/32] (q4 only)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)


def available() -> bool:
    return _qkernels is not None


def require() -> None:
    if _qkernels is None:
        raise SpecMTPError(f"the quantized kernels are not built ({_IMPORT_ERROR}); reinstall specmtp with a C "
                           "compiler available (make clean && make test), or use --weights fp32")


ROWS_PER_CHUNK = 4096  # quantize() works through large matrices in slices, so its temporaries stay small


def quantize(w: torch.Tensor, fmt: str) -> QuantWeight:
    """w: [N, K] float -> QuantWeight (round to nearest; q4 spans each block's min..max)."""
    if fmt not in FORMATS:
        raise SpecMTPError(f"unknown weight format {fmt!r} (choose from {', '.join(FORMATS)})")
    n, k = w.shape
    if k % QK:
        raise SpecMTPError(f"cannot quantize a weight with {k} inputs: not a multiple of {QK}")
    parts = [_quantize_rows(w[i : i + ROWS_PER_CHUNK], FORMATS[fmt]) for i in range(0, n, ROWS_PER_CHUNK)]
    if len(parts) == 1:
        return parts[0]
    m = torch.cat([q.m for q in parts]) if parts[0].m is not None else None
    return QuantWeight(parts[0].fmt, (n, k), torch.cat([q.qs for q in parts]), torch.cat([q.d for q in parts]), m)


def _quantize_rows(w: torch.Tensor, bits: int) -> QuantWeight:
    n, k = w.shape
    blocks = w.detach().float().reshape(n, k // QK, QK)
    if bits == 8:
        d = blocks.abs().amax(-1) / 127.0  # [N, B]
        d16 = d.half()
        inv = torch.where(d16.float() > 0, 1.0 / d16.float(), torch.zeros_like(d))
        q = torch.round(blocks * inv[..., None]).clamp(-127, 127).to(torch.int8)
        return QuantWeight(8, (n, k), q.reshape(n, k).contiguous(), d16.contiguous(), None)
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    m16 = lo.half()
    d16 = ((hi - m16.float()) / 15.0).half()
    inv = torch.where(d16.float() > 0, 1.0 / d16.float(), torch.zeros_like(lo))
    q = torch.round((blocks - m16.float()[..., None]) * inv[..., None]).clamp(0, 15).to(torch.uint8)
    return QuantWeight(4, (n, k), _pack4(q), d16.contiguous(), m16.contiguous())


def _pack4(q: torch.Tensor) -> torch.Tensor:  # q: [N, B, 32] values 0..15 -> [N, B * 16] bytes
    """Blocks in pairs: byte j of a pair holds element j of the even block in its low nibble and element j of the
    odd block in its high one, so one 32-byte load and two masks unpack 64 weights. An odd last block keeps its
    16 bytes to itself (element j low, element j + 16 high)."""
    n, nb, _ = q.shape
    even = nb // 2 * 2
    pairs = q[:, :even].reshape(n, even // 2, 2, QK)
    packed = [(pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, -1)]
    if nb % 2:
        packed.append(q[:, -1, : QK // 2] | (q[:, -1, QK // 2 :] << 4))
    return torch.cat(packed, dim=1).contiguous()


def _unpack4(packed: torch.Tensor, nb: int) -> torch.Tensor:  # [N, B * 16] -> [N, B, 32] values 0..15
    n = packed.shape[0]
    even = nb // 2 * 2
    pairs = packed[:, : even * QK // 2].reshape(n, even // 2, 1, QK)
    blocks = [torch.cat([pairs & 0x0F, pairs >> 4], dim=2).reshape(n, even, QK)]
    if nb % 2:
        last = packed[:, even * QK // 2 :]
        blocks.append(torch.cat([last & 0x0F, last >> 4], dim=1)[:, None])
    return torch.cat(blocks, dim=1)


def dequantize(qw: QuantWeight) -> torch.Tensor:
    """The fp32 weight a QuantWeight stands for (the reference the kernels are tested against)."""
    n, k = qw.shape
    if qw.fmt == 8:
        q = qw.qs.reshape(n, k // QK, QK).float()
        return (q * qw.d.float()[..., None]).reshape(n, k)
    q = _unpack4(qw.qs, k // QK).float()
    return (q * qw.d.float()[..., None] + qw.m.float()[..., None]).reshape(n, k)


PRE = {None: 0, "rms_norm": 1, "swiglu": 2}


def qlinear(
    x: torch.Tensor,  # [..., K] ([..., 2K] with pre="swiglu": gate then up)
    qw: QuantWeight,
    bias: torch.Tensor | None = None,
    pre: str | None = None,  # what the kernel applies to each token first: None, "rms_norm" (with norm, eps), "swiglu"
    norm: torch.Tensor | None = None,  # [K] the RMSNorm weight
    eps: float = 0.0,
    residual: torch.Tensor | None = None,  # [..., N] added to the result
) -> torch.Tensor:  # [..., N]
    """pre(x) @ W.T + bias + residual through the quantized kernels (fp32 in and out)."""
    require()
    n, k = qw.shape
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    b = bias.float().contiguous() if bias is not None else None
    if norm is not None:
        norm = norm.float().contiguous()
    r = residual.reshape(-1, n).float().contiguous() if residual is not None else None
    _qkernels.gemm(qw.fmt, x2.data_ptr(), x2.shape[0], k, qw.qs.data_ptr(), qw.d.data_ptr(),
                   qw.m.data_ptr() if qw.m is not None else 0, b.data_ptr() if b is not None else 0,
                   y.data_ptr(), n, PRE[pre], norm.data_ptr() if norm is not None else 0, eps,
                   r.data_ptr() if r is not None else 0)
    return y.reshape(*shape[:-1], n)


def attend(
    qkv: torch.Tensor,  # [1, T, (Hq + 2 Hkv) D] fp32 contiguous: q, k, v of one row's new tokens (rotated in place)
    pos0: int,  # position of the first of them (they are contiguous)
    cos: torch.Tensor,  # [1, T, 1, D] fp32 contiguous
    sin: torch.Tensor,
    k_cache: torch.Tensor,  # [1, Hkv, S, D] fp32 contiguous: the layer's cache (written at pos0 .. pos0 + T - 1)
    v_cache: torch.Tensor,
    heads: int,
    window: int | None,
    scale: float,
) -> torch.Tensor:  # [1, T, Hq D]
    """Attention of one row's new tokens in the kernels' batch-invariant way: RoPE, cache write, and each query
    over exactly the slots a one-token step at its position reads (quantized mode's Llama/Qwen2 layers)."""
    _, t, width = qkv.shape
    _, kv_heads, slots, d = k_cache.shape
    out = torch.empty(1, t, heads * d, dtype=torch.float32)
    _qkernels.attend(qkv.data_ptr(), t, heads, kv_heads, d, cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
                     v_cache.data_ptr(), slots, pos0, window or 0, scale, out.data_ptr())
    return out


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
        layer.fused = layer.plain_layer() and all(m.qweight is not None for m in linears)
    return total


def select_rows(w, rows: torch.Tensor):
    """Rows of a dense or quantized weight (an MTP drafter's reduced head)."""
    if isinstance(w, torch.Tensor):
        return w[rows].contiguous()
    return QuantWeight(w.fmt, (len(rows), w.shape[1]), w.qs[rows].contiguous(), w.d[rows].contiguous(),
                       w.m[rows].contiguous() if w.m is not None else None)
