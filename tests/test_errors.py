"""Bad input gets one clear line naming the problem, a non-zero exit, and no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from specmtp.errors import SpecMTPError
from specmtp.loader import load_model


def cli(*args: str, env_cache=None) -> subprocess.CompletedProcess:
    env = None
    if env_cache is not None:
        import os

        env = {**os.environ, "SPECMTP_CACHE": str(env_cache)}
    return subprocess.run([sys.executable, "-m", "specmtp", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def assert_clean_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode != 0
    assert fragment in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_path():
    with pytest.raises(SpecMTPError, match="no such file, directory or preset"):
        load_model("/nonexistent/model.gguf")


def test_unknown_preset_via_cli():
    assert_clean_error(cli("generate", "--model", "no-such-preset", "--prompt", "hi"),
                       "no such file, directory or preset")


def test_file_that_is_not_a_checkpoint(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(SpecMTPError, match="is not a checkpoint"):
        load_model(str(f))
    with pytest.raises(SpecMTPError, match="no config.json"):
        load_model(str(tmp_path))


def test_truncated_gguf(tmp_path):
    from specmtp.presets import preset_path

    src = preset_path("smollm2-135m")
    bad = tmp_path / "truncated.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(3_000_000))
    proc = cli("generate", "--model", str(bad), "--prompt", "hi", env_cache=tmp_path / "cache")
    assert_clean_error(proc, "corrupt or truncated GGUF")


def test_gguf_with_bad_magic(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(SpecMTPError, match="corrupt or truncated GGUF"):
        load_model(str(bad))


def test_corrupt_and_truncated_safetensors(tiny_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dir("llama"), d)
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(SpecMTPError, match="corrupt or truncated safetensors"):
        load_model(str(d))
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(SpecMTPError, match="corrupt or truncated safetensors"):
        load_model(str(d))


def test_unsupported_architecture(tiny_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dir("llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (d / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(cli("generate", "--model", str(d), "--prompt", "hi"), "unsupported architecture 'mamba'")


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dir("llama"), d)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(SpecMTPError, match="missing tensor 'layers.1.mlp.up_proj.weight'"):
        load_model(str(d))


def test_prompt_longer_than_context_via_cli(tiny_dir):
    proc = cli("generate", "--model", str(tiny_dir("llama")), "--prompt", "y" * 700, "--max-new-tokens", "2")
    assert_clean_error(proc, "longer than the model's context")


def test_invalid_sampling_values():
    from specmtp import SamplingParams

    with pytest.raises(SpecMTPError, match="top_p"):
        SamplingParams(temperature=1.0, top_p=0.0)
    with pytest.raises(SpecMTPError, match="temperature"):
        SamplingParams(temperature=-1.0)


def test_bad_prompts_file(tmp_path, tiny_dir):
    f = tmp_path / "p.jsonl"
    f.write_text('{"no_prompt": 1}\n')
    assert_clean_error(cli("bench", "--model", str(tiny_dir("llama")), "--prompts", str(f)), "no string 'prompt'")


def test_llamacpp_comparison_reads_its_timings_and_reports_failures(tmp_path):
    from specmtp.bench import llamacpp_binary, run_llamacpp

    fake = tmp_path / "llama-completion"
    fake.write_text("#!/bin/sh\necho 'some text'\n"
                    "echo 'common_perf_print: prompt eval time =      20.00 ms /    10 tokens' >&2\n"
                    "echo 'common_perf_print:        eval time =     180.00 ms /     9 runs   (20 ms per token)' >&2\n")
    fake.chmod(0o755)
    assert llamacpp_binary(str(tmp_path)) == fake
    out = run_llamacpp(fake, tmp_path / "m.gguf", ["a", "b"], 16, 2)
    assert out["new_tokens"] == 20 and out["seconds"] == pytest.approx(0.4) and out["decode_tok_s"] == pytest.approx(50)
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\necho 'error: unknown model' >&2\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(SpecMTPError, match="unknown model"):
        run_llamacpp(broken, tmp_path / "m.gguf", ["a"], 16, 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecMTPError, match="no llama-completion"):
        llamacpp_binary(str(tmp_path / "empty"))
    with pytest.raises(SpecMTPError, match="not found"):
        llamacpp_binary(str(tmp_path / "missing"))


def test_compare_names_a_sampled_difference_as_a_sample_not_an_error(tiny_dir):
    """`generate --compare` with sampling: the speculative sample may differ from target-only's (same distribution,
    other random draws) and is reported as such; greedy output must be identical."""
    model = str(tiny_dir("llama"))
    common = ("generate", "--model", model, "--drafter", "ngram", "--prompt", "the cat the cat the cat the cat",
              "--max-new-tokens", "40", "--compare")
    greedy = cli(*common)
    assert greedy.returncode == 0 and "output identical" in greedy.stdout, greedy.stdout + greedy.stderr
    outs = []
    for seed in ("2", "3", "4"):  # copies drafted and sampled: other draws (seed 2 here; others where kernels differ)
        sampled = cli(*common, "--temperature", "0.7", "--seed", seed)
        assert sampled.returncode == 0 and "DIFFERENT" not in sampled.stdout, sampled.stdout + sampled.stderr
        outs.append(sampled.stdout)
        if "a different sample" in sampled.stdout:
            break
    assert "a different sample" in outs[-1], outs
