"""The engine: prefill, then draft -> one target forward over all drafts -> verify -> advance, per step.

Target-only decoding is the same loop with no drafter (zero drafts per step), so there is one decode
path to test. Each step the target sees, per row, the row's last emitted token (not yet in its cache)
followed by the drafts, at explicit positions; the verifier returns the accepted drafts plus one
recovered/bonus token; the target cache length advances by accepted + 1 (the tokens now cached), and
the rejected drafts' K/V slots are simply overwritten by the next step (see cache.py). EOS, stop strings
and max_new_tokens cut an accepted block at the right token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from specmtp.drafters.base import DraftContext, Drafter
from specmtp.errors import SpecMTPError
from specmtp.loader import LoadedModel
from specmtp.sampling import SamplingParams, probabilities, sample
from specmtp.schedule import GreedyPicks, Schedule, make_schedule
from specmtp.tree import depths, input_parents, is_chain, last_input
from specmtp.verify import greedy_walk, verify_greedy, verify_sampled, verify_tree

MAX_DRAFT = 32


@dataclass
class Stats:
    """Counters of one generate call. tau counts the bonus/recovered token: tokens emitted per row-forward."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    target_forwards: int = 0  # verify passes (prefill not counted)
    row_steps: int = 0  # sum over verify passes of rows still generating
    drafted: int = 0
    accepted: int = 0
    drafted_at: list[int] = field(default_factory=list)  # per draft position (a tree's depth)
    accepted_at: list[int] = field(default_factory=list)
    draft_lengths: list[int] = field(default_factory=list)  # N chosen per step
    finish_reasons: list[str] = field(default_factory=list)  # per row, once decoded: eos | stop | length
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0

    @property
    def tau(self) -> float:
        return (self.accepted + self.row_steps) / self.row_steps if self.row_steps else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at, strict=True)]

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s else 0.0

    def record(self, n: int, num_drafts: torch.Tensor, num_accepted: torch.Tensor, active: list[bool],
               nodes: torch.Tensor | None = None) -> None:
        """num_drafts: [B] drafts deep per row (a tree's depth); nodes: [B] drafts verified (a tree's size)."""
        while len(self.drafted_at) < n:
            self.drafted_at.append(0)
            self.accepted_at.append(0)
        nodes = num_drafts if nodes is None else nodes
        for nd, nn, na, live in zip(num_drafts.tolist(), nodes.tolist(), num_accepted.tolist(), active, strict=True):
            if not live:
                continue
            self.row_steps += 1
            self.drafted += nn
            self.accepted += na
            for i in range(nd):
                self.drafted_at[i] += 1
                self.accepted_at[i] += i < na

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
            "target_forwards": self.target_forwards, "drafted": self.drafted, "accepted": self.accepted,
            "tau": round(self.tau, 4), "acceptance_by_position": [round(a, 4) for a in self.acceptance_by_position],
            "prefill_s": round(self.prefill_s, 4), "draft_s": round(self.draft_s, 4),
            "verify_s": round(self.verify_s, 4), "total_s": round(self.total_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
        }


