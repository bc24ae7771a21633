"""specmtp's own MTP drafters: training learns, save/load round trip, exact greedy output, batches, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specmtp import Engine, SamplingParams, load_drafter, load_model
from specmtp.drafters import LookupFirst, MTPDrafter
from specmtp.drafters.base import DraftContext
from specmtp.errors import SpecMTPError
from specmtp.quant import _qkernels, quantize_model
from specmtp.training import TrainOptions, train_drafter
from specmtp.training.trainer import _batch, acceptance, new_module, stored_samples, unrolled

CORPUS = [f"{w} {w} {w} and {w} again" for w in ("abc", "xyz", "hello", "cat", "dog", "sun", "tea", "map")] + [
    "the quick brown fox", "one two three four", "red green blue", "a b c d e f g"]
PROMPTS = [CORPUS[0], CORPUS[3], "the cat sat on the mat and the cat"]  # two training prompts, one new


def tiny_opts(steps: int) -> TrainOptions:
    return TrainOptions(steps=steps, batch=4, anchors=24, unroll=3, lr=1e-2, prompts=len(CORPUS), answer_tokens=24,
                        max_len=96, topk=8, gen_batch=6, heldout=0.25, eval_every=10, draft_vocab=128)


def peaked(path) -> object:
    """A tiny random target whose next-token distributions are peaked, as a trained model's are (a random one's
    are nearly uniform, which leaves nothing to learn)."""
    model = load_model(str(path))
    with torch.no_grad():
        model.model.norm.mul_(12.0)
    return model


@pytest.fixture(scope="module")
def target(tiny_dir):
    return peaked(tiny_dir("llama", num_hidden_layers=2))


@pytest.fixture(scope="module")
def trained(target, tmp_path_factory):
    out = tmp_path_factory.mktemp("mtp")
    opts = tiny_opts(80)
    opts.precision = "bf16"  # learning is checked in bf16 here and in fp32 by the Gemma 4 assistant's tests
    meta = train_drafter(target, out, opts, progress=False, prompts=CORPUS)
    return out, meta


def corpus_acceptance(module, target, out) -> list[float]:
    """Greedy chained acceptance of a drafter on the training corpus's answers, as training measures it."""
    samples = stored_samples(out)
    to_draft = torch.full((target.config.vocab_size,), -1, dtype=torch.long)
    to_draft[module.draft_vocab] = torch.arange(module.draft_vocab.numel())
    head = target.model.head_weight.detach()[module.draft_vocab].float()
    batch = _batch(samples, 0, 3, None)
    with torch.no_grad():
        _, match = unrolled(module.float(), target, head, to_draft, batch, 3)
    return acceptance(match, batch[-1])


def test_training_learns(target, trained):
    out, meta = trained
    assert [h["step"] for h in meta["history"]] == [10, 20, 30, 40, 50, 60, 70, 80]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "specmtp_mtp" and cfg["draft_vocab_size"] == 128
    assert meta["options"]["precision"] == "bf16"
    assert "Held-out tau estimate" in (out / "README.md").read_text()
    learnt = corpus_acceptance(load_drafter(str(out)).module, target, out)
    fresh = corpus_acceptance(new_module(target, tiny_opts(0), load_drafter(str(out)).module.draft_vocab), target, out)
    assert learnt[0] > fresh[0] + 0.3, (learnt, fresh)
    assert learnt[2] > fresh[2]


@pytest.mark.parametrize("branches", [1, None])  # chains, and the trees a trained drafter's config asks for
@pytest.mark.parametrize("n", [1, 3, 6])
def test_greedy_output_identical_to_target_only(target, trained, n, branches):
    drafter = load_drafter(str(trained[0]))
    assert isinstance(drafter, MTPDrafter)
    base = Engine(target).generate(PROMPTS, max_new_tokens=20)
    accepted = 0
    for schedule in ("constant", "heuristic", "adaptive"):
        spec = Engine(target, drafter, n, schedule, branches)
        for prompt, ref in zip(PROMPTS, base, strict=True):  # one at a time and as a batch of 3
            assert spec.generate([prompt], max_new_tokens=20)[0].tokens == ref.tokens
            accepted += spec.stats.accepted
        assert [c.tokens for c in spec.generate(PROMPTS, max_new_tokens=20)] == [c.tokens for c in base]
        accepted += spec.stats.accepted
    assert accepted > 0  # drafts were accepted, so the equality above covered accepted drafts too


@pytest.mark.parametrize("weights", ["dense", "q4"])
def test_tree_drafting_output_identical_to_target_only(target, trained, tiny_dir, weights):
    """Branching drafts (a tree of up to n nodes a round) keep greedy output exact, one row or a batch, and the
    trees do branch and get accepted off their first branch."""
    from specmtp.tree import is_chain

    tgt = target
    if weights == "q4":
        tgt = peaked(tiny_dir("llama", num_hidden_layers=2))
        quantize_model(tgt.model, "q4")
    drafter = load_drafter(str(trained[0]))
    drafter.branches = 3
    trees, off_first = [], []
    propose = drafter.propose_tree

    def recording(ctx, n, price):
        p = propose(ctx, n, price)
        trees.append(not is_chain(p.parents))
        return p

    drafter.propose_tree = recording
    accept = drafter.accept

    def seen(num_accepted, path=None):
        if path is not None:
            off_first.append(bool(((path[:, 0] > 0) & (num_accepted > 0)).any()))
        accept(num_accepted, path)

    drafter.accept = seen
    base = Engine(tgt).generate(PROMPTS, max_new_tokens=20)
    for n, schedule in ((4, "constant"), (8, "constant"), (6, "adaptive")):
        spec = Engine(tgt, drafter, n, schedule)
        for prompt, ref in zip(PROMPTS, base, strict=True):
            assert spec.generate([prompt], max_new_tokens=20)[0].tokens == ref.tokens
            for walk in (True, False):  # one row's picks by a walk, or one head call (schedule.GreedyPicks)
                spec.head_walk = walk
                assert spec.generate([prompt], max_new_tokens=20)[0].tokens == ref.tokens
            spec.head_walk = None
        assert [c.tokens for c in spec.generate(PROMPTS, max_new_tokens=20)] == [c.tokens for c in base]
    assert any(trees) and any(off_first)


