"""`specmtp bench`: our engine (target-only and speculative) against transformers, in one process.

Prints a table and, as its last line, one JSON object. Timings are wall-clock per prompt after one
warm-up generation per engine, our engines taking turns prompt by prompt; greedy tokens are compared token for token.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from specmtp.engine import Engine, Stats
from specmtp.errors import SpecMTPError
from specmtp.loader import LoadedModel, load_model


def load_prompts(path: str, kind: str | None = None, limit: int | None = None) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise SpecMTPError(f"prompts file not found: {path}")
    rows = []
    for i, line in enumerate(p.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpecMTPError(f"{path}:{i + 1} is not JSON: {e}") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise SpecMTPError(f"{path}:{i + 1} has no string 'prompt' field")
        if kind is None or row.get("kind") == kind:
            rows.append(row)
    if not rows:
        raise SpecMTPError(f"no prompts in {path}" + (f" of kind {kind!r}" if kind else ""))
    return rows[:limit] if limit else rows


def measure_read_bandwidth(gib: float = 1.0) -> float:
    """Bytes per second of a streaming read over a buffer far larger than the caches (best of 5)."""
    x = torch.ones(int(gib * (1 << 30)) // 4)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one greedy decode step reads: every matrix once; the embedding table only as the head."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(m.qweight.nbytes for m in model.modules() if getattr(m, "qweight", None) is not None)
    if model.lm_head is not None or model.head_q is not None:  # the lookup reads one row, not the table
        total -= model.embed.weight.numel() * model.embed.weight.element_size()
    if model.head_q is not None:
        total += model.head_q.nbytes
    screen = model.head_screen
    if screen is not None:  # a greedy step reads the head's q8 copy instead (and a few of its fp32 rows: screen.py)
        total += screen.nbytes - screen.weight.numel() * screen.weight.element_size()
    return total


def _encode_all(target: LoadedModel, prompts: list[dict]) -> list[list[int]]:
    tok = target.tokenizer
    return [tok.encode_chat(p["prompt"]) if tok.has_chat_template else tok.encode(p["prompt"]) for p in prompts]


def run_ours(engines: list[Engine], ids: list[list[int]], max_new: int, repeats: int = 1) -> list[dict]:
    """Each engine on every prompt, interleaved: prompt by prompt, every engine in turn (the order reversed on every
    other prompt), so that a machine whose speed drifts during the run (this one's memory bandwidth moves by tens
    of percent between minutes) slows all of them alike and their ratios stay fair. With `repeats` > 1 the whole
    round runs that many times (the engines keep what their schedules measured); each result pools them and keeps
    each round's own figures under "rounds". One result per engine."""
    for engine in engines:
        engine.generate([ids[0]], max_new_tokens=min(8, max_new))  # warm-up
    tallies = [_Tally() for _ in engines]
    for r in range(repeats):
        desc = "specmtp" if repeats == 1 else f"specmtp {r + 1}/{repeats}"
        for i, p in enumerate(tqdm(ids, desc=desc, leave=False)):
            order = range(len(engines)) if i % 2 == 0 else reversed(range(len(engines)))
            for e in order:
                out = engines[e].generate([p], max_new_tokens=max_new)[0]
                tallies[e].add(out.tokens, engines[e].stats)
        for t in tallies:
            t.end_round()
    return [t.result() for t in tallies]


