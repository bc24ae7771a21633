"""Confidence-aware draft lengths: each row drafts while its drafts so far are likely enough to all be accepted.

A fixed draft length N per step spends the same verify width on a run of boilerplate the drafter is sure of
and on a token it is guessing. Instead, a drafter scores each draft (a model drafter: the probability it gave
the token it drafted; a copy from the context: its position in the copy), and `Calibration` turns a score
into the probability that the target accepts that draft, learnt online from verification outcomes (decayed
counts per score bin, starting from a prior). A row's chain survives with probability alive = prod of its
drafts' calibrated rates. Two prices, in accepted tokens, come from the adaptive schedule's measurements of
the hardware (see schedule.py): verifying one more token, and computing one more draft. `Chain` proposes a
draft only while alive stays at or above the verify price (it adds alive tokens to the expectation and
costs the price), and computes the next draft only if its expected worth, over the drafter's usual scores,
exceeds the draft price; with both prices 0 every row drafts n tokens. `TreeRound` does the same for a draft
tree (tree.py), where every node is scored and a child's alive is its parent's times its own rate; it also weighs
whole tree sizes against the measured cost of verify passes by width, which is not linear on a CPU (fitted
non-decreasing), and steps a node when its children, each valued by what its rank among the step's candidates usually
scores and charged the pass's growth where the tree stands, are worth a drafter step.

Lossless with sampling: the stop depends only on the drafter's own scores and on past outcomes, never on
the target's distribution at the drafted positions, so verification sees an ordinary proposal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BINS = 20  # probability bins of a model drafter's score


@dataclass(frozen=True)
class Price:
    """What one more token costs, in expected accepted tokens (cost in seconds x tokens per second)."""

    verify: float = 0.0  # the verify pass's growth by one token
    draft: float = 0.0  # one draft step
    verify_curve: tuple[float, ...] = ()  # a whole verify pass of T tokens at index T - 1, fitted non-decreasing
    # (schedule.Adaptive; empty: not measured)

    @property
    def free(self) -> bool:
        return self.verify <= 0 and self.draft <= 0


FREE = Price()


def monotone(costs: tuple[float, ...]) -> tuple[float, ...]:
    """The closest non-decreasing sequence (least squares: pool adjacent violators). Verify passes are measured by
    width from a few noisy samples each, and a wider pass never costs less; a cheap outlier at one width would
    otherwise make it look like a bargain, a dear one make the widths around it look free."""
    blocks: list[list[float]] = []  # [sum, count] of pooled runs
    for c in costs:
        blocks.append([c, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return tuple(v for total, count in blocks for v in [total / count] * int(count))


def prob_keys(conf: torch.Tensor) -> torch.Tensor:
    """conf: [B] probabilities in [0, 1] -> calibration keys [B] (their bin)."""
    return (conf.float() * BINS).long().clamp(0, BINS - 1)


def prob_key(p: float) -> int:
    """One probability's key (prob_keys for a Python float: a tree round scores a few candidates at a time)."""
    return min(max(int(p * BINS), 0), BINS - 1)


