"""The native decoder: Llama, Qwen2 and Gemma 3 text models as one function of (tokens, positions, cache).

    hidden = model(tokens, positions, cache)   # [B, T, H], after the final norm
    logits = model.logits(hidden)              # [B, T, V]

The forward writes each layer's keys/values for `tokens` at `positions` into `cache` and attends to every
cached slot at or before each query's position (and within the sliding window on sliding layers). It
never changes `cache.lengths`: the decode loop owns that. No sampling happens here. Splitting the head
from the trunk lets callers compute logits only where they need them (the last prompt token, the
verified positions) and gives drafters the hidden states they condition on.

Weights are stored fused for fewer, larger GEMMs: q/k/v in one matrix, gate/up in one.
Gemma's (1 + w) norm weights are stored with the 1 already added, so every norm is `x * w`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from specmtp.cache import KVCache
from specmtp.config import FULL, SLIDING, ModelConfig, RopeConfig
from specmtp.linear import Linear, linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., H], weight: [H] -> [..., H]; computed in fp32."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * weight.float()).to(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [D/2] for one RoPE configuration."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if rope.kind == "linear":
        inv = inv / rope.factor
    elif rope.kind == "llama3":
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [B, T] -> cos, sin: [B, T, 1, D] (rotate-half layout)."""
    freqs = positions[..., None].float() * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, heads, D] -> [B, T, heads, D]"""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention_mask(
    positions: torch.Tensor, start: int, end: int, window: int | None
) -> torch.Tensor:
    """Boolean mask [B, 1, T, end-start]: query at position p sees key slots s with s <= p (and s > p - window)."""
    slots = torch.arange(start, end, device=positions.device)  # [S]
    q = positions[:, None, :, None]  # [B, 1, T, 1]
    mask = slots <= q
    if window is not None:
        mask = mask & (slots > q - window)
    return mask


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.kind = cfg.layer_types[index]
        self.window = cfg.sliding_window if self.kind == SLIDING else None
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        self.wqkv = Linear(h, self.q_size + 2 * self.kv_size, bias=cfg.attn_bias)
        self.wo = Linear(self.q_size, h, bias=False)
        self.w_gate_up = Linear(h, 2 * cfg.intermediate_size, bias=False)
        self.w_down = Linear(cfg.intermediate_size, h, bias=False)
        self.attn_norm = nn.Parameter(torch.ones(h))
        self.mlp_norm = nn.Parameter(torch.ones(h))
        if cfg.sandwich_norm:
            self.attn_post_norm = nn.Parameter(torch.ones(h))
            self.mlp_post_norm = nn.Parameter(torch.ones(h))
        if cfg.qk_norm:
            self.q_norm = nn.Parameter(torch.ones(d))
            self.k_norm = nn.Parameter(torch.ones(d))

    def forward(
        self,
        x: torch.Tensor,  # [B, T, H]
        positions: torch.Tensor,  # [B, T]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin: [B, T, 1, D]
        mask: torch.Tensor,  # [B, 1, T, S]
        start: int,  # first cache slot attended to
        end: int,  # one past the last cache slot attended to
        cache: KVCache,
    ) -> torch.Tensor:  # [B, T, H]
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        b, t, _ = x.shape
        h = rms_norm(x, self.attn_norm, eps)
        qkv = self.wqkv(h)
        q = qkv[..., : self.q_size].view(b, t, cfg.num_heads, cfg.head_dim)
        k = qkv[..., self.q_size : self.q_size + self.kv_size].view(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = qkv[..., self.q_size + self.kv_size :].view(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = rms_norm(q, self.q_norm, eps)
            k = rms_norm(k, self.k_norm, eps)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.write(self.index, positions, k, v)
        keys = cache.k[self.index][:, :, start:end]  # [B, Hkv, S, D]
        values = cache.v[self.index][:, :, start:end]  # [B, Hkv, S, D]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, scale=cfg.attn_scale,
            enable_gqa=cfg.num_heads != cfg.num_kv_heads,
        )  # [B, Hq, T, D]
        out = self.wo(out.transpose(1, 2).reshape(b, t, self.q_size))
        if cfg.sandwich_norm:
            out = rms_norm(out, self.attn_post_norm, eps)
        x = x + out
        h = rms_norm(x, self.mlp_norm, eps)
        gate, up = self.w_gate_up(h).chunk(2, dim=-1)
        act = F.silu(gate) if cfg.activation == "silu" else F.gelu(gate, approximate="tanh")
        out = self.w_down(act * up)
        if cfg.sandwich_norm:
            out = rms_norm(out, self.mlp_post_norm, eps)
        return x + out


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for kind, rope in cfg.rope.items():
            self.register_buffer(f"inv_freq_{kind}", rope_inv_freq(rope, cfg.head_dim), persistent=False)

    @property
    def head_weight(self) -> torch.Tensor:  # [V, H]
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        c = self.cfg
        p = self.embed.weight
        return KVCache(c.num_layers, batch_size, capacity, c.num_kv_heads, c.head_dim, p.dtype, p.device)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, T] -> [B, T, H] (scaled for Gemma)"""
        x = self.embed(tokens)
        if self.cfg.embed_scale != 1.0:
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        return x

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T]
        positions: torch.Tensor,  # [B, T] absolute positions, contiguous per row
        cache: KVCache,
    ) -> torch.Tensor:  # [B, T, H] final-normed hidden states
        cfg = self.cfg
        # One host read of the position range per forward (free on CPU) bounds the cache slots read.
        lo, hi = int(positions.min()), int(positions.max()) + 1
        if hi > cache.capacity:
            raise ValueError(f"position {hi - 1} is past the KV cache capacity {cache.capacity}")
        views = {}
        for kind in set(cfg.layer_types):
            window = cfg.sliding_window if kind == SLIDING else None
            start = max(0, lo - window + 1) if window is not None else 0
            rope = rope_cos_sin(getattr(self, f"inv_freq_{kind}"), positions)
            views[kind] = (rope, attention_mask(positions, start, hi, window), start)
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            rope, mask, start = views[layer.kind]
            x = layer(x, positions, rope, mask, start, hi, cache)
        return rms_norm(x, self.norm, cfg.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., H] -> logits [..., V] (soft-capped where the family does so)"""
        logits = linear(hidden, self.head_weight)
        cap = self.cfg.final_logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


__all__ = ["Transformer", "rms_norm", "apply_rope", "rope_cos_sin", "attention_mask", "FULL", "SLIDING"]
