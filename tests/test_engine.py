"""The engine: greedy speculative output equals target-only greedy for every drafter, schedule, batch size
and draft length; EOS, stop strings and max_new_tokens cut an accepted block at the right token."""

from __future__ import annotations

import pytest
import torch

from specmtp import Engine, SamplingParams, load_model
from specmtp.drafters import DraftModelDrafter, LookupFirst, NgramDrafter
from specmtp.drafters.base import DraftContext, Drafter, Proposal
from specmtp.drafters.confidence import FREE, Price
from specmtp.errors import SpecMTPError

PROMPTS = ["abcabcabcabc", "hello world, hello world, hello", "the cat sat on the mat and the cat"]


@pytest.fixture(scope="module")
def target(tiny_dir):
    return load_model(str(tiny_dir("llama", num_hidden_layers=2)))


@pytest.fixture(scope="module")
def other(tiny_dir):
    return load_model(str(tiny_dir("llama", seed=7, num_hidden_layers=1)))


@pytest.fixture(scope="module")
def reference(target):
    engine = Engine(target)
    return {p: engine.generate([p], max_new_tokens=24)[0].tokens for p in PROMPTS}


def drafters(target, other):
    return {
        "ngram": NgramDrafter(),
        "self": DraftModelDrafter(target.model, target.tokenizer.vocab, "self"),  # accepts everything
        "other": DraftModelDrafter(other.model, other.tokenizer.vocab, "other"),  # mostly rejected
        "ngram+other": LookupFirst(DraftModelDrafter(other.model, other.tokenizer.vocab, "other")),
    }


