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


def test_quantized_qwen_stays_small_in_memory():
    """Loading with --weights q4 keeps the weights quantized: resident memory of the 1.5B preset under 2.5 GB
    (fp32: about 7 GB). Measured in a fresh process."""
    import subprocess
    import sys

    from specmtp.quant import available

    try:
        preset_path("qwen2.5-coder-1.5b")
    except SpecMTPError as e:
        pytest.skip(str(e))
    if not available():
        pytest.skip("quantized kernels not built")
    code = ("import gc, specmtp; m = specmtp.load_model('qwen2.5-coder-1.5b', weights='q4', progress=False);"
            "gc.collect(); e = specmtp.Engine(m); e.generate(['def f(x):'], max_new_tokens=4);"
            "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    rss_kb = int(out.split()[-1])
    assert rss_kb < 2.5 * 1024 * 1024, f"resident {rss_kb / 1024**2:.2f} GB"
