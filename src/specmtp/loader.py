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


WEIGHTS = ("dense", "q8", "q4", "native")


def load_model(ref: str, dtype: str = "fp32", progress: bool = True, weights: str = "dense") -> LoadedModel:
    """Load weights, config and tokenizer.

    weights: "dense" keeps `dtype` weights; "q8" / "q4" re-pack every linear layer and the head into specmtp's
    quantized formats at load (GGUF or safetensors alike); "native" picks the one nearest a GGUF file's own
    quantization (4-/5-bit -> q4, else q8)."""
    if dtype not in DTYPES:
        raise SpecMTPError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if weights not in WEIGHTS:
        raise SpecMTPError(f"unknown weights {weights!r} (choose from {', '.join(WEIGHTS)})")
    path = checkpoint_dir(ref, progress=progress)
    if weights == "dense":
        from specmtp import quant, screen

        config, model = load_hf_dir(path, DTYPES[dtype])
        if quant.fuse_dense_layers(model):  # fp32 on a CPU with specmtp's kernels: its layers through them too
            model.head_screen = screen.build(model.head_weight)  # greedy tokens through a q8 copy of the head
    else:
        from specmtp import quant

        if DTYPES[dtype] != torch.float32:
            raise SpecMTPError(f"--weights {weights} computes in fp32; drop --dtype {dtype}")
        quant.require()
        fmt = _native_format(ref) if weights == "native" else weights
        config, model = load_hf_dir(path, torch.float32, quantize=fmt)  # each layer quantized as it is read
        quant.quantize_model(model, fmt)  # the output head
        # The kernels' own thread pool uses every core; torch's pool (norms, attention: small in decoding) gets
        # one thread so that the two never spin against each other (measured: 17.0 vs 5.8 tok/s on 2 cores).
        torch.set_num_threads(1)
    _into_huge_pages(model)
    gen_path = path / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    eos = set(config.eos_token_ids)
    extra = gen.get("eos_token_id")
    eos.update([extra] if isinstance(extra, int) else (extra or []))
    return LoadedModel(ref, path, config, model, Tokenizer(path, tuple(sorted(eos))), gen)


def _into_huge_pages(model: Transformer) -> None:
    """The model's weights into 2 MB pages (hugepages.py: a decode step streams them all); the layer stack's kernel
    descriptor holds their addresses, so it is rebuilt."""
    from specmtp import hugepages, quant

    if hugepages.adopt(hugepages.large_tensors(model)) and model.stack is not None:
        model.stack = quant.stack_descriptor(model.layers)


def _native_format(ref: str) -> str:
    """q4 for a GGUF file whose weights are mostly 4- or 5-bit, else q8."""
    path = resolve(ref)
    if path.is_file():
        from gguf import GGUFReader

        names = [t.tensor_type.name for t in GGUFReader(str(path)).tensors if t.name.endswith("weight")]
        if names and sum(n.startswith(("Q4", "Q5", "IQ4")) for n in names) * 2 >= len(names):
            return "q4"
    return "q8"