class _Tally:
    """One engine's statistics summed over prompts."""

    def __init__(self) -> None:
        self.tokens: list[list[int]] = []
        self.seconds, self.draft_s, self.verify_s = 0.0, 0.0, 0.0
        self.drafted = self.accepted = self.forwards = self.row_steps = 0
        self.lengths: list[int] = []
        self.by_pos_a: list[int] = []
        self.by_pos_d: list[int] = []
        self.per_prompt: list[tuple] = []  # (new tokens, seconds, accepted drafts, verify passes) of each prompt
        self.rounds: list[dict] = []  # per round of all prompts (bench --repeat): its own tok/s and tau
        self._mark = 0  # per_prompt entries before the current round

    def add(self, tokens: list[int], s: Stats) -> None:
        self.per_prompt.append((len(tokens), s.total_s, s.accepted, s.row_steps))
        self.tokens.append(tokens)
        self.seconds += s.total_s
        self.forwards += s.target_forwards
        self.row_steps += s.row_steps
        self.drafted += s.drafted
        self.accepted += s.accepted
        self.draft_s += s.draft_s
        self.verify_s += s.verify_s
        self.lengths += s.draft_lengths
        for i, (a, d) in enumerate(zip(s.accepted_at, s.drafted_at, strict=True)):
            if i >= len(self.by_pos_a):
                self.by_pos_a.append(0)
                self.by_pos_d.append(0)
            self.by_pos_a[i] += a
            self.by_pos_d[i] += d

    def end_round(self) -> None:
        rows = self.per_prompt[self._mark :]
        self._mark = len(self.per_prompt)
        new, seconds = sum(r[0] for r in rows), sum(r[1] for r in rows)
        accepted, steps = sum(r[2] for r in rows), sum(r[3] for r in rows)
        self.rounds.append({"tok_s": new / seconds if seconds else 0.0,
                            "tau": (accepted + steps) / steps if steps else 1.0})

    def result(self) -> dict:
        new, lengths, steps = sum(len(t) for t in self.tokens), self.lengths, self.row_steps
        return {
            "tokens": self.tokens, "new_tokens": new, "seconds": self.seconds, "tok_s": new / self.seconds,
            "tau": (self.accepted + steps) / steps if steps else 1.0,
            "acceptance_by_position": [round(a / d, 4) if d else 0.0
                                       for a, d in zip(self.by_pos_a, self.by_pos_d, strict=True)],
            "drafted": self.drafted, "accepted": self.accepted, "target_forwards": self.forwards,
            "draft_s": self.draft_s, "verify_s": self.verify_s,
            "mean_draft_length": sum(lengths) / len(lengths) if lengths else 0.0,
            "draft_length_counts": [lengths.count(n) for n in range(max(lengths, default=-1) + 1)],  # steps by length
            "draft_ms_per_token": 1000 * self.draft_s / sum(lengths) if sum(lengths) else 0.0,
            "verify_ms_per_pass": 1000 * self.verify_s / self.forwards if self.forwards else 0.0,
            "per_prompt": self.per_prompt, "rounds": self.rounds,
        }


def _brief(res: dict, base: dict) -> dict:
    """A speculative run's headline figures for the JSON summary, with its speedup over target-only."""
    brief = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()
             if k in ("tok_s", "tau", "acceptance_by_position", "greedy_identical", "mean_draft_length",
                      "draft_length_counts")}
    return {**brief, "speedup_vs_target_only": round(res["tok_s"] / base["tok_s"], 3)}


def by_kind(prompts: list[dict], base: dict, spec: dict) -> dict[str, dict]:
    """tau, tok/s and speedup over target-only for each prompt kind (the 'kind' field), from per-prompt stats (of
    every round, with bench --repeat: entry j is prompt j mod len(prompts))."""
    out = {}
    n = len(prompts)
    for kind in sorted({p.get("kind", "all") for p in prompts}):
        idx = [j for j in range(len(spec["per_prompt"])) if prompts[j % n].get("kind", "all") == kind]
        b = [base["per_prompt"][i] for i in idx]
        s = [spec["per_prompt"][i] for i in idx]
        steps = sum(r[3] for r in s)
        tok_s = sum(r[0] for r in s) / sum(r[1] for r in s)
        out[kind] = {"prompts": sum(1 for j in idx if j < n),
                     "tau": round((sum(r[2] for r in s) + steps) / steps, 4) if steps else 1.0,
                     "tok_s": round(tok_s, 3),
                     "speedup_vs_target_only": round(tok_s / (sum(r[0] for r in b) / sum(r[1] for r in b)), 3)}
    return out


