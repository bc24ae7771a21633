"""The KV cache: preallocated per layer, written at explicit positions, with a length per batch row.

Slots are indexed by absolute position, so a row's K/V for position p always live in slot p. Layers write
the keys/values of the tokens they are given at those tokens' positions; attention masks by position
(causal, and the sliding window where a layer has one), so whatever sits in slots at or beyond a row's
length is never read before it is overwritten. That makes rollback free: the decode loop just sets a
shorter length (`rollback`) and the next write at those positions replaces the rejected tokens' K/V.
Only the decode loop (the engine) advances or rolls back `lengths`; layers never touch it.
"""

from __future__ import annotations

import torch

from specmtp import quant


class KVCache:
    def __init__(
        self,
        batch_size: int,
        capacity: int,
        shapes: list[tuple[int, int]],  # (kv_heads, head_dim) per layer
        sources: list[int] | None = None,  # layer whose slots each layer uses (KV sharing); default itself
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        sources = sources or list(range(len(shapes)))
        own = {layer: i for i, layer in enumerate(j for j in range(len(shapes)) if sources[j] == j)}  # -> block index
        # Layers of one shape share one block [own layers, 2, B, Hkv, S, D], so moving slots (keep_path) is one
        # indexing op for all of them, not one per layer and K/V
        self._block: torch.Tensor | None = None
        if len({shapes[layer] for layer in own}) == 1:
            heads, dim = shapes[next(iter(own))]
            self._block = torch.zeros(len(own), 2, batch_size, heads, capacity, dim, dtype=dtype, device=device)
        self.k: list[torch.Tensor] = []  # L x [B, Hkv, S, D]; a KV-shared layer aliases its source's tensor
        self.v: list[torch.Tensor] = []
        for layer, (heads, dim) in enumerate(shapes):
            src = sources[layer]
            if src != layer:
                self.k.append(self.k[src])
                self.v.append(self.v[src])
            elif self._block is not None:
                self.k.append(self._block[own[layer], 0])
                self.v.append(self._block[own[layer], 1])
            else:
                self.k.append(torch.zeros(batch_size, heads, capacity, dim, dtype=dtype, device=device))
                self.v.append(torch.zeros(batch_size, heads, capacity, dim, dtype=dtype, device=device))
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B] tokens held per row
        self.capacity = capacity
        self.batch_index = torch.arange(batch_size, device=device)[:, None]  # [B, 1]
        self._pointers: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def pointers(self) -> torch.Tensor:
        """[L, 2] int64: where each layer's K and V of row 0 live (the quantized kernels' layer stack reads them)."""
        if self._pointers is None:
            self._pointers = torch.tensor([[k.data_ptr(), v.data_ptr()] for k, v in zip(self.k, self.v, strict=True)])
        return self._pointers

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys/values of new tokens at their positions.

        positions: [B, T]; k, v: [B, T, Hkv, D]
        """
        if positions.shape[0] == 1:  # one row, contiguous positions: a plain slice copy, no scatter
            start = int(positions[0, 0])  # host read of one scalar; the CPU path has no device to sync
            end = start + positions.shape[1]
            self.k[layer][0, :, start:end] = k[0].transpose(0, 1)
            self.v[layer][0, :, start:end] = v[0].transpose(0, 1)
            return
        self.k[layer][self.batch_index, :, positions] = k
        self.v[layer][self.batch_index, :, positions] = v

    def advance(self, counts: torch.Tensor) -> None:
        """Mark `counts` more tokens as held per row. counts: [B]"""
        self.lengths += counts

    def keep_path(self, start: torch.Tensor, picked: torch.Tensor, count: torch.Tensor) -> None:
        """After a draft tree's verification (specmtp.tree): move the accepted drafts' K/V down to the slots their
        positions name. start: [B] the root's slot; picked: [B, N] slot offsets from it (the inputs' indices) of
        the accepted drafts, root-down; count: [B] how many. Slot start + picked[b, i] moves to start + 1 + i."""
        b_idx, src, dst = [], [], []
        for b, (s0, row, c) in enumerate(zip(start.tolist(), picked.tolist(), count.tolist(), strict=True)):
            for i in range(c):
                if row[i] != i + 1:
                    b_idx.append(b)
                    src.append(s0 + row[i])
                    dst.append(s0 + 1 + i)
        if not src:  # a chain, or the tree's first branch all the way: already in place
            return
        block = self._block
        if (block is not None and block.shape[2] == 1 and block.is_contiguous() and block.device.type == "cpu"
                and block.dtype == torch.float32 and quant.available()):
            # one row (the engine's): plain copies in C; the indexing ops cost ~0.1 ms just after a verify pass
            quant.move_slots(block, src, dst)
            return
        bi, si, di = torch.tensor(b_idx), torch.tensor(src), torch.tensor(dst)
        if self._block is not None:
            self._block[:, :, bi, :, di] = self._block[:, :, bi, :, si]
            return
        seen: set[int] = set()
        for t in (*self.k, *self.v):
            if id(t) not in seen:  # KV-shared layers alias their source's tensors
                seen.add(id(t))
                t[bi, :, di] = t[bi, :, si]  # the right side is gathered before anything is written

    def rollback(self, lengths: torch.Tensor) -> None:
        """Forget everything at or past `lengths` per row (rejected drafts). lengths: [B]"""
        self.lengths.copy_(torch.minimum(self.lengths, lengths))

    def row(self, b: int) -> KVCache:
        """A one-row cache whose tensors are views of row b of this one (writes land in this cache)."""
        out = KVCache.__new__(KVCache)
        views: dict[int, torch.Tensor] = {}
        out.k = [views.setdefault(id(t), t[b : b + 1]) for t in self.k]
        out.v = [views.setdefault(id(t), t[b : b + 1]) for t in self.v]
        out.lengths = self.lengths[b : b + 1].clone()
        out.capacity = self.capacity
        out.batch_index = torch.zeros(1, 1, dtype=torch.long, device=self.lengths.device)
        out._pointers = None
        out._block = self._block[:, :, b : b + 1] if self._block is not None else None  # the views' own block
        return out
