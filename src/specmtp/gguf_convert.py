"""GGUF files: convert once into a Hugging Face-layout directory in the cache, then load that.

The conversion dequantizes every tensor to fp32 with the `gguf` package, undoes llama.cpp's conversion
quirks (the q/k row permutation of Llama-architecture files, the `+1` folded into Gemma norm weights),
maps the metadata to a `config.json` and saves the tokenizer (read from the GGUF by transformers'
tokenizer classes) beside it. The result is written to a temporary directory and renamed into place, so
an interrupted conversion never leaves a half-written cache entry. A later load reads the fp32
safetensors directly: seconds instead of minutes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specmtp.errors import SpecMTPError

CONVERTER_VERSION = 1
GGUF_MAGIC = b"GGUF"


def cache_root() -> Path:
    return Path(os.environ.get("SPECMTP_CACHE", Path.home() / ".cache" / "specmtp"))


def _open_reader(path: Path):
    from gguf import GGUFReader

    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise SpecMTPError(f"{path} is not a GGUF file (bad magic bytes)")
    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError, TypeError, EOFError) as e:
        raise SpecMTPError(f"corrupt or truncated GGUF file {path}: {e}") from None


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs back to rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def _hf_name(arch: str, name: str) -> str:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    parts = name.split(".")
    if parts[0] != "blk" or len(parts) != 4:
        raise SpecMTPError(f"unexpected GGUF tensor {name!r}")
    layer, kind, suffix = parts[1], parts[2], parts[3]
    if kind == "ffn_norm":  # the pre-MLP norm: Llama's post_attention_layernorm, Gemma's pre_feedforward
        hf = "pre_feedforward_layernorm" if arch == "gemma3" else "post_attention_layernorm"
    elif kind in _LAYER_NAMES:
        hf = _LAYER_NAMES[kind]
    else:
        raise SpecMTPError(f"unexpected GGUF tensor {name!r}")
    return f"model.layers.{layer}.{hf}.{suffix}"


def _hf_config(reader, arch: str, vocab: int, tied: bool) -> dict[str, Any]:
    def g(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    layers = int(g("block_count"))
    kv = g("attention.head_count_kv", heads)
    head_dim = int(g("attention.key_length", hidden // heads))
    cfg: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv),
        "head_dim": head_dim,
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(g("context_length", 8192)),
        "tie_word_embeddings": tied,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    theta = float(g("rope.freq_base", 10000.0))
    scaling = g("rope.scaling.type")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if scaling == "linear":
        rope = {"rope_type": "linear", "rope_theta": theta, "factor": float(g("rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise SpecMTPError(f"unsupported GGUF rope scaling {scaling!r}")
    if arch in ("llama", "qwen2"):
        cfg.update(model_type=arch, rope_parameters=rope, hidden_act="silu",
                   architectures=["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"])
        return cfg
    # gemma3: llama.cpp fixes the 5:1 sliding pattern and the local RoPE base; the attention scale is
    # 1/sqrt(head_dim) except for the 27B model (62 layers), where it is 1/sqrt(hidden/heads).
    cfg.update(
        model_type="gemma3_text",
        architectures=["Gemma3ForCausalLM"],
        hidden_activation="gelu_pytorch_tanh",
        sliding_window=int(g("attention.sliding_window", 4096)),
        query_pre_attn_scalar=hidden // heads if layers == 62 else head_dim,
        layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)],
        rope_parameters={
            "full_attention": rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
    )
    return cfg


def convert(gguf_path: Path, out_dir: Path, progress: bool = True) -> None:
    """Dequantize a GGUF file into an HF-layout directory (config.json, model.safetensors, tokenizer)."""
    from gguf import dequantize
    from safetensors.torch import save_file
    from tqdm import tqdm

    reader = _open_reader(gguf_path)
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2", "gemma3"):
        raise SpecMTPError(f"unsupported GGUF architecture {arch!r} in {gguf_path} (supported: llama, qwen2, gemma3)")
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    tensors: dict[str, torch.Tensor] = {}
    try:
        for t in tqdm(reader.tensors, desc=f"converting {gguf_path.name}", disable=not progress, leave=False):
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            w = w.reshape(shape)
            kind = t.name.split(".")[-2] if t.name.startswith("blk.") else ""
            if arch == "llama" and kind in ("attn_q", "attn_k"):
                w = _unpermute(w, heads if kind == "attn_q" else kv_heads)
            if arch == "gemma3" and t.name.endswith("norm.weight"):
                w = w - 1.0  # llama.cpp stores Gemma's (1 + w) scale; the HF layout stores w
            w = np.ascontiguousarray(w)
            if not w.flags.writeable:  # f32 tensors come back as read-only views of the file
                w = w.copy()
            tensors[_hf_name(arch, t.name)] = torch.from_numpy(w)
    except (ValueError, IndexError, TypeError) as e:
        raise SpecMTPError(f"corrupt or truncated GGUF file {gguf_path}: {e}") from None
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    cfg = _hf_config(reader, arch, vocab, tied)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    _save_tokenizer(gguf_path, out_dir)


def _save_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    finally:
        hf_logging.set_verbosity(verbosity)
    tok.save_pretrained(str(out_dir))


KEY_BYTES = 1 << 20  # the cache key reads this much of a GGUF file's head and of its tail


def content_key(path: Path) -> str:
    """A GGUF file's cache key from its content (size, the first and last MiB: its metadata and some of its
    weights), not its path or modification time: the same model installed into another environment (a fresh
    virtualenv, a clean clone's) finds its conversion instead of making another copy of it."""
    size = path.stat().st_size
    h = hashlib.sha256(f"{size}|{CONVERTER_VERSION}|".encode())
    with open(path, "rb") as f:
        h.update(f.read(KEY_BYTES))
        if size > 2 * KEY_BYTES:
            f.seek(size - KEY_BYTES)
        h.update(f.read(KEY_BYTES))
    return h.hexdigest()[:16]


def converted_dir(gguf_path: Path, progress: bool = True) -> Path:
    """The cached HF-layout conversion of `gguf_path`, converting it first if needed."""
    out = cache_root() / "gguf" / f"{gguf_path.stem}-{content_key(gguf_path)}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=out.parent))
    try:
        convert(gguf_path, tmp, progress=progress)
        os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