def rounds_summary(base: dict, spec: dict, rival: dict | None = None) -> dict:
    """bench --repeat: each round's target-only and speculative tok/s, speedup and tau (and the rival's), and the
    speedups' spread: how much a single run of this machine can be trusted."""
    rounds = []
    for i, (b, s) in enumerate(zip(base["rounds"], spec["rounds"], strict=True)):
        row = {"target_only_tok_s": round(b["tok_s"], 3), "spec_tok_s": round(s["tok_s"], 3),
               "speedup_vs_target_only": round(s["tok_s"] / b["tok_s"], 3), "tau": round(s["tau"], 4)}
        if rival is not None:
            r = rival["rounds"][i]
            row.update({"rival_tok_s": round(r["tok_s"], 3), "speedup_vs_rival": round(s["tok_s"] / r["tok_s"], 3)})
        rounds.append(row)
    speedups = sorted(r["speedup_vs_target_only"] for r in rounds)
    taus = sorted(r["tau"] for r in rounds)
    return {"rounds": rounds, "speedup_min": speedups[0], "speedup_median": statistics.median(speedups),
            "speedup_max": speedups[-1], "tau_min": taus[0], "tau_max": taus[-1]}


class _CallTimer:
    """Wall time of every forward call of a module (transformers' models), with its number of input tokens."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls: list[tuple[int, float]] = []
        self._t0 = 0.0
        self._handles = [module.register_forward_pre_hook(self._pre, with_kwargs=True),
                         module.register_forward_hook(self._post)]
        self._tokens = 0

    def _pre(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        self._tokens = int(ids.shape[1]) if ids is not None else 0
        self._t0 = time.perf_counter()

    def _post(self, module, args, output) -> None:
        self.calls.append((self._tokens, time.perf_counter() - self._t0))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def run_hf(path: Path, ids: list[list[int]], max_new: int, eos: tuple[int, ...], assistant=None,
           lookup: int | None = None) -> dict:
    kwargs = dict(do_sample=False, max_new_tokens=max_new, eos_token_id=list(eos), pad_token_id=eos[0],
                  top_k=None, top_p=None, temperature=None)
    if assistant is not None:
        kwargs["assistant_model"] = assistant
    if lookup:
        kwargs["prompt_lookup_num_tokens"] = lookup
    model = hf_model(path)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # transformers as users run it (a quantized target set ours to 1)
    tokens, seconds = [], 0.0
    verify_calls: list[float] = []
    draft_calls: list[float] = []
    with torch.inference_mode():
        model.generate(torch.tensor([ids[0]]), **{**kwargs, "max_new_tokens": min(8, max_new)})
        for p in tqdm(ids, desc="transformers", leave=False):
            timers = [_CallTimer(model)] + ([_CallTimer(assistant)] if assistant is not None else [])
            t0 = time.perf_counter()
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), **kwargs)
            seconds += time.perf_counter() - t0
            for t in timers:
                t.remove()
            verify_calls += [s for _, s in timers[0].calls[1:]]  # every call after the prefill
            if assistant is not None:
                draft_calls += [s for n, s in timers[1].calls if n <= 1]  # one-token drafting steps
            new = out[0, len(p):].tolist()
            tokens.append(_strip_pad(new, eos))
    torch.set_num_threads(threads)
    n = sum(len(t) for t in tokens)
    res = {"tokens": tokens, "new_tokens": n, "seconds": seconds, "tok_s": n / seconds,
           "verify_ms_per_pass": 1000 * sum(verify_calls) / max(len(verify_calls), 1)}
    if draft_calls:
        res["draft_ms_per_step"] = 1000 * sum(draft_calls) / len(draft_calls)
    return res


_HF_CACHE: dict[str, torch.nn.Module] = {}


def hf_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    key = str(path)
    if key not in _HF_CACHE:
        hf_logging.set_verbosity_error()
        _HF_CACHE[key] = AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32).eval()
    return _HF_CACHE[key]


_LLAMA_EVAL = re.compile(r"(prompt eval|\s eval) time =\s*([\d.]+) ms /\s*(\d+)")


def llamacpp_binary(path: str) -> Path:
    """A llama.cpp build's non-interactive generator: the file itself, or llama-completion / llama-cli under path."""
    p = Path(path)
    if p.is_dir():
        for name in ("llama-completion", "bin/llama-completion", "build/bin/llama-completion"):
            if (p / name).is_file():
                return p / name
        raise SpecMTPError(f"no llama-completion binary under {path} (build llama.cpp's llama-completion target)")
    if not p.is_file():
        raise SpecMTPError(f"llama.cpp binary not found: {path}")
    return p


