"""Random checkpoints of a real model's shape, for benchmarks of architectures whose weights are not on the machine.

`make_gemma4_pair("gemma4-e2b", layers=10)` builds, with transformers' own config and model classes, a random
Gemma 4 text model with E2B's widths (hidden 1536, 8 query heads, 1 KV head, head dims 256 / 512, MLP 6144 and
double-wide on KV-shared layers, 262144-token vocabulary, per-layer inputs of 256, sliding window 512, four
sliding layers per full one, the last ~57 % of layers KV-shared as in the 35-layer original) but fewer layers,
and a random assistant (MTP drafter) for it: 4 layers (3 sliding + 1 full) reading the target's KV, with the
centroid-masked head. The released assistant's widths are not public offline, so they are parameters
(defaults: hidden 512, MLP 2048, 4 query heads, 2048 centroids, top 32). Both are saved with save_pretrained
and cached under the specmtp cache, so specmtp and transformers load the very same files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from specmtp.errors import SpecMTPError
from specmtp.gguf_convert import cache_root

SLIDING, FULL = "sliding_attention", "full_attention"

SHAPES = {
    "gemma4-e2b": dict(hidden_size=1536, intermediate_size=6144, num_attention_heads=8, num_key_value_heads=1,
                       head_dim=256, global_head_dim=512, vocab_size=262144, hidden_size_per_layer_input=256,
                       vocab_size_per_layer_input=262144, sliding_window=512, use_double_wide_mlp=True,
                       final_logit_softcapping=30.0, full_every=5, shared_fraction=20 / 35),
}


@contextmanager
def all_shared_kv_fix() -> Iterator[None]:
    """transformers 5.23 cannot build a Gemma4AssistantForCausalLM: with every layer KV-shared (which the assistant
    config enforces) Gemma4TextConfig.kv_sharing_modes raises. Patch only that case to what the assistant means
    (every layer reuses the target's K/V); attention, masks and heads are untouched."""
    from transformers import Gemma4TextConfig

    original = Gemma4TextConfig.kv_sharing_modes

    def modes(self):
        if self.num_kv_shared_layers and self.num_kv_shared_layers == self.num_hidden_layers:
            return ["reuse"] * self.num_hidden_layers
        return original.fget(self)

    Gemma4TextConfig.kv_sharing_modes = property(modes)
    try:
        yield
    finally:
        Gemma4TextConfig.kv_sharing_modes = original


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


def make_gemma4_pair(shape: str = "gemma4-e2b", layers: int = 10, assistant_hidden: int = 512,
                     assistant_intermediate: int = 2048, assistant_heads: int = 4, num_centroids: int = 2048,
                     centroid_top_k: int = 32, seed: int = 0) -> tuple[Path, Path]:
    """(target dir, assistant dir), built once and cached."""
    from transformers import (
        Gemma4AssistantConfig,
        Gemma4AssistantForCausalLM,
        Gemma4ForCausalLM,
        Gemma4TextConfig,
    )

    if shape not in SHAPES:
        raise SpecMTPError(f"unknown synthetic shape {shape!r} (choose from {', '.join(SHAPES)})")
    spec = dict(SHAPES[shape])
    full_every, shared_fraction = spec.pop("full_every"), spec.pop("shared_fraction")
    if layers < full_every:
        raise SpecMTPError(f"{shape} needs at least {full_every} layers (one full-attention layer)")
    key = f"{shape}-L{layers}-a{assistant_hidden}x{assistant_intermediate}h{assistant_heads}-c{num_centroids}k" \
          f"{centroid_top_k}-s{seed}"
    root = cache_root() / "synthetic" / key
    target_dir, assistant_dir = root / "target", root / "assistant"
    if (target_dir / "config.json").is_file() and (assistant_dir / "config.json").is_file():
        return target_dir, assistant_dir

    types = [FULL if (i + 1) % full_every == 0 else SLIDING for i in range(layers)]
    # the KV-producing prefix must end on a full layer, so both kinds have a producer for the shared layers
    own = max(full_every, -(-round(layers * (1 - shared_fraction)) // full_every) * full_every)
    own = min(own, layers)
    text = Gemma4TextConfig(num_hidden_layers=layers, layer_types=types, num_kv_shared_layers=layers - own,
                            max_position_embeddings=4096, bos_token_id=2, eos_token_id=1, pad_token_id=0,
                            tie_word_embeddings=True, **spec)
    torch.manual_seed(seed)
    target = Gemma4ForCausalLM(text).eval()
    _randomize(target, seed)
    target.save_pretrained(str(target_dir))
    del target

    with all_shared_kv_fix():
        a_text = Gemma4TextConfig(
            vocab_size=spec["vocab_size"], hidden_size=assistant_hidden, intermediate_size=assistant_intermediate,
            num_hidden_layers=4, layer_types=[SLIDING, SLIDING, SLIDING, FULL], num_kv_shared_layers=4,
            num_attention_heads=assistant_heads, num_key_value_heads=spec["num_key_value_heads"],
            head_dim=spec["head_dim"], global_head_dim=spec["global_head_dim"], sliding_window=spec["sliding_window"],
            hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, max_position_embeddings=4096)
        cfg = Gemma4AssistantConfig(text_config=a_text, backbone_hidden_size=spec["hidden_size"],
                                    use_ordered_embeddings=True, num_centroids=num_centroids,
                                    centroid_intermediate_top_k=centroid_top_k)
        assistant = Gemma4AssistantForCausalLM(cfg).eval()
        _randomize(assistant, seed + 1)
        with torch.no_grad():
            assistant.masked_embedding.token_ordering.copy_(
                torch.randperm(spec["vocab_size"], generator=torch.Generator().manual_seed(seed + 2)))
        assistant.generation_config.num_assistant_tokens = 4
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        assistant.save_pretrained(str(assistant_dir))
    _byte_tokenizer(target_dir)
    (root / "shape.json").write_text(json.dumps({"shape": shape, "layers": layers, "kv_producing_layers": own,
                                                 "assistant_hidden": assistant_hidden}, indent=1))
    return target_dir, assistant_dir


def _byte_tokenizer(path: Path) -> None:
    """A byte-level tokenizer (ids 3..258) with a chat template: enough to feed prompts to random weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[ch] = 3 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    fast.save_pretrained(str(path))
