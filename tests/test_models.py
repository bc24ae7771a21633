"""Our native models against transformers on tiny random checkpoints of every family (fp32, 1e-4)."""

from __future__ import annotations

import pytest
import torch

from specmtp.linear import onednn
from specmtp.loader import load_model

FAMILIES = ["llama", "llama3rope", "qwen2", "gemma3", "gemma4", "gemma4moe"]


def hf_logits(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]  # [T, V]


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_match_transformers(tiny_dir, family, fast):
    path = tiny_dir(family)
    ids = list(torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(1)).tolist())
    ref = hf_logits(path, ids)
    m = load_model(str(path)).model
    with torch.inference_mode(), onednn(fast):
        cache = m.new_cache(1, 64)
        pre = m.logits(m(torch.tensor([ids[:12]]), torch.arange(12)[None], cache))[0]
        torch.testing.assert_close(pre, ref[:12], atol=1e-4, rtol=1e-4)
        for t in range(12, 20):  # step by step through the cache, past Gemma's sliding window of 6
            step = m.logits(m(torch.tensor([[ids[t]]]), torch.tensor([[t]]), cache))[0, 0]
            torch.testing.assert_close(step, ref[t], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_equals_uncached_and_chunked(tiny_dir, family):
    m = load_model(str(tiny_dir(family))).model
    ids = torch.randint(0, 256, (1, 18), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = m.logits(m(ids, torch.arange(18)[None], m.new_cache(1, 32)))
        cache = m.new_cache(1, 32)
        parts = [m.logits(m(ids[:, a:b], torch.arange(a, b)[None], cache)) for a, b in [(0, 5), (5, 6), (6, 13),
                                                                                        (13, 18)]]
        # chunks of up to linear.SMALL_ROWS tokens take specmtp's kernel, the whole prompt oneDNN: rounding differs
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_rollback_then_redecode_equals_never_decoded(tiny_dir, family):
    m = load_model(str(tiny_dir(family))).model
    g = torch.Generator().manual_seed(3)
    prefix, junk, real = (torch.randint(0, 256, (1, n), generator=g) for n in (10, 4, 5))
    with torch.inference_mode():
        clean = m.new_cache(1, 32)
        m(prefix, torch.arange(10)[None], clean)
        want = m.logits(m(real, torch.arange(10, 15)[None], clean))
        dirty = m.new_cache(1, 32)
        m(prefix, torch.arange(10)[None], dirty)
        dirty.lengths.fill_(10)
        m(junk, torch.arange(10, 14)[None], dirty)  # rejected drafts
        dirty.rollback(torch.tensor([10]))
        got = m.logits(m(real, torch.arange(10, 15)[None], dirty))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert int(dirty.lengths[0]) == 10


@pytest.mark.parametrize("family", ["llama", "gemma3", "gemma4", "gemma4moe"])
def test_ragged_batch_rows_equal_single_rows(tiny_dir, family):
    m = load_model(str(tiny_dir(family))).model
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(0, 256, (n,), generator=g) for n in (9, 4, 13)]
    with torch.inference_mode():
        cache = m.new_cache(3, 32)
        tokens = torch.zeros(3, 13, dtype=torch.long)
        for b, r in enumerate(rows):
            tokens[b, : len(r)] = r
        batch = m.logits(m(tokens, torch.arange(13).expand(3, 13), cache))
        for b, r in enumerate(rows):
            single = m.logits(m(r[None], torch.arange(len(r))[None], m.new_cache(1, 32)))[0]
            # GEMMs of another shape sum in another order: equal to rounding, not bit for bit
            torch.testing.assert_close(batch[b, : len(r)], single, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gemma4"])
def test_batched_decode_step_equals_single_rows(tiny_dir, family):
    """A one-token step over rows at different positions (the masked one-query attention) equals each row's own
    step (unmasked SDPA), on full and sliding layers."""
    m = load_model(str(tiny_dir(family))).model
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(0, 256, (n,), generator=g) for n in (21, 6, 14)]
    with torch.inference_mode():
        cache = m.new_cache(3, 32)
        singles = []
        for b, r in enumerate(rows):
            own = m.new_cache(1, 32)
            m(r[None, :-1], torch.arange(len(r) - 1)[None], own)
            m(r[None, :-1], torch.arange(len(r) - 1)[None], cache.row(b))
            singles.append(m.logits(m(r[None, -1:], torch.tensor([[len(r) - 1]]), own))[0, 0])
        last = torch.stack([r[-1:] for r in rows])  # [3, 1]
        at = torch.tensor([[len(r) - 1] for r in rows])
        batch = m.logits(m(last, at, cache))[:, 0]
    torch.testing.assert_close(batch, torch.stack(singles), atol=1e-4, rtol=1e-4)


def test_one_query_attention_matches_sdpa():
    import torch.nn.functional as F

    from specmtp.model import one_query_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g) for shape in ((3, 6, 1, 8), (3, 2, 10, 8), (3, 2, 10, 8)))
    mask = torch.arange(10) < torch.tensor([10, 4, 7])[:, None, None, None]  # [3, 1, 1, 10]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(one_query_attention(q, k, v, mask, 0.3), want, atol=1e-5, rtol=1e-5)


def test_gemma4_multimodal_checkpoint_loads_text_weights_only(tmp_path):
    """A Gemma4ForConditionalGeneration checkpoint (vision tower and projector included) loads as its text model:
    the towers are skipped, never materialized, and the logits match transformers' full model on text."""
    from conftest import VOCAB, byte_tokenizer, gemma4_kwargs, hf_config
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4TextConfig, Gemma4VisionConfig

    torch.manual_seed(0)
    common = hf_config("llama").to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    text = Gemma4TextConfig(**gemma4_kwargs("gemma4", {k: common[k] for k in keep}))
    vision = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=16, position_embedding_size=64)
    cfg = Gemma4Config(text_config=text, vision_config=vision, audio_config=None, image_token_id=VOCAB - 1,
                       boi_token_id=VOCAB - 2, eoi_token_id=VOCAB - 3)
    hf = Gemma4ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2 if "norm" in name else 0.15)
    hf.save_pretrained(str(tmp_path))
    byte_tokenizer(tmp_path)
    ids = torch.randint(0, 256, (1, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits[0]
    m = load_model(str(tmp_path)).model
    assert not any("vision" in n or "audio" in n for n, _ in m.named_parameters())
    with torch.inference_mode():
        ours = m.logits(m(ids, torch.arange(14)[None], m.new_cache(1, 32)))[0]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_native_layout_maps_back_to_the_checkpoint_names(tiny_dir, family):
    """checkpoint.native_to_hf (how trained assistants are saved) inverts the loader's mapping: every tensor of the
    original checkpoint comes back under its own name with its own values."""
    from specmtp.checkpoint import native_to_hf, read_tensors, safetensors_files

    path = tiny_dir(family)
    loaded = load_model(str(path))
    original = {k.removeprefix("model."): v for k, v in read_tensors(safetensors_files(path)).items()}
    back = native_to_hf(loaded.config, loaded.model.state_dict())
    assert set(back) == set(original) - ({"lm_head.weight"} if loaded.config.tie_word_embeddings else set())
    for name, t in back.items():
        torch.testing.assert_close(t.float(), original[name].float(), rtol=0, atol=1e-6, msg=name)
