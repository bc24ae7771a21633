"""Linear layers for the CPU: fp32 products on the weights as they are, by the fastest path for their size.

Decoding reads every weight once per token, so a one-token step and a verify pass of a few tokens are both
bound by the bytes of weights read. Up to SMALL_ROWS rows, an fp32 product goes through specmtp's own kernel
(`quant.sgemm`: each weight read once for all rows, each output the same sum in the same order whatever the
number of rows, so a verify pass computes exactly what single steps would). Larger products (prefill, big
batches) go through oneDNN's linear kernel (`torch.ops.mkldnn._linear_pointwise`, the op inductor uses),
which streams the dense weights without re-packing them. Anything that needs autograd, or another dtype or
device, goes through `F.linear`. The paths sum in different orders, so they agree to rounding.

Threads: specmtp's kernel runs on its own pool, and two pools spinning on the same cores slow each other
about threefold, so torch runs on one thread while the small products run and gets its threads back for the
next large one. Measured on SmolLM2-135M fp32 (2 cores, engine, 4 benchmark prompts): a one-token step 40.0 ms
and a 4-token verify pass 53.8 ms through oneDNN; through this kernel, in the benchmark of all 24 prompts,
35.3 ms and 38.7 ms.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from specmtp import quant

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
SMALL_ROWS = 16  # products of up to this many rows go through specmtp's kernel (on SmolLM2's matrices, 2 cores:
# 29.8 / 41.6 / 64.8 ms for all of a step's products at 8 / 16 / 32 rows against oneDNN's 40.5 / 50.2 / 70.2; past
# 16 rows torch's own ops at one thread would start to cost)
_enabled = True
_torch_threads: int | None = None  # torch's thread count, held while it runs on one thread for our pool


@contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    """Temporarily turn the fast paths (specmtp's kernels and oneDNN) on or off (tests compare both against
    transformers)."""
    global _enabled
    saved, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = saved


def fast_paths() -> bool:
    """Whether the fast paths are on (see `onednn`): dense layers' attention kernel honours it too."""
    return _enabled


def own_pool(active: bool) -> None:
    """torch on one thread while our pool does the products; its own count back before a large product."""
    global _torch_threads
    if active:
        n = torch.get_num_threads()
        if n > 1:
            _torch_threads = n
            torch.set_num_threads(1)
    else:
        quant.park()  # our workers off the cores torch's threads are about to use
        if _torch_threads is not None:
            if torch.get_num_threads() == 1:
                torch.set_num_threads(_torch_threads)
            _torch_threads = None


def _fast(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_enabled and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def _small(rows: int, weight: torch.Tensor) -> bool:
    return 0 < rows <= SMALL_ROWS and weight.is_contiguous() and quant.dense_kernel()


def through_kernel(x: torch.Tensor, weight) -> bool:
    """Whether linear(x, weight) takes specmtp's dense kernel (x: [..., in], weight: a dense tensor)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return isinstance(weight, torch.Tensor) and _fast(x, weight) and _small(rows, weight)


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., in], weight: [out, in] (dense, or a quant.QuantWeight), bias: [out] -> [..., out]"""
    if not isinstance(weight, torch.Tensor):
        own_pool(True)  # the quantized kernels run on specmtp's pool too
        return quant.qlinear(x, weight, bias)
    fast = _fast(x, weight)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    small = fast and _small(x2.shape[0], weight)
    own_pool(small)
    if small:
        y = quant.sgemm(x2, weight, bias)
    elif fast and _ONEDNN:
        y = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")
    else:
        return F.linear(x, weight, bias)
    return y.reshape(*shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear whose inference path is `linear` above; parameters and state dict are unchanged.
    `qweight` (set by quant.quantize_model) replaces the dense weight with a quantized one."""

    qweight = None

    @property
    def kernel_weight(self):  # the quant.QuantWeight, or the dense weight [out, in]
        return self.qweight if self.qweight is not None else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.kernel_weight, self.bias)
