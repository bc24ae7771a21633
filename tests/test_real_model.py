"""The default real model (SmolLM2-135M-Instruct, GGUF Q4_1, from its PyPI package) against transformers
reading the same GGUF file itself: same greedy tokens."""

from __future__ import annotations

import pytest
import torch

from specmtp import Engine, load_model
from specmtp.presets import preset_path

PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string.",
           "List three colors."]


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m", progress=False)


def test_gguf_greedy_tokens_match_transformers(smollm):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = preset_path("smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    engine = Engine(smollm)
    eos = list(smollm.tokenizer.eos_token_ids)
    for prompt in PROMPTS:
        ids = smollm.tokenizer.encode_chat(prompt)
        ours = engine.generate([ids], max_new_tokens=24)[0].tokens
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=24, eos_token_id=eos, pad_token_id=eos[0])
        theirs = out[0, len(ids):].tolist()
        assert ours == theirs[: len(ours)] and len(ours) == len(theirs), prompt


def test_answer_is_coherent(smollm):
    text = Engine(smollm).generate(["What is the capital of France?"], max_new_tokens=16, chat=True)[0].text
    assert "Paris" in text


def test_ngram_speculative_equals_target_only_on_real_model(smollm):
    from specmtp.drafters import NgramDrafter

    prompt = "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox"
    ref = Engine(smollm).generate([prompt], max_new_tokens=32)[0].tokens
    spec = Engine(smollm, NgramDrafter(), num_draft_tokens=4)
    assert spec.generate([prompt], max_new_tokens=32)[0].tokens == ref
