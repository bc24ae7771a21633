"""Larger presets (installed by `make models`) against transformers reading the same GGUF file.
Slow: run with `pytest -m slow`. Each is skipped when its package is not installed."""

from __future__ import annotations

import pytest
import torch

from specmtp import Engine, load_model
from specmtp.errors import SpecMTPError
from specmtp.presets import preset_path

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("preset", ["gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_preset_greedy_matches_transformers_gguf(preset):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    try:
        path = preset_path(preset)
    except SpecMTPError as e:
        pytest.skip(str(e))
    ours = load_model(preset, progress=False)
    hf_logging.set_verbosity_error()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    eos = list(ours.tokenizer.eos_token_ids)
    engine = Engine(ours)
    for prompt in ["def fibonacci(n):", "The three primary colors are"]:
        ids = ours.tokenizer.encode(prompt)
        mine = engine.generate([ids], max_new_tokens=16)[0].tokens
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=16, eos_token_id=eos, pad_token_id=eos[0])
        assert mine == out[0, len(ids):].tolist()[: len(mine)], prompt
