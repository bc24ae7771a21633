"""Trained MTP drafters for Llama, Qwen2 and Gemma 3 targets: the Gemma 4 assistant's design, in specmtp's format.

One draft step, for a row whose last token t sits at position L (not yet in the target's cache):

    x      = pre_projection(concat(target.embed(t), h))   # h: target hidden state (final-normed) that predicted t
    x      = layers(x) at position L; queries only, over the target's cached K/V of its last layer of each
             attention type, slots [0, L) (sliding layers: the last `sliding_window` + 1 of them)
    h      = post_projection(norm(x))                      # next step's hidden state, in the target's space
    logits = target_head[draft_vocab] @ h                  # reduced head: only the draft vocabulary's rows

With taps (target layers i, j, ...), a round's first h is fuse(concat(norm(x_i), norm(x_j), ..., h)) from the
residual stream x after those layers at the same position (EAGLE-3's multi-layer features; later steps feed back
their own h).

The head is the target's own output matrix restricted to a frequency-ranked draft vocabulary (FR-Spec's idea):
with 49k-152k token vocabularies a full head costs several times the rest of the drafter, while the few
thousand most frequent tokens of the target's own output carry nearly all of its argmax mass. The drafter
stores no embedding and no head (both are the target's), only its trunk, projections and the vocabulary ids,
so a shipped drafter is a few MB. `MTPModule.forward` is the same function at training time (many anchors L
at once, gradients through the queries) and at draft time (one anchor per row), so the drafter is trained
exactly as it is used.

Files: config.json (`model_type: specmtp_mtp`, the drafter's layer config, the target it was trained for),
model.safetensors, generation_config.json (recommended draft length and schedule).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from specmtp import hugepages, quant
from specmtp.config import FULL, SLIDING, ModelConfig, RopeConfig
from specmtp.drafters.base import DraftContext, RecurrentDrafter
from specmtp.errors import SpecMTPError
from specmtp.linear import Linear, linear, own_pool
from specmtp.loader import LoadedModel
from specmtp.model import (
    Layer,
    attention_mask,
    rms_norm,
    rms_norm_plain,
    rope_cos_sin,
    rope_inv_freq,
    taps_valid,
)
from specmtp.quant import select_rows

MODEL_TYPE = "specmtp_mtp"
TRAINABLE_FAMILIES = ("llama", "qwen2", "gemma3")


def run_layers(
    layers: nn.ModuleList,
    cfg: ModelConfig,
    inv_freq: dict[str, torch.Tensor],
    x: torch.Tensor,  # [B, T, Ha] one query per anchor
    positions: torch.Tensor,  # [B, T] anchor positions L: each query sees slots [0, L) of the target cache
    kv: Any,  # the target's KVCache, or anything with .k / .v indexed by the target's layer numbers
    end: int,  # one past the last slot any query sees (max L)
) -> torch.Tensor:  # [B, T, Ha]
    """Query-only layers over another model's KV, with transformers' assistant mask (the sliding window keeps
    the last W + 1 slots). Shared by the Gemma 4 assistant and specmtp's own MTP drafters."""
    lo = int(positions.min())
    same = lo == end  # every query at one position (a draft step): each sees all of [start, end), so no mask
    views = {}
    for kind in {layer.kind for layer in layers}:
        window = cfg.sliding_window + 1 if kind == SLIDING else None
        start = max(0, lo - window) if window is not None else 0
        mask = None if same else attention_mask(positions - 1, start, end, window)
        views[kind] = (rope_cos_sin(inv_freq[kind], positions), mask, start)
    for layer in layers:
        rope, mask, start = views[layer.kind]
        x = layer(x, positions, rope, mask, start, end, kv)
    return x