def test_copies_join_the_drafters_trees_and_keep_output_identical(target, trained):
    """ngram+ over a tree-drafting drafter (greedy): the copy's chain competes for the tree's nodes beside the
    drafter's candidates; output stays exact, and both sources' nodes are proposed and calibrated."""
    base = Engine(target).generate(PROMPTS, max_new_tokens=24)
    drafter = LookupFirst(load_drafter(str(trained[0])), min_match=1)
    drafter.set_branches(3)
    for n, schedule in ((6, "constant"), (6, "adaptive")):
        spec = Engine(target, drafter, n, schedule)
        for prompt, ref in zip(PROMPTS, base, strict=True):
            assert spec.generate([prompt], max_new_tokens=24)[0].tokens == ref.tokens
        assert [c.tokens for c in spec.generate(PROMPTS, max_new_tokens=24)] == [c.tokens for c in base]
    assert drafter.calibration.reached.sum() > 0  # copied nodes were proposed and reached
    assert drafter.inner.calibration.reached.sum() > 0
    assert not any(drafter.copied)  # never the copy alone: one tree


def test_sampled_drafting_returns_q_of_the_sampled_tokens(target, trained):
    drafter = load_drafter(str(trained[0]))
    engine = Engine(target, drafter, 3)
    out = engine.generate(PROMPTS, max_new_tokens=12, sampling=SamplingParams(temperature=0.9, top_k=20, seed=3))
    assert all(len(c.tokens) == 12 or c.finish_reason == "eos" for c in out)


def test_price_stops_unsure_rows_early_and_output_stays_exact(target, trained):
    from specmtp.drafters.confidence import FREE, Price

    drafter = load_drafter(str(trained[0]))
    base = Engine(target).generate(PROMPTS, max_new_tokens=20)
    engine = Engine(target, drafter, 6, "adaptive")  # calibrated: prices from measured costs, a stop per row
    assert [c.tokens for c in engine.generate(PROMPTS, max_new_tokens=20)] == [c.tokens for c in base]
    assert engine._adaptive[3].calibrated and engine._adaptive[3].price != FREE
    drafter.check_compatible(target)
    ids = [engine.encode(p) for p in PROMPTS]
    for price, longest in ((FREE, 6), (Price(verify=0.999), 0)):  # nothing is that sure: no row drafts
        cache = target.model.new_cache(3, 64)
        width = max(map(len, ids))
        tokens = torch.tensor([i + [0] * (width - len(i)) for i in ids])
        hidden = target.model(tokens, torch.arange(width).expand(3, width), cache)
        cache.lengths.copy_(torch.tensor([len(i) for i in ids]))
        last = hidden[torch.arange(3), cache.lengths - 1]
        seqs = [i + [int(target.model.logits(h).argmax())] for i, h in zip(ids, last, strict=True)]
        ctx = DraftContext(seqs, last, target.model, cache, SamplingParams(), None)
        drafter.begin(ctx)
        p = drafter.propose(ctx, 6, price)
        assert int(p.num.max()) == longest and p.tokens.shape[1] <= 6


def test_save_load_round_trip(target, trained, tmp_path):
    out, meta = trained
    drafter = load_drafter(str(out))
    state = torch.load(out / "checkpoint.pt", weights_only=False)["module"]
    for name, saved in drafter.module.state_dict().items():  # bf16 on disk: equal to rounding
        assert torch.allclose(saved.float(), state[name].float(), rtol=1e-2, atol=1e-2), name
    drafter.check_compatible(target)  # binds to its target (and then computes with q8 weights)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["num_assistant_tokens"] >= 1
    assert gen["specmtp_branches"] == 3  # as the shipped drafters: trees under greedy decoding
    assert load_drafter(str(out)).branches == 3
    assert drafter.default_schedule == "adaptive"


def test_resume_continues_and_refuses_other_options(target, tmp_path):
    train_drafter(target, tmp_path, tiny_opts(10), progress=False, prompts=CORPUS)
    meta = train_drafter(target, tmp_path, tiny_opts(20), progress=False, prompts=CORPUS, resume=True)
    assert [h["step"] for h in meta["history"]][-1] == 20
    with pytest.raises(SpecMTPError, match="already holds training data"):
        train_drafter(target, tmp_path, tiny_opts(20), progress=False, prompts=CORPUS)
    shards = sorted((tmp_path / "shards").glob("[0-9]*.pt"))
    before = shards[-1].read_bytes()
    shards[-1].unlink()  # as if the data run had been interrupted before its last batch
    train_drafter(target, tmp_path, tiny_opts(20), progress=False, prompts=CORPUS, resume=True)
    assert shards[-1].read_bytes() == before  # rebuilt identically (seeded)
    with pytest.raises(SpecMTPError, match="other options"):
        opts = tiny_opts(30)
        opts.lr = 5e-3
        train_drafter(target, tmp_path, opts, progress=False, prompts=CORPUS, resume=True)


def test_heldout_is_spread_over_the_prompts_and_kept_on_resume(target, tmp_path):
    """Answers are stored shortest prompt first; the held-out ones spread over them (not the longest prompts only),
    are recorded in the checkpoint, and a resumed run keeps them, also one from before they were recorded."""
    opts = tiny_opts(4)
    opts.heldout = 0.35
    train_drafter(target, tmp_path, opts, progress=False, prompts=CORPUS)
    held = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["held"]
    greedy = [i for i, s in enumerate(stored_samples(tmp_path)) if s.greedy]
    n = len(held)
    assert n >= 2 and held != greedy[-n:] and set(held) <= set(greedy)
    opts.steps = 8
    train_drafter(target, tmp_path, opts, progress=False, prompts=CORPUS, resume=True)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["held"] == held
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    del ckpt["held"]  # a checkpoint from before: it held out the last greedy answers
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    opts.steps = 12
    train_drafter(target, tmp_path, opts, progress=False, prompts=CORPUS, resume=True)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["held"] == greedy[-n:]


