"""`specmtp bench` end to end on a tiny model: the table, and a JSON last line with per-kind figures."""

from __future__ import annotations

import json

import pytest

from specmtp.bench import run_bench
from specmtp.cli import build_parser
from specmtp.errors import SpecMTPError


def test_bench_reports_tau_and_speed_by_prompt_kind(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    rows = [("code", "def f(x): return x + x + x + x"), ("code", "abcabcabcabc"), ("chat", "hello world, hello")]
    prompts.write_text("".join(json.dumps({"kind": k, "prompt": p}) + "\n" for k, p in rows))
    args = build_parser().parse_args(["bench", "--model", str(tiny_dir("llama")), "--drafter", "ngram+ngram",
                                      "--prompts", str(prompts), "--max-new-tokens", "12", "--rival", "ngram"])
    assert run_bench(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("run") and "specmtp spec (ngram+ngram" in out[2]
    summary = json.loads(out[-1])
    assert summary["greedy_identical"] and summary["prompts"] == 3
    kinds = summary["by_kind"]
    assert set(kinds) == {"code", "chat"} and kinds["code"]["prompts"] == 2 and kinds["chat"]["prompts"] == 1
    assert all(k["tau"] >= 1.0 and k["tok_s"] > 0 for k in kinds.values())
    rival = summary["rival"]  # the other drafter took the same turns
    assert rival["drafter"] == "ngram" and rival["greedy_identical"] and rival["tau"] >= 1.0
    assert summary["speedup_vs_rival"] == round(summary["spec_tok_s"] / rival["tok_s"], 3)
    assert set(rival["by_kind"]) == {"code", "chat"} and rival["by_kind"]["code"]["prompts"] == 2
    for kind, ratio in summary["speedup_vs_rival_by_kind"].items():
        assert ratio == round(kinds[kind]["tok_s"] / rival["by_kind"][kind]["tok_s"], 3)
    assert "specmtp spec (ngram, " in "\n".join(out)


def test_engines_take_turns_prompt_by_prompt():
    """Target-only and speculative runs interleave (order reversed every other prompt), so drift hits both alike."""
    from types import SimpleNamespace

    from specmtp.bench import run_ours
    from specmtp.engine import Stats

    calls = []

    class Fake:
        def __init__(self, name):
            self.name, self.stats = name, Stats()

        def generate(self, prompts, max_new_tokens):
            calls.append((self.name, prompts[0][0], max_new_tokens))
            self.stats = Stats(row_steps=2, total_s=0.5)
            return [SimpleNamespace(tokens=[prompts[0][0]] * 2)]

    a, b = run_ours([Fake("base"), Fake("spec")], [[1], [2], [3]], 16)
    assert [c[:2] for c in calls if c[2] == 16] == [("base", 1), ("spec", 1), ("spec", 2), ("base", 2),
                                                   ("base", 3), ("spec", 3)]
    assert a["tokens"] == b["tokens"] == [[1, 1], [2, 2], [3, 3]] and a["tok_s"] == 6 / 1.5


def test_bench_repeat_reports_every_round_and_pools_them(tiny_dir, tmp_path, capsys):
    """--repeat N: all prompts N times over, each round's speedup and tau reported, the headline pooling them."""
    prompts = tmp_path / "p.jsonl"
    rows = [("code", "def f(x): return x + x + x + x"), ("chat", "hello world, hello")]
    prompts.write_text("".join(json.dumps({"kind": k, "prompt": p}) + "\n" for k, p in rows))
    base = ["bench", "--model", str(tiny_dir("llama")), "--drafter", "ngram", "--prompts", str(prompts),
            "--max-new-tokens", "10", "--rival", "ngram+ngram"]
    assert run_bench(build_parser().parse_args(base)) == 0
    once = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert once["repeats"] == 1 and "rounds" not in once
    assert run_bench(build_parser().parse_args([*base, "--repeat", "3", "--compare-hf"])) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["repeats"] == 3 and len(summary["rounds"]) == 3
    assert summary["greedy_identical_to_hf"]  # transformers' one round against each of ours
    assert summary["new_tokens"] == 3 * once["new_tokens"] and summary["greedy_identical"]
    for r in summary["rounds"]:
        assert r["speedup_vs_target_only"] == round(r["spec_tok_s"] / r["target_only_tok_s"], 3)
        assert r["tau"] == once["tau"] and r["speedup_vs_rival"] > 0  # the same greedy drafts every round
    speedups = sorted(r["speedup_vs_target_only"] for r in summary["rounds"])
    assert (summary["speedup_min"], summary["speedup_median"], summary["speedup_max"]) == tuple(speedups)
    assert summary["by_kind"]["code"]["prompts"] == 1 and summary["by_kind"]["chat"]["prompts"] == 1
    assert summary["by_kind"]["code"]["tau"] == once["by_kind"]["code"]["tau"]
    assert any(line.startswith("speedup over target-only: min") for line in out)
    args = build_parser().parse_args([*base, "--repeat", "0"])
    with pytest.raises(SpecMTPError, match="--repeat must be at least 1"):
        run_bench(args)
