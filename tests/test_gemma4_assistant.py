"""The Gemma 4 assistant (MTP) drafter against transformers' Gemma4AssistantForCausalLM, on tiny random models
of the real architecture: same logits and projected hidden state for the same inputs, and greedy speculative
output identical to target-only greedy and to transformers' generate(assistant_model=...)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB

from specmtp import Engine, SamplingParams, load_drafter, load_model
from specmtp.drafters.base import DraftContext
from specmtp.errors import SpecMTPError
from specmtp.training import TrainOptions, train_drafter
from specmtp.training.trainer import _batch, acceptance, new_assistant, stored_samples, unrolled


@pytest.fixture(autouse=True, scope="module")
def _all_shared_kv_fix():
    """transformers 5.23 cannot build a Gemma4AssistantForCausalLM without this patch (see specmtp.synthetic)."""
    from specmtp.synthetic import all_shared_kv_fix

    with all_shared_kv_fix():
        yield


def make_assistant(path, ordered: bool, seed: int = 3, backbone: int = 64):
    from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM, Gemma4TextConfig

    torch.manual_seed(seed)
    text = Gemma4TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                            sliding_window=5, layer_types=["sliding_attention", "full_attention"],
                            num_kv_shared_layers=2, hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
                            max_position_embeddings=512)
    cfg = Gemma4AssistantConfig(text_config=text, backbone_hidden_size=backbone, use_ordered_embeddings=ordered,
                                num_centroids=8, centroid_intermediate_top_k=2)
    model = Gemma4AssistantForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2 if "norm" in name else 0.15)
        if ordered:
            model.masked_embedding.token_ordering.copy_(torch.randperm(VOCAB))
    model.generation_config.num_assistant_tokens = 3
    model.generation_config.num_assistant_tokens_schedule = "constant"
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def target_dir(tiny_dir):
    return tiny_dir("gemma4")


CORPUS = [f"{w} {w} {w} and {w} again" for w in ("abc", "xyz", "hello", "cat", "dog", "sun", "tea", "map")] + [
    "the quick brown fox", "one two three four", "red green blue", "a b c d e f g"]


def train_opts(steps: int) -> TrainOptions:
    return TrainOptions(layers=2, hidden=32, intermediate=64, heads=4, steps=steps, batch=4, anchors=24, unroll=3,
                        lr=1e-2, prompts=len(CORPUS), answer_tokens=24, max_len=96, topk=8, gen_batch=6,
                        heldout=0.25, eval_every=20, centroids=8, centroid_top_k=2, precision="fp32")


def peaked(path):
    """The tiny target with peaked next-token distributions, as a trained model's are (see test_mtp)."""
    model = load_model(str(path))
    with torch.no_grad():
        model.model.norm.mul_(12.0)
    return model


@pytest.fixture(scope="module")
def trained(target_dir, tmp_path_factory):
    """A Gemma 4 assistant trained by `specmtp train-drafter`'s code for the tiny Gemma 4 target."""
    out = tmp_path_factory.mktemp("trained")
    target = peaked(target_dir)
    meta = train_drafter(target, out, train_opts(120), progress=False, prompts=CORPUS)
    return out, meta, target


@pytest.fixture(scope="module", params=["tied-head", "ordered-embeddings", "trained"])
def assistant_dir(request, tmp_path_factory):
    if request.param == "trained":  # every test below also checks the assistant specmtp trains and saves
        return request.getfixturevalue("trained")[0]
    return make_assistant(tmp_path_factory.mktemp("assistant"), ordered=request.param == "ordered-embeddings")