def test_weight_decay_and_feature_noise_are_seeded_and_held_on_resume(target, tmp_path):
    opts = tiny_opts(6)
    opts.weight_decay, opts.noise = 0.1, 0.2
    runs = [train_drafter(target, tmp_path / name, opts, progress=False, prompts=CORPUS) for name in ("a", "b")]
    weights = [load_drafter(str(tmp_path / name)).module.state_dict() for name in ("a", "b")]
    assert runs[0]["history"] == runs[1]["history"]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    plain = train_drafter(target, tmp_path / "plain", tiny_opts(6), progress=False, prompts=CORPUS)
    assert plain["history"][-1]["loss"] != runs[0]["history"][-1]["loss"]
    with pytest.raises(SpecMTPError, match="other options.*noise"):
        again = tiny_opts(8)
        again.weight_decay = 0.1
        train_drafter(target, tmp_path / "a", again, progress=False, prompts=CORPUS, resume=True)


def test_greedy_share_decides_how_the_answers_are_decoded(target, tmp_path):
    """--greedy-share: 1 answers every prompt greedily, 0.5 (the default) alternates chunks; the card says which, the
    data key holds it, and it is checked."""
    opts = tiny_opts(2)
    opts.greedy_share = 1.0
    train_drafter(target, tmp_path / "greedy", opts, progress=False, prompts=CORPUS)
    assert all(s.greedy for s in stored_samples(tmp_path / "greedy"))
    assert "all greedy;" in (tmp_path / "greedy" / "README.md").read_text()
    train_drafter(target, tmp_path / "half", tiny_opts(2), progress=False, prompts=CORPUS)
    kinds = [s.greedy for s in stored_samples(tmp_path / "half")]
    assert True in kinds and False in kinds
    assert "half greedy, half sampled" in (tmp_path / "half" / "README.md").read_text()
    with pytest.raises(SpecMTPError, match="other settings.*greedy_share"):
        train_drafter(target, tmp_path / "greedy", tiny_opts(4), progress=False, prompts=CORPUS, resume=True)
    opts.greedy_share = 1.5
    with pytest.raises(SpecMTPError, match="--greedy-share must be between 0 and 1"):
        train_drafter(target, tmp_path / "bad", opts, progress=False, prompts=CORPUS)


def test_precision_is_resolved_recorded_and_held_on_resume(target, tmp_path):
    with pytest.raises(SpecMTPError, match="unknown precision 'fp8'"):
        train_drafter(target, tmp_path / "bad", TrainOptions(precision="fp8"), progress=False, prompts=CORPUS)
    opts = tiny_opts(4)
    opts.precision = "fp32"
    meta = train_drafter(target, tmp_path, opts, progress=False, prompts=CORPUS)
    assert meta["options"]["precision"] == "fp32"
    assert "fp32 matmuls" in (tmp_path / "README.md").read_text()
    with pytest.raises(SpecMTPError, match="other options.*precision"):
        opts = tiny_opts(8)
        opts.precision = "bf16"
        train_drafter(target, tmp_path, opts, progress=False, prompts=CORPUS, resume=True)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    del ckpt["options"]["precision"]  # a checkpoint from before the option: it trained in fp32
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    opts = tiny_opts(8)
    opts.precision = "fp32"
    assert train_drafter(target, tmp_path, opts, progress=False, prompts=CORPUS, resume=True)["steps"] == 8


def test_data_read_through_quantized_weights_is_not_resumed_with_dense_ones(tiny_dir, tmp_path):
    path = tiny_dir("llama", num_hidden_layers=2)
    train_drafter(load_model(str(path), weights="q8"), tmp_path, tiny_opts(2), progress=False, prompts=CORPUS[:4],
                  target_name="tiny")
    with pytest.raises(SpecMTPError, match="other settings"):
        train_drafter(load_model(str(path)), tmp_path, tiny_opts(2), progress=False, prompts=CORPUS[:4],
                      target_name="tiny", resume=True)


def test_data_read_through_bf16_weights_trains_a_drafter_for_the_fp32_target(tiny_dir, tmp_path):
    path = tiny_dir("llama", num_hidden_layers=2)
    meta = train_drafter(load_model(str(path), dtype="bf16"), tmp_path, tiny_opts(2), progress=False,
                         prompts=CORPUS[:4], target_name="tiny")
    assert meta["data_weights"] == "bfloat16"
    assert "answering and reading: bfloat16" in (tmp_path / "README.md").read_text()
    with pytest.raises(SpecMTPError, match="other settings"):
        train_drafter(load_model(str(path)), tmp_path, tiny_opts(2), progress=False, prompts=CORPUS[:4],
                      target_name="tiny", resume=True)
    fp32 = load_model(str(path))
    drafter = load_drafter(str(tmp_path))
    drafter.check_compatible(fp32)  # the same target, whatever weights read its data
    base = Engine(fp32).generate(PROMPTS, max_new_tokens=12)
    spec = Engine(fp32, drafter, 3).generate(PROMPTS, max_new_tokens=12)
    assert [c.tokens for c in spec] == [c.tokens for c in base]


