"""Self-distillation data: the target answers prompts, and the same forward passes that produce its answers
record what the drafter sees at inference (the target's final hidden states and the K/V of the layers it reads)
and what it must predict (the target's next-token distribution, as its top-k). Raw text (teacher-forced) goes
through `capture`, one forward per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from specmtp.loader import LoadedModel
from specmtp.sampling import SamplingParams, probabilities, sample


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


@torch.inference_mode()
def capture(target: LoadedModel, sequences: list[tuple[list[int], int, bool]], sources: list[int], topk: int,
            batch: int = 4, progress: bool = True) -> list[Sample]:
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
        hidden = model(tokens, torch.arange(width).expand(len(chunk), width), cache)  # [B, W, H]
        for b, (s, plen, greedy) in enumerate(chunk):
            t = len(s)
            logp = model.logits(hidden[b, :t]).float().log_softmax(-1)  # [T, V]
            top = torch.topk(logp, topk, dim=-1)
            samples.append(Sample(
                tokens=tokens[b, :t].clone(), prompt_len=plen, hidden=hidden[b, :t].to(torch.bfloat16),
                keys={src: cache.k[src][b, :, :t].to(torch.bfloat16) for src in sources},
                values={src: cache.v[src][b, :, :t].to(torch.bfloat16) for src in sources},
                top_ids=top.indices, top_p=top.values.exp(), greedy=greedy,
            ))
        bar.update(len(chunk))
    bar.close()
    return samples


@torch.inference_mode()
def distill(target: LoadedModel, prompts: list[list[int]], max_new_tokens: int, max_len: int, greedy: bool,
            sources: list[int], topk: int, seed: int) -> list[Sample]:
    """One batch of prompts (token ids) answered by the target, recorded as it decodes: prefill, then one token
    per step for every unfinished row, then one more forward of each row's last token so that every kept
    position has its hidden state, K/V and next-token distribution (the target's top-k, prompt positions
    included). Finished rows leave the batch once a quarter of it has finished (their K/V kept)."""
    model, eos = target.model, set(target.tokenizer.eos_token_ids)
    sampling = SamplingParams() if greedy else SamplingParams(temperature=0.8, top_p=0.95)
    gen = torch.Generator().manual_seed(seed)
    bsz = len(prompts)
    plen = torch.tensor([len(p) for p in prompts])  # [B]
    budget = [max(1, min(max_new_tokens, max_len - len(p))) for p in prompts]
    width, steps = int(plen.max()), max(budget)
    cache = model.new_cache(bsz, width + steps + 1)
    tokens = torch.zeros(bsz, width + steps + 1, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p)
    hidden = torch.zeros(bsz, width + steps + 1, model.cfg.hidden_size, dtype=torch.bfloat16)
    top_ids = torch.zeros(bsz, width + steps + 1, topk, dtype=torch.long)
    top_p = torch.zeros(bsz, width + steps + 1, topk)

    h = model(tokens[:, :width], torch.arange(width).expand(bsz, width), cache)  # [B, W, H]
    hidden[:, :width] = h.to(torch.bfloat16)
    for b in range(bsz):  # the prompt's own positions, read by the target (weighted lower as anchors)
        n = int(plen[b]) - 1
        top = torch.topk(model.logits(h[b, :n]).float().log_softmax(-1), topk, dim=-1)
        top_ids[b, :n], top_p[b, :n] = top.indices, top.values.exp()
    rows = torch.arange(bsz)  # [B'] the prompt index of each row still in the batch
    last = h[rows, plen - 1]  # [B', H]
    ends = [0] * bsz  # sequence length of each prompt once it stops (EOS or budget)
    kv: dict[int, tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]] = {}
    pos = plen.clone()  # [B'] where each row's next token goes

    def keep_kv(i: int, b: int) -> None:  # row i of the batch is prompt b, complete
        t = ends[b] or int(pos[i])
        kv[b] = ({src: cache.k[src][i, :, :t].to(torch.bfloat16) for src in sources},
                 {src: cache.v[src][i, :, :t].to(torch.bfloat16) for src in sources})

    for step in range(steps + 1):
        logits = model.logits(last).float()  # [B', V]
        top = torch.topk(logits.log_softmax(-1), topk, dim=-1)
        top_ids[rows, pos - 1], top_p[rows, pos - 1] = top.indices, top.values.exp()
        done = torch.tensor([ends[b] > 0 for b in rows.tolist()])  # [B'] complete: last token forwarded, labelled
        if step == steps or bool(done.all()):
            break
        if int(done.sum()) * 4 >= len(rows):  # drop finished rows from the batch
            for i in torch.nonzero(done)[:, 0].tolist():
                keep_kv(i, int(rows[i]))
            live = torch.nonzero(~done)[:, 0]
            cache, rows, pos, logits = cache.select(live), rows[live], pos[live], logits[live]
        nxt = logits.argmax(-1) if greedy else sample(probabilities(logits, sampling), gen)  # [B']
        tokens[rows, pos] = nxt
        for i, b in enumerate(rows.tolist()):
            if not ends[b] and (int(nxt[i]) in eos or step + 1 >= budget[b]):
                ends[b] = int(pos[i]) + 1
        h = model(nxt[:, None], pos[:, None], cache)[:, 0]  # [B', H]
        hidden[rows, pos] = h.to(torch.bfloat16)
        last = h
        pos = pos + 1
    for i, b in enumerate(rows.tolist()):
        keep_kv(i, b)
    samples = []
    for b in range(bsz):
        t, p = ends[b] or int(plen[b]), int(plen[b])
        samples.append(Sample(
            tokens=tokens[b, :t].clone(), prompt_len=p, hidden=hidden[b, :t].clone(), keys=kv[b][0],
            values=kv[b][1], top_ids=top_ids[b, :t].clone(), top_p=top_p[b, :t].clone(), greedy=greedy,
        ))
    return samples
