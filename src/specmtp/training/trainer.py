"""`specmtp train-drafter`: train an MTP drafter for a target by self-distillation, on the CPU.

Pipeline (each stage saved under --out, so --resume picks up where a run stopped):
    prompts  = build_prompts(...)                         stdlib code + instruction templates, no bench prompts
               (+ own_requests(target) from set 4 on)     requests the target writes itself (Magpie), none near one
    data     = distill_stream(target, prompts)            the target's answers, recorded as it decodes: hidden
                                                          states, read K/V, top-k next-token targets (shards/)
    train    : unrolled exactly as drafting runs: for anchors L (last token at L, target KV [0, L)),
               step 1 gets (embed(tok_L), h_{L-1}) (with --taps: h_{L-1} fused with lower layers' outputs at L-1),
               step k the drafter's own previous output and embed(tok_{L+k-1});
               loss = cross-entropy against the target's distribution at L+k-1, over the draft vocabulary
    out/     : config.json + model.safetensors (bf16) + generation_config.json + README.md (the card)

Held-out acceptance is estimated the same way (greedy match of the drafter's argmax with the target's, chained
over draft positions), which gives the expected tokens per verify pass (tau) without running the engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from specmtp.checkpoint import read_config
from specmtp.drafters.gemma4_assistant import (
    AssistantModule,
    assistant_config,
    assistant_text_config,
    balanced_clusters,
    save_assistant,
)
from specmtp.drafters.mtp import MTPModule, drafter_config, save_drafter
from specmtp.errors import SpecMTPError
from specmtp.loader import LoadedModel
from specmtp.model import taps_valid
from specmtp.training.data import Sample, capture, distill_stream
from specmtp.training.prompts import OWN_SHARE, PROMPT_SETS, build_prompts, own_requests, raw_answers

DATA_VERSION = 4


@dataclass
class TrainOptions:
    layers: int = 1
    hidden: int | None = None  # default: the target's hidden size
    intermediate: int | None = None  # default: the widest MLP (at most the target's) within PARAM_BUDGET
    heads: int | None = None  # default: the target's number of query heads
    steps: int = 400
    batch: int = 8  # sequences per step
    anchors: int = 96  # draft positions sampled per sequence per step
    unroll: int = 3  # draft steps trained through (backpropagated through the recurrence)
    lr: float = 2e-3
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    noise: float = 0.0  # uniform noise on the target hidden state a round starts from, times its RMS (EAGLE's
    # feature augmentation: the drafter learns not to lean on the exact vector of a memorized answer)
    draft_vocab: int = 8192  # 0: the full vocabulary
    prompts: int = 320
    answer_tokens: int = 128
    max_len: int = 448
    topk: int = 16
    centroids: int | None = None  # Gemma 4 assistants: token clusters of the masked head (None: V/128 where V allows)
    centroid_top_k: int = 32  # clusters scored per draft
    raw_tokens: int = 20000  # plus this many tokens of standard-library source read by the target (teacher-forced)
    feature_weight: float = 1.0  # weight of the hidden-state regression beside the distribution loss
    gen_batch: int = 32
    heldout: float = 0.06
    eval_every: int = 50
    seed: int = 0
    precision: str = "auto"  # the drafter's matmuls while training: bf16 (autocast) or fp32; auto: bf16 where fast
    taps: str = "none"  # lower target layers fused into the first step's input: none, auto, or indices "1,15"
    prompt_set: int = 2  # the offline prompt set's version (1: the one before more chat topics and templates; 3:
    # more programming tasks; 4: set 3 with a quarter of the prompts the target's own requests)
    exclude: str | None = None  # a JSONL prompt file whose prompts must not be trained on
    greedy_share: float = 0.5  # the share of answers decoded greedily (the rest sampled), spread evenly over chunks


@dataclass
class StoredKV:
    """The target's K/V of the layers a drafter reads, for a padded batch of training sequences."""

    k: dict[int, torch.Tensor]  # layer -> [B, Hkv, T, D]
    v: dict[int, torch.Tensor]


PRECISIONS = ("auto", "bf16", "fp32")