def test_recorded_answers_are_the_targets_own(target):
    """distill() records, while decoding, what a fresh forward over the answered sequence gives; rows that stop
    early (here: at max_len, so each prompt length stops at its own step) leave the batch on the way."""
    from specmtp.training.data import capture, distill

    texts = PROMPTS + ["a b c d e f g h i j k l m n o p", "tea map sun", "one two three four five six"]
    prompts = [target.tokenizer.encode(p) for p in texts]
    max_len = max(len(p) for p in prompts) + 8
    recorded = distill(target, prompts, 24, max_len, greedy=True, sources=[1], topk=4, seed=0)
    base = Engine(target).generate(texts, max_new_tokens=24)
    assert len({len(s.tokens) - s.prompt_len for s in recorded}) > 3  # stopped at different steps
    for s, ref, p in zip(recorded, base, prompts, strict=True):
        assert s.tokens.tolist() == (p + ref.tokens)[:max_len]
    fresh = capture(target, [(s.tokens.tolist(), s.prompt_len, True) for s in recorded], [1], 4, progress=False)
    for s, f in zip(recorded, fresh, strict=True):
        assert torch.allclose(s.hidden.float(), f.hidden.float(), atol=3e-2, rtol=3e-2)
        assert torch.allclose(s.keys[1].float(), f.keys[1].float(), atol=3e-2, rtol=3e-2)
        assert torch.equal(s.top_ids[:, 0], f.top_ids[:, 0])  # the target's distribution, prompt included
        assert torch.allclose(s.top_p, f.top_p, atol=1e-3)


def test_bad_drafters_are_refused(target, trained, tiny_dir, tmp_path):
    out, _ = trained
    other = peaked(tiny_dir("llama", seed=5, num_hidden_layers=2))  # same shapes, other weights
    with pytest.raises(SpecMTPError, match="trained for other weights"):
        Engine(other, load_drafter(str(out)))
    wider = peaked(tiny_dir("llama", num_hidden_layers=3))
    with pytest.raises(SpecMTPError, match="num_layers"):
        Engine(wider, load_drafter(str(out)))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((out / "config.json").read_text())
    (broken / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:100])
    with pytest.raises(SpecMTPError, match="corrupt or truncated"):
        load_drafter(str(broken))


def test_narrower_drafter_starts_from_the_most_important_channels(target):
    opts = tiny_opts(0)
    opts.intermediate = 48  # the target's MLP is 128 wide
    module = new_module(target, opts, torch.arange(64))
    src, dst = target.model.layers[module.layers[0].source], module.layers[0]
    keep = torch.sort(torch.topk(src.w_down.weight.norm(dim=0), 48).indices).values
    assert torch.equal(dst.w_down.weight, src.w_down.weight[:, keep])
    assert torch.equal(dst.w_gate_up.weight[:48], src.w_gate_up.weight[:128][keep])
    assert torch.equal(dst.wqkv.weight, src.wqkv.weight[: dst.wqkv.weight.shape[0]])


def test_default_mlp_width_keeps_any_number_of_layers_within_the_shipped_budget():
    """Qwen2.5-Coder-1.5B's geometry: one layer keeps an MLP 2560 wide, two share the budget (768 each); both
    drafters stay within PARAM_BUDGET (under 50 MB in bf16)."""
    from types import SimpleNamespace

    from specmtp.config import from_hf_config
    from specmtp.drafters.mtp import MTPModule, drafter_config
    from specmtp.training.trainer import PARAM_BUDGET, _default_shape

    tc = from_hf_config({"model_type": "qwen2", "hidden_size": 1536, "num_attention_heads": 12,
                         "num_key_value_heads": 2, "intermediate_size": 8960, "num_hidden_layers": 28,
                         "vocab_size": 1024})
    widths = []
    for layers in (1, 2):
        opts = tiny_opts(0)
        opts.layers = layers
        hidden, inter, heads = _default_shape(SimpleNamespace(config=tc), opts)
        module = MTPModule(drafter_config(tc, layers, hidden, inter, heads), tc.hidden_size, torch.arange(8))
        assert sum(p.numel() for p in module.parameters()) <= PARAM_BUDGET
        widths.append(inter)
    assert widths == [2560, 768]


def test_quantized_target_quantizes_its_mtp_drafter(trained, tiny_dir):
    """With a q8 target the drafter's layers run through the same kernels: they compute what the dense drafter
    computes, to quantization error, and speculative output still equals target-only output."""
    target = load_model(str(tiny_dir("llama", num_hidden_layers=2)), weights="q8")
    with torch.no_grad():
        target.model.norm.mul_(12.0)  # as `peaked` does for the dense target the drafter was trained on
    drafter, dense = load_drafter(str(trained[0])), load_drafter(str(trained[0]))
    base = [c.tokens for c in Engine(target).generate(PROMPTS, max_new_tokens=20)]
    for n in (1, 3):
        spec = Engine(target, drafter, n, "constant")
        assert [c.tokens for c in spec.generate(PROMPTS, max_new_tokens=20)] == base
    assert drafter.quantized and drafter.module.layers[0].w_down.qweight is not None
    g = torch.Generator().manual_seed(0)
    cache = target.model.new_cache(1, 32)
    target.model(torch.randint(0, 256, (1, 20), generator=g), torch.arange(20)[None], cache)
    hidden_size = target.config.hidden_size
    embeds, hidden = torch.randn(1, 3, hidden_size, generator=g), torch.randn(1, 3, hidden_size, generator=g)
    positions = torch.tensor([[8, 14, 20]])
    with torch.no_grad():
        q, d = (m.module(embeds, hidden, positions, cache, 20) for m in (drafter, dense))
    assert (q - d).norm() / d.norm() < 0.05


def test_dense_target_drafts_with_q8_weights_unless_asked_for_dense(target, trained):
    """A draft step reads a quarter of the bytes through q8 weights; the output stays the target's, and the drafts
    are nearly all the dense drafter's."""
    q8, dense = MTPDrafter(trained[0]), MTPDrafter(trained[0], weights="dense")
    base = [c.tokens for c in Engine(target).generate(PROMPTS, max_new_tokens=20)]
    accepted = {}
    for name, drafter in (("q8", q8), ("dense", dense)):
        spec = Engine(target, drafter, 3, "constant")
        assert [c.tokens for c in spec.generate(PROMPTS, max_new_tokens=20)] == base
        accepted[name] = spec.stats.accepted
    assert q8.quantized and not isinstance(q8.head, torch.Tensor) and q8.module.layers[0].w_down.qweight is not None
    assert not dense.quantized and isinstance(dense.head, torch.Tensor)
    assert accepted["q8"] >= 0.8 * accepted["dense"] > 0
    with pytest.raises(SpecMTPError, match="'auto' or 'dense'"):
        MTPDrafter(trained[0], weights="q4")


