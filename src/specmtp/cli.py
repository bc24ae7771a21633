"""Command line: a thin layer over the Python API. Errors print one line and exit non-zero."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from specmtp.errors import SpecMTPError
from specmtp.presets import DEFAULT_MODEL
from specmtp.schedule import SCHEDULES
from specmtp.training import TrainOptions

DEFAULT_CHAT = "Explain the concepts of speculative decoding and MTP in 3 sentences."


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="preset name, GGUF file, HF directory or cached HF id")
    p.add_argument("--drafter", default=None,
                   help="'ngram', 'none', an MTP drafter (shipped name or path) or a draft model (preset, path or HF "
                        "id), or 'ngram+' before either (copy from the context where it repeats itself); generate's "
                        "default: the preset's shipped MTP drafter behind n-gram lookup (ngram+)")
    p.add_argument("--num-draft-tokens", type=int, default=None, help="default: the drafter's config, else 4")
    p.add_argument("--schedule", choices=SCHEDULES, default=None, help="default: the drafter's config, else constant")
    p.add_argument("--branches", type=int, default=None,
                   help="candidates per draft-tree node for MTP drafters (1: chains; default: the drafter's config)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="target weights")
    p.add_argument("--weights", default="dense", choices=["dense", "q8", "q4", "native"],
                   help="target weights: dense (--dtype), or quantized at load with specmtp's CPU kernels")
    p.add_argument("--drafter-dtype", default="fp16", choices=["fp32", "bf16", "fp16"],
                   help="draft-model weights (drafts only propose, so half precision costs no exactness)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specmtp", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text")
    _add_model_args(g)
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="plain prompt (repeat for a batch)")
    src.add_argument("--chat", action="append", help="user message, chat template applied (repeatable)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--stream", action="store_true")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--compare", action="store_true",
                   help="also decode target-only and report the speedup and whether the output is identical")

    b = sub.add_parser("bench", help="benchmark against target-only and transformers")
    _add_model_args(b)
    b.add_argument("--prompts", required=True, help="JSONL file with a 'prompt' field per line")
    b.add_argument("--max-new-tokens", type=int, default=64)
    b.add_argument("--kind", default=None, help="only prompts whose 'kind' field equals this")
    b.add_argument("--limit", type=int, default=None, help="first N prompts only")
    b.add_argument("--compare-hf", action="store_true", help="also run transformers' generate")
    b.add_argument("--compare-llamacpp", metavar="PATH", default=None,
                   help="also run the same GGUF through llama.cpp (its llama-completion binary, or a build directory)")
    b.add_argument("--schedules", default=None, help="comma list of schedules to run (default: --schedule)")
    b.add_argument("--rival", default=None, metavar="DRAFTER",
                   help="another drafter (e.g. a draft model) run in the same interleaved turns, reported beside")
    b.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run every prompt N times over (all engines interleaved each time) and report each round's "
                        "speedup and their spread; transformers and llama.cpp still run once")
    b.add_argument("--json", action="store_true", help="(the JSON summary is always the last line)")
    b.add_argument("--synthetic", default=None, choices=["gemma4-e2b"],
                   help="bench a random model of this real shape and a random assistant for it (replaces --model "
                        "and --drafter; built once and cached)")
    b.add_argument("--layers", type=int, default=10, help="--synthetic: number of target layers")

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--name", default=None, help="the model name clients send and see (default: --model)")
    s.add_argument("--quiet", action="store_true", help="no request log")

    t = sub.add_parser("train-drafter", help="train an MTP drafter for a target by self-distillation")
    t.add_argument("--model", default=DEFAULT_MODEL, help="the target: preset, GGUF file or HF directory")
    t.add_argument("--out", required=True, help="output directory (also holds data and checkpoints for --resume)")
    t.add_argument("--resume", action="store_true", help="continue from the data and checkpoint in --out")
    t.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    t.add_argument("--weights", default="dense", choices=["dense", "q8", "q4", "native"],
                   help="the target's weights while it answers and is read (q4: several times faster data)")
    t.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="dense target weights while it answers and is read (bf16: data 1.3-2x faster on a CPU with "
                        "bf16 instructions, but drafts for an fp32 target measured slightly worse; see README)")
    defaults = TrainOptions()
    for f in dataclasses.fields(TrainOptions):
        kind = int if f.type in ("int", "int | None") else float if f.type == "float" else str
        t.add_argument("--" + f.name.replace("_", "-"), type=kind, default=getattr(defaults, f.name),
                       help=f"default: {getattr(defaults, f.name)}")
    return parser


def _engine(args: argparse.Namespace):
    from specmtp import Engine, load_drafter, load_model
    from specmtp.presets import default_drafter

    target = load_model(args.model, dtype=args.dtype, weights=args.weights)
    if args.drafter is None and args.command in ("generate", "serve"):
        args.drafter = default_drafter(args.model)
    if args.drafter == "none":
        args.drafter = None
    drafter = load_drafter(args.drafter, dtype=args.drafter_dtype, weights=args.weights) if args.drafter else None
    return Engine(target, drafter, num_draft_tokens=args.num_draft_tokens, schedule=args.schedule,
                  branches=args.branches)


def cmd_generate(args: argparse.Namespace) -> int:
    from specmtp import Engine, SamplingParams

    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    engine = _engine(args)
    chat = args.chat is not None or args.prompt is None
    prompts = args.chat or args.prompt or [DEFAULT_CHAT]
    if chat and not engine.target.tokenizer.has_chat_template:
        raise SpecMTPError(f"model {args.model!r} has no chat template: use --prompt")
    if args.stream and not args.json:
        if len(prompts) != 1:
            raise SpecMTPError("--stream takes a single prompt")
        t0 = time.perf_counter()
        for piece in engine.stream(prompts[0], args.max_new_tokens, sampling, args.stop, chat=chat):
            print(piece, end="", flush=True)
        print()
        _print_stats(engine.stats, time.perf_counter() - t0)
        return 0
    base = Engine(engine.target) if args.compare and engine.drafter is not None else None
    if args.compare and base is None and not args.json:
        print("[--compare: no drafter (none given, and the model has no shipped one), nothing to compare]")
    if base is not None:  # warm both up so that neither timing pays one-off kernel setup
        for e in (engine, base):
            e.generate(prompts[:1], 8, sampling, args.stop, chat=chat)
    completions = engine.generate(prompts, args.max_new_tokens, sampling, args.stop, chat=chat)
    stats = engine.stats
    compare = None
    if base is not None:
        reference = base.generate(prompts, args.max_new_tokens, sampling, args.stop, chat=chat)
        compare = {"target_only_tok_s": round(base.stats.tokens_per_s, 3),
                   "speedup_vs_target_only": round(stats.tokens_per_s / max(base.stats.tokens_per_s, 1e-9), 3),
                   "identical": [c.tokens for c in completions] == [c.tokens for c in reference]}
    if args.json:
        print(json.dumps({
            "model": args.model, "drafter": args.drafter,
            "completions": [{"text": c.text, "tokens": c.tokens, "finish_reason": c.finish_reason}
                            for c in completions],
            "stats": stats.to_dict(), **({"compare": compare} if compare else {}),
        }))
        return 0
    for c in completions:
        print(c.text)
        print()
    _print_stats(stats, stats.total_s)
    if compare is not None:
        if compare["identical"]:
            same = "identical"
        elif sampling.greedy:
            same = "DIFFERENT"
        else:  # the same distribution, other random draws: speculative sampling reads the stream differently
            same = "a different sample (speculative sampling keeps the target's distribution, not its random draws)"
        print(f"[target-only: {compare['target_only_tok_s']:.1f} tok/s; speculative decoding with "
              f"{args.drafter}: {compare['speedup_vs_target_only']:.2f}x; output {same}]")
    return 0


def _print_stats(stats, seconds: float) -> None:
    line = f"[{stats.new_tokens} tokens in {seconds:.2f}s: {stats.new_tokens / max(seconds, 1e-9):.1f} tok/s"
    if stats.drafted:
        line += f", tau {stats.tau:.2f}, drafts accepted {stats.accepted}/{stats.drafted}"
    print(line + "]")


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from specmtp import load_model
    from specmtp.training import train_drafter

    opts = TrainOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)})
    target = load_model(args.model, dtype=args.dtype, weights=args.weights)
    meta = train_drafter(target, Path(args.out), opts, resume=args.resume, target_name=args.model)
    print(f"drafter saved to {args.out}: held-out tau {meta['heldout_tau']:.2f}, acceptance "
          f"{meta['heldout_accept']}, {meta['wall_seconds'] / 60:.1f} min")
    print(json.dumps({k: v for k, v in meta.items() if k != "history"}))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from specmtp.server import make_server

    if not 0 <= args.port <= 65535:
        raise SpecMTPError(f"--port must be in 0..65535, got {args.port}")
    engine = _engine(args)
    name = args.name or args.model
    try:
        server = make_server(engine, name, args.host, args.port, quiet=args.quiet)
    except OSError as e:
        raise SpecMTPError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from e
    host, port = server.server_address[:2]
    print(f"specmtp: serving {name!r} (drafter: {args.drafter or 'none'}) on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from specmtp.bench import run_bench

    return run_bench(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        from specmtp import quant

        torch.set_num_threads(args.threads)
        quant.set_threads(args.threads)
    debug = args.debug or bool(os.environ.get("SPECMTP_DEBUG"))
    try:
        commands = {"generate": cmd_generate, "bench": cmd_bench, "serve": cmd_serve, "train-drafter": cmd_train}
        return commands[args.command](args)
    except SpecMTPError as e:
        if debug:
            raise
        print(f"specmtp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specmtp: interrupted", file=sys.stderr)
        return 130