def tap_layers(opts: TrainOptions, num_layers: int) -> tuple[int, ...]:
    """--taps as target layer indices: "auto" = a low and a middle layer (EAGLE-3's low/mid/high features, the
    final hidden state being the high one), "none" = ()."""
    if opts.taps == "none":
        return ()
    if opts.taps == "auto":
        return tuple(sorted({min(1, num_layers - 1), num_layers // 2}))
    try:
        taps = tuple(int(i) for i in opts.taps.split(","))
    except ValueError:
        raise SpecMTPError(f"--taps must be none, auto or comma-separated layer indices, got {opts.taps!r}") from None
    if not taps_valid(taps, num_layers):
        raise SpecMTPError(f"--taps {opts.taps}: layer indices must be ascending, distinct and below {num_layers}")
    return taps


def _precision(opts: TrainOptions) -> str:
    """auto -> bf16 where the CPU has native bf16 matmuls (about 2.3x fp32's rate on AVX512-BF16), else fp32."""
    if opts.precision not in PRECISIONS:
        raise SpecMTPError(f"unknown precision {opts.precision!r} (choose from {', '.join(PRECISIONS)})")
    if opts.precision != "auto":
        return opts.precision
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def _compute(precision: str) -> contextlib.AbstractContextManager:
    """The drafter's forward and backward: bf16 matmuls under autocast (parameters and optimizer stay fp32), and
    attention as plain matmuls (faster than the fused CPU kernel for a few queries per sequence, in bf16 twice so)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    stack = contextlib.ExitStack()
    stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"))
    return stack


PARAM_BUDGET = 24_000_000  # default cap on an MTP drafter's own parameters: under 50 MB in bf16, whatever its layers


def _default_shape(target: LoadedModel, opts: TrainOptions) -> tuple[int, int, int]:
    """The target's width (so the drafter's layers can start as copies of the layer they read), and the widest MLP
    (a multiple of 256, at most the target's) that keeps the whole drafter within PARAM_BUDGET: projections, taps'
    fusion and attention first, the MLPs of all `--layers` share the rest (the copies keep the most important
    channels)."""
    tc = target.config
    hidden = opts.hidden or tc.hidden_size
    heads = opts.heads or tc.num_heads
    if opts.intermediate:
        return hidden, opts.intermediate, heads
    ht, taps = tc.hidden_size, len(tap_layers(opts, tc.num_layers))
    fixed = 3 * ht * hidden + (taps + 1) * ht * ht * (taps > 0) + opts.layers * 2 * hidden * heads * tc.head_dim
    inter = (PARAM_BUDGET - fixed) // (3 * hidden * max(opts.layers, 1)) // 256 * 256
    return hidden, min(tc.intermediate_size, max(256, inter)), heads


def new_module(target: LoadedModel, opts: TrainOptions, draft_vocab: torch.Tensor) -> MTPModule:
    """A fresh drafter; where its widths equal the target's, layers start as copies of the layer they read. With
    taps, the fusion starts as the final hidden state alone (the taps' weights at zero)."""
    tc = target.config
    hidden, inter, heads = _default_shape(target, opts)
    cfg = drafter_config(tc, opts.layers, hidden, inter, heads)
    taps = tap_layers(opts, tc.num_layers)
    module = MTPModule(cfg, tc.hidden_size, draft_vocab, taps)
    with torch.no_grad():
        if taps:
            module.fuse.weight.zero_()
            module.fuse.weight[:, len(taps) * tc.hidden_size :] = torch.eye(tc.hidden_size)
        for p in module.pre_projection.parameters():
            p.normal_(0.0, 0.02)
        if hidden == tc.hidden_size:
            module.pre_projection.weight[:, tc.hidden_size :] += torch.eye(hidden)  # start from the hidden state
            module.post_projection.weight.copy_(torch.eye(hidden))
            module.norm.copy_(target.model.norm.float())
            if heads == tc.num_heads and inter <= tc.intermediate_size:
                for layer in module.layers:
                    _copy_layer(layer, target.model.layers[layer.source])
    return module


def new_assistant(target: LoadedModel, opts: TrainOptions) -> tuple[AssistantModule, dict[str, Any]]:
    """A fresh Gemma 4 assistant for a Gemma 4 target and its config.json. Its tied head starts as the target's
    embedding table projected onto the `hidden` directions of largest variance (the target's own rows when the
    widths match), the projections map between the two spaces along the same directions, and each layer's output
    projections start at zero, so the untrained assistant passes the target's hidden state through."""
    tc = target.config
    if not (Path(target.path) / "config.json").is_file():
        raise SpecMTPError(f"training a Gemma 4 assistant needs the target as a Hugging Face directory (its "
                           f"config.json), not {target.path}")
    raw = read_config(Path(target.path))
    raw = dict(raw.get("text_config") or raw)
    hidden, inter, heads = _default_shape(target, opts)
    vocab = tc.vocab_size
    centroids = opts.centroids if opts.centroids is not None else (vocab // 128 if vocab % 128 == 0 and
                                                                   vocab >= 8192 else 0)
    top_k = min(opts.centroid_top_k, centroids) if centroids else 0
    config = assistant_config(raw, tc, opts.layers, hidden, inter, heads, centroids, top_k)
    module = AssistantModule(assistant_text_config(config), tc.hidden_size, centroids, top_k)
    module.bind(tc)
    table = dense_rows(target.model.head_weight, torch.arange(vocab))  # [V, Ht]
    with torch.no_grad():
        basis = torch.eye(tc.hidden_size) if hidden == tc.hidden_size else torch.pca_lowrank(
            table, q=hidden, center=False, niter=4)[2]  # [Ht, Ha]
        module.embed.weight.copy_(table @ basis)
        module.pre_projection.weight.normal_(0.0, 0.02)
        module.pre_projection.weight[:, tc.hidden_size :] += basis.T
        module.post_projection.weight.copy_(basis)
        for layer in module.layers:
            layer.wo.weight.zero_()
            layer.w_down.weight.zero_()
        if centroids:
            order = balanced_clusters(module.embed.weight, centroids)
            module.masked_head.token_ordering.copy_(order)
            means = module.embed.weight[order].view(centroids, -1, hidden).mean(1)
            module.masked_head.centroids.copy_(means)
    return module, config


def _copy_layer(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Query, output and MLP weights (and norms) of the target layer the drafter layer reads; a narrower MLP keeps
    the channels whose output columns weigh most."""
    own = dict(dst.named_parameters())
    theirs = {name: _dense(src, name, p) for name, p in src.named_parameters()}
    inter_src, inter_dst = src.w_down.in_features, dst.w_down.in_features
    keep = torch.arange(inter_src)
    if inter_dst < inter_src:
        keep = torch.sort(torch.topk(theirs["w_down.weight"].norm(dim=0), inter_dst).indices).values
    for name, p in theirs.items():
        if name not in own or p.numel() == 0:
            continue
        q = own[name]
        if name.startswith("wqkv."):
            q.copy_(p[: q.shape[0]])
        elif name == "w_gate_up.weight":
            q.copy_(torch.cat([p[:inter_src][keep], p[inter_src:][keep]]))
        elif name == "w_down.weight":
            q.copy_(p[:, keep])
        elif q.shape == p.shape:
            q.copy_(p)


def dense_rows(weight, rows: torch.Tensor) -> torch.Tensor:
    """fp32 rows of a dense or quantized weight matrix."""
    if isinstance(weight, torch.Tensor):
        return weight.detach()[rows].float()
    from specmtp.quant import dequantize, select_rows

    return dequantize(select_rows(weight, rows))


def _dense(module: torch.nn.Module, name: str, p: torch.Tensor) -> torch.Tensor:
    """A parameter as fp32, dequantizing a quantized layer's weight."""
    owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
    if name.endswith(".weight") and getattr(owner, "qweight", None) is not None:
        from specmtp.quant import dequantize

        return dequantize(owner.qweight)
    return p.detach().float()


# ---- data ------------------------------------------------------------------------------------------------------
def build_data(target: LoadedModel, opts: TrainOptions, sources: list[int], progress: bool, shards: Path,
               prompts: list[str] | None = None, taps: tuple[int, ...] = ()) -> list[Sample]:
    """The target's answers to the prompt set, recorded as it decodes (continuous batching over `gen_batch` rows),
    in chunks of `gen_batch` prompts of similar length, greedy or sampled (`greedy_share` of the chunks greedy, spread
    evenly: 0.5 alternates). Each chunk is saved as a shard under `shards` once all its answers are done, so an
    interrupted run resumes with the next chunk."""
    shards.mkdir(parents=True, exist_ok=True)
    prompts = prompts or _prompt_set(target, opts, progress, shards)
    chat = target.tokenizer.has_chat_template
    ids = [target.tokenizer.encode_chat(p) if chat else target.tokenizer.encode(p) for p in prompts]
    ids = sorted((p for p in ids if len(p) < opts.max_len - 8), key=len)
    chunks = [ids[i : i + opts.gen_batch] for i in range(0, len(ids), opts.gen_batch)]
    parts: dict[int, list[Sample]] = {}
    for i in range(len(chunks)):
        if (shards / f"{i:04d}.pt").is_file():
            parts[i] = _load(shards / f"{i:04d}.pt", "training data shard")
    todo = [i for i in range(len(chunks)) if i not in parts]
    bar = tqdm(total=len(ids), initial=sum(len(chunks[i]) for i in parts), desc="answering", unit="prompt",
               disable=not progress)
    clock = [time.perf_counter()]

    def done(k: int, samples: list[Sample]) -> None:
        i = todo[k]
        _save(samples, shards / f"{i:04d}.pt")
        now = time.perf_counter()
        _add_seconds(shards, now - clock[0])
        clock[0] = now
        parts[i] = samples
        bar.update(len(samples))
        bar.set_postfix(tokens=sum(len(s.tokens) - s.prompt_len for p in parts.values() for s in p))

    if todo:
        distill_stream(target, [(chunks[i], greedy_chunk(i, opts.greedy_share), opts.seed + i) for i in todo],
                       opts.answer_tokens, opts.max_len, sources, opts.topk, opts.gen_batch, done, taps)
    bar.close()
    return [s for i in range(len(chunks)) for s in parts[i]]


def greedy_chunk(i: int, share: float) -> bool:
    """Whether answer chunk i is decoded greedily: a `share` of the chunks, evenly spaced (0.5: the even ones)."""
    return (i * share) % 1.0 < share


def _prompt_set(target: LoadedModel, opts: TrainOptions, progress: bool, shards: Path) -> list[str]:
    """The offline prompt set; from set 4 on, a quarter of it the target's own requests (half the chat share, so
    code keeps its half), asked once and kept under `shards` (requests.json) so a resumed run answers the same."""
    if opts.prompt_set < 4:
        return build_prompts(opts.prompts, opts.seed, exclude=opts.exclude, prompt_set=opts.prompt_set)
    path = shards / "requests.json"
    if path.is_file():
        own = json.loads(path.read_text())
    else:
        t0 = time.perf_counter()
        own = own_requests(target, opts.prompts // OWN_SHARE, opts.seed, opts.exclude, progress=progress)
        path.write_text(json.dumps(own))
        _add_seconds(shards, time.perf_counter() - t0)
    rest = opts.prompts - len(own)
    templated = build_prompts(rest, opts.seed, code_share=min(1.0, opts.prompts / 2 / max(1, rest)),
                              exclude=opts.exclude, prompt_set=opts.prompt_set)
    seen = set(templated)
    return templated + [p for p in own if p not in seen]


def stored_samples(out: Path) -> list[Sample]:
    """The answered-prompt samples a run under `out` recorded (its shards, in order; raw text excluded)."""
    return [s for path in sorted((out / "shards").glob("[0-9]*.pt")) for s in _load(path, "training data shard")]


def _add_seconds(shards: Path, seconds: float) -> float:
    """Wall time spent building data, summed over runs (interrupted ones included)."""
    path = shards / "seconds.json"
    total = (json.loads(path.read_text())["seconds"] if path.is_file() else 0.0) + seconds
    path.write_text(json.dumps({"seconds": total}))
    return total


RAW_CHUNK = 48  # windows of raw text captured and saved together
FULL_HEAD_SEQUENCES = 8  # held-out sequences the full-vocabulary head is compared on


def build_raw(target: LoadedModel, opts: TrainOptions, sources: list[int], progress: bool,
              shards: Path, taps: tuple[int, ...] = ()) -> list[Sample]:
    """Standard-library source and documentation read by the target: cheap (prefill speed) teacher-forced data.
    Saved in chunks (`raw-<first window>.pt`) as they are captured, so an interrupted run loses at most one, and a
    resumed run with a larger --raw-tokens reads what it has and captures only the windows that follow (the
    windows for a smaller count are the first ones of a larger count's)."""
    if opts.raw_tokens <= 0:
        return []
    seqs = [(ids, plen, False) for ids, plen in raw_answers(target, opts.raw_tokens, opts.max_len, opts.seed)]
    have: list[Sample] = []
    for path in sorted(shards.glob("raw-*.pt")):
        if path.stem != f"raw-{len(have):06d}":
            raise SpecMTPError(f"{shards} holds raw-text chunks that do not follow each other ({path.name} after "
                               f"{len(have)} windows); use another --out")
        have += _load(path, "training data shard")
    if any(s.tokens.tolist() != ids for s, (ids, _, _) in zip(have, seqs, strict=False)):
        raise SpecMTPError(f"{shards} holds raw text that is not this target's reading of the standard library "
                           "here; use another --out")
    todo = seqs[len(have) :]
    bar = tqdm(total=len(seqs), initial=min(len(have), len(seqs)), desc="reading", unit="window",
               disable=not progress or not todo)
    for i in range(0, len(todo), RAW_CHUNK):
        t0 = time.perf_counter()
        part = capture(target, todo[i : i + RAW_CHUNK], sources, opts.topk, batch=8, progress=False, taps=taps)
        _save(part, shards / f"raw-{len(have):06d}.pt")
        _add_seconds(shards, time.perf_counter() - t0)
        have += part
        bar.update(len(part))
    bar.close()
    return have[: len(seqs)]


def choose_vocab(samples: list[Sample], vocab_size: int, size: int, eos: tuple[int, ...]) -> torch.Tensor:
    """The `size` tokens the target most often predicts (argmax) or emits in the data: the draft vocabulary."""
    if size <= 0 or size >= vocab_size:
        return torch.arange(vocab_size)
    counts = torch.zeros(vocab_size)
    for s in samples:
        counts.index_add_(0, s.top_ids[:, 0], torch.ones(len(s.tokens)))
        counts.index_add_(0, s.tokens, torch.full((len(s.tokens),), 0.5))
    counts[list(eos)] += 1e9  # always draftable
    return torch.sort(torch.topk(counts, size).indices).values


# ---- one batch ---------------------------------------------------------------------------------------------------
def _batch(samples: list[Sample], anchors: int, unroll: int, gen: torch.Generator | None):
    """Pad a batch; pick anchor positions (evaluation: answers only). Returns tensors for `unrolled_loss`."""
    bsz, width = len(samples), max(len(s.tokens) for s in samples)
    tokens = torch.zeros(bsz, width, dtype=torch.long)
    hidden = torch.zeros(bsz, width, samples[0].hidden.shape[-1])
    taps = None if samples[0].taps is None else torch.zeros(bsz, width, *samples[0].taps.shape[1:])  # [B, W, n, Ht]
    k = {src: torch.zeros(bsz, *t.shape[:-2], width, t.shape[-1]) for src, t in samples[0].keys.items()}
    v = {src: torch.zeros_like(t) for src, t in k.items()}
    topk = samples[0].top_ids.shape[-1]
    top_ids = torch.zeros(bsz, width, topk, dtype=torch.long)
    top_p = torch.zeros(bsz, width, topk)
    lengths = torch.tensor([len(s.tokens) for s in samples])
    rows = []
    for b, s in enumerate(samples):
        t = len(s.tokens)
        tokens[b, :t], hidden[b, :t] = s.tokens, s.hidden.float()
        if taps is not None:
            taps[b, :t] = s.taps.float()
        for src in k:
            k[src][b, :, :t], v[src][b, :, :t] = s.keys[src].float(), s.values[src].float()
        top_ids[b, :t], top_p[b, :t] = s.top_ids, s.top_p
        weight = torch.ones(t)
        weight[0] = 0.0  # anchor 0 has no visible KV
        weight[: s.prompt_len] *= 0.25 if gen is not None else 0.0  # drafting meets answers; prompts add variety
        if anchors and gen is not None:
            pick = torch.multinomial(weight, min(anchors, int((weight > 0).sum())), generator=gen)
        else:
            pick = torch.nonzero(weight > 0)[:, 0]
        rows.append(pick)
    n = max(len(r) for r in rows)
    anchor = torch.ones(bsz, n, dtype=torch.long)
    valid = torch.zeros(bsz, n, dtype=torch.bool)
    for b, r in enumerate(rows):
        anchor[b, : len(r)], valid[b, : len(r)] = r, True
    return tokens, hidden, taps, StoredKV(k, v), top_ids, top_p, lengths, anchor, valid


def unrolled(module: MTPModule | AssistantModule, target: LoadedModel, head: torch.Tensor | None,
             to_draft: torch.Tensor, batch, steps: int, feature_weight: float = 0.0, noise: float = 0.0,
             gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `steps` draft steps from every anchor exactly as drafting does (training: `noise` on the first state).
    Returns (loss, match [B, A, steps]: drafter argmax == target argmax, False where no label)."""
    tokens, hidden, taps, kv, top_ids, top_p, lengths, anchor, valid = batch
    bidx = torch.arange(tokens.shape[0])[:, None]
    end = int(anchor[valid].max()) if valid.any() else 1
    state = hidden[bidx, anchor - 1]  # [B, A, Ht] the hidden state that predicted tok_L
    if noise > 0:
        rms = state.pow(2).mean(-1, keepdim=True).sqrt()  # [B, A, 1]
        state = state + noise * rms * (2 * torch.rand(state.shape, generator=gen) - 1)
    if getattr(module, "taps", ()):
        state = module.fused(state, taps[bidx, anchor - 1])  # with the tapped layers' outputs at L - 1
    losses, matches = [], []
    for k in range(steps):
        pos = anchor + k  # position whose next token this step predicts; the query position stays at L
        ok = valid & (pos < lengths[:, None])
        pos = pos.clamp(max=tokens.shape[1] - 1)
        with torch.no_grad():
            embeds = target.model.embed_tokens(tokens[bidx, pos]).float()  # [B, A, Ht]
        state, logits, aux = module.draft(embeds, state, anchor, kv, end, head)  # [B, A, Ht], [B, A, K]
        logq = logits.log_softmax(-1)  # [B, A, K]
        ids, p = top_ids[bidx, pos], top_p[bidx, pos]  # [B, A, k]
        col = to_draft[ids]  # [B, A, k] draft-vocabulary column, -1 when not draftable
        ce = -(p * logq.gather(-1, col.clamp(min=0)) * (col >= 0)).sum(-1)  # [B, A]
        if aux is not None:  # the assistant's centroid scores learn the target's mass per token cluster
            ce = ce + module.aux_loss(aux, ids, p)
        # the target's own hidden state at that position produced its distribution over the whole vocabulary
        feat = torch.nn.functional.smooth_l1_loss(state, hidden[bidx, pos], reduction="none").mean(-1)  # [B, A]
        losses.append(((ce + feature_weight * feat) * ok).sum() / ok.sum().clamp(min=1))
        matches.append(ok & (module.pick(logq, aux) == col[..., 0]))
    return torch.stack(losses).mean(), torch.stack(matches, -1)


def acceptance(match: torch.Tensor, valid: torch.Tensor) -> list[float]:
    """match [B, A, K], valid [B, A] -> P(first k drafts all accepted), k = 1..K (greedy, chained)."""
    chained = match.long().cumprod(-1)[valid]  # [N, K]
    return chained.float().mean(0).tolist() if len(chained) else [0.0] * match.shape[-1]


# ---- the loop ----------------------------------------------------------------------------------------------------
def train_drafter(target: LoadedModel, out: Path, opts: TrainOptions, resume: bool = False, progress: bool = True,
                  target_name: str | None = None, prompts: list[str] | None = None) -> dict[str, Any]:
    """Build (or reuse, with resume) the data, train, save the drafter and its card; return the card's facts.
    `prompts` replaces the built-in prompt set (tests use a tiny corpus)."""
    opts = dataclasses.replace(opts, precision=_precision(opts))  # auto resolved: a resumed run computes alike
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)
    tc = target.config
    hidden, inter, heads = _default_shape(target, opts)
    assistant = tc.family == "gemma4"  # a Gemma 4 target gets a Gemma4Assistant, in the released format
    taps = tap_layers(opts, tc.num_layers)
    if not 0.0 <= opts.greedy_share <= 1.0:
        raise SpecMTPError(f"--greedy-share must be between 0 and 1, got {opts.greedy_share}")
    if opts.prompt_set not in PROMPT_SETS:
        raise SpecMTPError(f"unknown --prompt-set {opts.prompt_set} (choose from {', '.join(map(str, PROMPT_SETS))})")
    if assistant:
        if taps:
            raise SpecMTPError("a Gemma 4 target gets a Gemma4Assistant, whose input is fixed: --taps must be none")
        module, assistant_raw = new_assistant(target, opts)  # validates before any expensive work
        sources = sorted({layer.source for layer in module.layers})
    else:
        cfg = drafter_config(tc, opts.layers, hidden, inter, heads)
        sources = sorted(set(cfg.kv_source))

    shards, ckpt_path = out / "shards", out / "checkpoint.pt"
    key = {"version": DATA_VERSION, "prompts": opts.prompts, "answer_tokens": opts.answer_tokens,
           "max_len": opts.max_len, "topk": opts.topk, "seed": opts.seed, "sources": sources,
           "raw_tokens": opts.raw_tokens, "gen_batch": opts.gen_batch,
           "target": target_name or str(target.path), "custom_prompts": prompts}
    if taps:  # (keys of runs without taps or with the first prompt set predate these entries)
        key["taps"] = list(taps)
    if opts.prompt_set != 1:
        key["prompt_set"] = opts.prompt_set
    if opts.greedy_share != 0.5:  # (keys of runs with half greedy answers predate this entry)
        key["greedy_share"] = opts.greedy_share
    head_q = getattr(target.model, "head_q", None)
    if head_q is not None:  # data read through quantized weights is not the dense target's (dense keys predate this)
        key["weights"] = f"q{head_q.fmt}"
    elif target.model.norm.dtype != torch.float32:  # nor is data read through bf16 weights (fp32 keys predate this)
        key["dtype"] = str(target.model.norm.dtype).removeprefix("torch.")
    key_path = shards / "key.json"
    if shards.is_dir() and any(shards.iterdir()):
        if not resume:
            raise SpecMTPError(f"{out} already holds training data; pass --resume to continue it or choose another "
                               "--out")
        saved_key = json.loads(key_path.read_text()) if key_path.is_file() else {}
        now_key = json.loads(json.dumps(key))
        growing = ("raw_tokens",)  # more raw text can be read on resume; the rest must match
        diff = sorted(k for k in {**saved_key, **now_key} if saved_key.get(k) != now_key.get(k) and k not in growing)
        if diff:
            raise SpecMTPError(f"{shards} was built with other settings ({', '.join(diff)}); use another --out or "
                               "the same options")
        if opts.raw_tokens < saved_key.get("raw_tokens", 0):
            raise SpecMTPError(f"{shards} already holds {saved_key['raw_tokens']} tokens of raw text; --raw-tokens "
                               "can grow on resume, not shrink")
        if (shards / "raw.pt").is_file():  # the single file of runs before raw text was chunked: its first chunk
            (shards / "raw.pt").rename(shards / "raw-000000.pt")
    shards.mkdir(parents=True, exist_ok=True)
    key_path.write_text(json.dumps(key))
    samples = build_data(target, opts, sources, progress, shards, prompts, taps)
    raw = build_raw(target, opts, sources, progress, shards, taps) if prompts is None else []
    data_s = _add_seconds(shards, 0.0)
    if len(samples) < 4:
        raise SpecMTPError(f"only {len(samples)} training sequences; raise --prompts")
    torch.set_num_threads(os.cpu_count() or 1)  # a quantized target leaves torch one thread; training wants all
    ck = _load(ckpt_path, "checkpoint") if resume and ckpt_path.is_file() else None
    # held out: the target's own greedy answers (what greedy drafting meets), spread evenly over the prompt set
    # (answers are stored in length order, so its last ones would all be long code prompts); a resumed run keeps
    # the ones it started with
    n_held = max(2, int(len(samples) * opts.heldout))
    greedy = [i for i, s in enumerate(samples) if s.greedy] or list(range(len(samples)))
    if ck is None:
        held_idx = {greedy[(2 * k + 1) * len(greedy) // (2 * n_held)] for k in range(min(n_held, len(greedy)))}
    else:  # checkpoints from before they were recorded held out the last ones
        held_idx = set(ck.get("held", greedy[-n_held:]))
    held = [s for i, s in enumerate(samples) if i in held_idx]
    train_set = [s for i, s in enumerate(samples) if i not in held_idx] + raw

    grown: list[dict[str, int]] = []  # resumed with more raw text: at which step, to how many tokens
    if ck is not None:
        free = ("steps", "eval_every", "raw_tokens")  # a resumed run may train longer, on more read text
        older = {"precision": "fp32", "taps": "none", "prompt_set": 1, "weight_decay": 0.0,
                 "noise": 0.0, "greedy_share": 0.5}  # checkpoints from before these options
        saved, now = ({k: v for k, v in o.items() if k not in free} for o in ({**older, **ck.get("options", {})},
                                                                               dataclasses.asdict(opts)))
        if saved != now:
            diff = sorted(k for k in now if saved.get(k) != now[k])
            raise SpecMTPError(f"{ckpt_path} was written with other options ({', '.join(diff)}); resume with the "
                               "same ones")
        grown = list(ck.get("grown", []))
        if opts.raw_tokens != ck["options"].get("raw_tokens", opts.raw_tokens):
            grown.append({"step": ck["step"], "raw_tokens": opts.raw_tokens})

    if assistant:  # its own head over the whole vocabulary (reduced at drafting time by the centroid mask)
        vocab = torch.arange(tc.vocab_size)
        head = None
    else:  # a resumed run keeps its vocabulary (data grown since would rank the tokens differently)
        vocab = ck["module"]["draft_vocab"] if ck is not None else choose_vocab(
            train_set, tc.vocab_size, opts.draft_vocab, target.tokenizer.eos_token_ids)
        head = dense_rows(target.model.head_weight, vocab)  # [K, Ht] frozen: the target's own rows
        module = new_module(target, opts, vocab)
    to_draft = torch.full((tc.vocab_size,), -1, dtype=torch.long)
    to_draft[vocab] = torch.arange(len(vocab))
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.95), weight_decay=opts.weight_decay)
    gen = torch.Generator().manual_seed(opts.seed)
    step, history, train_s = 0, [], 0.0
    if ck is not None:
        module.load_state_dict(ck["module"])
        optim.load_state_dict(ck["optim"])
        gen.set_state(ck["generator"])
        step, history, train_s = ck["step"], ck["history"], ck["train_s"]

    held_batch = _batch(held, 0, opts.unroll, None)
    eval_steps = max(opts.unroll, 6)
    bar = tqdm(total=opts.steps, initial=step, desc="training", unit="step", disable=not progress)
    t_seg = time.perf_counter()
    while step < opts.steps:
        idx = torch.randint(len(train_set), (opts.batch,), generator=gen).tolist()
        batch = _batch([train_set[i] for i in idx], opts.anchors, opts.unroll, gen)
        lr = opts.lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / opts.steps)))
        for g in optim.param_groups:
            g["lr"] = lr
        with _compute(opts.precision):
            loss, match = unrolled(module, target, head, to_draft, batch, opts.unroll, opts.feature_weight,
                                   opts.noise, gen)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        loss = loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        step += 1
        bar.update(1)
        if step % opts.eval_every == 0 or step == opts.steps:
            acc = _evaluate(module, target, head, to_draft, held_batch, eval_steps, opts.precision)
            train_s += time.perf_counter() - t_seg
            t_seg = time.perf_counter()
            history.append({"step": step, "loss": round(float(loss), 4), "heldout_accept": [round(a, 3) for a in acc],
                            "heldout_tau": round(1 + sum(acc), 3)})
            bar.set_postfix(loss=f"{float(loss):.3f}", tau=f"{1 + sum(acc):.2f}", acc1=f"{acc[0]:.2f}")
            _save({"module": module.state_dict(), "optim": optim.state_dict(), "generator": gen.get_state(),
                   "step": step, "history": history, "train_s": train_s, "options": dataclasses.asdict(opts),
                   "grown": grown, "held": sorted(held_idx)},
                  ckpt_path)
        elif step % 5 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()

    acc = _evaluate(module, target, head, to_draft, held_batch, eval_steps, opts.precision)
    # the reduced head's cost in acceptance: both heads on the same few held-out sequences (a full head is slow)
    subset = _batch(held[:FULL_HEAD_SEQUENCES], 0, opts.unroll, None)
    part = acc if assistant else _evaluate(module, target, head, to_draft, subset, eval_steps, opts.precision)
    full = acc if assistant else _evaluate(
        module, target, dense_rows(target.model.head_weight, torch.arange(tc.vocab_size)),
        torch.arange(tc.vocab_size), subset, eval_steps, opts.precision)
    covered = torch.cat([s.top_ids[s.prompt_len :, 0] for s in held])
    coverage = float((to_draft[covered] >= 0).float().mean())
    expected = [1.0] + acc
    num_draft = max(range(1, eval_steps + 1), key=lambda n: sum(expected[: n + 1]) / (1 + 0.1 * n))
    meta = {
        "target_name": target_name or str(target.path), "options": dataclasses.asdict(opts),
        "train_sequences": len(train_set), "heldout_sequences": len(held),
        "train_tokens": sum(len(s.tokens) for s in train_set), "steps": step,
        "raw_sequences": len(raw), "raw_tokens": sum(len(s.tokens) for s in raw), "raw_grown": grown,
        "data_weights": key.get("weights", key.get("dtype", "fp32")),
        "own_requests": len(json.loads((shards / "requests.json").read_text())) if (shards / "requests.json").is_file()
        else 0,
        "data_seconds": round(data_s, 1), "train_seconds": round(train_s, 1),
        "wall_seconds": round(data_s + train_s, 1),
        "heldout_accept": [round(a, 4) for a in acc], "heldout_tau": round(1 + sum(acc), 3),
        "heldout_tau_full_head": round(1 + sum(full), 3), "heldout_tau_subset": round(1 + sum(part), 3),
        "full_head_sequences": min(len(held), FULL_HEAD_SEQUENCES), "draft_vocab_coverage": round(coverage, 4),
        "history": history,
    }
    module.eval()
    if assistant:
        save_assistant(module, assistant_raw, out, num_draft)
    else:
        save_drafter(module, out, target, meta, num_draft)
    (out / "README.md").write_text(_card(meta, module))
    return meta


@torch.no_grad()
def _evaluate(module, target, head, to_draft, batch, steps: int, precision: str) -> list[float]:
    with _compute(precision):
        _, match = unrolled(module, target, head, to_draft, batch, steps)
    return acceptance(match, batch[-1])


def _save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint under the real name


def _load(path: Path, what: str) -> Any:
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise SpecMTPError(f"corrupt or truncated {what} {path}: {e}; delete it to start over") from None


def _decoding(share: float) -> str:
    """The card's words for --greedy-share."""
    named = {0.5: "half greedy, half sampled", 1.0: "all greedy", 0.0: "all sampled"}
    return named.get(share, f"{share:.0%} greedy, the rest sampled")


def _card(meta: dict[str, Any], module: MTPModule | AssistantModule) -> str:
    cfg, opts = module.cfg, meta["options"]
    params = sum(p.numel() for p in module.parameters())
    acc = ", ".join(f"{a:.2f}" for a in meta["heldout_accept"])
    sources = [layer.source for layer in module.layers]
    if isinstance(module, AssistantModule):
        kind, head = "Gemma 4 assistant", module.masked_head
        what = (f"its own tied head, masked to the {head.top_k} best of {head.num_centroids} token clusters a "
                "draft" if head is not None else "its own tied head over the whole vocabulary")
        head_line = (f"- Head: {what}\n- Format: transformers' Gemma4AssistantForCausalLM (config.json, "
                     "model.safetensors)")
    else:
        kind = "MTP drafter"
        head_line = (f"- Head: the target's own output rows for a draft vocabulary of {module.draft_vocab.numel()} "
                     f"tokens\n  (covers {meta['draft_vocab_coverage']:.1%} of the target's held-out argmax tokens)")
    raw_n, raw_tokens = meta.get("raw_sequences", 0), meta.get("raw_tokens", 0)
    answered, answered_tokens = meta["train_sequences"] - raw_n, meta["train_tokens"] - raw_tokens
    raw_line = (f";\n  plus {raw_n} windows ({raw_tokens} tokens) of standard-library source and documentation "
                "read by the\n  target (teacher-forced)" if raw_n else "")
    raw_line += "".join(f"; read text grown to --raw-tokens {g['raw_tokens']} on resuming at step {g['step']}"
                        for g in meta.get("raw_grown", []))
    own = meta.get("own_requests", 0)
    own_line = f",\n  and {own} requests the target wrote itself" if own else ""
    taps = getattr(module, "taps", ())
    if "heldout_tau_subset" in meta:
        full_line = (f"(on the first {meta['full_head_sequences']} held-out sequences: full-vocabulary head "
                     f"{meta['heldout_tau_full_head']:.2f},\n  this head {meta['heldout_tau_subset']:.2f})")
    else:  # runs before the subset's own figure
        full_line = f"(full-vocabulary head: {meta['heldout_tau_full_head']:.2f}, on a subset)"
    taps_line = (f"; its first step also reads the outputs of the target's\n  layers {list(taps)} (fused with the last "
                 "hidden state)" if taps else "")
    regular = "".join(f", {name} {opts[key]}" for key, name in (("weight_decay", "weight decay"),
                                                                ("noise", "feature noise")) if opts.get(key))
    decoding = _decoding(opts.get("greedy_share", 0.5))
    return f"""# specmtp {kind} for `{meta['target_name']}`

Trained with `specmtp train-drafter` (self-distillation on the CPU).

- Target: `{meta['target_name']}`
- Drafter: {cfg.num_layers} layer(s) of the target's family, hidden {cfg.hidden_size}, MLP {cfg.intermediate_size},
  {cfg.num_heads} query heads reading the target's layers {sources}{taps_line}; {params / 1e6:.1f} M parameters (bf16)
{head_line}
- Data: {answered} self-distilled sequences ({answered_tokens} tokens) from {opts['prompts']} offline prompts
  (prompt set {opts.get('prompt_set', 1)}: Python standard library code + instruction templates{own_line}), answers
  of up to {opts['answer_tokens']} tokens, {decoding}; none of the benchmark prompts{raw_line};
  the target's weights while answering and reading: {meta.get('data_weights', 'fp32')}
- Training: {meta['steps']} steps, batch {opts['batch']} x {opts['anchors']} anchors, unrolled over {opts['unroll']}
  draft steps, lr {opts['lr']}, seed {opts['seed']}, {opts['precision']} matmuls{regular}
- Wall time on this 2-core CPU: data {meta['data_seconds']:.0f} s + training {meta['train_seconds']:.0f} s
  = {meta['wall_seconds'] / 60:.1f} min
- Held-out greedy acceptance (P(first k drafts accepted), k = 1..): {acc}
- Held-out tau estimate (tokens per verify pass with enough drafts): {meta['heldout_tau']:.2f}
  {full_line}
"""