def test_query_only_drafter_layers_run_fused_without_a_mask(target, trained):
    """A q8 drafter's layers (queries over the target's KV, no K/V of their own) run the fused quantized forward;
    a draft step's queries, all at one position, skip the mask. Both compute what the plain masked forward does."""
    drafter = MTPDrafter(trained[0])
    drafter.check_compatible(target)
    layers = drafter.module.layers
    assert all(layer.fused for layer in layers)
    g = torch.Generator().manual_seed(0)
    cache = target.model.new_cache(1, 32)
    with torch.no_grad():
        target.model(torch.randint(0, 256, (1, 20), generator=g), torch.arange(20)[None], cache)
        embeds, hidden = (torch.randn(1, 3, target.config.hidden_size, generator=g) for _ in range(2))
        where = torch.full((1, 3), 20)  # three branches of one row, at its next position
        fast = drafter.module(embeds, hidden, where, cache, 20)
        for layer in layers:
            layer.fused = False
        try:
            plain = drafter.module(embeds, hidden, where, cache, 21)  # end past the position: the masked path
        finally:
            for layer in layers:
                layer.fused = True
    assert (fast - plain).norm() / plain.norm() < 1e-3


def test_draft_step_in_one_stack_call_computes_what_the_module_does(target, trained):
    """A q8 drafter's step as four kernel calls (its layers through quant.run_stack, attention over the target's
    cache in C) against the module's forward: the same logits and next hidden state to rounding, the same picks."""
    drafter = MTPDrafter(trained[0])
    drafter.check_compatible(target)
    assert drafter.stack is not None and drafter.stack[:, 29].tolist() == [1] * len(drafter.module.layers)
    g = torch.Generator().manual_seed(0)
    cache = target.model.new_cache(1, 32)
    with torch.no_grad():
        target.model(torch.randint(0, 256, (1, 20), generator=g), torch.arange(20)[None], cache)
        ctx = DraftContext([[0] * 21], torch.zeros(1, 1), target.model, cache, SamplingParams(), None)
        token = torch.randint(0, 256, (1, 3), generator=g)
        hidden = torch.randn(1, 3, target.config.hidden_size, generator=g)
        fast = drafter.step(token, hidden, torch.tensor([20]), ctx)
        stack, drafter.stack = drafter.stack, None
        try:
            plain = drafter.step(token, hidden, torch.tensor([20]), ctx)
        finally:
            drafter.stack = stack
    for a, b in zip(fast, plain, strict=True):
        assert a.shape == b.shape and (a - b).norm() / b.norm() < 1e-4
    assert torch.equal(fast[0].topk(3).indices, plain[0].topk(3).indices)
    # the step as one kernel call (quant.draft_step: the embedding lookup and those four calls in C): the same bits
    assert drafter._step is not None
    with torch.no_grad():
        step, drafter._step = drafter._step, None
        try:
            four = drafter.step(token, hidden, torch.tensor([20]), ctx)
        finally:
            drafter._step = step
    assert all(torch.equal(a, b) for a, b in zip(fast, four, strict=True))
    fields, rows, table, emb_scale = step  # a scaled embedding (Gemma's): the table halved and scaled by 2, exactly
    drafter._step = (fields, rows, table * 0.5, 2.0 * emb_scale)
    try:
        with torch.no_grad():
            scaled = drafter.step(token, hidden, torch.tensor([20]), ctx)
    finally:
        drafter._step = step
    assert all(torch.equal(a, b) for a, b in zip(fast, scaled, strict=True))
    # a tree's step: the softmax's top 3 in the kernel (its own e^x with AVX2, else expf), against torch's over the
    # same logits, on every code path this CPU has
    try:
        for isa in _qkernels.info()["available"]:
            _qkernels.set_isa(isa)
            with torch.no_grad():
                logits, h = drafter.step(token, hidden, torch.tensor([20]), ctx)
                conf, pick, out = drafter.step_top(token, hidden, torch.tensor([20]), ctx, 3)
            want, at = torch.softmax(logits, -1).topk(3, -1)
            assert torch.equal(out, h) and torch.equal(pick, drafter.vocab[at]), isa
            torch.testing.assert_close(conf, want, rtol=1e-5, atol=1e-7)
    finally:
        _qkernels.set_isa("best")
    with pytest.raises(ValueError, match="token id outside"):
        drafter.step(torch.tensor([[target.config.vocab_size]]), hidden[:, :1], torch.tensor([20]), ctx)