@pytest.mark.parametrize("kind", ["ngram", "self", "other", "ngram+other"])
@pytest.mark.parametrize("schedule", ["constant", "heuristic", "adaptive"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n", [1, 4, 8])
def test_greedy_speculative_equals_target_only(target, other, reference, kind, schedule, batch, n):
    engine = Engine(target, drafters(target, other)[kind], num_draft_tokens=n, schedule=schedule)
    prompts = PROMPTS[:batch]
    out = engine.generate(prompts, max_new_tokens=24)
    for p, c in zip(prompts, out, strict=True):
        assert c.tokens == reference[p]
    if kind == "self" and schedule != "adaptive":  # adaptive may rightly stop drafting with a costly drafter
        assert engine.stats.accepted > 0 and engine.stats.tau > 1.5


def test_self_drafting_accepts_everything(target, other):
    engine = Engine(target, drafters(target, other)["self"], num_draft_tokens=4)
    engine.generate([PROMPTS[0]], max_new_tokens=20)
    s = engine.stats
    assert s.accepted == s.drafted and all(a == 1.0 for a in s.acceptance_by_position)


def test_draft_cache_rollback_matches_fresh_drafter(target, other):
    """A drafter whose drafts are mostly rejected must still draft from exactly the accepted context:
    its proposals equal those of a fresh drafter prefilled with the same context."""
    drafter = DraftModelDrafter(other.model, other.tokenizer.vocab)
    engine = Engine(target, drafter, num_draft_tokens=4)
    engine.generate([PROMPTS[1]], max_new_tokens=16)
    seq = PROMPTS[1]
    ids = target.tokenizer.encode(seq)
    ref = Engine(other).generate([ids], max_new_tokens=4)[0].tokens
    fresh = DraftModelDrafter(other.model, other.tokenizer.vocab)
    from specmtp.drafters.base import DraftContext

    cache = target.model.new_cache(1, 64)
    ctx = DraftContext([ids], torch.zeros(1, 1), target.model, cache, SamplingParams(), None)
    fresh.begin(ctx)
    assert fresh.propose(ctx, 4).tokens[0].tolist() == ref[:4]


def test_max_new_tokens_inside_accepted_block(target, other, reference):
    engine = Engine(target, drafters(target, other)["self"], num_draft_tokens=8)
    out = engine.generate([PROMPTS[0]], max_new_tokens=5)[0]
    assert out.tokens == reference[PROMPTS[0]][:5] and out.finish_reason == "length"


def test_eos_inside_accepted_block(target, other, reference):
    ref = reference[PROMPTS[2]]
    i = next(i for i in range(1, len(ref)) if ref[i] not in ref[:i])
    saved = target.tokenizer.eos_token_ids
    target.tokenizer.eos_token_ids = (ref[i],)
    try:
        engine = Engine(target, drafters(target, other)["self"], num_draft_tokens=8)
        out = engine.generate([PROMPTS[2]], max_new_tokens=24)[0]
    finally:
        target.tokenizer.eos_token_ids = saved
    assert out.tokens == ref[: i + 1] and out.finish_reason == "eos"


def test_stop_string_inside_accepted_block(target, other, reference):
    tok = target.tokenizer
    ref = reference[PROMPTS[0]]
    text = tok.decode(ref)
    pos = next(i for i in range(1, len(text)) if text[i].isalnum() and text[i] not in text[:i])
    engine = Engine(target, drafters(target, other)["self"], num_draft_tokens=8)
    out = engine.generate([PROMPTS[0]], max_new_tokens=24, stop=[text[pos]])[0]
    assert out.finish_reason == "stop" and out.text == text[:pos]
    assert tok.decode(out.tokens).startswith(text[: pos + 1]) and out.tokens == ref[: len(out.tokens)]


def test_streaming_yields_the_same_text(target, other):
    engine = Engine(target, drafters(target, other)["self"], num_draft_tokens=4)
    pieces = list(engine.stream(PROMPTS[1], max_new_tokens=20))
    streamed_end = engine.stats.finish_reasons
    assert len(pieces) > 1
    whole = engine.generate([PROMPTS[1]], max_new_tokens=20)[0]
    assert "".join(pieces) == whole.text and streamed_end == [whole.finish_reason]


def test_sampling_is_seeded_and_reproducible(target, other):
    s = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=11)
    for kind in ("other", "ngram", "ngram+other"):
        engine = Engine(target, drafters(target, other)[kind], num_draft_tokens=3)
        a = engine.generate(PROMPTS, max_new_tokens=16, sampling=s)
        b = engine.generate(PROMPTS, max_new_tokens=16, sampling=s)
        assert [c.tokens for c in a] == [c.tokens for c in b]
    plain = Engine(target)
    assert plain.generate([PROMPTS[0]], 16, s)[0].tokens == plain.generate([PROMPTS[0]], 16, s)[0].tokens


class Recorder(Drafter):
    """Proposes token 7 everywhere with a flat q over 10 tokens; records what it is told was accepted."""

    def __init__(self) -> None:
        self.accepted: list[list[int]] = []

    def begin(self, ctx: DraftContext) -> None:
        pass

    def propose(self, ctx: DraftContext, n: int, price: Price = FREE) -> Proposal:
        bsz = len(ctx.sequences)
        return Proposal(torch.full((bsz, n), 7), torch.full((bsz,), n), torch.full((bsz, n, 10), 0.1))

    def accept(self, num_accepted: torch.Tensor, path: torch.Tensor | None = None) -> None:
        self.accepted.append(num_accepted.tolist())


def test_lookup_first_copies_repeats_and_keeps_the_inner_drafter_elsewhere(target):
    inner = Recorder()
    drafter = LookupFirst(inner, min_match=2)
    seqs = [[1, 2, 3, 4, 5, 1, 2], [1, 2, 3, 4, 5, 6, 9]]  # row 0 repeats "1 2": copy "3 4 5"; row 1 does not
    ctx = DraftContext(seqs, torch.zeros(2, 1), target.model, target.model.new_cache(2, 16),
                       SamplingParams(temperature=1.0), None)
    p = drafter.propose(ctx, 3)
    assert p.tokens.tolist() == [[3, 4, 5], [7, 7, 7]] and p.num.tolist() == [3, 3]
    assert torch.equal(p.probs[0], torch.nn.functional.one_hot(torch.tensor([3, 4, 5]), 10).float())
    assert torch.equal(p.probs[1], torch.full((3, 10), 0.1))
    drafter.accept(torch.tensor([2, 1]))
    assert inner.accepted == [[0, 1]]  # the copying row used none of the inner drafter's tokens
    ctx.sequences = [seqs[0]]  # one row that copies: the inner drafter is not asked at all
    p = drafter.propose(ctx, 2)
    assert p.tokens.tolist() == [[3, 4]] and p.probs is None
    drafter.accept(torch.tensor([2]))
    assert inner.accepted == [[0, 1]]


def test_chat_mode_applies_template(target):
    engine = Engine(target)
    ids = engine.encode("hi", chat=True)
    assert target.tokenizer.decode(ids) == "<user>hi\n<assistant>"


def test_prompt_longer_than_context_is_a_clear_error(target):
    with pytest.raises(SpecMTPError, match="longer than the model's context"):
        Engine(target).generate(["x" * 600], max_new_tokens=4)


def test_draft_model_with_other_vocabulary_is_refused(target):
    drafter = DraftModelDrafter(target.model, {"a": 0}, "mismatched")
    with pytest.raises(SpecMTPError, match="different vocabulary"):
        Engine(target, drafter)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_draft_model_keeps_output_exact(target, tiny_dir, reference, dtype):
    """A draft model in 16-bit (fewer bytes per draft step) only changes the proposals, never the output."""
    half = load_model(str(tiny_dir("llama", num_hidden_layers=2)), dtype=dtype)
    assert half.model.embed.weight.dtype == (torch.bfloat16 if dtype == "bf16" else torch.float16)
    engine = Engine(target, DraftModelDrafter(half.model, half.tokenizer.vocab, dtype), num_draft_tokens=4)
    for p in PROMPTS:
        assert engine.generate([p], max_new_tokens=24)[0].tokens == reference[p]
    assert engine.stats.accepted > 0  # the same weights in 16 bits mostly agree with the fp32 target
    sampled = engine.generate(PROMPTS, max_new_tokens=8, sampling=SamplingParams(temperature=1.0, seed=0))
    assert all(len(c.tokens) > 0 for c in sampled)