def drafter_config(target: ModelConfig, layers: int, hidden: int, intermediate: int, heads: int) -> ModelConfig:
    """The drafter's layer config: the target's family and attention geometry, its own widths."""
    if target.family not in TRAINABLE_FAMILIES:
        raise SpecMTPError(f"MTP drafters can be trained for {', '.join(TRAINABLE_FAMILIES)} targets, not "
                           f"{target.family!r} (Gemma 4 targets use their released assistant)")
    producers = target.kv_producers()
    if layers < 1:
        raise SpecMTPError(f"a drafter needs at least one layer, got {layers}")
    last = FULL if FULL in producers else SLIDING
    types = tuple([SLIDING if SLIDING in producers else last] * (layers - 1) + [last])
    sources = tuple(producers[t] for t in types)
    kv_heads = tuple(target.kv_heads_of(s) for s in sources)
    if any(heads % k for k in kv_heads):
        raise SpecMTPError(f"drafter heads {heads} must be a multiple of the target's KV heads {set(kv_heads)}")
    return dataclasses.replace(
        target, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers, num_heads=heads,
        layer_types=types, kv_source=sources, layer_kv_heads=kv_heads,
        layer_head_dims=tuple(target.head_dim_of(s) for s in sources), layer_intermediate=(),
        external_kv=True, ple_dim=0, ple_vocab=0, num_experts=0, top_k_experts=0, moe_intermediate=0,
        layer_scalar=False, tie_word_embeddings=True,
    )


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    d = dict(d)
    d["rope"] = {k: RopeConfig(**v) for k, v in d["rope"].items()}
    for k in ("layer_types", "eos_token_ids", "layer_head_dims", "layer_kv_heads", "layer_intermediate", "kv_source"):
        d[k] = tuple(d.get(k) or ())
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in d.items() if k in known})


def target_fingerprint(target: nn.Module) -> list[float]:
    """A few embedding values that tell one set of target weights from another with the same shapes."""
    return [round(float(x), 3) for x in target.embed.weight[:8, :32].float().flatten()]


def same_weights(a: list[float], b: list[float]) -> bool:
    """Fingerprints of the same weights (in any dtype: cosine ~1) vs other weights (cosine ~0)."""
    x, y = torch.tensor(a), torch.tensor(b)
    return x.shape == y.shape and float(torch.nn.functional.cosine_similarity(x, y, dim=0)) > 0.99