def test_first_state_fuses_the_taps_with_one_norm_op(target, trained, tmp_path):
    """With taps (EAGLE-3's lower-layer features), a q8 drafter's round starts from the fused state (for fp32 taps
    one kernel call: the quantized product's pre-op norms each tap on its own and scales it, the hidden state as it
    is): each tap normalized on its own and scaled, concatenated with the hidden state, projected."""
    out = tmp_path / "taps"
    opts = tiny_opts(4)
    opts.taps = "0"
    train_drafter(target, out, opts, progress=False, prompts=CORPUS)
    drafter = MTPDrafter(out)
    drafter.check_compatible(target)
    assert drafter.taps == (0,) and drafter.stack is not None
    assert not isinstance(drafter.module.fuse.kernel_weight, torch.Tensor)  # q8: the norms and product in one call
    g = torch.Generator().manual_seed(1)
    hidden, taps = torch.randn(1, target.config.hidden_size, generator=g), torch.randn(1, 1, target.config.hidden_size,
                                                                                      generator=g)
    ctx = DraftContext([[0]], hidden, target.model, target.model.new_cache(1, 4), SamplingParams(), None, taps)
    mod = drafter.module
    with torch.no_grad():
        fast = drafter.first_state(ctx)
        normed = taps * torch.rsqrt(taps.pow(2).mean(-1, keepdim=True) + mod.cfg.rms_norm_eps) * mod.tap_norm
        plain = mod.fuse(torch.cat([normed.flatten(-2), hidden], dim=-1))
    assert (fast - plain).norm() / plain.norm() < 1e-4
    # a tree round's first step computes that fusion in its own kernel call: the same bits as first_state, then a step
    cache = target.model.new_cache(1, 32)
    with torch.no_grad():
        target.model(torch.randint(0, 256, (1, 20), generator=g), torch.arange(20)[None], cache)
        ctx = DraftContext([[0] * 21], hidden, target.model, cache, SamplingParams(), None, taps)
        token, where = torch.tensor([[7]]), torch.tensor([20])
        assert drafter._fuse_in_kernel(ctx)
        one = drafter.step_top(token, None, where, ctx, 3)
        two = drafter.step_top(token, drafter.first_state(ctx)[:, None], where, ctx, 3)
        fused_logits = drafter._kernel_step(token[0], ctx.hidden, 20, ctx, 0, ctx.taps[0])  # the logits' form too
        logits = drafter.step(token, drafter.first_state(ctx)[:, None], where, ctx)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
    assert all(torch.equal(a[None], b) for a, b in zip(fused_logits, logits, strict=True))


def test_recorded_samples_own_compact_storage_with_a_bf16_target(tiny_dir):
    """With bf16 target weights the cache is bf16 already, so a sample's K/V must still be copies: a view would keep
    (and a shard would save) the whole batch's cache of every layer with each sample."""
    from specmtp.training.data import capture, distill_stream

    target = load_model(str(tiny_dir("llama", num_hidden_layers=2)), dtype="bf16")
    prompts = [target.tokenizer.encode(p) for p in PROMPTS]
    got = []
    distill_stream(target, [(prompts, True, 0)], 6, 40, [1], 4, 2, lambda _, samples: got.extend(samples), (0,))
    got += capture(target, [(p + [5, 6, 7], len(p), True) for p in prompts], [1], 4, progress=False, taps=(0,))
    for s in got:
        for t in (s.hidden, s.taps, s.keys[1], s.values[1]):
            assert t.dtype == torch.bfloat16 and t.untyped_storage().nbytes() == t.numel() * 2


def test_continuous_batching_refills_rows_and_keeps_answers(target):
    """distill_stream with fewer rows than prompts: finished rows take the next prompt, chunks come back in order,
    greedy answers are the target's own and sampled ones do not depend on which prompts shared a step."""
    from specmtp.training.data import distill_stream

    texts = PROMPTS + ["a b c d e f g h i j k l m n o p", "tea map sun", "one two three four five six"]
    prompts = [target.tokenizer.encode(p) for p in texts]
    max_len = max(len(p) for p in prompts) + 10
    base = Engine(target).generate(texts, max_new_tokens=10)

    def run(batch: int) -> list[tuple[int, list]]:
        got: list[tuple[int, list]] = []
        distill_stream(target, [(prompts[:3], True, 0), (prompts[3:], False, 1)], 10, max_len, [1], 4, batch,
                       lambda i, samples: got.append((i, samples)))
        return got

    two, four = run(2), run(4)
    assert [i for i, _ in two] == [0, 1] and [len(s) for _, s in two] == [3, 3]
    for s, ref, p in zip(two[0][1], base[:3], prompts[:3], strict=True):
        assert s.tokens.tolist() == (p + ref.tokens)[:max_len] and s.greedy
    for a, b in zip(two[1][1], four[1][1], strict=True):  # sampled: the same draws whatever the batch
        assert torch.equal(a.tokens, b.tokens) and not a.greedy
        assert torch.allclose(a.hidden.float(), b.hidden.float(), atol=3e-2)


def test_prompt_set_is_varied_deterministic_and_excludes_the_benchmark(tmp_path):
    from specmtp.training.prompts import build_prompts

    prompts = build_prompts(400, seed=3)
    assert prompts == build_prompts(400, seed=3) and len(set(prompts)) == len(prompts)
    tasks = [p for p in prompts if " function that " in p and p.startswith("Write a ")]
    assert len({p.split()[2] for p in tasks}) >= 3  # small programming tasks in several languages
    assert any(p.startswith("Translate to ") for p in build_prompts(1600))
    assert any("```python" in p for p in prompts)  # standard-library code
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[:5]))
    kept = build_prompts(400, seed=3, exclude=bench)
    assert not set(prompts[:5]) & set(kept) and len(kept) == len(prompts) - 5


def test_prompt_set_2_adds_chat_prompts_and_set_1_stays_as_it_was():
    from specmtp.training.prompts import TEMPLATES, TEMPLATES_2, TOPICS, TOPICS_2, build_prompts

    added = {t.format(t=topic) for topic in TOPICS + TOPICS_2 for t in TEMPLATES_2}
    added |= {t.format(t=topic) for topic in TOPICS_2 for t in TEMPLATES}

    def new_kinds(prompts):
        return [p for p in prompts if p in added]

    one, two = build_prompts(1600, seed=1, prompt_set=1), build_prompts(1600, seed=1)
    assert not new_kinds(one) and len(new_kinds(two)) > 200
    assert two == build_prompts(1600, seed=1, prompt_set=2) and len(set(two)) == len(two)
    with pytest.raises(ValueError, match="prompt set"):
        build_prompts(10, prompt_set=5)


