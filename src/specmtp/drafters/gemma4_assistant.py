"""Gemma 4 assistant (MTP) drafter: a few Gemma 4 layers that read the target's KV cache instead of their own.

One draft step, for a row whose last token t sits at position L (not yet in the target's cache):

    x      = pre_projection(concat(target.embed(t), h))     # h: the target hidden state that predicted t
    x      = layers(x) at position L; each layer's queries attend to the target's cached K/V of the
             target's last full-attention / last sliding-attention layer (its own type), slots [0, L)
             (sliding layers only the last `sliding_window` + 1 of them, as transformers' assistant mask
             does); the drafter has no KV of its own
    logits = head(norm(x))        tied head, or the centroid-masked head (`use_ordered_embeddings`)
    h      = post_projection(norm(x))   fed back as the next step's hidden state

Every draft step of a round uses the same position L and the same target KV, so drafting allocates no
cache and copies nothing: the layers index the target's cache tensors directly. This matches
transformers' `SinglePositionMultiTokenCandidateGenerator` + `Gemma4AssistantForCausalLM`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from specmtp.checkpoint import build_model, hf_to_native, read_config, read_tensors, safetensors_files
from specmtp.config import SLIDING, from_hf_config
from specmtp.drafters.base import DraftContext, Drafter, Proposal, pick_draft
from specmtp.drafters.mtp import run_layers
from specmtp.errors import SpecMTPError
from specmtp.linear import linear
from specmtp.loader import LoadedModel
from specmtp.model import Transformer, rms_norm

_SCHEDULES = {"constant": "constant", "heuristic": "heuristic", "heuristic_transient": "heuristic"}


class MaskedHead(nn.Module):
    """Centroid-masked output head: score `top_k` of `num_centroids` token clusters, then only their tokens."""

    def __init__(self, hidden: int, vocab: int, num_centroids: int, top_k: int) -> None:
        super().__init__()
        if vocab % num_centroids:
            raise SpecMTPError(f"assistant vocab {vocab} is not divisible by num_centroids {num_centroids}")
        self.top_k, self.num_centroids, self.per_centroid = top_k, num_centroids, vocab // num_centroids
        self.centroids = nn.Parameter(torch.zeros(num_centroids, hidden))  # [C, H]
        self.register_buffer("token_ordering", torch.zeros(vocab, dtype=torch.long))  # [V] tokens grouped by cluster

    def forward(self, x: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """x: [B, H], head: [V, H] -> logits [B, V]; tokens outside the chosen clusters get min - 1."""
        top = torch.topk(linear(x, self.centroids), self.top_k, dim=-1).indices  # [B, k]
        ids = self.token_ordering.view(self.num_centroids, self.per_centroid)[top].flatten(1)  # [B, k*K]
        scores = torch.einsum("bh,bnh->bn", x, head[ids])  # [B, k*K]
        out = torch.full((x.shape[0], head.shape[0]), float(scores.min()) - 1.0, dtype=x.dtype)
        return out.scatter_(-1, ids, scores)


class Gemma4AssistantDrafter(Drafter):
    def __init__(self, path: Path) -> None:
        raw = read_config(path)
        if raw.get("model_type") != "gemma4_assistant":
            raise SpecMTPError(f"{path} is not a Gemma 4 assistant (model_type {raw.get('model_type')!r})")
        self.name = str(path)
        text = dict(raw.get("text_config") or {})
        text["model_type"] = "gemma4_text"
        text["num_kv_shared_layers"] = 0  # bound to the target's producer layers in check_compatible
        for key in ("hidden_size_per_layer_input", "vocab_size_per_layer_input"):
            text[key] = 0
        cfg = dataclasses.replace(from_hf_config(text), external_kv=True)
        if cfg.num_experts or cfg.ple_dim:
            raise SpecMTPError(f"{path}: an assistant cannot have MoE blocks or per-layer inputs")
        self.backbone_hidden = int(raw.get("backbone_hidden_size", 0))
        tensors = read_tensors(safetensors_files(path))
        trunk = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        if "lm_head.weight" in tensors and not cfg.tie_word_embeddings:
            trunk["lm_head.weight"] = tensors["lm_head.weight"]
        self.model: Transformer = build_model(cfg, hf_to_native(cfg, trunk, torch.float32))
        self.cfg = cfg

        def need(name: str) -> torch.Tensor:
            if name not in tensors:
                raise SpecMTPError(f"assistant checkpoint {path} is missing tensor {name!r}")
            return tensors[name].float()

        self.pre_projection = need("pre_projection.weight")  # [Ha, 2*Ht]
        self.post_projection = need("post_projection.weight")  # [Ht, Ha]
        if self.pre_projection.shape != (cfg.hidden_size, 2 * self.backbone_hidden):
            raise SpecMTPError(f"assistant pre_projection has shape {tuple(self.pre_projection.shape)}, expected "
                               f"({cfg.hidden_size}, {2 * self.backbone_hidden})")
        self.masked_head = None
        if raw.get("use_ordered_embeddings"):
            self.masked_head = MaskedHead(cfg.hidden_size, cfg.vocab_size, int(raw["num_centroids"]),
                                          int(raw["centroid_intermediate_top_k"]))
            self.masked_head.centroids.data = need("masked_embedding.centroids.weight")
            self.masked_head.token_ordering.copy_(need("masked_embedding.token_ordering").long())
        gen_path = path / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        self.default_num_draft_tokens = int(gen["num_assistant_tokens"]) if "num_assistant_tokens" in gen else None
        sched = gen.get("num_assistant_tokens_schedule")
        self.default_schedule = _SCHEDULES.get(sched) if sched else None
        self.bound = False

    def check_compatible(self, target: LoadedModel) -> None:
        tc, cfg = target.config, self.cfg
        if self.backbone_hidden != tc.hidden_size:
            raise SpecMTPError(f"assistant backbone_hidden_size {self.backbone_hidden} does not fit the target's "
                               f"hidden size {tc.hidden_size}")
        if cfg.vocab_size != tc.vocab_size:
            raise SpecMTPError(f"assistant vocabulary {cfg.vocab_size} does not fit the target's {tc.vocab_size}")
        producers = tc.kv_producers()
        for i, layer in enumerate(self.model.layers):
            if layer.kind not in producers:
                raise SpecMTPError(f"assistant layer {i} attends {layer.kind} but the target has no such layer")
            src = producers[layer.kind]
            want = (tc.kv_heads_of(src), tc.head_dim_of(src))
            have = (cfg.kv_heads_of(i), cfg.head_dim_of(i))
            if want != have:
                raise SpecMTPError(f"assistant layer {i} ({layer.kind}) expects (kv_heads, head_dim) {have}, the "
                                   f"target's layer {src} has {want}")
            if layer.kind == SLIDING and cfg.sliding_window != tc.sliding_window:
                raise SpecMTPError(f"assistant sliding_window {cfg.sliding_window} differs from the target's "
                                   f"{tc.sliding_window}")
            layer.source = src  # queries read the target's cache of this layer, no copy
        self.bound = True

    def begin(self, ctx: DraftContext) -> None:
        if not self.bound:
            raise SpecMTPError("assistant drafter used before check_compatible bound it to a target")

    @torch.inference_mode()
    def step(
        self,
        token: torch.Tensor,  # [B] last token, at position `positions`, not in the target cache
        hidden: torch.Tensor,  # [B, Ht] target (or previous step's projected) hidden state
        positions: torch.Tensor,  # [B]
        ctx: DraftContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # logits [B, V], next hidden [B, Ht]
        m, cfg = self.model, self.cfg
        x = torch.cat([ctx.target.embed_tokens(token[:, None]), hidden[:, None]], dim=-1)  # [B, 1, 2Ht]
        x = linear(x, self.pre_projection)  # [B, 1, Ha]
        inv_freq = {kind: getattr(m, f"inv_freq_{kind}") for kind in cfg.rope}
        x = run_layers(m.layers, cfg, inv_freq, x, positions[:, None], ctx.cache, int(positions.max()))
        x = rms_norm(x, m.norm, cfg.rms_norm_eps)[:, 0]  # [B, Ha]
        # no soft-capping: transformers' assistant applies its head directly
        logits = self.masked_head(x, m.head_weight) if self.masked_head is not None else linear(x, m.head_weight)
        return logits, linear(x, self.post_projection)

    def propose(self, ctx: DraftContext, n: int) -> Proposal:
        token = torch.tensor([s[-1] for s in ctx.sequences])  # [B]
        positions = torch.tensor([len(s) - 1 for s in ctx.sequences])  # [B] fixed for the whole round
        hidden = ctx.hidden
        drafts, probs = [], []
        for _ in range(n):
            logits, hidden = self.step(token, hidden, positions, ctx)
            token, q = pick_draft(logits, ctx)
            if q is not None:
                probs.append(q)
            drafts.append(token)
        return Proposal(torch.stack(drafts, 1), torch.full((len(ctx.sequences),), n, dtype=torch.long),
                        torch.stack(probs, 1) if probs else None)
