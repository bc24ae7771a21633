"""Model configuration: one dataclass for the decoder families specmtp runs natively.

Family quirks are fields, not forked code: Qwen2's q/k/v bias is `attn_bias`, Gemma 3's four norms per
layer are `sandwich_norm`, its q/k norms `qk_norm`, its embedding scale `embed_scale`, its per-layer-type
RoPE bases `rope` keyed by layer type. The config is built from the checkpoint's own `config.json`
(Hugging Face layout) by `from_hf_config`; GGUF files are first turned into that layout (see `gguf_convert`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from specmtp.errors import SpecMTPError

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    kind: str = "default"  # default | linear | llama3 | proportional
    factor: float = 1.0
    partial: float = 1.0  # proportional: fraction of the head dim that rotates; the rest keeps angle 0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    family: str  # llama | qwen2 | gemma3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    layer_types: tuple[str, ...]
    rope: dict[str, RopeConfig]
    activation: str = "silu"  # silu | gelu_tanh
    attn_bias: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False
    norm_unit_offset: bool = False  # Gemma stores norm weights as w with scale (1 + w)
    embed_scale: float = 1.0
    query_scale: float = 0.0  # 0 means head_dim ** -0.5
    sliding_window: int | None = None
    final_logit_softcap: float | None = None
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # Gemma 4. Per-layer tuples are empty when every layer uses the scalar field above.
    layer_head_dims: tuple[int, ...] = ()  # head dim per layer (full layers are wider)
    layer_kv_heads: tuple[int, ...] = ()  # KV heads per layer
    layer_intermediate: tuple[int, ...] = ()  # MLP width per layer (double-wide on KV-shared layers)
    kv_source: tuple[int, ...] = ()  # layer whose KV cache each layer reads (itself unless KV-shared)
    v_norm: bool = False  # unscaled RMSNorm on values
    k_eq_v: bool = False  # full-attention layers: values are the (un-normed) keys' projection
    ple_dim: int = 0  # per-layer input embedding width (0: none)
    ple_vocab: int = 0
    layer_scalar: bool = False  # a learned scalar multiplies each layer's output
    num_experts: int = 0  # MoE block beside the MLP (0: none)
    top_k_experts: int = 0
    moe_intermediate: int = 0
    external_kv: bool = False  # every layer only reads another model's cache (MTP drafters); kv_source indexes it

    @property
    def attn_scale(self) -> float:
        return self.query_scale if self.query_scale > 0 else self.head_dim**-0.5

    def head_dim_of(self, layer: int) -> int:
        return self.layer_head_dims[layer] if self.layer_head_dims else self.head_dim

    def kv_heads_of(self, layer: int) -> int:
        return self.layer_kv_heads[layer] if self.layer_kv_heads else self.num_kv_heads

    def intermediate_of(self, layer: int) -> int:
        return self.layer_intermediate[layer] if self.layer_intermediate else self.intermediate_size

    def kv_source_of(self, layer: int) -> int:
        return self.kv_source[layer] if self.kv_source else layer

    def owns_kv(self, layer: int) -> bool:
        """Whether a layer computes and writes its own keys/values."""
        return not self.external_kv and self.kv_source_of(layer) == layer

    def kind_head_dim(self, kind: str) -> int:
        """Head dim of the layers of one attention type (RoPE tables are built per type)."""
        dims = {self.head_dim_of(i) for i, t in enumerate(self.layer_types) if t == kind}
        return dims.pop() if len(dims) == 1 else self.head_dim

    def kv_producers(self) -> dict[str, int]:
        """The last layer of each attention type that computes its own K/V (what an MTP drafter reads)."""
        out: dict[str, int] = {}
        for i, kind in enumerate(self.layer_types):
            if self.owns_kv(i):
                out[kind] = i
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["rope"] = {k: vars(v) for k, v in self.rope.items()}
        for k in ("layer_head_dims", "layer_kv_heads", "layer_intermediate", "kv_source"):
            d[k] = list(d[k])
        d["layer_types"] = list(self.layer_types)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d


SUPPORTED = ("llama", "qwen2", "gemma3_text", "gemma3", "gemma4_text", "gemma4")


def _rope_from(params: dict[str, Any] | None, default_theta: float, max_pos: int) -> RopeConfig:
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    theta = float(params.get("rope_theta", default_theta))
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=float(params["factor"]))
    if kind == "proportional":
        return RopeConfig(theta=theta, kind="proportional", factor=float(params.get("factor", 1.0)),
                          partial=float(params.get("partial_rotary_factor", 1.0)))
    if kind == "llama3":
        return RopeConfig(
            theta=theta,
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position=int(params.get("original_max_position_embeddings", max_pos)),
        )
    raise SpecMTPError(f"unsupported RoPE scaling type {kind!r} (supported: default, linear, llama3, proportional)")


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def from_hf_config(cfg: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face `config.json` dict; refuse architectures we do not run."""
    model_type = cfg.get("model_type")
    if model_type in ("gemma3", "gemma4") and "text_config" in cfg:  # multimodal wrapper: the text model only
        text = dict(cfg["text_config"])
        text.setdefault("model_type", f"{model_type}_text")
        for key in ("bos_token_id", "eos_token_id", "tie_word_embeddings"):
            if key in cfg and key not in text:
                text[key] = cfg[key]
        return from_hf_config(text)
    if model_type not in SUPPORTED:
        raise SpecMTPError(
            f"unsupported architecture {model_type!r} (supported model_type: {', '.join(SUPPORTED)})"
        )
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    layers = int(cfg["num_hidden_layers"])
    max_pos = int(cfg.get("max_position_embeddings", 8192))
    common = dict(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", model_type != "llama")),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
    )
    rope_params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if model_type in ("llama", "qwen2"):
        if "rope_theta" in cfg and "rope_theta" not in rope_params:
            rope_params = {**rope_params, "rope_theta": cfg["rope_theta"]}
        rope = _rope_from(rope_params, 10000.0, max_pos)
        types = [FULL] * layers
        window = None
        if model_type == "qwen2" and cfg.get("use_sliding_window"):
            window = int(cfg["sliding_window"])
            max_window_layers = int(cfg.get("max_window_layers", layers))
            types = [SLIDING if i >= max_window_layers else FULL for i in range(layers)]
        return ModelConfig(
            family=model_type,
            layer_types=tuple(cfg.get("layer_types") or types),
            rope={FULL: rope, SLIDING: rope},
            sliding_window=window,
            attn_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            **common,
        )
    if model_type == "gemma4_text":
        return _gemma4(cfg, common)
    # gemma3_text
    pattern = int(cfg.get("sliding_window_pattern", 6))
    types = cfg.get("layer_types") or [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
    if "full_attention" in rope_params or "sliding_attention" in rope_params:
        full = _rope_from(rope_params.get(FULL), 1_000_000.0, max_pos)
        local = _rope_from(rope_params.get(SLIDING), 10_000.0, max_pos)
    else:  # older configs: rope_theta, rope_local_base_freq and a rope_scaling for global layers
        full = _rope_from({**rope_params, "rope_theta": cfg.get("rope_theta", 1_000_000.0)}, 1e6, max_pos)
        local = RopeConfig(theta=float(cfg.get("rope_local_base_freq", 10_000.0)))
    if cfg.get("attn_logit_softcapping"):
        raise SpecMTPError("unsupported Gemma 3 config: attn_logit_softcapping is set")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise SpecMTPError(f"unsupported Gemma 3 activation {act!r}")
    common["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", True))
    return ModelConfig(
        family="gemma3",
        layer_types=tuple(types),
        rope={FULL: full, SLIDING: local},
        activation="gelu_tanh",
        qk_norm=True,
        sandwich_norm=True,
        norm_unit_offset=True,
        embed_scale=math.sqrt(hidden),
        query_scale=float(cfg.get("query_pre_attn_scalar", head_dim)) ** -0.5,
        sliding_window=int(cfg.get("sliding_window") or 4096),
        final_logit_softcap=cfg.get("final_logit_softcapping"),
        **common,
    )