class Calibration:
    """P(target accepts a draft | its key), as decayed counts of verified drafts per key over a prior."""

    def __init__(self, prior: list[float], strength: float = 2.0, decay: float = 0.998) -> None:
        # Python lists, not tensors: a draft round reads and updates these 20-entry tables a few times, and after
        # a verify pass has streamed the weights through the caches every tensor op pays 20-70 us of cold code
        # (list arithmetic on tables this small is cheaper even warm).
        self._prior = [float(p) for p in prior]  # [K] rate assumed before any evidence
        self.strength, self.decay = strength, decay
        self._reached = [0.0] * len(prior)  # [K] decayed drafts verified
        self._hits = [0.0] * len(prior)  # [K] decayed drafts accepted
        # [R][K] decayed keys of the children a tree step produced, by rank among its siblings (0: the likeliest);
        # None until a tree step is seen.
        self._produced: list[list[float]] | None = None
        self._children: list[float] | None = None
        self._changed()

    def _changed(self) -> None:
        """The counts changed: drop the tables derived from them (rebuilt when next asked for)."""
        self._rates: torch.Tensor | None = None  # [K] every key's rate
        self._rate_list: list[float] | None = None  # the same as Python floats
        self._usual: torch.Tensor | None = None  # [K] how often verified drafts get each key

    @property
    def prior(self) -> torch.Tensor:
        """[K] the rate assumed before any evidence"""
        return torch.tensor(self._prior, dtype=torch.float64)

    @property
    def reached(self) -> torch.Tensor:
        """[K] decayed count of verified drafts by key"""
        return torch.tensor(self._reached, dtype=torch.float64)

    @property
    def hits(self) -> torch.Tensor:
        """[K] decayed count of accepted drafts by key"""
        return torch.tensor(self._hits, dtype=torch.float64)

    @property
    def produced(self) -> torch.Tensor | None:
        """[R, K] the decayed keys of tree steps' children by rank (None before any tree step)."""
        return None if self._produced is None else torch.tensor(self._produced, dtype=torch.float64)

    @classmethod
    def for_probabilities(cls) -> Calibration:
        return cls([(i + 0.5) / BINS for i in range(BINS)])  # a calibrated drafter's score is its rate

    def rate(self, keys: torch.Tensor) -> torch.Tensor:
        """keys: [B] -> acceptance probabilities [B]."""
        return self.rates()[keys.clamp(0, len(self._prior) - 1)]

    def rates(self) -> torch.Tensor:
        """[K] every key's rate (rate() of all keys), kept until the next observation."""
        if self._rates is None:
            self._rates = torch.tensor(self.rate_list())
        return self._rates

    def rate_list(self) -> list[float]:
        """Every key's rate as Python floats (tree rounds look rates up one node at a time)."""
        if self._rate_list is None:
            s = self.strength
            self._rate_list = [(h + s * p) / (r + s) for h, p, r in zip(self._hits, self._prior, self._reached,
                                                                         strict=True)]
        return self._rate_list

    def _worth(self, alive: torch.Tensor, verify_price: float) -> torch.Tensor:
        """alive: [B] -> [B, K] what a draft of each key adds beyond the verify price, where it is proposed at all."""
        return (alive[:, None] * self.rates()[None, :] - verify_price).clamp(min=0)

    def expected_gain(self, alive: torch.Tensor, verify_price: float) -> torch.Tensor:
        """alive: [B] -> [B] expected net worth of computing a row's next draft: over the keys drafts usually
        get (the verified drafts' key frequencies; the prior's keys alike before any), what proposing it
        adds (alive x rate) beyond the verify price, when it is proposed at all."""
        if self._usual is None:
            weight = [r + 1.0 / len(self._prior) for r in self._reached]  # [K]
            total = sum(weight)
            self._usual = torch.tensor([w / total for w in weight])
        return self._worth(alive, verify_price) @ self._usual

    def note_produced(self, keys: torch.Tensor | list[list[int]]) -> None:
        """keys: [N, R] the keys of the R children each of N stepped tree nodes just produced, likeliest first."""
        rows = keys.tolist() if isinstance(keys, torch.Tensor) else keys
        if not rows:
            return
        k_max, ranks = len(self._prior) - 1, len(rows[0])
        if self._produced is None or len(self._produced) != ranks:
            table = [[0.0] * len(self._prior) for _ in range(ranks)]
        else:
            table = [[v * self.decay for v in rank] for rank in self._produced]
        for row in rows:
            for rank, k in zip(table, row, strict=True):
                rank[min(max(int(k), 0), k_max)] += 1.0
        self._produced, self._children = table, None

    def _child_weights(self) -> list[float]:
        """[K] each rank's share of its children by key (counts over a uniform prior of total 1), summed over ranks."""
        if self._children is None:
            assert self._produced is not None
            prior = 1.0 / len(self._prior)
            out = [0.0] * len(self._prior)
            for rank in self._produced:
                total = sum(rank) + 1.0
                for k, v in enumerate(rank):
                    out[k] += (v + prior) / total
            self._children = out
        return self._children

    def step_gain(self, alive: torch.Tensor, verify_price: float) -> torch.Tensor:
        """alive: [B] -> [B] expected net worth of stepping a tree node: what its children, each its own rank's usual
        key, add (alive x rate) beyond the verify price, where proposed. The likeliest child is worth far more than
        an average draft (a step's third candidate is rarely accepted), so this is not `expected_gain` (one average
        child); before any tree step was seen, it is."""
        if self._produced is None:
            return self.expected_gain(alive, verify_price)
        return torch.tensor([self.step_worth([a], verify_price) for a in alive.tolist()])

    def step_worth(self, alive: list[float], verify_price: float) -> float:
        """step_gain summed over a few nodes' alive, in Python floats (a tree round asks this every step)."""
        if self._produced is None:
            return float(self.expected_gain(torch.tensor(alive), verify_price).sum())
        rates, weights = self.rate_list(), self._child_weights()
        return sum(w * (a * r - verify_price) for a in alive for r, w in zip(rates, weights, strict=True)
                   if a * r > verify_price)

    def observe_nodes(self, rows: list[list[tuple[int, bool]]]) -> None:
        """Per row: (key, accepted) of each tree node the target reached (its parent was accepted, or is the root)."""
        self._changed()
        d, k_max = self.decay, len(self._prior) - 1
        self._reached = [r * d for r in self._reached]
        self._hits = [h * d for h in self._hits]
        for row in rows:
            for k, hit in row:
                k = min(k, k_max)
                self._reached[k] += 1.0
                self._hits[k] += hit

    def observe(self, keys: list[list[int]], accepted: list[int]) -> None:
        """Per row: the keys of the drafts it proposed, and how many the target accepted (-1: not verified)."""
        self._changed()
        d, k_max = self.decay, len(self._prior) - 1
        self._reached = [r * d for r in self._reached]
        self._hits = [h * d for h in self._hits]
        for row, a in zip(keys, accepted, strict=True):
            if a < 0:
                continue
            for i, k in enumerate(row[: a + 1]):  # drafts 1..a accepted; draft a+1 (if any) reached and rejected
                k = min(k, k_max)
                self._reached[k] += 1.0
                self._hits[k] += i < a


