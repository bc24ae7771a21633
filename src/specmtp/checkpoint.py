"""Checkpoint loading: a Hugging Face directory (config.json + safetensors, sharded or not) into our model.

Names are mapped from the Hugging Face layout to ours with a strict key check in both directions (a
missing or unexpected tensor is an error, as in nanoGPT's weight-key check). q/k/v and gate/up are fused
here; Gemma's (1 + w) norms get their 1 added here. Vision/audio towers of multimodal checkpoints are
never read. GGUF files are converted to this layout once and cached (see `gguf_convert`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from specmtp.config import ModelConfig, from_hf_config
from specmtp.errors import SpecMTPError
from specmtp.model import Transformer, rope_inv_freq

# Prefixes under which the text decoder lives, per checkpoint class.
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_SKIP_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.",
                  "multi_modal_projector.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")


def read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise SpecMTPError(f"{path} is not a checkpoint directory: no config.json in it")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise SpecMTPError(f"{cfg_path} is not valid JSON: {e}") from None


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise SpecMTPError(f"{index} is not a valid safetensors index: {e}") from None
        files = [path / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise SpecMTPError(f"checkpoint shard missing: {missing[0]}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SpecMTPError(f"{path} holds no *.safetensors weights")
    return files


def read_tensors(files: list[Path], keep: Callable[[str], bool] = lambda name: True) -> dict[str, torch.Tensor]:
    """Read the tensors whose names pass `keep`; a truncated or corrupt file is a clear error."""
    with LazyTensors(files, lambda n: n if keep(n) else None) as lazy:
        return {name: lazy[name] for name in lazy}


class LazyTensors(Mapping):
    """A checkpoint's tensors, read one at a time when asked for (under names given by `rename`; None skips a
    tensor), so a loader that converts as it goes never holds the whole checkpoint. Each read maps its file only
    while it copies the tensor out, so the pages of tensors already converted do not stay resident."""

    def __init__(self, files: list[Path], rename: Callable[[str], str | None]) -> None:
        self._where: dict[str, tuple[str, Path]] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as sf:
                    names = list(sf.keys())
            except (SafetensorError, OSError, RuntimeError) as e:
                raise SpecMTPError(f"corrupt or truncated safetensors file {f}: {e}") from None
            for name in names:
                new = rename(name)
                if new is not None:
                    self._where[new] = (name, f)

    def __getitem__(self, name: str) -> torch.Tensor:
        stored, f = self._where[name]
        try:
            with safe_open(str(f), framework="pt") as sf:
                return sf.get_tensor(stored)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise SpecMTPError(f"corrupt or truncated safetensors file {f}: {e}") from None

    def __contains__(self, name: object) -> bool:  # without reading the tensor
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __enter__(self) -> LazyTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _strip_prefix(name: str) -> str | None:
    if name.startswith(_SKIP_PREFIXES):
        return None
    if name == "lm_head.weight":
        return name
    for p in _TEXT_PREFIXES:
        if name.startswith(p):
            return name[len(p) :]
    return name


def hf_to_native(cfg: ModelConfig, hf: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 convert: Callable[[str, torch.Tensor], Any] | None = None) -> dict[str, Any]:
    """Map Hugging Face tensor names (prefix already stripped) to our fused layout; strict both ways.
    `convert(name, tensor)`, when given, is applied to each of our tensors as soon as it is made (the loader
    quantizes there), so with a lazy `hf` only one layer's dense tensors exist at a time."""
    used: set[str] = set()
    out: dict[str, Any] = {}

    def put(name: str, t: torch.Tensor) -> None:
        out[name] = convert(name, t) if convert is not None else t

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise SpecMTPError(f"checkpoint is missing tensor {name!r}")
        used.add(name)
        return hf[name].to(dtype)

    def norm(name: str) -> torch.Tensor:
        w = take(name).float()
        return (w + 1.0 if cfg.norm_unit_offset else w).to(dtype)

    put("embed.weight", take("embed_tokens.weight"))
    put("norm", norm("norm.weight"))
    if not cfg.tie_word_embeddings:
        put("lm_head.weight", take("lm_head.weight"))
    elif "lm_head.weight" in hf:
        used.add("lm_head.weight")  # tied: the copy some checkpoints store is ignored
    for i in range(cfg.num_layers):
        p, o = f"layers.{i}.", f"layers.{i}."
        a = p + "self_attn."
        own_kv = cfg.owns_kv(i)
        values_are_keys = cfg.k_eq_v and cfg.layer_types[i] == "full_attention"
        proj = ["q"] + (["k"] if own_kv else []) + (["v"] if own_kv and not values_are_keys else [])
        put(o + "wqkv.weight", torch.cat([take(a + f"{n}_proj.weight") for n in proj]))
        if cfg.attn_bias:
            put(o + "wqkv.bias", torch.cat([take(a + f"{n}_proj.bias") for n in proj]))
        if not own_kv:  # KV-shared layers: transformers ignores stored k/v weights, so do we
            used.update(n for n in hf if n.startswith((a + "k_", a + "v_")))
        put(o + "wo.weight", take(a + "o_proj.weight"))
        put(o + "w_gate_up.weight", torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]))
        put(o + "w_down.weight", take(p + "mlp.down_proj.weight"))
        put(o + "attn_norm", norm(p + "input_layernorm.weight"))
        if cfg.sandwich_norm:
            put(o + "attn_post_norm", norm(p + "post_attention_layernorm.weight"))
            put(o + "mlp_norm", norm(p + "pre_feedforward_layernorm.weight"))
            put(o + "mlp_post_norm", norm(p + "post_feedforward_layernorm.weight"))
        else:
            put(o + "mlp_norm", norm(p + "post_attention_layernorm.weight"))
        if cfg.qk_norm:
            put(o + "q_norm", norm(a + "q_norm.weight"))
            if own_kv:
                put(o + "k_norm", norm(a + "k_norm.weight"))
        if cfg.layer_scalar:
            put(o + "scalar", take(p + "layer_scalar"))
        if cfg.num_experts:
            put(o + "experts.router.weight", take(p + "router.proj.weight"))
            put(o + "experts.router_scale", take(p + "router.scale"))
            put(o + "experts.per_expert_scale", take(p + "router.per_expert_scale"))
            put(o + "experts.gate_up", take(p + "experts.gate_up_proj"))
            put(o + "experts.down", take(p + "experts.down_proj"))
            put(o + "mlp_post_norm_1", norm(p + "post_feedforward_layernorm_1.weight"))
            put(o + "moe_norm", norm(p + "pre_feedforward_layernorm_2.weight"))
            put(o + "moe_post_norm", norm(p + "post_feedforward_layernorm_2.weight"))
        if cfg.ple_dim:
            put(o + "ple_gate.weight", take(p + "per_layer_input_gate.weight"))
            put(o + "ple_proj.weight", take(p + "per_layer_projection.weight"))
            put(o + "ple_norm", norm(p + "post_per_layer_input_norm.weight"))
    if cfg.ple_dim:
        put("ple_embed.weight", take("embed_tokens_per_layer.weight"))
        put("ple_model_proj.weight", take("per_layer_model_projection.weight"))
        put("ple_proj_norm", norm("per_layer_projection_norm.weight"))
    extra = sorted(set(hf) - used - {n for n in hf if "rotary_emb" in n})
    if extra:
        raise SpecMTPError(f"checkpoint has {len(extra)} unexpected tensors, e.g. {extra[0]!r}")
    return out