def _gemma4(cfg: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
    """Gemma 4 text: per-type head dims and KV heads, KV sharing, per-layer inputs, MoE, layer scalars."""
    layers = common["num_layers"]
    types = list(cfg.get("layer_types") or [SLIDING if (i + 1) % 6 else FULL for i in range(layers)])
    types[-1] = FULL  # transformers forces the last layer to full attention
    if cfg.get("use_bidirectional_attention"):
        raise SpecMTPError("unsupported Gemma 4 config: use_bidirectional_attention is set")
    per_layer = {int(k): v for k, v in (cfg.get("per_layer_config") or {}).items()}
    head_dims = tuple(int(per_layer.get(i, {}).get("head_dim", common["head_dim"])) for i in range(layers))
    kv_heads = tuple(int(per_layer.get(i, {}).get("num_key_value_heads", common["num_kv_heads"]))
                     for i in range(layers))
    shared = int(cfg.get("num_kv_shared_layers") or 0)
    first_shared = layers - shared
    source = list(range(layers))
    if shared:
        for i in range(first_shared, layers):
            producers = [j for j in range(first_shared) if types[j] == types[i]]
            if not producers:
                raise SpecMTPError(f"Gemma 4 config: KV-shared layer {i} ({types[i]}) has no producer layer")
            source[i] = producers[-1]
    double = bool(cfg.get("use_double_wide_mlp"))
    inter = int(cfg["intermediate_size"])
    widths = tuple(inter * (2 if double and source[i] != i else 1) for i in range(layers))
    rope_params = cfg.get("rope_parameters") or {}
    full = _rope_from(rope_params.get(FULL) or {"rope_type": "proportional", "partial_rotary_factor": 0.25},
                      1_000_000.0, common["max_position_embeddings"])
    local = _rope_from(rope_params.get(SLIDING), 10_000.0, common["max_position_embeddings"])
    act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise SpecMTPError(f"unsupported Gemma 4 activation {act!r}")
    moe = bool(cfg.get("enable_moe_block"))
    common["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", True))
    return ModelConfig(
        family="gemma4",
        layer_types=tuple(types),
        rope={FULL: full, SLIDING: local},
        activation="gelu_tanh",
        attn_bias=bool(cfg.get("attention_bias", False)),
        qk_norm=True,
        sandwich_norm=True,
        embed_scale=math.sqrt(common["hidden_size"]),
        query_scale=1.0,
        sliding_window=int(cfg.get("sliding_window") or 512),
        final_logit_softcap=cfg.get("final_logit_softcapping"),
        layer_head_dims=head_dims,
        layer_kv_heads=kv_heads,
        layer_intermediate=widths,
        kv_source=tuple(source),
        v_norm=True,
        k_eq_v=bool(cfg.get("attention_k_eq_v")),
        ple_dim=int(cfg.get("hidden_size_per_layer_input") or 0),
        ple_vocab=int(cfg.get("vocab_size_per_layer_input") or 0),
        layer_scalar=True,
        num_experts=int(cfg.get("num_experts") or 0) if moe else 0,
        top_k_experts=int(cfg.get("top_k_experts") or 0) if moe else 0,
        moe_intermediate=int(cfg.get("moe_intermediate_size") or 0) if moe else 0,
        **common,
    )