class ProjectedTrunk(nn.Module):
    """What specmtp's MTP drafters and the Gemma 4 assistant share: [target embedding ++ hidden state] ->
    pre_projection -> query-only layers over the target's KV -> final norm -> post_projection (the next hidden
    state, in the target's space)."""

    def __init__(self, cfg: ModelConfig, target_hidden: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.pre_projection = Linear(2 * target_hidden, cfg.hidden_size, bias=False)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.post_projection = Linear(cfg.hidden_size, target_hidden, bias=False)
        self.inv_freq = {kind: rope_inv_freq(rope, cfg.kind_head_dim(kind)) for kind, rope in cfg.rope.items()}

    def trunk(
        self,
        embeds: torch.Tensor,  # [B, T, Ht] target embedding of each anchor's last token
        hidden: torch.Tensor,  # [B, T, Ht] target (or previous step's) hidden state
        positions: torch.Tensor,  # [B, T] anchor positions
        kv: Any,  # target KV (cache, or a training batch's stored K/V)
        end: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # next hidden [B, T, Ht], normed trunk output x [B, T, Ha]
        x = self.pre_projection(torch.cat([embeds, hidden.to(embeds.dtype)], dim=-1))
        x = run_layers(self.layers, self.cfg, self.inv_freq, x, positions, kv, end)
        x = rms_norm(x, self.norm, self.cfg.rms_norm_eps)
        return self.post_projection(x), x


class MTPModule(ProjectedTrunk):
    def __init__(self, cfg: ModelConfig, target_hidden: int, draft_vocab: torch.Tensor,
                 taps: tuple[int, ...] = ()) -> None:
        super().__init__(cfg, target_hidden)
        self.register_buffer("draft_vocab", draft_vocab.long().clone())  # [K] target token ids
        self.taps = tuple(taps)  # target layers whose outputs the first step fuses with the final hidden state
        if self.taps:
            self.tap_norm = nn.Parameter(torch.ones(len(self.taps), target_hidden))
            self.fuse = Linear((len(self.taps) + 1) * target_hidden, target_hidden, bias=False)

    def fused(self, hidden: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
        """A round's first hidden state from several of the target's layers (EAGLE-3's multi-layer features):
        hidden [.., Ht] final-normed, taps [.., n, Ht] the residual stream after each tapped layer -> [.., Ht]"""
        eps, width = self.cfg.rms_norm_eps, taps.shape[-1]
        weight = self.fuse.kernel_weight
        if (hidden.dtype == taps.dtype == torch.float32 and not isinstance(weight, torch.Tensor) and width % 32 == 0
                and not torch.is_grad_enabled()):
            # a quantized fuse (inference): the norms and the product in one kernel call (just after a verify pass,
            # the first call of each torch op costs tens of microseconds; the round's first step waits on this)
            own_pool(True)
            x = torch.cat([taps.flatten(-2), hidden], dim=-1)
            return quant.qlinear(x, weight, None, "tap_norm", self.tap_norm.flatten(), eps, segment=width)
        if hidden.dtype == taps.dtype == torch.float32:  # one fused op (a draft round's first step pays every op)
            normed = F.rms_norm(taps, (width,), None, eps) * self.tap_norm
        else:
            normed = rms_norm_plain(taps.to(hidden.dtype), eps) * self.tap_norm.to(hidden.dtype)
        return self.fuse(torch.cat([normed.flatten(-2), hidden], dim=-1))

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, kv: Any,
                end: int) -> torch.Tensor:  # [B, T, Ht] next hidden state (its head is the target's, outside)
        return self.trunk(embeds, hidden, positions, kv, end)[0]

    # training's view of a draft step (shared with the Gemma 4 assistant's module): (next hidden, logits, aux)
    def draft(self, embeds, hidden, positions, kv, end, head):
        """head: [K, Ht] the target's rows of the draft vocabulary -> (next hidden, logits [.., K], None)"""
        h = self(embeds, hidden, positions, kv, end)
        return h, h @ head.T, None

    def pick(self, logits: torch.Tensor, aux: None) -> torch.Tensor:
        return logits.max(-1).indices  # the argmax (torch's argmax of bf16 logits is ~5x slower on the CPU)


TREE_BRANCHES = 3  # a trained drafter drafts trees of 3 candidates a node under greedy decoding (1.05x over chains)


def save_drafter(module: MTPModule, out: Path, target: LoadedModel, meta: dict[str, Any],
                 num_draft_tokens: int, dtype: torch.dtype = torch.bfloat16) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tc = target.config
    config = {
        "model_type": MODEL_TYPE,
        "drafter": module.cfg.to_dict(),
        "target": {"name": meta.get("target_name", str(target.path)), "family": tc.family,
                   "hidden_size": tc.hidden_size, "vocab_size": tc.vocab_size, "num_layers": tc.num_layers,
                   "fingerprint": target_fingerprint(target.model)},
        "draft_vocab_size": int(module.draft_vocab.numel()),
        "taps": list(module.taps),
        "training": meta,
    }
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    gen = {"num_assistant_tokens": num_draft_tokens, "num_assistant_tokens_schedule": "constant",
           "specmtp_schedule": "adaptive", "specmtp_branches": TREE_BRANCHES}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=1) + "\n")


def load_module(path: Path) -> tuple[MTPModule, dict[str, Any]]:
    """Read a drafter directory; every failure names the file and the problem."""
    cfg_path = path / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SpecMTPError(f"cannot read MTP drafter config {cfg_path}: {e}") from None
    if raw.get("model_type") != MODEL_TYPE:
        raise SpecMTPError(f"{path} is not a specmtp MTP drafter (model_type {raw.get('model_type')!r})")
    try:
        cfg = config_from_dict(raw["drafter"])
        target_hidden = int(raw["target"]["hidden_size"])
        taps = tuple(int(i) for i in raw.get("taps", ()))
    except (KeyError, TypeError, ValueError) as e:
        raise SpecMTPError(f"MTP drafter config {cfg_path} is incomplete or malformed: {e}") from None
    try:
        state = load_file(str(path / "model.safetensors"))
    except (OSError, SafetensorError) as e:
        raise SpecMTPError(f"corrupt or truncated drafter weights {path / 'model.safetensors'}: {e}") from None
    if "draft_vocab" not in state:
        raise SpecMTPError(f"drafter weights {path / 'model.safetensors'} lack the tensor 'draft_vocab'")
    module = MTPModule(cfg, target_hidden, state["draft_vocab"], taps)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise SpecMTPError(f"drafter weights {path / 'model.safetensors'} do not match its config: "
                           f"missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise SpecMTPError(f"drafter tensor {k!r} has shape {tuple(v.shape)}, its config implies "
                               f"{tuple(expected[k].shape)}")
    module.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()})
    module.requires_grad_(False)
    return module, raw


