"""The native decoder: Llama, Qwen2 and Gemma 3 text models as one function of (tokens, positions, cache).

    hidden = model(tokens, positions, cache)   # [B, T, H], after the final norm
    logits = model.logits(hidden)              # [B, T, V]
    tokens = model.greedy(hidden)              # [B, T] the argmax of those logits (screen.py: without them all)

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

from specmtp import quant
from specmtp.cache import KVCache
from specmtp.config import FULL, SLIDING, ModelConfig, RopeConfig
from specmtp.linear import SMALL_ROWS, Linear, fast_paths, linear, own_pool, through_kernel
from specmtp.sampling import argmax
from specmtp.tree import ancestors


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., H], weight: [H] -> [..., H]; computed in fp32."""
    if x.dtype == weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused op: decoding is per-op-overhead bound
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * weight.float()).to(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [D/2] for one RoPE configuration."""
    if rope.kind == "proportional":  # only the first `partial` of the angles rotate; the rest stay at angle 0
        angles = int(rope.partial * head_dim // 2)
        inv = 1.0 / (rope.theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.float32) / head_dim))
        return torch.cat([inv, torch.zeros(head_dim // 2 - angles)]) / rope.factor
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
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def attention_mask(
    positions: torch.Tensor, start: int, end: int, window: int | None, tree: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean mask [B, 1, T, end-start]: query at position p sees key slots s with s <= p (and s > p - window).
    With a draft tree (`tree` [B, T] the tokens' parents, specmtp.tree), token i sits in slot positions[:, 0] + i
    and sees the slots before the root's and its ancestors' slots (by their positions, within the window)."""
    slots = torch.arange(start, end, device=positions.device)  # [S]
    q = positions[:, None, :, None]  # [B, 1, T, 1]
    if tree is None:
        key_pos = slots
        mask = key_pos <= q
    else:
        t = positions.shape[1]
        rel = slots - positions[:, :1]  # [B, S] slot's index among the tree's tokens
        in_tree = (rel >= 0) & (rel < t)
        j = rel.clamp(0, t - 1)
        key_pos = torch.where(in_tree, positions.gather(1, j), slots)[:, None, None, :]  # [B, 1, 1, S]
        anc = ancestors(tree).gather(2, j[:, None, :].expand(-1, t, -1))  # [B, T, S]
        mask = (key_pos <= q) & (~in_tree[:, None, :] | anc)[:, None]
    if window is not None:
        mask = mask & (key_pos > q - window)
    return mask


def rms_norm_plain(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Unscaled RMSNorm over the last dim (Gemma 4 values and router input), fp32."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _act(cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) if cfg.activation == "silu" else F.gelu(x, approximate="tanh")


class Experts(nn.Module):
    """Gemma 4 MoE block: a router picks top-k experts per token; their gated MLP outputs are mixed."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, e, i = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate
        self.cfg = cfg
        self.router = Linear(h, e, bias=False)
        self.router_scale = nn.Parameter(torch.ones(h))
        self.per_expert_scale = nn.Parameter(torch.ones(e))
        self.gate_up = nn.Parameter(torch.zeros(e, 2 * i, h))  # [E, 2I, H]
        self.down = nn.Parameter(torch.zeros(e, h, i))  # [E, H, I]

    def forward(self, router_in: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """router_in, x: [N, H] (router sees the residual stream, experts the pre-normed one) -> [N, H]"""
        cfg = self.cfg
        r = rms_norm_plain(router_in, cfg.rms_norm_eps) * self.router_scale * cfg.hidden_size**-0.5
        probs = self.router(r).float().softmax(-1)  # [N, E]
        weights, index = torch.topk(probs, cfg.top_k_experts, dim=-1)  # [N, K]
        weights = weights / weights.sum(-1, keepdim=True) * self.per_expert_scale[index]
        out = torch.zeros_like(x)
        for e in index.unique().tolist():  # host loop over the few experts this batch of tokens uses
            token, slot = torch.where(index == e)
            gate, up = linear(x[token], self.gate_up[e]).chunk(2, dim=-1)
            y = linear(_act(cfg, gate) * up, self.down[e]) * weights[token, slot, None].to(x.dtype)
            out.index_add_(0, token, y)
        return out


def one_query_attention(
    q: torch.Tensor,  # [B, Hq, 1, D]
    keys: torch.Tensor,  # [B, Hkv, S, D]
    values: torch.Tensor,  # [B, Hkv, S, D]
    mask: torch.Tensor,  # [B, 1, 1, S] bool: visible slots
    scale: float,
) -> torch.Tensor:  # [B, Hq, 1, D]
    """One query per row over masked slots, as two batched matmuls: the query heads that share a KV head form
    the rows of one GEMM. CPU SDPA with a mask is slower at this (measured at 32-64 rows: about 1.5x in fp32, 6x in
    bf16); a batched decode step of SmolLM2-135M at 32 rows took 129 instead of 155 ms."""
    b, hq, _, d = q.shape
    hkv = keys.shape[1]
    scores = torch.matmul(q.reshape(b, hkv, hq // hkv, d), keys.transpose(-1, -2)) * scale  # [B, Hkv, g, S]
    scores = scores.float().masked_fill(~mask, float("-inf"))
    out = torch.matmul(scores.softmax(-1).to(values.dtype), values)  # [B, Hkv, g, D]
    return out.reshape(b, hq, 1, d)


INVARIANT_MAX_T = 64  # batch-invariant attention covers verify passes (a longer prefill is the same in any mode)


class Layer(nn.Module):
    batch_invariant = False  # set with quantized weights, whose kernels are batch-invariant too
    fused_attention = False  # set where the layer is a plain Llama/Qwen2 one and its weights are quantized or fp32 on
    # a CPU with specmtp's kernels (quant.attend)
    fused = False  # ... and where its whole forward can run as four kernel calls and quant.attend

    def attends_in_kernel(self, b: int, t: int, cache: KVCache) -> bool:
        """Whether attention over t new tokens of b rows runs in quant.attend (which needs no mask)."""
        return self.fused_attention and b == 1 and t <= INVARIANT_MAX_T and cache.k[self.index].shape[0] == 1 and (
            self.wqkv.qweight is not None or fast_paths())

    def runs_fused(self, rows: int) -> bool:
        """Whether a forward over `rows` tokens takes the fused kernel calls (`fused` set): always with quantized
        weights; with dense fp32 ones for decode-sized passes (a prefill's products are faster through oneDNN),
        outside autograd, with the fast paths on."""
        return self.wqkv.qweight is not None or (rows <= SMALL_ROWS and fast_paths() and not torch.is_grad_enabled())

    def runs_stacked(self) -> bool:
        """Whether one row's forward may run as the stack's single kernel call (Transformer.stack set): any number of
        tokens, as no torch op runs between its products; with dense weights outside autograd, fast paths on."""
        return self.wqkv.qweight is not None or (fast_paths() and not torch.is_grad_enabled())

    def plain_layer(self) -> bool:
        """Pre-norm, SwiGLU MLP, nothing else (Llama, Qwen2): what the fused quantized forward computes."""
        return self.plain_attention() and self._plain_mlp()

    def query_only_plain(self) -> bool:
        """A drafter's layer that only queries another model's K/V (no K/V of its own, no q norm), with a plain
        pre-norm SwiGLU MLP: the fused quantized forward computes it too (its attention over the target's cache)."""
        return not self.own_kv and not self.cfg.qk_norm and self._plain_mlp()

    def _plain_mlp(self) -> bool:
        """Pre-norm, SwiGLU, and no extra norms, experts, per-layer inputs or scalar."""
        cfg = self.cfg
        return (cfg.activation == "silu" and not cfg.sandwich_norm and not cfg.num_experts and not cfg.ple_dim
                and not cfg.layer_scalar)

    def plain_attention(self) -> bool:
        """q/k/v of its own, RoPE and nothing else (no q/k/v norms): what quant.attend computes."""
        cfg = self.cfg
        return self.own_kv and not cfg.qk_norm and not cfg.v_norm and not self.values_are_keys

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.kind = cfg.layer_types[index]
        self.window = cfg.sliding_window if self.kind == SLIDING else None
        self.cfg = cfg
        self.source = cfg.kv_source_of(index)  # cache slots this layer reads; != index: KV-shared, no K/V of its own
        h = cfg.hidden_size
        self.head_dim, self.kv_heads = cfg.head_dim_of(index), cfg.kv_heads_of(index)
        self.q_size, self.kv_size = cfg.num_heads * self.head_dim, self.kv_heads * self.head_dim
        self.own_kv = cfg.owns_kv(index)
        self.values_are_keys = cfg.k_eq_v and self.kind == FULL
        n_kv = (1 if self.values_are_keys else 2) if self.own_kv else 0
        self.wqkv = Linear(h, self.q_size + n_kv * self.kv_size, bias=cfg.attn_bias)  # q[, k[, v]] rows
        self.wo = Linear(self.q_size, h, bias=False)
        inter = cfg.intermediate_of(index)
        self.w_gate_up = Linear(h, 2 * inter, bias=False)
        self.w_down = Linear(inter, h, bias=False)
        self.attn_norm = nn.Parameter(torch.ones(h))
        self.mlp_norm = nn.Parameter(torch.ones(h))
        if cfg.sandwich_norm:
            self.attn_post_norm = nn.Parameter(torch.ones(h))
            self.mlp_post_norm = nn.Parameter(torch.ones(h))
        if cfg.qk_norm:
            self.q_norm = nn.Parameter(torch.ones(self.head_dim))
            if self.own_kv:
                self.k_norm = nn.Parameter(torch.ones(self.head_dim))
        if cfg.num_experts:
            self.experts = Experts(cfg)
            self.mlp_post_norm_1 = nn.Parameter(torch.ones(h))
            self.moe_norm = nn.Parameter(torch.ones(h))
            self.moe_post_norm = nn.Parameter(torch.ones(h))
        if cfg.ple_dim:
            self.ple_gate = Linear(h, cfg.ple_dim, bias=False)
            self.ple_proj = Linear(cfg.ple_dim, h, bias=False)
            self.ple_norm = nn.Parameter(torch.ones(h))
        if cfg.layer_scalar:
            self.scalar = nn.Parameter(torch.ones(1))

    def attention(
        self,
        h: torch.Tensor,  # [B, T, H] normed input
        positions: torch.Tensor,  # [B, T]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin: [B, T, 1, D]
        mask: torch.Tensor,  # [B, 1, T, S]
        start: int,  # first cache slot attended to
        end: int,  # one past the last cache slot attended to
        cache: KVCache,
        tree: torch.Tensor | None = None,  # [B, T] a draft tree's parents (specmtp.tree); None: a causal run
    ) -> torch.Tensor:  # [B, T, H]
        return self.wo(self.attend_qkv(self.wqkv(h), positions, rope, mask, start, end, cache, tree))

    def attend_qkv(
        self,
        qkv: torch.Tensor,  # [B, T, (Hq + 2 Hkv) D] (or fewer heads where K/V are shared or values are keys)
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        start: int,
        end: int,
        cache: KVCache,
        tree: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [B, T, Hq D] before the output projection
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        b, t, _ = qkv.shape
        d = self.head_dim
        cos, sin = rope
        if self.attends_in_kernel(b, t, cache):
            # one row: RoPE, cache write and attention in one kernel call (quant.attend), a verify pass's tokens
            # each over exactly what a one-token step reads (quantized layers, and dense fp32 ones on a CPU)
            return quant.attend(qkv, int(positions[0, 0]), rope[0], rope[1], cache.k[self.index],
                                cache.v[self.index], cfg.num_heads, self.window, cfg.attn_scale,
                                None if tree is None else tree[0].contiguous())
        # a tree's tokens fill consecutive slots from the root's, whatever their positions
        slots = positions if tree is None else positions[:, :1] + torch.arange(t, device=positions.device)
        if self.own_kv and not cfg.qk_norm and not self.values_are_keys:  # Llama, Qwen2: one RoPE call for q and k
            qk = apply_rope(qkv[..., : self.q_size + self.kv_size].view(b, t, cfg.num_heads + self.kv_heads, d),
                            cos, sin)
            q, k = qk[:, :, : cfg.num_heads], qk[:, :, cfg.num_heads :]
            v = qkv[..., self.q_size + self.kv_size :].view(b, t, self.kv_heads, d)
            if cfg.v_norm:
                v = rms_norm_plain(v, eps)
            cache.write(self.index, slots, k, v)
            return self._attend(q, positions, mask, start, end, cache, tree is not None)
        q = qkv[..., : self.q_size].view(b, t, cfg.num_heads, d)
        if cfg.qk_norm:
            q = rms_norm(q, self.q_norm, eps)
        q = apply_rope(q, cos, sin)
        if self.own_kv:
            k = qkv[..., self.q_size : self.q_size + self.kv_size].view(b, t, self.kv_heads, d)
            v = k if self.values_are_keys else qkv[..., self.q_size + self.kv_size :].view(b, t, self.kv_heads, d)
            if cfg.qk_norm:
                k = rms_norm(k, self.k_norm, eps)
            if cfg.v_norm:
                v = rms_norm_plain(v, eps)
            cache.write(self.index, slots, apply_rope(k, cos, sin), v)
        return self._attend(q, positions, mask, start, end, cache, tree is not None)

    def _attend(
        self,
        q: torch.Tensor,  # [B, T, Hq, D] after RoPE
        positions: torch.Tensor,  # [B, T]
        mask: torch.Tensor | None,  # [B, 1, T, S]; None: every slot in [start, end) is visible
        start: int,
        end: int,
        cache: KVCache,
        masked: bool = False,  # only the mask says what each query sees (a draft tree), not its position
    ) -> torch.Tensor:  # [B, T, Hq D] before the output projection
        cfg = self.cfg
        b, t = q.shape[:2]
        keys = cache.k[self.source][:, :, start:end]  # [B, Hkv, S, D]
        values = cache.v[self.source][:, :, start:end]  # [B, Hkv, S, D]
        q = q.transpose(1, 2)  # [B, Hq, T, D]
        gqa = cfg.num_heads != keys.shape[1]
        if self.batch_invariant and 1 < t <= INVARIANT_MAX_T and not masked and self.own_kv:
            # One query at a time over exactly the slots a one-token step would read: a verified token's attention
            # is then computed as in target-only decoding, bit for bit (a multi-query SDPA blocks differently).
            # (A drafter's layers, reading another model's KV, need no such exactness: their mask says it all.)
            outs = []
            for i in range(t):
                pos = positions[:, i]
                lo = max(start, int(pos.min()) - self.window + 1) if self.window is not None else start
                a, z = lo - start, int(pos.max()) + 1 - start
                if b == 1:  # one row sees all of [a, z), as a step does
                    outs.append(F.scaled_dot_product_attention(
                        q[:, :, i : i + 1], keys[:, :, a:z], values[:, :, a:z], scale=cfg.attn_scale, enable_gqa=gqa))
                else:
                    outs.append(one_query_attention(q[:, :, i : i + 1], keys[:, :, a:z], values[:, :, a:z],
                                                    mask[:, :, i : i + 1, a:z], cfg.attn_scale))
            out = torch.cat(outs, dim=2)
        elif t == 1 and mask is not None:  # a batched decode step
            out = one_query_attention(q, keys, values, mask, cfg.attn_scale)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=cfg.attn_scale,
                                                 enable_gqa=gqa)  # [B, Hq, T, D]
        return out.transpose(1, 2).reshape(b, t, self.q_size)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, H]
        positions: torch.Tensor,  # [B, T]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin: [B, T, 1, D]
        mask: torch.Tensor,  # [B, 1, T, S]
        start: int,
        end: int,
        cache: KVCache,
        ple: torch.Tensor | None = None,  # [B, T, P] this layer's per-layer input (Gemma 4)
        tree: torch.Tensor | None = None,  # [B, T] a draft tree's parents (specmtp.tree); None: a causal run
    ) -> torch.Tensor:  # [B, T, H]
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        if self.fused and self.runs_fused(x.shape[0] * x.shape[1]):
            # plain or query-only plain layer: norms, SwiGLU, residual adds in the kernel calls
            own_pool(True)
            qkv = quant.qlinear(x, self.wqkv.kernel_weight, self.wqkv.bias, "rms_norm", self.attn_norm, eps)
            out = self.attend_qkv(qkv, positions, rope, mask, start, end, cache, tree)
            x = quant.qlinear(out, self.wo.kernel_weight, self.wo.bias, residual=x)
            gate_up = quant.qlinear(x, self.w_gate_up.kernel_weight, None, "rms_norm", self.mlp_norm, eps)
            return quant.qlinear(gate_up, self.w_down.kernel_weight, None, "swiglu", residual=x)
        out = self.attention(rms_norm(x, self.attn_norm, eps), positions, rope, mask, start, end, cache, tree)
        if cfg.sandwich_norm:
            out = rms_norm(out, self.attn_post_norm, eps)
        x = x + out
        h = rms_norm(x, self.mlp_norm, eps)
        gate, up = self.w_gate_up(h).chunk(2, dim=-1)
        out = self.w_down(_act(cfg, gate) * up)
        if cfg.num_experts:
            flat = x.reshape(-1, x.shape[-1])
            moe = self.experts(flat, rms_norm(flat, self.moe_norm, eps)).reshape(x.shape)
            out = rms_norm(out, self.mlp_post_norm_1, eps) + rms_norm(moe, self.moe_post_norm, eps)
        if cfg.sandwich_norm:
            out = rms_norm(out, self.mlp_post_norm, eps)
        x = x + out
        if ple is not None:
            g = _act(cfg, self.ple_gate(x)) * ple
            x = x + rms_norm(self.ple_proj(g), self.ple_norm, eps)
        if cfg.layer_scalar:
            x = x * self.scalar
        return x


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.ple_dim:
            self.ple_embed = nn.Embedding(cfg.ple_vocab, cfg.num_layers * cfg.ple_dim)
            self.ple_model_proj = Linear(cfg.hidden_size, cfg.num_layers * cfg.ple_dim, bias=False)
            self.ple_proj_norm = nn.Parameter(torch.ones(cfg.ple_dim))
        for kind, rope in cfg.rope.items():
            self.register_buffer(f"inv_freq_{kind}", rope_inv_freq(rope, cfg.kind_head_dim(kind)), persistent=False)

    head_q = None  # a quant.QuantWeight output head, when the model was quantized
    stack = None  # quant.stack_descriptor of the layers, when all are plain quantized ones: one kernel call for all
    head_screen = None  # a screen.HeadScreen of the dense fp32 head: greedy tokens through its q8 copy

    @property
    def head_weight(self):  # [V, H] dense tensor, or QuantWeight
        if self.head_q is not None:
            return self.head_q
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        c = self.cfg
        p = self.norm  # the compute dtype (the embedding table may be stored narrower)
        shapes = [(c.kv_heads_of(i), c.head_dim_of(i)) for i in range(c.num_layers)]
        sources = [c.kv_source_of(i) for i in range(c.num_layers)]
        return KVCache(batch_size, capacity, shapes, sources, p.dtype, p.device)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, T] -> [B, T, H] (scaled for Gemma)"""
        x = self.embed(tokens)
        if x.dtype != self.norm.dtype:  # a quantized model keeps its lookup table in bf16
            x = x.to(self.norm.dtype)
        if self.cfg.embed_scale != 1.0:
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        return x

    def per_layer_inputs(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gemma 4 per-layer inputs: tokens [B, T], embeddings x [B, T, H] -> [B, T, L, P]"""
        cfg = self.cfg
        shape = (*tokens.shape, cfg.num_layers, cfg.ple_dim)
        token_part = self.ple_embed(tokens) * torch.tensor(cfg.ple_dim**0.5, dtype=x.dtype)
        context = self.ple_model_proj(x) * cfg.hidden_size**-0.5
        context = rms_norm(context.reshape(shape), self.ple_proj_norm, cfg.rms_norm_eps)
        return (context + token_part.reshape(shape)) * 2**-0.5

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T]
        positions: torch.Tensor,  # [B, T] absolute positions, contiguous per row
        cache: KVCache,
    ) -> torch.Tensor:  # [B, T, H] final-normed hidden states
        return self.features(tokens, positions, cache)[0]

    def features(
        self,
        tokens: torch.Tensor,  # [B, T]
        positions: torch.Tensor,  # [B, T] absolute positions, contiguous per row
        cache: KVCache,
        taps: tuple[int, ...] = (),  # layers whose outputs (the residual stream after them) are returned too
        tree: torch.Tensor | None = None,  # [B, T] a draft tree's parents (specmtp.tree); None: a causal run
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # final-normed hidden [B, T, H], taps [B, T, len(taps), H]
        """The forward pass, with the residual stream after each layer in `taps` (ascending) kept: the lower
        layers' features a drafter fuses with the final hidden state (EAGLE-3's multi-layer features).
        With a tree, positions are the tokens' depths from the root's position (positions[:, 0]), and token i
        is cached in slot positions[:, 0] + i."""
        cfg = self.cfg
        if not taps_valid(taps, cfg.num_layers):
            raise ValueError(f"taps must be ascending layer indices below {cfg.num_layers}, got {taps}")
        kept: list[torch.Tensor] = []
        # One host read of the position range per forward (free on CPU) bounds the cache slots read.
        lo, hi = int(positions.min()), int(positions.max()) + 1
        if tree is not None:  # the tree's slots run past its deepest position
            hi = int(positions[:, 0].max()) + tokens.shape[1]
        if hi > cache.capacity:
            raise ValueError(f"position {hi - 1} is past the KV cache capacity {cache.capacity}")
        ropes = {kind: rope_cos_sin(getattr(self, f"inv_freq_{kind}"), positions) for kind in set(cfg.layer_types)}
        x = self.embed_tokens(tokens)
        if self.stack is not None and tokens.shape[0] == 1 and cache.batch_size == 1 and (
                cache.k[0].device.type == "cpu" and self.layers[0].runs_stacked()):
            # plain fused layers, one row: the whole stack in one kernel call, the same computation as below. A
            # prefill too, in pieces of up to INVARIANT_MAX_T tokens (each over the slots the pieces before it
            # wrote): every token then gets the bits a one-token step would give it, and the kernel's tiles beat
            # oneDNN's products at a prompt's sizes (SmolLM2, 48 tokens: 80 ms against 130)
            own_pool(True)
            x = x[0].contiguous()  # [T, H]
            t, h = x.shape
            tapped = x.new_empty(1, t, len(taps), h) if taps else None  # the kernel copies x out after each tap
            parents = None if tree is None else tree[0].contiguous()
            for c0 in range(0, t, INVARIANT_MAX_T):  # a tree (a verify pass) is always one piece
                c1, whole = min(t, c0 + INVARIANT_MAX_T), t <= INVARIANT_MAX_T
                piece = ropes if whole else {kind: (cos[:, c0:c1], sin[:, c0:c1]) for kind, (cos, sin) in ropes.items()}
                quant.run_stack(self.stack, x if whole else x[c0:c1], lo + c0, piece, cache.pointers(), cache.capacity,
                                cfg.rms_norm_eps, cfg.attn_scale, parents, self._tap_layers(taps),
                                None if tapped is None else tapped[0] if whole else tapped[0, c0:c1])
            return rms_norm(x[None], self.norm, cfg.rms_norm_eps), tapped
        rows = tokens.shape[0]
        if self.stack is not None and tokens.shape[1] == 1 and tree is None and cache.batch_size == rows and (
                cache.k[0].device.type == "cpu" and cache.k[0].is_contiguous() and self.layers[0].runs_stacked()):
            # a batched decode step (each row one token at its own position): the stack in one kernel call too, its
            # products over all rows at once and each row's attention as a one-row step's (the same bits as one)
            own_pool(True)
            x = x[:, 0].contiguous()  # [B, H]
            tapped = x.new_empty(rows, 1, len(taps), x.shape[-1]) if taps else None
            quant.run_stack_rows(self.stack, x, positions[:, 0].contiguous(), ropes, cache.pointers(), cache.capacity,
                                 cfg.rms_norm_eps, cfg.attn_scale, self._tap_layers(taps),
                                 None if tapped is None else tapped[:, 0])
            return rms_norm(x[:, None], self.norm, cfg.rms_norm_eps), tapped
        views = {}
        masked = {layer.kind for layer in self.layers if not layer.attends_in_kernel(*tokens.shape, cache)}
        for kind, rope in ropes.items():
            window = cfg.sliding_window if kind == SLIDING else None
            start = max(0, lo - window + 1) if window is not None else 0
            # one row, one token: every slot in [start, hi) is visible, so no mask (a faster attention path); nor
            # where every layer of the kind attends in the kernel, which reads the positions and the tree itself
            needs_mask = positions.shape != (1, 1) and kind in masked
            mask = attention_mask(positions, start, hi, window, tree) if needs_mask else None
            views[kind] = (rope, mask, start)
        ple = self.per_layer_inputs(tokens, x) if cfg.ple_dim else None
        for i, layer in enumerate(self.layers):
            rope, mask, start = views[layer.kind]
            x = layer(x, positions, rope, mask, start, hi, cache, None if ple is None else ple[:, :, i], tree)
            if i in taps:
                kept.append(x)
        return rms_norm(x, self.norm, cfg.rms_norm_eps), _stacked_taps(kept)

    def _tap_layers(self, taps: tuple[int, ...]) -> torch.Tensor | None:
        """taps as the stack kernel's int64 layer indices (None for none), made once per tuple."""
        if not taps:
            return None
        made = self.__dict__.setdefault("_tap_index", {})
        if taps not in made:
            made[taps] = torch.tensor(taps, dtype=torch.long)
        return made[taps]

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., H] -> [...] the first index of the largest of logits(hidden), bit for bit: through the head's
        screen where the full product would run through the dense kernel too (screen.py), else the logits."""
        screen = self.head_screen
        if screen is not None and not self.cfg.final_logit_softcap and through_kernel(hidden, screen.weight) \
                and screen.weight is self.head_weight:
            own_pool(True)
            return screen.argmax(hidden)
        return argmax(self.logits(hidden))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., H] -> logits [..., V] (soft-capped where the family does so)"""
        logits = linear(hidden, self.head_weight)
        cap = self.cfg.final_logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def taps_valid(taps: tuple[int, ...], num_layers: int) -> bool:
    """Tapped layers are distinct, ascending indices of existing layers."""
    return list(taps) == sorted(set(taps)) and all(0 <= i < num_layers for i in taps)


def _stacked_taps(kept: list[torch.Tensor]) -> torch.Tensor | None:
    """[B, T, H] per tap -> [B, T, n, H] (None without taps)"""
    return torch.stack(kept, 2) if kept else None


__all__ = ["Transformer", "rms_norm", "apply_rope", "rope_cos_sin", "attention_mask", "FULL", "SLIDING"]
