"""Shared fixtures: tiny random models of each family, built with transformers' config classes and saved
with save_pretrained, plus a byte-level tokenizer, so tests need no weights from anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

VOCAB = 320  # 256 bytes + specials, padded
EOS = 257


def byte_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<bos>"], vocab["<eos>"] = 256, EOS
    for i in range(258, VOCAB):  # the rest of the model's vocabulary decodes as short words
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")
    fast.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    fast.save_pretrained(str(path))


def hf_config(family: str, **overrides):
    from transformers import Gemma3TextConfig, Gemma4TextConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=256, eos_token_id=EOS, pad_token_id=EOS)
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)
    if family == "llama3rope":
        return LlamaConfig(rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 64},
                           tie_word_embeddings=False, **common)
    if family == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **common)
    if family == "gemma3":
        common.setdefault("num_hidden_layers", 4)
        common["num_hidden_layers"] = max(common["num_hidden_layers"], 4)
        return Gemma3TextConfig(head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                             "full_attention"][: common["num_hidden_layers"]]
                                + ["sliding_attention"] * max(0, common["num_hidden_layers"] - 4),
                                final_logit_softcapping=30.0, **common)
    if family in ("gemma4", "gemma4moe"):
        return Gemma4TextConfig(**gemma4_kwargs(family, common))
    raise ValueError(family)


def gemma4_kwargs(family: str, common: dict) -> dict:
    """Tiny Gemma 4 text configs exercising every feature: E2B-like (per-layer inputs, KV sharing, double-wide
    MLP on shared layers) and 26B-A4B-like (MoE, k_eq_v); both with wider full-attention heads."""
    kw = dict(common, num_hidden_layers=6, head_dim=16, global_head_dim=32, sliding_window=5,
              final_logit_softcapping=30.0,
              layer_types=["sliding_attention", "sliding_attention", "full_attention",
                           "sliding_attention", "sliding_attention", "full_attention"])
    if family == "gemma4":
        kw.update(hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB, num_kv_shared_layers=3,
                  use_double_wide_mlp=True, attention_k_eq_v=False)
    else:
        kw.update(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, num_kv_shared_layers=0,
                  attention_k_eq_v=True, num_global_key_value_heads=1, enable_moe_block=True, num_experts=4,
                  top_k_experts=2, moe_intermediate_size=32)
    return kw


def make_checkpoint(path: Path, family: str, seed: int = 0, **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random norms so the (1 + w) convention is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0 if family.startswith("gemma4") else 0.0, 0.2)
            else:
                p.normal_(0.0, 0.15)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
    model.save_pretrained(str(path))
    byte_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """family -> saved tiny random checkpoint directory (cached for the session)."""
    made: dict[str, Path] = {}

    def get(family: str, seed: int = 0, **overrides) -> Path:
        key = json.dumps([family, seed, overrides], sort_keys=True)
        if key not in made:
            made[key] = make_checkpoint(tmp_path_factory.mktemp(family), family, seed, **overrides)
        return made[key]

    return get


def prefilled_pair(model) -> tuple[list, torch.Tensor]:
    """Two 64-slot caches holding the same seeded 40-token prompt, and a seeded 7-token block [1, 7] to continue it:
    one cache for a many-token pass, one for token-by-token steps."""
    g = torch.Generator().manual_seed(0)
    prompt, block = torch.randint(0, 256, (1, 40), generator=g), torch.randint(0, 256, (1, 7), generator=g)
    caches = [model.new_cache(1, 64) for _ in range(2)]
    for c in caches:
        model(prompt, torch.arange(40)[None], c)
    return caches, block
