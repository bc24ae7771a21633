"""Greedy tokens from a dense fp32 output head at a quarter of its bytes, exactly.

A greedy step needs only the argmax of the logits, and a head is a large share of what a step reads (SmolLM2-135M:
113 MB of 538 MB in fp32; Qwen2.5-Coder-1.5B: 933 MB of 6.2 GB). `HeadScreen` keeps a q8 copy of the head
(quant.py's format, 1.06 bytes a weight) and, for a token x, bounds each fp32 logit l_j by its q8 logit a_j:

    |l_j - a_j| <= |x| |w_j - w~_j| + |x - x~| |w~_j| + g (|x| |w_j| + |x~| |w~_j|)

(w~_j the row as q8 stores it, x~ the token as the q8 kernel quantizes it, g = 2 (K + 8) 2^-24 covering both
products' fp32 rounding in any summation order; |x~| <= |x| + |x - x~|). So with alpha_j = |w_j - w~_j| + g |w_j|
and beta_j = |w~_j|, the bound is e_j = |x| alpha_j + (|x - x~| + g (|x| + |x - x~|)) beta_j. A row whose a_j + e_j
is below max_i (a_i - e_i) has a logit below another row's and cannot be the argmax; the kernel
(`screen_argmax`) computes the rows left (1 to 3 on average for SmolLM2 and Qwen2.5-Coder, measured on benchmark
answers; a token with more than 256 left takes the full product) through the dense fp32 kernel, each the same bits
the full product gives it, and returns the first largest: the full head's argmax, bit for bit. q4 would leave most
of the vocabulary (its error bound is ten times wider).

Only where the full head would run through specmtp's dense kernel too (linear.py: up to SMALL_ROWS rows, fast
paths on) and the logits are not soft-capped (tanh can round two logits to one value, and then the first of them
wins): elsewhere `Transformer.greedy` computes the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specmtp import quant

ROWS_PER_CHUNK = 4096  # rows of the head quantized and measured at a time (temporaries stay small)


@dataclass
class HeadScreen:
    weight: torch.Tensor  # [V, H] the dense fp32 head (the model's own tensor)
    qs: torch.Tensor  # its q8 copy: int8 [V8, H/32, 8, 32], quant.py's layout, or with pairs the screen's own
    d: torch.Tensor  # fp16 [V8, H/32, 8]: the q8 blocks' scales (quant.py's)
    sums: torch.Tensor  # int16 [V8, H/32, 8]: each row's block sums, grouped as the scales (the VNNI product's term)
    alpha: torch.Tensor  # [V] fp32, rounded up: |w_j - w~_j| + g |w_j|
    beta: torch.Tensor  # [V] fp32, rounded up: |w~_j|
    g: float
    pairs: bool = False  # qs in the layout of the kernel's VNNI product (quant.pair_words), else quant.py's
    rows: int = 0  # rows screened so far
    full_rows: int = 0  # of which took the full fp32 product (the screen left more than 256 rows)

    @property
    def nbytes(self) -> int:
        return self.qs.numel() + 2 * (self.d.numel() + self.sums.numel()) + 4 * (self.alpha.numel() + self.beta.numel())

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., H] fp32 -> [...] the first index of the largest of x @ weight.T, as the dense kernel computes it."""
        shape = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
        out = torch.empty(x2.shape[0], dtype=torch.long)
        for i in range(0, x2.shape[0], 64):  # the kernel takes up to 64 rows a call
            self.full_rows += quant.screen_argmax(x2[i : i + 64], self, out[i : i + 64])
        self.rows += x2.shape[0]
        return out.view(shape)


def build(weight: torch.Tensor) -> HeadScreen | None:
    """The screen of a dense fp32 head [V, H], or None where it cannot serve (no kernels, a width that is not a
    multiple of 32 or not below 16k, non-finite weights)."""
    if not (quant.dense_kernel() and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.shape[1] % quant.QK == 0 and weight.shape[1] < 16384 and weight.is_contiguous()):
        return None
    v, k = weight.shape
    g = 2.0 * (k + 8) * 2.0**-24
    parts, alpha, beta, sums = [], [], [], []
    for i in range(0, v, ROWS_PER_CHUNK):
        rows = weight.detach()[i : i + ROWS_PER_CHUNK]
        if not bool(torch.isfinite(rows).all()):
            return None
        values, scales, _ = quant.quantize_rows(rows, 8)  # [n, K/32, 32], [n, K/32]
        stored = (values.float() * scales.float()[..., None]).reshape(rows.shape)  # w~: what the q8 kernel reads
        alpha.append((rows - stored).norm(dim=1) + g * rows.norm(dim=1))
        beta.append(stored.norm(dim=1))
        parts.append(quant.pack(8, values, scales, None))
        sums.append(quant.group_rows(values.sum(-1, dtype=torch.int16)))
    qs, d = torch.cat([p.qs for p in parts]), torch.cat([p.d for p in parts])
    pairs = quant.screen_pairs()
    if pairs:  # where the VNNI product reads it: its own layout, which needs no copy of quant.py's
        qs = quant.pair_words(qs)
    # w~ = q d is exact in fp32 (7 by 11 significant bits), w - w~ within 2^-24 of its value, and fp32 norms of K
    # squares within K 2^-24 of theirs (build() takes K below 16k): a relative margin of 1e-3 keeps both upper bounds
    up = 1.0 + 1e-3
    return HeadScreen(weight, qs, d, torch.cat(sums), torch.cat(alpha) * up, torch.cat(beta) * up, g, pairs)
