"""Self-distillation data: the target answers prompts, and the same forward passes that produce its answers
record what the drafter sees at inference (the target's final hidden states and the K/V of the layers it reads)
and what it must predict (the target's next-token distribution, as its top-k). Raw text (teacher-forced) goes
through `capture`, one forward per batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from specmtp.loader import LoadedModel
from specmtp.sampling import SamplingParams, probabilities, sample

SAMPLE_FROM = 64  # sampled answers draw from the target's 64 most likely next tokens (then top-p)


@dataclass
class Sample:
    tokens: torch.Tensor  # [T] prompt + answer
    prompt_len: int
    hidden: torch.Tensor  # [T, Ht] bf16: target final hidden state at each position (predicts token t+1)
    keys: dict[int, torch.Tensor]  # target layer -> [Hkv, T, D] bf16 (RoPE applied, as cached)
    values: dict[int, torch.Tensor]  # target layer -> [Hkv, T, D] bf16
    top_ids: torch.Tensor  # [T, k] int64: the target's k most likely next tokens at each position
    top_p: torch.Tensor  # [T, k] float32: their probabilities
    greedy: bool = True  # the answer was decoded greedily (held-out acceptance is measured on those)
    taps: torch.Tensor | None = None  # [T, n, Ht] bf16: the residual stream after each tapped target layer


@torch.inference_mode()
def capture(target: LoadedModel, sequences: list[tuple[list[int], int, bool]], sources: list[int], topk: int,
            batch: int = 4, progress: bool = True, taps: tuple[int, ...] = ()) -> list[Sample]:
    """One target forward per batch of sequences; keep what training needs, in compact dtypes."""
    model = target.model
    samples = []
    bar = tqdm(total=len(sequences), desc="capturing", unit="seq", disable=not progress)
    for i in range(0, len(sequences), batch):
        chunk = sequences[i : i + batch]
        width = max(len(s) for s, _, _ in chunk)
        tokens = torch.zeros(len(chunk), width, dtype=torch.long)
        for b, (s, _, _) in enumerate(chunk):
            tokens[b, : len(s)] = torch.tensor(s)
        cache = model.new_cache(len(chunk), width)
        hidden, tapped = model.features(tokens, torch.arange(width).expand(len(chunk), width), cache, taps)
        for b, (s, plen, greedy) in enumerate(chunk):
            t = len(s)
            logp = model.logits(hidden[b, :t]).float().log_softmax(-1)  # [T, V]
            top = torch.topk(logp, topk, dim=-1)
            samples.append(Sample(
                tokens=tokens[b, :t].clone(), prompt_len=plen, hidden=hidden[b, :t].to(torch.bfloat16, copy=True),
                keys={src: cache.k[src][b, :, :t].to(torch.bfloat16, copy=True) for src in sources},
                values={src: cache.v[src][b, :, :t].to(torch.bfloat16, copy=True) for src in sources},
                top_ids=top.indices, top_p=top.values.exp(), greedy=greedy,
                taps=tapped[b, :t].to(torch.bfloat16, copy=True) if taps else None,
            ))
        bar.update(len(chunk))
    bar.close()
    return samples


def distill(target: LoadedModel, prompts: list[list[int]], max_new_tokens: int, max_len: int, greedy: bool,
            sources: list[int], topk: int, seed: int, taps: tuple[int, ...] = ()) -> list[Sample]:
    """One chunk of prompts (token ids) answered and recorded (see `distill_stream`), all in one batch."""
    out: list[Sample] = []
    distill_stream(target, [(prompts, greedy, seed)], max_new_tokens, max_len, sources, topk, len(prompts),
                   lambda _, samples: out.extend(samples), taps)
    return out


@torch.inference_mode()
def distill_stream(
    target: LoadedModel,
    chunks: list[tuple[list[list[int]], bool, int]],  # (prompts as token ids, greedy, seed) per chunk
    max_new_tokens: int,
    max_len: int,
    sources: list[int],
    topk: int,
    batch: int,
    done: Callable[[int, list[Sample]], None],  # called with each chunk's index and samples, in chunk order
    taps: tuple[int, ...] = (),  # target layers whose outputs are recorded too
) -> None:
    """The target answers every prompt, recorded as it decodes: each prompt is prefilled into a free row of a
    batch of `batch` rows (continuous batching: a row that finishes takes the next prompt at once), then decoded
    one token a step with the others, then its last token forwarded once more, so that every kept position has
    its hidden state, K/V and next-token distribution (the target's top-k, prompt positions included). Sampled
    chunks draw from a generator per prompt, so the answers do not depend on which prompts share a step."""
    model, eos = target.model, set(target.tokenizer.eos_token_ids)
    sampling = SamplingParams(temperature=0.8, top_p=0.95)  # nucleus over the SAMPLE_FROM most likely tokens
    cap = max_len + 1
    cache = model.new_cache(batch, cap)
    tokens = torch.zeros(batch, cap, dtype=torch.long)
    hidden = torch.zeros(batch, cap, model.cfg.hidden_size, dtype=torch.bfloat16)
    tapped = torch.zeros(batch, cap, len(taps), model.cfg.hidden_size, dtype=torch.bfloat16)
    top_ids = torch.zeros(batch, cap, topk, dtype=torch.long)
    top_p = torch.zeros(batch, cap, topk)
    last = torch.zeros(batch, model.cfg.hidden_size, dtype=model.norm.dtype)  # [B, H] hidden that predicts pos
    pos = torch.zeros(batch, dtype=torch.long)  # [B] where each row's next token goes
    todo = iter([(i, j) for i, (prompts, _, _) in enumerate(chunks) for j in range(len(prompts))])
    rows: list[dict | None] = [None] * batch
    results: list[list[Sample | None]] = [[None] * len(prompts) for prompts, _, _ in chunks]
    emitted = 0

    def fill(b: int) -> None:
        nxt = next(todo, None)
        if nxt is None:
            rows[b] = None
            return
        i, j = nxt
        prompts, greedy, seed = chunks[i]
        ids = prompts[j]
        n = len(ids)
        if n >= max_len:
            raise ValueError(f"prompt of {n} tokens does not fit max_len {max_len}")
        tokens[b, :n] = torch.tensor(ids)
        view = cache.row(b)
        h, hx = model.features(tokens[b : b + 1, :n], torch.arange(n)[None], view, taps)
        h = h[0]  # [n, H]
        hidden[b, :n] = h.to(torch.bfloat16)
        if taps:
            tapped[b, :n] = hx[0].to(torch.bfloat16)
        if n > 1:
            top = torch.topk(model.logits(h[: n - 1]).float().log_softmax(-1), topk, dim=-1)
            top_ids[b, : n - 1], top_p[b, : n - 1] = top.indices, top.values.exp()
        last[b], pos[b] = h[n - 1], n
        gen = None if greedy else torch.Generator().manual_seed(seed * 100_003 + j)
        rows[b] = {"chunk": i, "index": j, "plen": n, "budget": max(1, min(max_new_tokens, max_len - n)),
                   "greedy": greedy, "gen": gen, "end": 0}

    for b in range(batch):
        fill(b)
    while any(r is not None for r in rows):
        live = [b for b in range(batch) if rows[b] is not None]
        idx = torch.tensor(live)
        logits = model.logits(last[idx]).float()  # [L, V]
        top = torch.topk(logits.log_softmax(-1), topk, dim=-1)
        top_ids[idx, pos[idx] - 1], top_p[idx, pos[idx] - 1] = top.indices, top.values.exp()
        likely = torch.topk(logits, min(SAMPLE_FROM, logits.shape[-1]), dim=-1)  # [L, 64]: sampling sorts only these
        for k, b in enumerate(live):
            r = rows[b]
            if r["end"]:  # its last token was forwarded and labelled: complete
                t = r["end"]
                results[r["chunk"]][r["index"]] = Sample(
                    tokens=tokens[b, :t].clone(), prompt_len=r["plen"], hidden=hidden[b, :t].clone(),
                    keys={src: cache.k[src][b, :, :t].to(torch.bfloat16, copy=True) for src in sources},
                    values={src: cache.v[src][b, :, :t].to(torch.bfloat16, copy=True) for src in sources},
                    top_ids=top_ids[b, :t].clone(), top_p=top_p[b, :t].clone(), greedy=r["greedy"],
                    taps=tapped[b, :t].clone() if taps else None)
                rows[b] = None
                continue
            if r["greedy"]:
                t_next = int(logits[k].argmax())
            else:
                pick = sample(probabilities(likely.values[k : k + 1], sampling), r["gen"])[0]
                t_next = int(likely.indices[k, pick])
            tokens[b, pos[b]] = t_next
            if t_next in eos or int(pos[b]) + 1 - r["plen"] >= r["budget"]:
                r["end"] = int(pos[b]) + 1
        while emitted < len(chunks) and all(x is not None for x in results[emitted]):
            done(emitted, results[emitted])  # type: ignore[arg-type]
            results[emitted] = []
            emitted += 1
        step = [b for b in range(batch) if rows[b] is not None]
        if step:  # one forward over the whole batch; rows left idle as the stream drains run at slot 0, unread
            idx = torch.tensor(step)
            inputs, at = torch.zeros(batch, dtype=torch.long), torch.zeros(batch, dtype=torch.long)
            inputs[idx], at[idx] = tokens[idx, pos[idx]], pos[idx]
            h, hx = model.features(inputs[:, None], at[:, None], cache, taps)
            h = h[:, 0]  # [B, H]
            hidden[idx, pos[idx]] = h[idx].to(torch.bfloat16)
            if taps:
                tapped[idx, pos[idx]] = hx[idx, 0].to(torch.bfloat16)
            last[idx] = h[idx]
            pos[idx] += 1
        for b in range(batch):
            if rows[b] is None:
                fill(b)