def held_back(text: str, stop: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could be the start of a stop string (the longest such suffix)."""
    return max((k for s in stop for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


@dataclass
class Row:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)  # emitted so far
    finish_reason: str | None = None  # eos | stop | length
    text: str | None = None  # set when cut at a stop string

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Completion:
    prompt_tokens: int
    tokens: list[int]
    text: str
    finish_reason: str


@dataclass
class Delta:
    """What one step added to one row: streamed to callers."""

    row: int
    tokens: list[int]
    finish_reason: str | None


class Engine:
    def __init__(
        self,
        target: LoadedModel,
        drafter: Drafter | None = None,
        num_draft_tokens: int | None = None,
        schedule: str | None = None,
        branches: int | None = None,
    ) -> None:
        """num_draft_tokens / schedule / branches: None takes the drafter's own recommendation, else 4 / constant /
        1. branches > 1 lets a drafter that can draft trees propose that many candidates per node (tree.py), up
        to num_draft_tokens nodes a round."""
        self.target = target
        self.drafter = drafter
        if drafter is not None:
            drafter.check_compatible(target)
            if branches is not None:
                drafter.set_branches(branches)
            num_draft_tokens = num_draft_tokens if num_draft_tokens is not None else (
                drafter.default_num_draft_tokens or 4)
            schedule = schedule or drafter.default_schedule
        self.num_draft_tokens = num_draft_tokens if drafter is not None else 0
        self.schedule_name = schedule or "constant"
        make_schedule(self.schedule_name, self.num_draft_tokens)  # validate now
        self._adaptive: dict[int, Schedule] = {}  # batch size -> adaptive schedule, kept across requests
        self.stats = Stats()
        self.picks = GreedyPicks()  # one row's greedy picks: one head call or a walk, by their measured costs
        self.head_walk: bool | None = None  # None: as self.picks measures; True / False: always / never walk

    def _schedule(self, batch_size: int) -> Schedule:
        """Constant and heuristic start afresh per request; adaptive keeps what it measured (costs depend on
        the batch size, so one per batch size)."""
        if self.schedule_name != "adaptive":
            return make_schedule(self.schedule_name, self.num_draft_tokens)
        if batch_size not in self._adaptive:
            self._adaptive[batch_size] = make_schedule(self.schedule_name, self.num_draft_tokens,
                                                       calibrated=self.drafter is not None and self.drafter.calibrated)
        return self._adaptive[batch_size]

    # ---- prompts -------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int] | list[dict[str, str]], chat: bool = False) -> list[int]:
        tok = self.target.tokenizer
        if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], int)):
            ids = list(prompt)
        elif chat:
            ids = tok.encode_chat(prompt)
        elif isinstance(prompt, str):
            ids = tok.encode(prompt)
        else:
            raise SpecMTPError("a list of messages needs chat=True")
        if not ids:
            raise SpecMTPError("empty prompt")
        ctx = self.target.config.max_position_embeddings
        if len(ids) >= ctx:
            raise SpecMTPError(f"prompt is {len(ids)} tokens, longer than the model's context of {ctx}")
        return ids

    # ---- public API ----------------------------------------------------------------------------
    def generate(
        self,
        prompts: list,
        max_new_tokens: int = 128,
        sampling: SamplingParams | None = None,
        stop: tuple[str, ...] | list[str] = (),
        chat: bool = False,
    ) -> list[Completion]:
        rows = [Row(self.encode(p, chat)) for p in prompts]
        for _ in self._decode(rows, max_new_tokens, sampling or SamplingParams(), tuple(stop)):
            pass
        return [self._completion(r) for r in rows]

    def stream(
        self,
        prompt,
        max_new_tokens: int = 128,
        sampling: SamplingParams | None = None,
        stop: tuple[str, ...] | list[str] = (),
        chat: bool = False,
    ) -> Iterator[str]:
        """Text pieces of one prompt's completion as the tokens are accepted (how it ended: stats.finish_reasons).
        Text that may be the start of a stop string is held back until it is known not to be one, so no piece is
        ever taken back; an incomplete UTF-8 sequence waits for the rest."""
        row = Row(self.encode(prompt, chat))
        stop = tuple(stop)
        shown = ""
        for _ in self._decode([row], max_new_tokens, sampling or SamplingParams(), stop):
            text = self._text(row)
            if not row.done:
                if text.endswith("\ufffd"):
                    continue
                text = text[: len(text) - held_back(text, stop)]
            if len(text) > len(shown):  # a decoded prefix stays put as tokens are added
                yield text[len(shown) :]
                shown = text

    def _text(self, row: Row) -> str:
        return row.text if row.text is not None else self.target.tokenizer.decode(row.tokens)

    def _completion(self, row: Row) -> Completion:
        return Completion(len(row.prompt), row.tokens, self._text(row), row.finish_reason or "length")

    # ---- the loop ------------------------------------------------------------------------------
    def _finish(self, row: Row, new: list[int], budget: int, stop: tuple[str, ...]) -> list[int]:
        """Append `new` to the row, cut at EOS / stop string / budget; return what was kept."""
        eos = self.target.tokenizer.eos_token_ids
        kept = new[: budget - len(row.tokens)]
        for i, t in enumerate(kept):
            if t in eos:
                kept = kept[: i + 1]
                row.finish_reason = "eos"
                break
        before = len(row.tokens)
        row.tokens.extend(kept)
        if stop:
            decode = self.target.tokenizer.decode
            text = decode(row.tokens)
            hits = [(text.find(s), s) for s in stop if s in text]
            if hits:
                cut = min(hits)[0]
                # the first token whose text reaches past the stop string's start ends the row
                n = before
                while n < len(row.tokens) and len(decode(row.tokens[:n])) <= cut:
                    n += 1
                row.tokens = row.tokens[: max(n, before)]
                row.text = text[:cut]
                row.finish_reason = "stop"
                kept = row.tokens[before:]
        if row.finish_reason is None and len(row.tokens) >= budget:
            row.finish_reason = "length"
        return kept

    @torch.inference_mode()
    def _decode(
        self, rows: list[Row], max_new_tokens: int, sampling: SamplingParams, stop: tuple[str, ...]
    ) -> Iterator[list[Delta]]:
        if max_new_tokens < 1:
            raise SpecMTPError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        model = self.target.model
        ctx_limit = self.target.config.max_position_embeddings
        budgets = [min(max_new_tokens, ctx_limit - len(r.prompt)) for r in rows]
        max_n = min(MAX_DRAFT, max(self.num_draft_tokens * 4, 16)) if self.drafter else 0
        capacity = max(len(r.prompt) + b for r, b in zip(rows, budgets, strict=True)) + max_n + 1
        generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        if generator is None and not sampling.greedy:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
        schedule = self._schedule(len(rows))
        stats = self.stats = Stats(prompt_tokens=sum(len(r.prompt) for r in rows))
        t_start = time.perf_counter()
        bsz = len(rows)
        batch = torch.arange(bsz)

        # Prefill: prompts right-padded; padding sits past each row's length and is overwritten later.
        lengths = torch.tensor([len(r.prompt) for r in rows])  # [B]
        width = int(lengths.max())
        tokens = torch.zeros(bsz, width, dtype=torch.long)
        for b, r in enumerate(rows):
            tokens[b, : len(r.prompt)] = torch.tensor(r.prompt)
        cache = model.new_cache(bsz, capacity)
        taps = self.drafter.taps if self.drafter is not None else ()  # lower layers' features the drafter reads
        hidden, tapped = model.features(tokens, torch.arange(width).expand(bsz, width), cache, taps)  # [B, W, H]
        last_hidden = hidden[batch, lengths - 1]  # [B, H]
        cache.lengths.copy_(lengths)
        first = model.greedy(last_hidden) if sampling.greedy else sample(
            probabilities(model.logits(last_hidden), sampling), generator)  # [B]
        deltas = [Delta(b, self._finish(r, [int(first[b])], budgets[b], stop), r.finish_reason)
                  for b, r in enumerate(rows)]
        sequences = [r.prompt + r.tokens for r in rows]  # the last token of each is not yet cached
        ctx = DraftContext(sequences, last_hidden, model, cache, sampling, generator,
                           tapped[batch, lengths - 1] if taps else None)
        if self.drafter is not None:
            self.drafter.begin(ctx)  # a drafter's own prefill counts as prefill
        stats.prefill_s = time.perf_counter() - t_start
        stats.new_tokens = sum(len(d.tokens) for d in deltas)
        yield deltas

        while not all(r.done for r in rows):
            active = [not r.done for r in rows]
            remaining = max(b - len(r.tokens) for r, b in zip(rows, budgets, strict=True) if not r.done)
            n = min(schedule.next(), max_n, remaining - 1) if self.drafter is not None else 0
            t0 = time.perf_counter()
            parents, steps = None, None
            if n > 0:
                proposal = self.drafter.propose(ctx, n, schedule.price)
                n_eff = int(proposal.num.max())  # drop trailing positions that no row filled
                drafts, num_drafts = proposal.tokens[:, :n_eff], proposal.num
                q = proposal.probs[:, :n_eff] if proposal.probs is not None else None
                if proposal.parents is not None and n_eff > 0 and not is_chain(proposal.parents[:, :n_eff]):
                    parents = proposal.parents[:, :n_eff]  # [B, n] a draft tree
                steps = proposal.steps
            else:
                n_eff, q = 0, None
                drafts, num_drafts = torch.zeros(bsz, 0, dtype=torch.long), torch.zeros(bsz, dtype=torch.long)
            t1 = time.perf_counter()
            pending = torch.tensor([s[-1] for s in sequences])[:, None]  # [B, 1]
            inputs = torch.cat([pending, drafts], dim=1)  # [B, n+1]
            tree = input_parents(parents) if parents is not None else None  # [B, n+1]
            depth = depths(tree) if tree is not None else torch.arange(n_eff + 1)  # [B, n+1] (a chain's: [n+1])
            # each input at the position of its depth, in consecutive slots from the row's length on
            positions = cache.lengths[:, None] + depth  # [B, n+1]
            reach = num_drafts  # [B] how deep each row's drafts go
            if tree is not None:  # the deepest of each row's own drafts (lists: a few values)
                reach = torch.tensor([max(d[1 : 1 + k], default=0) for d, k in zip(depth.tolist(), num_drafts.tolist(),
                                                                                    strict=True)])
            hidden, tapped = model.features(inputs, positions, cache, taps, tree)  # [B, n+1, H], [B, n+1, taps, H]
            # the target's greedy tokens, or its distributions when sampling: [B, n+1] / [B, n+1, V]
            walked, calls, head_t = False, 1, time.perf_counter()
            one_row_greedy = sampling.greedy and bsz == 1 and n_eff > 0  # where a walk may take the picks
            if one_row_greedy:
                walked = self.picks.walk(n_eff + 1) if self.head_walk is None else self.head_walk
            if walked:  # the picks only where verification reads them (schedule.GreedyPicks)
                choice, calls = greedy_walk(model.greedy, hidden, drafts, parents, num_drafts)
            else:
                choice = model.greedy(hidden) if sampling.greedy else None
            head_s = time.perf_counter() - head_t
            p = probabilities(model.logits(hidden), sampling) if choice is None else None
            path = None  # [B, n] a tree's accepted nodes, root-down
            if parents is not None:
                if choice is None:
                    choice = sample(p.flatten(0, 1), generator).view(bsz, -1)
                out, num_accepted, path = verify_tree(choice, drafts, parents, num_drafts)
            elif choice is not None:
                out, num_accepted = verify_greedy(choice, drafts, num_drafts)
            else:
                if q is not None and q.shape[-1] < p.shape[-1]:
                    q = torch.nn.functional.pad(q, (0, p.shape[-1] - q.shape[-1]))
                out, num_accepted = verify_sampled(p, drafts, q, num_drafts, generator)
            # The pending token and the accepted drafts are now cached. Finished rows stay where they are
            # (their slots are rewritten in place), so they never outgrow the cache.
            if one_row_greedy:
                self.picks.update(walked, n_eff + 1, head_s, calls, 1 + int(num_accepted.max()))
            live = torch.tensor(active)
            num_accepted = torch.where(live, num_accepted, 0)
            last = num_accepted  # [B] input index of each row's last accepted token (or the root)
            if path is not None:  # move the accepted path's K/V to the slots of their positions
                cache.keep_path(cache.lengths, path + 1, num_accepted)
                last = last_input(path, num_accepted)
            cache.advance(torch.where(live, num_accepted + 1, 0))
            ctx.hidden = hidden[batch, last]  # hidden that predicted each row's new last token
            ctx.taps = tapped[batch, last] if taps else None
            if self.drafter is not None and n > 0:
                self.drafter.accept(num_accepted, path)
            t2 = time.perf_counter()
            stats.target_forwards += 1
            stats.draft_s += t1 - t0
            stats.verify_s += t2 - t1
            stats.draft_lengths.append(n_eff)
            stats.record(n_eff, reach, num_accepted, active, nodes=num_drafts)
            schedule.update(n_eff, num_accepted[live], t1 - t0, t2 - t1, steps)
            deltas = []
            for b, r in enumerate(rows):
                if active[b]:
                    emitted = out[b, : int(num_accepted[b]) + 1].tolist()
                    sequences[b].extend(emitted)
                    kept = self._finish(r, emitted, budgets[b], stop)
                    stats.new_tokens += len(kept)
                    deltas.append(Delta(b, kept, r.finish_reason))
            stats.total_s = time.perf_counter() - t_start
            yield deltas
        stats.total_s = time.perf_counter() - t_start
        stats.finish_reasons = [r.finish_reason or "length" for r in rows]

