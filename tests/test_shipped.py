"""Drafters shipped with the package (src/specmtp/shipped/): complete, small, loadable, picked up by their presets,
and exact on their real target (slow; skipped where the target's package is not installed)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from specmtp import Engine, load_drafter, load_model
from specmtp.drafters.mtp import load_module
from specmtp.errors import SpecMTPError
from specmtp.presets import PRESETS, default_drafter, preset_path, shipped_drafters

SHIPPED = shipped_drafters()
TARGETS = {name: p.name for p in PRESETS.values() for name in [(p.drafter or "").removeprefix("ngram+")]
           if name in SHIPPED}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_drafter_is_complete_small_and_loads(name):
    path = SHIPPED[name]
    for f in ("config.json", "model.safetensors", "generation_config.json", "README.md"):
        assert (path / f).is_file(), f
    assert (path / "model.safetensors").stat().st_size < 50 * 2**20
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype in (torch.bfloat16, torch.int64) for k in f.keys())
    module, raw = load_module(path)
    assert raw["training"]["wall_seconds"] > 0 and raw["target"]["name"] in PRESETS
    assert json.loads((path / "generation_config.json").read_text())["num_assistant_tokens"] >= 1
    card = (path / "README.md").read_text()
    assert raw["target"]["name"] in card and "Measured" in card


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_preset_uses_its_shipped_drafter(name):
    assert default_drafter(TARGETS[name]).removeprefix("ngram+") == name


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_shipped_drafter_is_exact_on_its_target(name):
    try:
        preset_path(TARGETS[name])
    except SpecMTPError as e:
        pytest.skip(str(e))
    target = load_model(TARGETS[name], progress=False)
    text = "Write a Python function that reverses a string."
    tok = target.tokenizer
    prompts = [tok.encode_chat(text) if tok.has_chat_template else tok.encode(text)]
    plain = Engine(target).generate(prompts, max_new_tokens=32)[0].tokens
    engine = Engine(target, load_drafter(name, progress=False))
    assert engine.generate(prompts, max_new_tokens=32)[0].tokens == plain
    assert engine.stats.accepted > 0
