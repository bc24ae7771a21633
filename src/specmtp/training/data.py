"""Self-distillation data: the target answers prompts, then one forward over each answered sequence records
what the drafter sees at inference (the target's final hidden states and the K/V of the layers it reads) and
what it must predict (the target's next-token distribution, as its top-k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from specmtp.engine import Engine
from specmtp.loader import LoadedModel
from specmtp.sampling import SamplingParams


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


def answer(target: LoadedModel, prompts: list[str], max_new_tokens: int, batch: int, seed: int,
           progress: bool = True) -> list[tuple[list[int], int, bool]]:
    """The target's own answers, chat-formatted where it has a template: alternate batches greedy and sampled.
    Returns (prompt + answer tokens, prompt length, greedy) per prompt."""
    engine = Engine(target)
    chat = target.tokenizer.has_chat_template
    out = []
    bar = tqdm(total=len(prompts), desc="answering", unit="prompt", disable=not progress)
    for i in range(0, len(prompts), batch):
        ids = [engine.encode(p, chat=chat) for p in prompts[i : i + batch]]
        greedy = (i // batch) % 2 == 0
        sampling = SamplingParams() if greedy else SamplingParams(temperature=0.8, top_p=0.95, seed=seed + i)
        for prompt, c in zip(ids, engine.generate(ids, max_new_tokens=max_new_tokens, sampling=sampling), strict=True):
            out.append((prompt + c.tokens, len(prompt), greedy))
        bar.update(len(ids))
    bar.close()
    return out


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