def test_prompt_set_3_adds_programming_tasks_and_never_a_bench_prompt():
    from specmtp.training.prompts import CODE_TASKS_3, build_prompts

    bench = Path(__file__).parents[1] / ".." / "shared" / "prompts" / "bench.jsonl"
    two, three = build_prompts(1600, seed=1, prompt_set=2), build_prompts(1600, seed=1, prompt_set=3)
    assert three == build_prompts(1600, seed=1, prompt_set=3) and len(set(three)) == len(three)

    def tasks(prompts):
        return [p for p in prompts if any(task in p for task in CODE_TASKS_3)]

    assert not tasks(two) and len(tasks(three)) > 200
    if bench.is_file():
        banned = {json.loads(line)["prompt"] for line in bench.read_text().splitlines() if line.strip()}
        kept = build_prompts(1600, seed=1, prompt_set=3, exclude=bench)
        assert not banned & set(kept)


def test_near_catches_requests_close_to_an_excluded_prompt():
    from specmtp.training.prompts import near

    banned = {"Write a short story about a lighthouse keeper who finds a message in a bottle."}
    assert near("Write a short story about a lighthouse keeper who finds a bottle.", banned)  # most words shared
    assert near("Tell me about a lighthouse keeper who finds a message in it", banned)  # 5 words in a row
    assert near("Write a short story about a dragon.", banned)  # (strict: a common 5-word opening counts)
    assert not near("Write a poem about a dragon.", banned)
    assert not near("Explain how tides work.", set())


def test_own_requests_keep_finished_plain_requests_and_drop_excluded_ones(target, tmp_path, monkeypatch):
    from specmtp.engine import Completion, Engine
    from specmtp.training import prompts as P

    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"prompt": "Write a short story about a lighthouse keeper who finds a message."}))
    scripted = [("Explain how tides work for a ten-year-old.", "eos"),
                ("Write a short story about a lighthouse keeper who finds a message.", "eos"),  # excluded
                ("Explain how tides work for a ten-year-old.", "eos"),  # asked twice
                ("How do I sort a list of numbers in Python?", "length"),  # still open at the limit
                ("Hi there", "eos"),  # too short
                ("Describe the water wheel and its uses in a mill.", "eos")]
    calls = []

    def generate(self, prompts, max_new_tokens=128, sampling=None, stop=(), chat=False):
        calls.append((prompts, sampling.seed, sampling.temperature))
        tok = self.target.tokenizer
        return [Completion(len(p), tok.encode(scripted[i % len(scripted)][0], add_special_tokens=False), "",
                           scripted[i % len(scripted)][1]) for i, p in enumerate(prompts)]

    monkeypatch.setattr(Engine, "generate", generate)
    monkeypatch.setattr(P, "OPENERS", ("",))
    got = P.own_requests(target, 5, seed=1, exclude=bench, batch=6)
    assert got == ["Explain how tides work for a ten-year-old.", "Describe the water wheel and its uses in a mill."]
    head = target.tokenizer.encode_chat("x")[:2]
    assert all(p[:2] == head for p in calls[0][0])  # the chat template up to the user's turn
    assert calls[0][2] == 1.0 and len({seed for _, seed, _ in calls}) == len(calls) == 6  # gave up: 8n requests asked
    assert P.own_requests(target, 1, seed=1, exclude=bench, batch=6) == got[:1]


def test_prompt_set_4_is_a_quarter_own_requests_asked_once(target, tmp_path, monkeypatch):
    from specmtp.training import trainer
    from specmtp.training.prompts import build_prompts

    asked = []

    def own(target, n, seed, exclude, progress=False):
        asked.append(n)
        return [f"Tell me something about the number {i}." for i in range(n)]

    monkeypatch.setattr(trainer, "own_requests", own)
    opts = TrainOptions(prompts=400, prompt_set=4)
    first = trainer._prompt_set(target, opts, False, tmp_path)
    again = trainer._prompt_set(target, opts, False, tmp_path)  # a resumed run: the saved requests
    assert asked == [100] and first == again and len(first) == len(set(first)) == 400
    assert sum(p.startswith("Tell me something about the number") for p in first) == 100
    # the rest is the templated set with code's share raised so that code keeps half of all the prompts
    assert first[:300] == build_prompts(300, 0, code_share=200 / 300, prompt_set=4)


def test_teacher_forced_text_is_code_and_prose_after_a_request(target):
    from specmtp.training.prompts import raw_answers

    windows = raw_answers(target, 4000, 96, seed=0)
    assert windows == raw_answers(target, 4000, 96, seed=0)
    assert sum(len(ids) for ids, _ in windows) >= 4000
    texts = []
    for ids, plen in windows:
        assert len(ids) <= 96 and 1 <= plen < len(ids)
        head = target.tokenizer.encode_chat("x")[:2] if target.tokenizer.has_chat_template else ids[:1]
        assert ids[: len(head)] == head  # every window starts as a request would
        texts.append(target.tokenizer.decode(ids[plen:]))
    assert any(t.startswith("```python") for t in texts) and any(not t.startswith("```") for t in texts)



def test_read_text_grows_on_resume_and_keeps_what_was_read(target, tmp_path, monkeypatch):
    from specmtp.training import trainer

    build_raw = trainer.build_raw
    monkeypatch.setattr(trainer, "RAW_CHUNK", 8)
    opts = tiny_opts(0)
    opts.raw_tokens = 3000
    first = build_raw(target, opts, [1], False, tmp_path)
    chunks = {p.name: p.read_bytes() for p in tmp_path.glob("raw-*.pt")}
    assert "raw-000000.pt" in chunks and len(chunks) > 1
    opts.raw_tokens = 6000
    grown = build_raw(target, opts, [1], False, tmp_path)
    assert len(grown) > len(first) and sum(len(s.tokens) for s in grown) >= 6000
    kept = zip(first, grown[: len(first)], strict=True)
    assert all(torch.equal(a.tokens, b.tokens) and torch.equal(a.hidden, b.hidden) for a, b in kept)
    assert all((tmp_path / name).read_bytes() == data for name, data in chunks.items())  # read, not recaptured
    assert (tmp_path / f"raw-{len(first):06d}.pt").is_file()
    (tmp_path / "raw-000000.pt").unlink()
    with pytest.raises(SpecMTPError, match="do not follow each other"):
        build_raw(target, opts, [1], False, tmp_path)