class Chain:
    """One round of drafting for a batch: which rows are still drafting and how many drafts each proposes."""

    def __init__(self, calibration: Calibration, batch_size: int, price: Price) -> None:
        self.calibration, self.price = calibration, price
        self.alive = torch.ones(batch_size)  # [B] estimated P(every draft so far is accepted)
        self.live = torch.ones(batch_size, dtype=torch.bool)  # [B] still drafting
        self.num = torch.zeros(batch_size, dtype=torch.long)  # [B] drafts proposed
        self.keys: list[list[int]] = [[] for _ in range(batch_size)]

    def worth_drafting(self) -> bool:
        """Is computing the next draft worth its price for some live row? (False once no row is live: with a
        free price no row ever stops.)"""
        if self.price.free:
            return True
        gain = self.calibration.expected_gain(self.alive[self.live], self.price.verify)
        return bool((gain >= self.price.draft).any()) if len(gain) else False

    def push(self, keys: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """keys: [B] calibration keys of this round's next draft per row; rows whose chain falls below the
        verify price stop here (this draft not proposed), as do rows without a next draft (valid [B] False)."""
        self.alive = self.alive * self.calibration.rate(keys)
        self.live &= self.alive >= self.price.verify
        if valid is not None:
            self.live &= valid
        self.num += self.live.long()
        for b in torch.nonzero(self.live).flatten().tolist():
            self.keys[b].append(int(keys[b]))

    def forget(self, rows: list[int]) -> None:
        """Rows whose proposals were not used this round: nothing to learn from them."""
        for b in rows:
            self.keys[b] = []

    def observe(self, num_accepted: torch.Tensor, path: torch.Tensor | None = None) -> None:
        """num_accepted: [B]; path is for trees (a chain's accepted drafts are its first ones)."""
        self.calibration.observe(self.keys, [a if keys else -1 for a, keys in zip(num_accepted.tolist(), self.keys,
                                                                                   strict=True)])


class TreeRound:
    """One round of tree drafting for a batch (tree.py): the candidate nodes each row's steps produced, which to
    step next, and which to propose. A node's `alive` is the estimated probability that the target accepts it
    and its ancestors (the product of their calibrated rates); it is proposed when it is among the row's m best
    (a child is never likelier than its parent, so the best m form a tree), m chosen against the measured cost of
    whole verify passes where the price carries them (size()), else n with alive at or above the verify price;
    it is stepped (to score its children) when it is among the best n and the expected worth of its next draft
    exceeds the draft price. Siblings are distinct tokens (a step's top-k)."""

    def __init__(self, calibration: Calibration, batch_size: int, price: Price, n: int) -> None:
        self.calibration, self.price, self.n = calibration, price, n
        # candidates below this are never proposed: the verify price, unless whole passes' costs are known (then
        # selected() weighs each tree size against its pass)
        self.floor = 0.0 if price.verify_curve else price.verify
        self.token: list[list[int]] = [[] for _ in range(batch_size)]  # per row, per candidate node
        self.parent: list[list[int]] = [[] for _ in range(batch_size)]  # -1: a child of the root
        self.alive: list[list[float]] = [[] for _ in range(batch_size)]
        # per node, the (calibration, key) of every source that proposed it (a drafter's step, a copy)
        self.marks: list[list[list[tuple[Calibration, int]]]] = [[] for _ in range(batch_size)]
        self.feed: list[list[torch.Tensor | None]] = [[] for _ in range(batch_size)]  # [Ht] stepping it reads
        self.stepped: list[set[int]] = [set() for _ in range(batch_size)]
        self.index: list[dict[tuple[int, int], int]] = [{} for _ in range(batch_size)]  # (parent, token) -> node
        self.proposed: list[list[int]] = [[] for _ in range(batch_size)]  # selected(): candidate index per draft

    def _add(self, b: int, parent: int, token: int, rate: float, mark: tuple[Calibration, int],
             feed: torch.Tensor | None) -> int | None:
        """A candidate child of `parent` (-1: the root) in row b; a token its parent already has merges into that
        node (the likelier estimate, both sources' marks). Returns the node, None when it is below the floor."""
        alive = (1.0 if parent < 0 else self.alive[b][parent]) * rate
        node = self.index[b].get((parent, token))
        if node is not None:
            self.alive[b][node] = max(self.alive[b][node], alive)
            self.marks[b][node].append(mark)
            if self.feed[b][node] is None:
                self.feed[b][node] = feed
            return node
        if alive < self.floor:  # never worth verifying, nor are its descendants
            return None
        self.index[b][(parent, token)] = len(self.token[b])
        self.token[b].append(token)
        self.parent[b].append(parent)
        self.alive[b].append(alive)
        self.marks[b].append([mark])
        self.feed[b].append(feed)
        return len(self.token[b]) - 1

    def seed(self, chains: list[list[int]], calibration: Calibration, keys: list[list[int]] | None = None) -> None:
        """Per row, a chain of drafts below the root from another source (a copy from the context); its k-th
        token's rate is `calibration`'s for keys[b][k] (default: key k). Such nodes are never stepped unless a
        drafter step proposes them too (then they merge, and the step's state is theirs)."""
        table = calibration.rate_list()
        for b, chain in enumerate(chains):
            node = -1
            for k, tok in enumerate(chain):
                key = min(k if keys is None else keys[b][k], len(table) - 1)
                node = self._add(b, node, tok, table[key], (calibration, key), None)
                if node is None:
                    break

    def grow(self, stepped: list[list[int]], pick: torch.Tensor, conf: torch.Tensor, out: torch.Tensor) -> None:
        """The nodes just stepped per row (-1: the root), their steps' top tokens pick [B, W, k] with the drafter's
        probabilities conf [B, W, k], and the hidden states out [B, W, Ht] their children's steps read."""
        picks, confs, table = pick.tolist(), conf.tolist(), self.calibration.rate_list()
        produced = []  # padding branches produce nothing
        for b, nodes in enumerate(stepped):
            for w, node in enumerate(nodes):
                self.stepped[b].add(node)
                keys = [prob_key(c) for c in confs[b][w]]
                produced.append(keys)
                feed = out[b, w]
                for tok, key in zip(picks[b][w], keys, strict=True):
                    self._add(b, node, tok, table[key], (self.calibration, key), feed)
        self.calibration.note_produced(produced)

    def _best(self, b: int) -> list[int]:
        """Row b's n likeliest candidates (ties: the earlier, so parents before children)."""
        order = sorted(range(len(self.alive[b])), key=lambda i: (-self.alive[b][i], i))
        return order[: self.n]

    def _child_price(self, steps: int, width: int) -> float:
        """What verifying one more node costs where the tree stands: the measured pass cost's growth from the size
        worth verifying now to that plus a step's children (the pass is flat up to a kernel tile and steep past
        it, so one slope over all widths misprices both); the fitted slope before the costs are known."""
        curve = self.price.verify_curve
        if not curve:
            return self.price.verify
        m = min(self.size(steps), len(curve) - 1)
        k = max(1, min(width, len(curve) - 1 - m))
        return max(0.0, (curve[min(m + k, len(curve) - 1)] - curve[m]) / k)

    def next_expansion(self, width: int, steps: int = 0) -> list[list[int]]:
        """Per row, up to `width` of its best candidates to step next (none once no step is worth its price)."""
        out = []
        verify = self._child_price(steps, width) if not self.price.free else 0.0
        for b in range(len(self.token)):
            todo = [i for i in self._best(b) if i not in self.stepped[b] and self.feed[b][i] is not None][:width]
            if todo and not self.price.free:
                gain = self.calibration.step_worth([self.alive[b][i] for i in todo], verify)
                todo = todo if gain >= self.price.draft else []
            out.append(todo)
        return out

    def size(self, steps: int) -> int:
        """Nodes per row worth verifying: with the costs of whole verify passes known, the count m that maximizes
        expected tokens per cost, (rows + the rows' m likeliest alive) / (the steps' drafting + a pass of m + 1
        tokens); else n (the floor has already dropped what is not worth its price)."""
        curve = self.price.verify_curve
        if not curve:
            return self.n
        alive = [sorted(a, reverse=True) for a in self.alive]
        sunk = steps * self.price.draft
        tokens = [float(len(alive))]  # expected tokens of the rows' m likeliest, m = 0..n
        for m in range(self.n):
            tokens.append(tokens[-1] + sum(a[m] for a in alive if m < len(a)))
        return max(range(self.n + 1), key=lambda m: tokens[m] / (sunk + curve[min(m, len(curve) - 1)]))

    def selected(self, steps: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The proposal after `steps` drafter passes: tokens [B, N], parents [B, N] (draft indices, -1 the root),
        num [B]; each row's nodes by depth, likeliest first."""
        rows = []
        size = self.size(steps)
        for b in range(len(self.token)):
            best = set(self._best(b)[:size])
            depth: dict[int, int] = {}
            for i in sorted(best):  # parents come before their children in candidate order
                depth[i] = 0 if self.parent[b][i] < 0 else depth[self.parent[b][i]] + 1
            order = sorted(best, key=lambda i: (depth[i], -self.alive[b][i], i))
            self.proposed[b] = order
            rows.append(order)
        width = max(map(len, rows), default=0)
        tokens, parents = [], []  # built as lists, one tensor each (not an indexed write per node)
        for b, order in enumerate(rows):
            index = {node: j for j, node in enumerate(order)}
            pad = width - len(order)
            tokens.append([self.token[b][node] for node in order] + [0] * pad)
            parents.append([index.get(self.parent[b][node], -1) for node in order] + [-1] * pad)
        return (torch.tensor(tokens, dtype=torch.long).view(len(rows), width),
                torch.tensor(parents, dtype=torch.long).view(len(rows), width),
                torch.tensor([len(r) for r in rows], dtype=torch.long))

    def forget(self, rows: list[int]) -> None:
        for b in rows:
            self.proposed[b] = []

    def observe(self, num_accepted: torch.Tensor, path: torch.Tensor | None) -> None:
        """Every proposed node whose parent the target accepted (or the root) was reached: a hit if accepted."""
        # each source's calibration learns from its own marks: per calibration, per row, (key, accepted)
        seen: dict[int, tuple[Calibration, list[list[tuple[int, bool]]]]] = {
            id(self.calibration): (self.calibration, [[] for _ in self.proposed])}
        for b, order in enumerate(self.proposed):
            a = int(num_accepted[b])
            accepted = {order[j] for j in (path[b, :a].tolist() if path is not None else range(a))}
            for i in order:
                if self.parent[b][i] < 0 or self.parent[b][i] in accepted:
                    for cal, key in self.marks[b][i]:
                        seen.setdefault(id(cal), (cal, [[] for _ in self.proposed]))[1][b].append((key, i in accepted))
        for cal, rows in seen.values():
            cal.observe_nodes(rows)
