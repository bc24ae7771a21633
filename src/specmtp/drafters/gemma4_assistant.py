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
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from specmtp.checkpoint import hf_to_native, native_to_hf, read_config, read_tensors, safetensors_files
from specmtp.config import FULL, SLIDING, ModelConfig, from_hf_config
from specmtp.drafters.base import DraftContext, RecurrentDrafter
from specmtp.drafters.mtp import ProjectedTrunk
from specmtp.errors import SpecMTPError
from specmtp.linear import linear
from specmtp.loader import LoadedModel

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
        out = torch.full((x.shape[0], head.shape[0]), float(scores.min()) - 1.0, dtype=scores.dtype)
        return out.scatter_(-1, ids, scores)

    def cluster_of(self) -> torch.Tensor:
        """[V] the cluster of each token."""
        cluster = torch.empty_like(self.token_ordering)
        cluster[self.token_ordering] = torch.arange(len(cluster)) // self.per_centroid
        return cluster


class AssistantModule(ProjectedTrunk):
    """transformers' Gemma4AssistantForCausalLM as one function, for drafting and for training alike:

        x      = layers(pre_projection(concat(embeds, hidden))) at the anchor positions, then the final norm
        hidden = post_projection(x)                      (the next step's hidden state, in the target's space)
        logits = x @ embed.T                             (its own tied head, or the centroid-masked head)

    Parameter names follow specmtp's model (embed, norm, layers.*), so `checkpoint.hf_to_native` /
    `native_to_hf` map the trunk to and from the released format."""

    def __init__(self, cfg: ModelConfig, backbone_hidden: int, num_centroids: int = 0, top_k: int = 0) -> None:
        if cfg.num_experts or cfg.ple_dim:
            raise SpecMTPError("an assistant cannot have MoE blocks or per-layer inputs")
        super().__init__(cfg, backbone_hidden)
        self.backbone_hidden = backbone_hidden
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # the tied head
        self.masked_head = MaskedHead(cfg.hidden_size, cfg.vocab_size, num_centroids, top_k) if num_centroids else None

    def bind(self, tc: ModelConfig) -> None:
        """Point each layer's queries at the target's last layer of its attention type; refuse what does not fit."""
        cfg = self.cfg
        if self.backbone_hidden != tc.hidden_size:
            raise SpecMTPError(f"assistant backbone_hidden_size {self.backbone_hidden} does not fit the target's "
                               f"hidden size {tc.hidden_size}")
        if cfg.vocab_size != tc.vocab_size:
            raise SpecMTPError(f"assistant vocabulary {cfg.vocab_size} does not fit the target's {tc.vocab_size}")
        producers = tc.kv_producers()
        for i, layer in enumerate(self.layers):
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

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, kv: Any,
                end: int) -> tuple[torch.Tensor, torch.Tensor]:  # next hidden [B, T, Ht], normed x [B, T, Ha]
        return self.trunk(embeds, hidden, positions, kv, end)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, Ha] -> [B, V] as drafting scores them (no soft-capping: transformers' assistant has none)."""
        if self.masked_head is not None:
            return self.masked_head(x, self.embed.weight)
        return linear(x, self.embed.weight)

    def draft(self, embeds, hidden, positions, kv, end, head=None):
        """Training's view of one draft step: (next hidden, full-vocabulary logits [.., V], x for the centroids)."""
        h, x = self(embeds, hidden, positions, kv, end)
        return h, x @ self.embed.weight.T, x

    def pick(self, logits: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        """The draft drafting would make: argmax over the masked head's clusters where there is one."""
        if self.masked_head is None:
            return logits.max(-1).indices  # the argmax (torch's argmax of bf16 logits is ~5x slower on the CPU)
        shape = x.shape[:-1]
        with torch.no_grad():
            return self.masked_head(x.reshape(-1, x.shape[-1]), self.embed.weight).max(-1).indices.reshape(shape)

    def aux_loss(self, x: torch.Tensor, ids: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Centroid scores against the target's mass per cluster (its top-k ids [.., k] and probabilities p)."""
        if self.masked_head is None:
            return x.new_zeros(x.shape[:-1])
        head = self.masked_head
        mass = torch.zeros(*ids.shape[:-1], head.num_centroids).scatter_add_(-1, head.cluster_of()[ids], p)
        return -(mass * linear(x, head.centroids).log_softmax(-1)).sum(-1)


def assistant_text_config(raw: dict[str, Any]) -> ModelConfig:
    """Our layer config of an assistant's config.json: Gemma 4 layers that read the target's K/V (bound to the
    target's producer layers by AssistantModule.bind)."""
    text = dict(raw.get("text_config") or {})
    text["model_type"] = "gemma4_text"
    text["num_kv_shared_layers"] = 0  # bound to the target's producer layers in bind
    for key in ("hidden_size_per_layer_input", "vocab_size_per_layer_input"):
        text[key] = 0
    return dataclasses.replace(from_hf_config(text), external_kv=True)


def load_assistant(path: Path) -> tuple[AssistantModule, dict[str, Any]]:
    """An assistant directory (transformers' Gemma4AssistantForCausalLM format) as an AssistantModule."""
    raw = read_config(path)
    if raw.get("model_type") != "gemma4_assistant":
        raise SpecMTPError(f"{path} is not a Gemma 4 assistant (model_type {raw.get('model_type')!r})")
    cfg = assistant_text_config(raw)
    if cfg.num_experts or cfg.ple_dim:
        raise SpecMTPError(f"{path}: an assistant cannot have MoE blocks or per-layer inputs")
    ordered = bool(raw.get("use_ordered_embeddings"))
    module = AssistantModule(cfg, int(raw.get("backbone_hidden_size", 0)),
                             int(raw["num_centroids"]) if ordered else 0,
                             int(raw["centroid_intermediate_top_k"]) if ordered else 0)
    tensors = read_tensors(safetensors_files(path))

    def need(name: str) -> torch.Tensor:
        if name not in tensors:
            raise SpecMTPError(f"assistant checkpoint {path} is missing tensor {name!r}")
        return tensors[name].float()

    if not cfg.tie_word_embeddings:
        raise SpecMTPError(f"{path}: an assistant with an untied output head is not supported")
    trunk = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    state = hf_to_native(cfg, trunk, torch.float32)
    state["pre_projection.weight"] = need("pre_projection.weight")  # [Ha, 2 Ht]
    state["post_projection.weight"] = need("post_projection.weight")  # [Ht, Ha]
    if ordered:
        state["masked_head.centroids"] = need("masked_embedding.centroids.weight")
        state["masked_head.token_ordering"] = need("masked_embedding.token_ordering").long()
    expected = module.state_dict()
    for name, t in state.items():
        if name in expected and t.shape != expected[name].shape:
            raise SpecMTPError(f"assistant tensor {name!r} has shape {tuple(t.shape)}, its config implies "
                               f"{tuple(expected[name].shape)}")
    module.load_state_dict(state, strict=True)
    return module.eval().requires_grad_(False), raw


def assistant_config(target_raw: dict[str, Any], tc: ModelConfig, layers: int, hidden: int, intermediate: int,
                     heads: int, num_centroids: int, top_k: int) -> dict[str, Any]:
    """config.json of a new assistant for a Gemma 4 target, as transformers writes Gemma4AssistantConfig: the
    target's text config (RoPE, norms, window, vocabulary) with the assistant's widths, `layers` layers (the last
    full attention, the others sliding where the target has sliding layers), every one KV-shared: each reads the
    target's last layer of its type, whose head dim and KV heads it takes."""
    producers = tc.kv_producers()
    if layers < 1:
        raise SpecMTPError(f"an assistant needs at least one layer, got {layers}")
    last = FULL if FULL in producers else SLIDING
    types = [SLIDING if SLIDING in producers else last] * (layers - 1) + [last]
    dims = [(tc.head_dim_of(producers[t]), tc.kv_heads_of(producers[t])) for t in types]
    base_dim, base_kv = dims[0]
    if any(heads % kv for _, kv in dims):
        raise SpecMTPError(f"assistant heads {heads} must be a multiple of the target's KV heads")
    per_layer = {}
    for i, (d, kv) in enumerate(dims):
        entry = ({"head_dim": d} if d != base_dim else {}) | ({"num_key_value_heads": kv} if kv != base_kv else {})
        if entry:
            per_layer[str(i)] = entry
    text = {k: v for k, v in target_raw.items()
            if k not in ("architectures", "dtype", "transformers_version", "per_layer_config", "auto_map")}
    text.update(model_type="gemma4_text", hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, layer_types=types, num_kv_shared_layers=layers, num_attention_heads=heads,
                head_dim=base_dim, num_key_value_heads=base_kv, per_layer_config=per_layer,
                hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, enable_moe_block=False,
                num_experts=None, top_k_experts=None, moe_intermediate_size=None, use_double_wide_mlp=False,
                final_logit_softcapping=None, tie_word_embeddings=True)
    text.pop("num_global_key_value_heads", None)
    if num_centroids and tc.vocab_size % num_centroids:
        raise SpecMTPError(f"the vocabulary of {tc.vocab_size} tokens does not split into {num_centroids} equal "
                           "centroid clusters")
    return {"architectures": ["Gemma4AssistantForCausalLM"], "model_type": "gemma4_assistant",
            "backbone_hidden_size": tc.hidden_size, "use_ordered_embeddings": bool(num_centroids),
            "num_centroids": num_centroids or 2048, "centroid_intermediate_top_k": top_k or 32,
            "tie_word_embeddings": True, "text_config": text}


def save_assistant(module: AssistantModule, raw: dict[str, Any], out: Path, num_draft_tokens: int,
                   dtype: torch.dtype = torch.bfloat16) -> None:
    """Write `module` (built from the config dict `raw`) as transformers writes a Gemma4AssistantForCausalLM:
    config.json, model.safetensors under the released tensor names, generation_config.json with the draft length."""
    state = module.state_dict()
    trunk = {k: v for k, v in state.items() if k.startswith(("embed.", "norm", "layers."))}
    tensors = {f"model.{k}": v for k, v in native_to_hf(module.cfg, trunk).items()}
    tensors["pre_projection.weight"] = state["pre_projection.weight"]
    tensors["post_projection.weight"] = state["post_projection.weight"]
    if module.masked_head is not None:
        tensors["masked_embedding.centroids.weight"] = state["masked_head.centroids"]
        tensors["masked_embedding.token_ordering"] = state["masked_head.token_ordering"]
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = dict(raw, dtype=str(dtype).removeprefix("torch."))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    text = raw["text_config"]
    gen = {"bos_token_id": text.get("bos_token_id"), "eos_token_id": text.get("eos_token_id"),
           "pad_token_id": text.get("pad_token_id"), "num_assistant_tokens": num_draft_tokens,
           "num_assistant_tokens_schedule": "constant"}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def balanced_clusters(emb: torch.Tensor, clusters: int) -> torch.Tensor:
    """token_ordering [V] for a centroid-masked head: tokens in `clusters` equal groups of similar embeddings
    (emb [V, H]), by splitting each group along its principal direction, proportionally to the clusters it holds."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(emb.shape[1], generator=gen)

    def split(ids: torch.Tensor, c: int) -> list[torch.Tensor]:
        if c == 1:
            return [ids]
        e = emb[ids].float()
        e = e - e.mean(0)
        v = start.clone()
        for _ in range(8):  # power iteration: the direction of largest variance
            v = e.T @ (e @ v)
            v = v / v.norm().clamp(min=1e-12)
        order = ids[torch.argsort(e @ v, stable=True)]
        left = c // 2
        cut = len(ids) * left // c
        return split(order[:cut], left) + split(order[cut:], c - left)

    return torch.cat(split(torch.arange(emb.shape[0]), clusters))


class Gemma4AssistantDrafter(RecurrentDrafter):
    def __init__(self, path: Path) -> None:
        self.name = str(path)
        self.module, raw = load_assistant(path)
        self.cfg = self.module.cfg
        gen_path = path / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        self.default_num_draft_tokens = int(gen["num_assistant_tokens"]) if "num_assistant_tokens" in gen else None
        sched = gen.get("num_assistant_tokens_schedule")
        self.default_schedule = _SCHEDULES.get(sched) if sched else None
        self.bound = False

    def check_compatible(self, target: LoadedModel) -> None:
        self.module.bind(target.config)
        self.bound = True

    def begin(self, ctx: DraftContext) -> None:
        if not self.bound:
            raise SpecMTPError("assistant drafter used before check_compatible bound it to a target")

    @torch.inference_mode()
    def step(
        self,
        token: torch.Tensor,  # [B, W] last tokens of W branches per row, at the row's position, not in the cache
        hidden: torch.Tensor,  # [B, W, Ht] target (or previous step's projected) hidden states
        positions: torch.Tensor,  # [B]
        ctx: DraftContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # logits [B, W, V], next hidden [B, W, Ht]
        embeds = ctx.target.embed_tokens(token)  # [B, W, Ht]
        where = positions[:, None].expand(token.shape)  # [B, W] every branch queries from the round's position
        h, x = self.module(embeds, hidden, where, ctx.cache, int(positions.max()))
        b, w, _ = x.shape
        return self.module.logits(x.reshape(b * w, -1)).reshape(b, w, -1), h
