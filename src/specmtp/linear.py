"""Linear layers for the CPU: weights pre-packed once for oneDNN.

PyTorch's default fp32 `F.linear` reaches about 10 GB/s of weight reads on this class of machine for a
one-token GEMV and gets slower per byte for 2-8 tokens; the same weights pre-packed as oneDNN (mkldnn)
tensors stream at about 20 GB/s for one token and stay fast for the small GEMMs of a verify pass.
`pack_linears` swaps every `nn.Linear` of a model for `PackedLinear` in place; the model code is
unchanged (it calls modules). The packing is exact fp32 arithmetic, though oneDNN may sum in another
order than `F.linear`, so results agree to rounding (about 1e-6 relative), not bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and torch.device("cpu").type == "cpu"


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight.detach().float().to_mkldnn()  # [out, in], oneDNN layout
        self.bias = None if linear.bias is None else linear.bias.detach().float().to_mkldnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        shape = x.shape
        y = torch._C._nn.mkldnn_linear(x.reshape(-1, shape[-1]).float().to_mkldnn(), self.weight, self.bias)
        return y.to_dense().reshape(*shape[:-1], self.out_features)


def pack_linears(module: nn.Module) -> nn.Module:
    """Replace fp32 nn.Linear submodules by PackedLinear, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and child.weight.dtype == torch.float32:
            setattr(module, name, PackedLinear(child))
        else:
            pack_linears(child)
    return module


def pack_model(model: nn.Module) -> nn.Module:
    """Pack a Transformer's layers and its output head (a packed copy when the head is tied)."""
    if not packing_available():
        return model
    pack_linears(model.layers)
    head = nn.Linear(model.cfg.hidden_size, model.cfg.vocab_size, bias=False, device="meta")
    head.weight = nn.Parameter(model.head_weight.detach(), requires_grad=False)
    model.packed_head = PackedLinear(head)
    return model
