"""Linear layers for the CPU: fp32 GEMV/GEMM through oneDNN, on the weights as they are.

PyTorch's default fp32 `F.linear` (MKL sgemm) reads weights at about 10 GB/s here for a one-token GEMV
and gets slower per byte for 2-8 tokens. oneDNN's linear kernel (`torch.ops.mkldnn._linear_pointwise`,
the op inductor uses) streams the same dense weights at about 24 GB/s for one token and 14-18 GB/s for
the small GEMMs of a verify pass, with no re-packing and no extra copy of the weights. It is used for
inference on fp32 CPU tensors; anything that needs autograd, or another dtype or device, goes through
`F.linear`. oneDNN sums in another order than MKL, so results agree to rounding, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_enabled = True


@contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    """Temporarily turn the oneDNN path on or off (tests compare both against transformers)."""
    global _enabled
    saved, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = saved


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., in], weight: [out, in] (dense, or a quant.QuantWeight), bias: [out] -> [..., out]"""
    if not isinstance(weight, torch.Tensor):
        from specmtp.quant import qlinear

        return qlinear(x, weight, bias)
    if (
        _enabled and _ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), weight, bias, "none", [], "")
        return y.reshape(*shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose inference path is `linear` above; parameters and state dict are unchanged.
    `qweight` (set by quant.quantize_model) replaces the dense weight with a quantized one."""

    qweight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.qweight if self.qweight is not None else self.weight, self.bias)
