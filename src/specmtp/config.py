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
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
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

    @property
    def attn_scale(self) -> float:
        return self.query_scale if self.query_scale > 0 else self.head_dim**-0.5

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["rope"] = {k: vars(v) for k, v in self.rope.items()}
        d["layer_types"] = list(self.layer_types)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d


SUPPORTED = ("llama", "qwen2", "gemma3_text", "gemma3")


def _rope_from(params: dict[str, Any] | None, default_theta: float, max_pos: int) -> RopeConfig:
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    theta = float(params.get("rope_theta", default_theta))
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeConfig(
            theta=theta,
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position=int(params.get("original_max_position_embeddings", max_pos)),
        )
    raise SpecMTPError(f"unsupported RoPE scaling type {kind!r} (supported: default, linear, llama3)")


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def from_hf_config(cfg: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face `config.json` dict; refuse architectures we do not run."""
    model_type = cfg.get("model_type")
    if model_type == "gemma3" and "text_config" in cfg:  # multimodal wrapper: the text model only
        text = dict(cfg["text_config"])
        text.setdefault("model_type", "gemma3_text")
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