class MTPDrafter(RecurrentDrafter):
    """specmtp's MTP drafter behind the drafter interface; reads the target's KV cache in place."""

    def __init__(self, path: Path, full_head: bool = False, weights: str = "auto") -> None:
        """weights: "auto" computes with q8 weights (trunk and head rows) beside a dense fp32 target on a CPU
        with specmtp's kernels, in the target's own format beside a quantized one; "dense": as stored."""
        if weights not in ("auto", "dense"):
            raise SpecMTPError(f"MTP drafter weights must be 'auto' or 'dense', got {weights!r}")
        self.path, self.name = path, str(path)
        self.module, self.raw = load_module(path)
        self.taps = self.module.taps
        self.full_head = full_head  # draft over the whole vocabulary (to measure what the reduced head costs)
        self.weights = weights
        gen_path = path / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        self.default_num_draft_tokens = int(gen["num_assistant_tokens"]) if "num_assistant_tokens" in gen else None
        self.default_schedule = gen.get("specmtp_schedule")
        self.branches = int(gen.get("specmtp_branches", 1))  # candidate children per draft-tree node (1: chains)
        self.head = None  # [K, Ht] target head rows of the draft vocabulary (dense or quantized)
        self.vocab: torch.Tensor | None = None  # [K] their token ids (None: identity)
        self.quantized = False
        self.stack: torch.Tensor | None = None  # quant.stack_descriptor of the layers where one call runs them all
        self.sources = torch.tensor([layer.source for layer in self.module.layers])  # [La] the target layers read
        self._rope: tuple[int, int, torch.Tensor, torch.Tensor] | None = None  # (position, branches, cos, sin)
        self._kv: tuple[torch.Tensor, torch.Tensor] | None = None  # (a cache's pointers, those the layers read)
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None  # RoPE cos, sin [P, D] of positions 0 .. P - 1
        self._fuse_fields: torch.Tensor | None = None  # matrix_fields of a quantized fuse (taps), for draft_step
        # (matrix_fields of pre/post_projection and head, head rows, the target's embedding, its scale): a step as one
        # kernel call (quant.draft_step), where the stack runs and the target's embedding table is fp32
        self._step: tuple[torch.Tensor, int, torch.Tensor, float] | None = None

    def check_compatible(self, target: LoadedModel) -> None:
        want, tc = self.raw["target"], target.config
        for key, have in (("family", tc.family), ("hidden_size", tc.hidden_size), ("vocab_size", tc.vocab_size),
                          ("num_layers", tc.num_layers)):
            if want[key] != have:
                raise SpecMTPError(f"MTP drafter {self.name} was trained for {want['name']!r} ({key} {want[key]}), "
                                   f"the target has {key} {have}")
        if not same_weights(target_fingerprint(target.model), want["fingerprint"]):
            raise SpecMTPError(f"MTP drafter {self.name} was trained for other weights ({want['name']!r}): its "
                               "target's embedding values differ from this target's")
        if not taps_valid(self.taps, tc.num_layers):
            raise SpecMTPError(f"MTP drafter {self.name} reads the outputs of target layers {list(self.taps)}, "
                               f"which a {tc.num_layers}-layer target does not have")
        producers = tc.kv_producers()
        for i, layer in enumerate(self.module.layers):
            src = layer.source
            if producers.get(layer.kind) != src or (tc.kv_heads_of(src), tc.head_dim_of(src)) != (
                    layer.kv_heads, layer.head_dim):
                raise SpecMTPError(f"MTP drafter layer {i} reads target layer {src} ({layer.kind}), which this "
                                   f"target does not provide with {layer.kv_heads} KV heads of dim {layer.head_dim}")
        self.module.to(target.model.norm.dtype)
        head = target.model.head_weight
        # A draft only proposes (the target's verification keeps the output exact), and a draft step is bound by
        # the bytes of its weights: beside a dense fp32 target it reads q8 weights, a quarter of the bytes
        # (Qwen2.5-Coder-1.5B's drafter: its 8192 head rows 0.60 -> 0.09 ms a step); beside a quantized target,
        # the target's format.
        dense_fp32 = isinstance(head, torch.Tensor) and head.dtype == torch.float32 and head.device.type == "cpu"
        fmt = (f"q{head.fmt}" if not isinstance(head, torch.Tensor)
               else "q8" if self.weights == "auto" and dense_fp32 and quant.available() else None)
        if fmt is not None and not self.quantized:
            quant.quantize_model(self.module, fmt, head=False)
            self.quantized = True
        if self.full_head:
            self.head, self.vocab = head, None
        else:
            self.vocab = self.module.draft_vocab
            self.head = select_rows(head, self.vocab)
            if fmt is not None and isinstance(self.head, torch.Tensor) and self.head.shape[1] % quant.QK == 0:
                self.head = quant.quantize(self.head, fmt)
        hugepages.adopt(hugepages.large_tensors(self.module, (self.head,)))  # in 2 MB pages, as the target's weights
        self.stack = quant.stack_descriptor(self.module.layers) if self.quantized else None
        self._step, self._kv, self._fuse_fields = None, None, None
        table = target.model.embed.weight
        mats = (self.module.pre_projection.kernel_weight, self.module.post_projection.kernel_weight, self.head)
        if self.stack is not None and table.dtype == torch.float32 and table.is_contiguous() and all(
                not isinstance(m, torch.Tensor) or (m.dtype == torch.float32 and m.is_contiguous()) for m in mats) and (
                self.module.norm.dtype == torch.float32):
            fields = torch.tensor([f for m in mats for f in quant.matrix_fields(m)], dtype=torch.int64)
            self._step = (fields, mats[2].shape[0], table, float(target.config.embed_scale))
            fuse = self.module.fuse.kernel_weight if self.taps else None
            if fuse is not None and not isinstance(fuse, torch.Tensor) and table.shape[1] % quant.QK == 0 and (
                    self.module.tap_norm.dtype == torch.float32):  # first_state's quantized path, in the step's call
                self._fuse_fields = torch.tensor(quant.matrix_fields(fuse), dtype=torch.int64)

    def begin(self, ctx: DraftContext) -> None:
        if self.head is None:
            raise SpecMTPError("MTP drafter used before check_compatible bound it to a target")

    @torch.inference_mode()
    def first_state(self, ctx: DraftContext) -> torch.Tensor:
        if not self.taps:
            return ctx.hidden
        if ctx.taps is None or ctx.taps.shape[1] != len(self.taps):
            raise SpecMTPError(f"MTP drafter {self.name} needs the target's layers {list(self.taps)} (ctx.taps)")
        return self.module.fused(ctx.hidden, ctx.taps)

    @torch.inference_mode()
    def step(self, token: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
             ctx: DraftContext) -> tuple[torch.Tensor, torch.Tensor]:  # logits [B, W, K], next hidden [B, W, Ht]
        """token [B, W] (W branches per row) at the row's positions [B] (not yet cached), hidden [B, W, Ht] ->
        draft-vocabulary logits, next hidden. The branches are queries side by side: one pass over the weights."""
        if self.stack is not None and token.shape[0] == 1:
            if self._step is not None:  # the whole step in one kernel call
                logits, h = self._kernel_step(token[0], hidden[0], int(positions[0]), ctx)
                return logits[None], h[None]
            return self._stack_step(ctx.target.embed_tokens(token)[0], hidden[0], int(positions[0]), ctx)
        embeds = ctx.target.embed_tokens(token)  # [B, W, Ht]
        where = positions[:, None].expand(token.shape)  # [B, W]
        h = self.module(embeds, hidden, where, ctx.cache, int(positions.max()))
        return linear(h, self.head), h

    @torch.inference_mode()
    def step_top(self, token: torch.Tensor, hidden: torch.Tensor | None, positions: torch.Tensor, ctx: DraftContext,
                 k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._step is None or self.stack is None or token.shape[0] != 1 or k > 8:
            return super().step_top(token, hidden, positions, ctx, k)
        fuse = None
        if hidden is None:  # a round's first step: with taps, their fusion in the same call (first_state's)
            if self.taps and self._fuse_in_kernel(ctx):
                fuse = ctx.taps[0]  # [n, Ht]
                hidden = ctx.hidden[:, None]
            else:
                hidden = self.first_state(ctx)[:, None]
        probs, ids, h = self._kernel_step(token[0], hidden[0], int(positions[0]), ctx, k, fuse)
        return probs[None], ids[None], h[None]

    def _fuse_in_kernel(self, ctx: DraftContext) -> bool:
        """Whether first_state's fusion runs as the kernel's tap-norm product (a quantized fuse, fp32 features), which
        draft_step then computes the same way."""
        return (self._fuse_fields is not None and ctx.taps is not None and ctx.taps.shape[1] == len(self.taps)
                and ctx.hidden.dtype == torch.float32 and ctx.taps.dtype == torch.float32)

    def _rope_rows(self, position: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, >= w, 1, D] at `position` (a round's steps share it): the table's row, one per branch, made
        once a round for up to 8 branches."""
        if self._rope is None or self._rope[0] != position or self._rope[1] < w:
            cos, sin = (t[position].expand(max(w, 8), -1)[None, :, None].contiguous()
                        for t in self._rope_table(position + 1))
            self._rope = (position, max(w, 8), cos, sin)
        return self._rope[2], self._rope[3]

    def _kv_pointers(self, cache) -> torch.Tensor:
        """[La, 2] the target cache's K/V pointers of the layers the drafter reads, made once per cache."""
        ptrs = cache.pointers()
        if self._kv is None or self._kv[0] is not ptrs:
            self._kv = (ptrs, ptrs[self.sources].contiguous())
        return self._kv[1]

    def _kernel_step(self, token: torch.Tensor, hidden: torch.Tensor, position: int, ctx: DraftContext,
                     top: int = 0, taps: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """One row's step as one kernel call (quant.draft_step: the target's embedding lookup and the four calls of
        _stack_step, in C): token [W], hidden [W, Ht] -> logits [W, K], next hidden [W, Ht]; with top, the top
        probabilities [W, top] and token ids [W, top] instead of the logits. taps [n, Ht]: hidden is the target's
        and the step reads first_state's fusion of the two (one branch)."""
        own_pool(True)
        mats, rows, embedding, emb_scale = self._step
        mod, cache = self.module, ctx.cache
        fuse = None if taps is None else (self._fuse_fields, mod.tap_norm, taps.contiguous())
        return quant.draft_step(token, embedding, emb_scale, hidden.contiguous(), mats, rows, mod.norm, self.stack,
                                self._rope_table(cache.capacity), self._kv_pointers(cache), cache.capacity, position,
                                mod.cfg.rms_norm_eps, mod.cfg.attn_scale, top, self.vocab, fuse)

    def _rope_table(self, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [P, D] for positions 0 .. P - 1 (P >= positions), grown as caches grow: a round's step reads its
        position's row where computing it cost half a dozen torch ops a round."""
        if self._table is None or self._table[0].shape[0] < positions:
            cos, sin = rope_cos_sin(self.module.inv_freq[FULL], torch.arange(max(positions, 1024))[None])
            self._table = (cos[0, :, 0].contiguous(), sin[0, :, 0].contiguous())
        return self._table

    def _stack_step(self, embeds: torch.Tensor, hidden: torch.Tensor, position: int,
                    ctx: DraftContext) -> tuple[torch.Tensor, torch.Tensor]:  # logits [1, W, K], next hidden [1, W, Ht]
        """One row's step as four kernel calls: pre_projection, every layer (quant.run_stack: query-only attention
        over the target's cache in C), the final norm with post_projection, the head. The module's forward computes
        the same (attention and the final norm to rounding) through a dozen torch ops and Python calls a layer; a
        step is small enough that those cost more than its products (SmolLM2's drafter: 0.9 ms a step in the
        engine, 0.5 ms of it the products)."""
        mod, eps, w = self.module, self.module.cfg.rms_norm_eps, embeds.shape[0]
        own_pool(True)  # torch on one thread while the kernels' pool runs
        x = quant.qlinear(torch.cat([embeds, hidden.to(embeds.dtype)], dim=-1), mod.pre_projection.kernel_weight)
        cos, sin = self._rope_rows(position, w)
        cache = ctx.cache
        quant.run_stack(self.stack, x, position, {FULL: (cos[:, :w], sin[:, :w])}, self._kv_pointers(cache),
                        cache.capacity, eps, mod.cfg.attn_scale)
        h = quant.qlinear(x, mod.post_projection.kernel_weight, None, "rms_norm", mod.norm, eps)  # [W, Ht]
        return quant.qlinear(h, self.head)[None], h[None]