def run_llamacpp(binary: Path, gguf: Path, texts: list[str], max_new: int, threads: int) -> dict:
    """The same prompts through llama.cpp (greedy, the same GGUF file), one process per prompt; its own timings
    (prompt eval + eval), so process start and model load are not counted. Tokens: eval runs + the first one."""
    import subprocess

    seconds, decode_s, new, decoded = 0.0, 0.0, 0, 0
    for text in tqdm(texts, desc="llama.cpp", leave=False):
        cmd = [str(binary), "-m", str(gguf), "-p", text, "-n", str(max_new), "--temp", "0", "-t", str(threads),
               "-no-cnv", "--simple-io", "--no-display-prompt", "-s", "0"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except OSError as e:
            raise SpecMTPError(f"cannot run {binary}: {e}") from None
        found = {kind.strip(): (float(ms), int(n)) for kind, ms, n in _LLAMA_EVAL.findall(out.stderr)}
        if out.returncode != 0 or "eval" not in found or "prompt eval" not in found:
            raise SpecMTPError(f"{binary} failed (exit {out.returncode}): {out.stderr.strip()[-400:]}")
        seconds += (found["prompt eval"][0] + found["eval"][0]) / 1000
        decode_s += found["eval"][0] / 1000
        new += found["eval"][1] + 1
        decoded += found["eval"][1]
    return {"new_tokens": new, "seconds": seconds, "tok_s": new / seconds, "decode_tok_s": decoded / decode_s}


def _strip_pad(tokens: list[int], eos: tuple[int, ...]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def run_bench(args: argparse.Namespace) -> int:
    from specmtp.drafters import DraftModelDrafter, Gemma4AssistantDrafter, MTPDrafter, load_drafter

    if getattr(args, "synthetic", None):  # a random model of a real shape, and its random assistant
        from specmtp.synthetic import make_gemma4_pair

        target_dir, assistant_dir = make_gemma4_pair(args.synthetic, layers=args.layers)
        args.model, args.drafter = str(target_dir), str(assistant_dir)

    repeats = getattr(args, "repeat", 1)
    if repeats < 1:
        raise SpecMTPError(f"--repeat must be at least 1, got {repeats}")
    prompts = load_prompts(args.prompts, args.kind, args.limit)
    t0 = time.perf_counter()
    target = load_model(args.model, dtype=args.dtype, weights=args.weights)
    load_s = time.perf_counter() - t0
    drafter = load_drafter(args.drafter, dtype=args.drafter_dtype, weights=args.weights) if args.drafter else None
    ids = _encode_all(target, prompts)
    max_new = args.max_new_tokens
    bandwidth = measure_read_bandwidth()
    wbytes = weight_bytes_per_token(target.model)
    rows: list[tuple[str, dict]] = []

    spec_engines = []
    if drafter is not None:
        schedules = args.schedules.split(",") if args.schedules else [args.schedule]  # None: drafter's default
        spec_engines = [Engine(target, drafter, args.num_draft_tokens, requested, getattr(args, "branches", None))
                        for requested in schedules]
    rival_ref = getattr(args, "rival", None)
    rival_engines = []  # another drafter (its own defaults) taking the same turns, for a comparison within one run
    if rival_ref:
        rival_engines = [Engine(target, load_drafter(rival_ref, dtype=args.drafter_dtype, weights=args.weights))]
    base, *results = run_ours([Engine(target), *spec_engines, *rival_engines], ids, max_new, repeats)
    specs, rival = results[: len(spec_engines)], (results[-1] if rival_engines else None)
    rows.append(("specmtp target-only", base))
    summary: dict = {
        "model": args.model, "weights": args.weights,
        "prompts": len(prompts), "max_new_tokens": max_new, "new_tokens": base["new_tokens"],
        "load_s": round(load_s, 2), "specmtp_tok_s": round(base["tok_s"], 3),
        "target_only_tok_s": round(base["tok_s"], 3),
        "weight_bytes_per_token": wbytes, "read_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "decode_vs_bandwidth_bound": round((base["seconds"] / base["new_tokens"]) / (wbytes / bandwidth), 3),
        "achieved_weight_gb_s": round(wbytes * base["tok_s"] / 1e9, 2),
        "order": "interleaved by prompt",  # target-only and each schedule take turns on every prompt
        "repeats": repeats,  # rounds of all prompts (the figures pool them)
    }
    if drafter is not None:
        best = None
        per_schedule = {}
        for engine, res in zip(spec_engines, specs, strict=True):
            sched, num_draft = engine.schedule_name, engine.num_draft_tokens
            res["greedy_identical"] = res["tokens"] == base["tokens"]
            rows.append((f"specmtp spec ({args.drafter}, {sched})", res))
            per_schedule[sched] = _brief(res, base)
            if best is None or res["tok_s"] > best[1]["tok_s"]:
                best = (sched, res)
        sched, res = best
        summary.update({
            "drafter": args.drafter, "schedule": sched, "num_draft_tokens": num_draft, "branches": drafter.branches,
            "tau": round(res["tau"], 4), "acceptance_by_position": res["acceptance_by_position"],
            "spec_tok_s": round(res["tok_s"], 3),
            "speedup_vs_target_only": round(res["tok_s"] / base["tok_s"], 3),
            "mean_draft_length": round(res.get("mean_draft_length", 0.0), 3),
            "draft_length_counts": res["draft_length_counts"],
            "greedy_identical": all(r["greedy_identical"] for _, r in rows[1:]),
            "draft_time_share": round(res["draft_s"] / max(res["draft_s"] + res["verify_s"], 1e-9), 4),
            "draft_ms_per_token": round(res["draft_ms_per_token"], 3),
            "verify_ms_per_pass": round(res["verify_ms_per_pass"], 3),
            "draft_step_vs_verify_pass": round(res["draft_ms_per_token"] / max(res["verify_ms_per_pass"], 1e-9), 4),
            "target_step_ms": round(1000 * base["seconds"] / base["new_tokens"], 3),
            "draft_step_vs_target_step": round(res["draft_ms_per_token"] / (1000 * base["seconds"]
                                                                            / base["new_tokens"]), 4),
            "schedules": per_schedule,
            "by_kind": by_kind(prompts, base, res),
        })
        if repeats > 1:
            summary.update(rounds_summary(base, res, rival))
    if rival is not None:
        rival["greedy_identical"] = rival["tokens"] == base["tokens"]
        rows.append((f"specmtp spec ({rival_ref}, {rival_engines[0].schedule_name})", rival))
        summary["rival"] = {"drafter": rival_ref, **_brief(rival, base), "by_kind": by_kind(prompts, base, rival)}
        if "spec_tok_s" in summary:
            summary["speedup_vs_rival"] = round(summary["spec_tok_s"] / summary["rival"]["tok_s"], 3)
            summary["speedup_vs_rival_by_kind"] = {
                kind: round(v["tok_s"] / summary["rival"]["by_kind"][kind]["tok_s"], 3)
                for kind, v in summary["by_kind"].items()}
    if args.compare_hf:
        eos = target.tokenizer.eos_token_ids
        hf = run_hf(target.path, ids, max_new, eos)
        rows.append(("transformers generate", hf))
        summary.update({
            "hf_tok_s": round(hf["tok_s"], 3), "speedup_vs_hf": round(base["tok_s"] / hf["tok_s"], 3),
            **({"spec_speedup_vs_hf": round(summary["spec_tok_s"] / hf["tok_s"], 3)} if drafter is not None else {}),
            "greedy_identical_to_hf": hf["tokens"] == base["tokens"][: len(ids)],  # (transformers runs one round)
        })
        if drafter is not None and not isinstance(drafter, MTPDrafter):  # transformers cannot run our MTP drafters
            if isinstance(drafter, DraftModelDrafter | Gemma4AssistantDrafter):
                from specmtp.loader import checkpoint_dir
                from specmtp.synthetic import all_shared_kv_fix

                with all_shared_kv_fix():  # needed to build a Gemma 4 assistant in transformers 5.23
                    assisted = run_hf(target.path, ids, max_new, eos,
                                      assistant=hf_model(checkpoint_dir(args.drafter)))
            else:
                assisted = run_hf(target.path, ids, max_new, eos, lookup=num_draft)
            rows.append(("transformers assisted", assisted))
            if "draft_ms_per_step" in assisted:
                summary.update({
                    "hf_draft_ms_per_step": round(assisted["draft_ms_per_step"], 3),
                    "hf_verify_ms_per_pass": round(assisted["verify_ms_per_pass"], 3),
                    "hf_draft_step_vs_verify_pass": round(assisted["draft_ms_per_step"]
                                                          / max(assisted["verify_ms_per_pass"], 1e-9), 4),
                })
            summary.update({
                "hf_assisted_tok_s": round(assisted["tok_s"], 3),
                "speedup_vs_hf_assisted": round(summary["spec_tok_s"] / assisted["tok_s"], 3),
                "hf_assisted_identical": assisted["tokens"] == base["tokens"][: len(ids)],
            })
    if getattr(args, "compare_llamacpp", None):
        from specmtp.presets import resolve

        gguf = resolve(args.model)
        if not gguf.is_file():
            raise SpecMTPError(f"--compare-llamacpp needs a GGUF model; {args.model} resolves to {gguf}")
        texts = [target.tokenizer.hf.decode(p, skip_special_tokens=False) for p in ids]
        llama = run_llamacpp(llamacpp_binary(args.compare_llamacpp), gguf, texts, max_new, os.cpu_count() or 1)
        rows.append(("llama.cpp (same GGUF, its own timings)", llama))
        best = summary.get("spec_tok_s", base["tok_s"])
        summary.update({"llamacpp_tok_s": round(llama["tok_s"], 3),
                        "llamacpp_decode_tok_s": round(llama["decode_tok_s"], 3),
                        "target_only_vs_llamacpp": round(base["tok_s"] / llama["tok_s"], 3),
                        "speedup_vs_llamacpp": round(best / llama["tok_s"], 3)})
    _print_table(rows, base["tok_s"])
    if "rounds" in summary:
        print(f"{'round':<7} {'target-only tok/s':>18} {'spec tok/s':>11} {'speedup':>8} {'tau':>6}")
        for i, r in enumerate(summary["rounds"]):
            print(f"{i + 1:<7} {r['target_only_tok_s']:>18.2f} {r['spec_tok_s']:>11.2f} "
                  f"{r['speedup_vs_target_only']:>8.3f} {r['tau']:>6.2f}")
        print(f"speedup over target-only: min {summary['speedup_min']:.3f}, median {summary['speedup_median']:.3f}, "
              f"max {summary['speedup_max']:.3f}")
    print(json.dumps(summary))
    return 0


def _print_table(rows: list[tuple[str, dict]], base_tok_s: float) -> None:
    print(f"{'run':<44} {'tokens':>7} {'seconds':>9} {'tok/s':>8} {'ratio':>7} {'tau':>6}")
    for name, r in rows:
        tau = f"{r['tau']:.2f}" if "tau" in r and r.get("drafted") else "-"
        print(f"{name:<44} {r['new_tokens']:>7} {r['seconds']:>9.2f} {r['tok_s']:>8.2f} "
              f"{r['tok_s'] / base_tok_s:>7.2f} {tau:>6}")