def test_step_matches_transformers(target_dir, assistant_dir):
    from transformers import AutoModelForCausalLM

    target = load_model(str(target_dir))
    drafter = load_drafter(str(assistant_dir))
    drafter.check_compatible(target)
    hf = AutoModelForCausalLM.from_pretrained(str(assistant_dir), dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    m = target.model
    with torch.inference_mode():
        cache = m.new_cache(1, 32)
        hidden = m(ids, torch.arange(12)[None], cache)[:, -1]  # [1, H]
        cache.lengths.fill_(12)
        token = m.logits(hidden).argmax(-1)  # the next token, at position 12
        ctx = DraftContext([ids[0].tolist() + [int(token)]], hidden, m, cache, SamplingParams(), None)
        ours_logits, ours_h = drafter.step(token[:, None], hidden[:, None], torch.tensor([12]), ctx)
        ours_logits2, ours_h2 = drafter.step(ours_logits.argmax(-1), ours_h, torch.tensor([12]), ctx)
        ours_logits, ours_h, ours_logits2, ours_h2 = (x[:, 0] for x in (ours_logits, ours_h, ours_logits2, ours_h2))
        producers = target.config.kv_producers()
        shared = {kind: (cache.k[i][:, :, :12], cache.v[i][:, :, :12]) for kind, i in producers.items()}
        emb = m.embed_tokens(token[:, None])
        out = hf(inputs_embeds=torch.cat([emb, hidden[:, None]], -1), position_ids=torch.tensor([[12]]),
                 shared_kv_states=shared)
        emb2 = m.embed_tokens(out.logits[:, -1].argmax(-1)[:, None])
        out2 = hf(inputs_embeds=torch.cat([emb2, out.last_hidden_state], -1), position_ids=torch.tensor([[12]]),
                  shared_kv_states=shared)
    torch.testing.assert_close(ours_logits, out.logits[:, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours_h, out.last_hidden_state[:, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours_logits2, out2.logits[:, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours_h2, out2.last_hidden_state[:, 0], atol=1e-4, rtol=1e-4)


PROMPTS = ["abcabcabc", "hello world, hello world, hello", "a long prompt past the sliding window of five"]


@pytest.fixture(scope="module")
def models(target_dir, assistant_dir):
    from transformers import AutoModelForCausalLM

    target = load_model(str(target_dir))
    reference = {}
    for prompt in PROMPTS:
        ids = target.tokenizer.encode(prompt)
        reference[prompt] = (ids, Engine(target).generate([ids], max_new_tokens=20)[0].tokens)
    hf_target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    hf_assistant = AutoModelForCausalLM.from_pretrained(str(assistant_dir), dtype=torch.float32).eval()
    return target, reference, hf_target, hf_assistant


@pytest.mark.parametrize("n", [1, 3, 6])
@pytest.mark.parametrize("schedule", ["constant", "heuristic"])
def test_greedy_speculative_equals_target_only_and_transformers(models, assistant_dir, n, schedule):
    target, reference, hf_target, hf_assistant = models
    spec = Engine(target, load_drafter(str(assistant_dir)), num_draft_tokens=n, schedule=schedule)
    hf_assistant.generation_config.num_assistant_tokens = n
    hf_assistant.generation_config.num_assistant_tokens_schedule = schedule
    eos = list(target.tokenizer.eos_token_ids)
    for ids, want in reference.values():
        assert spec.generate([ids], max_new_tokens=20)[0].tokens == want
        assert spec.stats.drafted > 0
        with torch.inference_mode():
            out = hf_target.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     assistant_model=hf_assistant, do_sample=False, max_new_tokens=20,
                                     eos_token_id=eos, pad_token_id=eos[0])
        assert out[0, len(ids):].tolist()[: len(want)] == want


def test_tree_drafting_keeps_greedy_output(models, assistant_dir):
    """The assistant drafts trees too (--branches): its branches step side by side through the masked head, and
    a Gemma 4 target verifies them through the attention mask (KV-shared layers included)."""
    target, reference, _, _ = models
    spec = Engine(target, load_drafter(str(assistant_dir)), num_draft_tokens=5, schedule="constant", branches=3)
    for ids, want in reference.values():
        assert spec.generate([ids], max_new_tokens=20)[0].tokens == want
        assert spec.stats.drafted > 0
    ids = [ids for ids, _ in reference.values()]
    assert [c.tokens for c in spec.generate(ids, max_new_tokens=20)] == [want for _, want in reference.values()]


def test_batch_and_sampling_run(target_dir, assistant_dir):
    target = load_model(str(target_dir))
    spec = Engine(target, load_drafter(str(assistant_dir)))
    gen = json.loads((assistant_dir / "generation_config.json").read_text())
    assert spec.num_draft_tokens == gen["num_assistant_tokens"] and spec.schedule_name == "constant"
    plain = Engine(target)
    got = spec.generate(PROMPTS, max_new_tokens=12)
    assert [c.tokens for c in got] == [c.tokens for c in plain.generate(PROMPTS, max_new_tokens=12)]
    s = SamplingParams(temperature=0.8, top_p=0.9, seed=1)
    a = spec.generate(PROMPTS, max_new_tokens=12, sampling=s)
    b = spec.generate(PROMPTS, max_new_tokens=12, sampling=s)
    assert [c.tokens for c in a] == [c.tokens for c in b]


def test_assistant_that_does_not_fit_is_refused(target_dir, tmp_path):
    target = load_model(str(target_dir))
    wrong = make_assistant(tmp_path / "wrong", ordered=False, backbone=48)
    with pytest.raises(SpecMTPError, match="backbone_hidden_size 48 does not fit the target's hidden size 64"):
        Engine(target, load_drafter(str(wrong)))
    cfg = json.loads((wrong / "config.json").read_text())
    assert cfg["model_type"] == "gemma4_assistant"


def test_training_a_gemma4_target_makes_an_assistant_that_learns(trained):
    """For a Gemma 4 target, train-drafter trains a Gemma4Assistant (centroid-masked head) and saves it in the
    released format (the tests above load it in transformers and match it); it learns the target's answers."""
    out, meta, target = trained
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gemma4_assistant" and cfg["use_ordered_embeddings"] and cfg["num_centroids"] == 8
    assert cfg["text_config"]["layer_types"] == ["sliding_attention", "full_attention"]
    assert "Gemma 4 assistant" in (out / "README.md").read_text()
    samples = stored_samples(out)
    vocab = torch.arange(target.config.vocab_size)

    def corpus_acceptance(module):
        batch = _batch(samples, 0, 3, None)
        with torch.no_grad():
            _, match = unrolled(module.float(), target, None, vocab, batch, 3)
        return acceptance(match, batch[-1])

    drafter = load_drafter(str(out))
    drafter.check_compatible(target)
    learnt = corpus_acceptance(drafter.module)
    for seed in range(3):
        torch.manual_seed(seed)
        fresh = corpus_acceptance(new_assistant(target, train_opts(0))[0])
        assert learnt[0] > fresh[0] + 0.25 and learnt[2] > 2 * fresh[2], (learnt, fresh)
    order = drafter.module.masked_head.token_ordering
    assert sorted(order.tolist()) == list(range(target.config.vocab_size))  # a permutation: every token drafted


def test_branches_stepped_side_by_side_see_the_sliding_window_of_one_step(target_dir, assistant_dir):
    """W branches in one step read the target's KV as W single steps do, the sliding layers' last W + 1 slots
    included, also where the layers run batch-invariant (quantized weights: one query at a time for own KV)."""
    target = load_model(str(target_dir))
    drafter = load_drafter(str(assistant_dir))
    drafter.check_compatible(target)
    for layer in drafter.module.layers:
        layer.batch_invariant = True
    m = target.model
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(6))  # 12 > the window of 5
    with torch.inference_mode():
        cache = m.new_cache(1, 32)
        hidden = m(ids, torch.arange(12)[None], cache)[:, -1]  # [1, H]
        cache.lengths.fill_(12)
        ctx = DraftContext([ids[0].tolist() + [7]], hidden, m, cache, SamplingParams(), None)
        tokens = torch.tensor([[7, 9, 11]])
        states = hidden[:, None] + 0.1 * torch.randn(1, 3, hidden.shape[-1], generator=torch.Generator().manual_seed(1))
        _, out = drafter.step(tokens, states, torch.tensor([12]), ctx)  # [1, 3, Ht] next hidden states
        for w in range(3):
            _, one_out = drafter.step(tokens[:, w : w + 1], states[:, w : w + 1], torch.tensor([12]), ctx)
            torch.testing.assert_close(out[:, w], one_out[:, 0], atol=1e-5, rtol=1e-5)  # (a masked head's columns
            # depend on the branch, so the next hidden states are compared)
