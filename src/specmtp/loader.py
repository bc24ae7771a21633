"""Load a model by preset name, GGUF file, HF directory or cached HF id: weights, config and tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from specmtp.checkpoint import load_hf_dir
from specmtp.config import ModelConfig
from specmtp.errors import SpecMTPError
from specmtp.gguf_convert import GGUF_MAGIC, converted_dir
from specmtp.model import Transformer
from specmtp.presets import resolve
from specmtp.tokenizer import Tokenizer

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass
class LoadedModel:
    name: str  # what the user asked for
    path: Path  # the HF-layout directory the weights were read from
    config: ModelConfig
    model: Transformer
    tokenizer: Tokenizer
    generation_config: dict


def checkpoint_dir(ref: str, progress: bool = True) -> Path:
    """Resolve `ref` to an HF-layout directory, converting a GGUF file (once, cached) on the way."""
    path = resolve(ref)
    if path.is_dir():
        return path
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == GGUF_MAGIC:
        return converted_dir(path, progress=progress)
    if path.name == "config.json":
        return path.parent
    raise SpecMTPError(f"{path} is not a checkpoint: expected a GGUF file or a directory with config.json")


def load_model(ref: str, dtype: str = "fp32", progress: bool = True) -> LoadedModel:
    """Load weights, config and tokenizer."""
    if dtype not in DTYPES:
        raise SpecMTPError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    path = checkpoint_dir(ref, progress=progress)
    config, model = load_hf_dir(path, DTYPES[dtype])
    gen_path = path / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    eos = set(config.eos_token_ids)
    extra = gen.get("eos_token_id")
    eos.update([extra] if isinstance(extra, int) else (extra or []))
    return LoadedModel(ref, path, config, model, Tokenizer(path, tuple(sorted(eos))), gen)