def native_to_hf(cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `hf_to_native` for dense layers (no MoE blocks, no per-layer inputs): our fused layout back to
    Hugging Face tensor names (without the "model." prefix), for saving checkpoints transformers reads."""
    if cfg.num_experts or cfg.ple_dim:
        raise SpecMTPError("saving MoE blocks or per-layer inputs in Hugging Face layout is not supported")
    out: dict[str, torch.Tensor] = {}

    def norm(w: torch.Tensor) -> torch.Tensor:
        return w.float() - 1.0 if cfg.norm_unit_offset else w.float()

    out["embed_tokens.weight"] = state["embed.weight"]
    out["norm.weight"] = norm(state["norm"])
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        a = p + "self_attn."
        own_kv = cfg.owns_kv(i)
        values_are_keys = cfg.k_eq_v and cfg.layer_types[i] == "full_attention"
        q, kv = cfg.num_heads * cfg.head_dim_of(i), cfg.kv_heads_of(i) * cfg.head_dim_of(i)
        sizes = {"q": q} | ({"k": kv} if own_kv else {}) | ({"v": kv} if own_kv and not values_are_keys else {})
        for name, t in zip(sizes, state[p + "wqkv.weight"].split(list(sizes.values())), strict=True):
            out[a + f"{name}_proj.weight"] = t
        if cfg.attn_bias:
            for name, t in zip(sizes, state[p + "wqkv.bias"].split(list(sizes.values())), strict=True):
                out[a + f"{name}_proj.bias"] = t
        out[a + "o_proj.weight"] = state[p + "wo.weight"]
        gate, up = state[p + "w_gate_up.weight"].chunk(2)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        out[p + "mlp.down_proj.weight"] = state[p + "w_down.weight"]
        out[p + "input_layernorm.weight"] = norm(state[p + "attn_norm"])
        if cfg.sandwich_norm:
            out[p + "post_attention_layernorm.weight"] = norm(state[p + "attn_post_norm"])
            out[p + "pre_feedforward_layernorm.weight"] = norm(state[p + "mlp_norm"])
            out[p + "post_feedforward_layernorm.weight"] = norm(state[p + "mlp_post_norm"])
        else:
            out[p + "post_attention_layernorm.weight"] = norm(state[p + "mlp_norm"])
        if cfg.qk_norm:
            out[a + "q_norm.weight"] = norm(state[p + "q_norm"])
            if own_kv:
                out[a + "k_norm.weight"] = norm(state[p + "k_norm"])
        if cfg.layer_scalar:
            out[p + "layer_scalar"] = state[p + "scalar"]
    return out


def build_model(cfg: ModelConfig, state: dict[str, Any]) -> Transformer:
    """Instantiate without allocating, then adopt the loaded tensors (no second copy of the weights).
    Entries that are quant.QuantWeight become their Linear layer's `qweight`."""
    with torch.device("meta"):
        model = Transformer(cfg)
    state = dict(state)
    for name, w in list(state.items()):
        if not isinstance(w, torch.Tensor):
            module = model.get_submodule(name.rsplit(".", 1)[0])
            module.qweight = w
            module.weight = torch.nn.Parameter(torch.empty(0, device="meta"), requires_grad=False)
            state[name] = torch.empty(0)
    model.load_state_dict(state, strict=True, assign=True)
    for kind, rope in cfg.rope.items():  # non-persistent buffers were created on meta
        setattr(model, f"inv_freq_{kind}", rope_inv_freq(rope, cfg.kind_head_dim(kind)))
    return model.eval().requires_grad_(False)


def load_hf_dir(path: Path, dtype: torch.dtype = torch.float32, quantize: str | None = None
                ) -> tuple[ModelConfig, Transformer]:
    """Read an HF-layout directory. With `quantize` ("q8" / "q4") every linear layer's weight is quantized as it
    is read, and the model keeps no reference to the (memory-mapped) files."""
    raw = read_config(path)
    cfg = from_hf_config(raw)
    convert = None
    if quantize is not None:
        from specmtp.quant import quantize_tensor

        def convert(name: str, t: torch.Tensor) -> Any:
            return quantize_tensor(name, t, quantize)

    with LazyTensors(safetensors_files(path), _strip_prefix) as hf:
        state = hf_to_native(cfg, hf, dtype, convert)
    return cfg, build_model(cfg, state)