def test_resume_may_grow_the_read_text_but_not_shrink_it(target, tmp_path):
    opts = tiny_opts(10)
    opts.raw_tokens = 100  # custom prompts read no text, but the run's settings still hold it
    train_drafter(target, tmp_path, opts, progress=False, prompts=CORPUS)
    vocab = load_drafter(str(tmp_path)).module.draft_vocab
    opts.steps, opts.raw_tokens = 20, 200
    meta = train_drafter(target, tmp_path, opts, progress=False, prompts=CORPUS, resume=True)
    assert meta["raw_grown"] == [{"step": 10, "raw_tokens": 200}]
    assert "grown to --raw-tokens 200 on resuming at step 10" in (tmp_path / "README.md").read_text()
    assert torch.equal(load_drafter(str(tmp_path)).module.draft_vocab, vocab)  # the vocabulary it started with
    opts.raw_tokens = 150
    with pytest.raises(SpecMTPError, match="can grow on resume, not shrink"):
        train_drafter(target, tmp_path, opts, progress=False, prompts=CORPUS, resume=True)


# ---- multi-layer features (--taps) ----------------------------------------------------------------------------
def test_features_return_the_residual_stream_after_tapped_layers(tiny_dir):
    """model.features: the final hidden state equals forward's, and each tap is the residual stream after that
    layer (transformers' hidden_states[i + 1]); a quantized model's one-call layer stack runs in segments and
    taps the same values as its layer-by-layer path."""
    from transformers import AutoModelForCausalLM

    path = tiny_dir("llama", num_hidden_layers=3)
    target = load_model(str(path))
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12)[None]
    final, taps = target.model.features(tokens, pos, target.model.new_cache(1, 16), (0, 1))
    assert taps.shape == (1, 12, 2, target.config.hidden_size)
    torch.testing.assert_close(final, target.model(tokens, pos, target.model.new_cache(1, 16)))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        states = hf(tokens, output_hidden_states=True).hidden_states
    for j, layer in enumerate((0, 1)):
        torch.testing.assert_close(taps[:, :, j], states[layer + 1], atol=1e-4, rtol=1e-4)
    assert target.model.features(tokens, pos, target.model.new_cache(1, 16))[1] is None
    with pytest.raises(ValueError, match="ascending"):
        target.model.features(tokens, pos, target.model.new_cache(1, 16), (1, 0))

    q = load_model(str(path), weights="q8").model
    assert q.stack is not None
    runs = []
    for stack in (q.stack, None):
        q.stack = stack
        runs.append(q.features(tokens, pos, q.new_cache(1, 16), (0, 2)))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.fixture(scope="module")
def tapped(target, tmp_path_factory):
    out = tmp_path_factory.mktemp("mtp-taps")
    opts = tiny_opts(80)
    opts.taps = "auto"
    meta = train_drafter(target, out, opts, progress=False, prompts=CORPUS)
    return out, meta


def test_drafter_with_taps_learns_round_trips_and_drafts_exactly(target, tapped):
    out, meta = tapped
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["taps"] == [1] and meta["options"]["taps"] == "auto"  # 2 layers: low = 1, middle = 1
    samples = stored_samples(out)
    assert samples[0].taps.shape == (len(samples[0].tokens), 1, target.config.hidden_size)
    drafter = load_drafter(str(out))
    assert drafter.taps == (1,) and drafter.module.fuse.weight.shape[1] == 2 * target.config.hidden_size
    state = torch.load(out / "checkpoint.pt", weights_only=False)["module"]
    assert torch.allclose(drafter.module.fuse.weight.float(), state["fuse.weight"].float(), atol=1e-2, rtol=1e-2)
    assert state["fuse.weight"][:, : target.config.hidden_size].abs().max() > 0  # the tapped layer is used
    learnt = corpus_acceptance(drafter.module, target, out)
    fresh = corpus_acceptance(new_module(target, tiny_opts(0), drafter.module.draft_vocab), target, out)
    assert learnt[0] > fresh[0] + 0.3, (learnt, fresh)
    base = [c.tokens for c in Engine(target).generate(PROMPTS, max_new_tokens=20)]
    for inner in ("", "ngram+"):
        spec, accepted = Engine(target, load_drafter(inner + str(out)), 3, "constant"), 0
        for prompt, ref in zip(PROMPTS, base, strict=True):
            assert spec.generate([prompt], max_new_tokens=20)[0].tokens == ref
            accepted += spec.stats.accepted
        assert [c.tokens for c in spec.generate(PROMPTS, max_new_tokens=20)] == base
        assert accepted + spec.stats.accepted > 0


def test_taps_are_checked(target, tapped, tmp_path, tiny_dir):
    opts = tiny_opts(5)
    for bad, msg in (("2,1", "ascending"), ("0,9", "below 2"), ("x", "none, auto or")):
        opts.taps = bad
        with pytest.raises(SpecMTPError, match=msg):
            train_drafter(target, tmp_path / bad, opts, progress=False, prompts=CORPUS)
    opts = tiny_opts(5)
    opts.prompt_set = 7
    with pytest.raises(SpecMTPError, match="prompt-set 7"):
        train_drafter(target, tmp_path / "set", opts, progress=False, prompts=CORPUS)
    assert not (tmp_path / "set" / "shards").exists()  # refused before any data was written
    ckpt = tmp_path / "other"
    train_drafter(target, ckpt, tiny_opts(5), progress=False, prompts=CORPUS)
    opts = tiny_opts(10)
    opts.taps = "auto"  # data recorded without taps cannot be resumed with them
    with pytest.raises(SpecMTPError, match="other settings"):
        train_drafter(target, ckpt, opts, progress=False, prompts=CORPUS, resume=True)
    shallow = load_model(str(tiny_dir("llama", num_hidden_layers=1)))
    drafter = load_drafter(str(tapped[0]))
    with pytest.raises(SpecMTPError, match="num_layers|layers \\[1\\]"):
        drafter.check_compatible(shallow)
