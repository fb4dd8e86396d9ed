"""Served speed in llama.cpp's llama-server: plain decoding vs each trained draft vs the n-gram
peers, per dataset at T = 0, the ratios, and each draft's measured break-even τ — in one run.

    .venv/bin/python bench/served.py --draft dspark=RUN/step_latest [--draft NAME=PATH@n_max=2,p_min=0.3] \
        [--datasets gsm8k,humaneval,mt-bench] [--eval-dir ../shared/eval] [--max-samples 10] \
        [--target-type f32] [--out OUT]

- Every configuration is one llama-server (one slot, T = 0) answering the first turn of each
  record, rendered with the target's chat template and sent as token ids (as `serve-check` does);
  requests run in series, the configurations one after another on the same prompts.
- τ is llama.cpp's mean length, pooled per dataset (1 + Σ accepted / Σ verification steps).
- `ratio` = decode tokens/s of the configuration / decode tokens/s of plain decoding (prompt
  processing excluded; it is the same for all); `wall` = the same over whole requests.
- `break-even τ` = the cost of one draft-and-verify round in plain decode steps, measured:
  τ × plain decode tok/s / decode tok/s. A draft pays for itself where its τ exceeds it.
- The batch-cost table (`--cost-curve`, default on) measures what a verification of n tokens
  costs in this llama-server, in plain decode steps: on a compute-bound CPU it grows almost
  linearly, which is what sets the break-even τ.
- `NAME=PATH@key=value,...` per draft: `n_max` (--spec-draft-n-max), `p_min`
  (--spec-draft-p-min), `dtype` (GGUF weight type of the draft: fp16, bf16, fp32).
- `--target-type f32|f16|bf16|q8_0` serves the target converted from its dequantized weights
  (the ones the offline engine uses) instead of the shipped GGUF; plain decoding uses the same
  file, so every ratio compares like with like.
Numbers are this machine's, now; nothing else CPU-heavy should run beside it (llama-server slows
down many-fold when it shares the two cores).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

from draftsmith.engines import llama_cpp
from draftsmith.eval.datasets import split_list
from draftsmith.eval.metrics import json_safe
from draftsmith.export import resolve_draft_dir
from draftsmith.export import gguf as gguf_export
from draftsmith.export.manifest import describe_target
from draftsmith.serve import check
from draftsmith.targets.model import load_tokenizer
from draftsmith.utils.io import InputError, atomic_write_json

OPTIONS = {"n_max": int, "p_min": float, "dtype": str}


def parse_draft(spec: str) -> tuple[str, str, dict]:
    """`NAME=PATH[@key=value,...]` -> (name, path, options)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise InputError(f"--draft {spec!r}: expected NAME=PATH[@n_max=N,p_min=P,dtype=D]")
    path, _, opts = rest.partition("@")
    options = {}
    for item in split_list(opts):
        key, sep, value = item.partition("=")
        if not sep or key not in OPTIONS:
            raise InputError(f"--draft {spec!r}: unknown option {item!r} (known: {', '.join(OPTIONS)})")
        options[key] = OPTIONS[key](value)
    return name, path, options


def batch_cost(target_gguf: Path, ctx_tokens: int = 200, sizes=(1, 2, 3, 4, 5, 6, 8), reps: int = 9) -> dict:
    """Median ms to evaluate n new tokens in one batch after a cached `ctx_tokens` prefix, and the
    ms per plain decode step, in one llama-server."""
    rng = random.Random(0)
    prefix = [rng.randrange(100, 40000) for _ in range(ctx_tokens)]
    out = {"batch_ms": {}}
    with llama_cpp.LlamaServer(target_gguf, slots=1, ctx_size=2048, seed=0) as srv:
        for n in sizes:
            ms = []
            for _ in range(reps):
                tokens = prefix + [rng.randrange(100, 40000) for _ in range(n)]
                t = srv.post_json("/completion", {"prompt": tokens, "n_predict": 1, "temperature": 0,
                                                  "cache_prompt": True}, timeout=120)["timings"]
                if t["prompt_n"] == n:  # the prefix came from the cache
                    ms.append(t["prompt_ms"])
            out["batch_ms"][n] = statistics.median(ms) if ms else None
        t = srv.post_json("/completion", {"prompt": prefix, "n_predict": 64, "temperature": 0,
                                          "cache_prompt": True, "ignore_eos": True}, timeout=300)["timings"]
        out["decode_step_ms"] = t["predicted_per_token_ms"]
    return out


def summarize(runs: dict, plain: dict, drafts: set[str]) -> dict:
    """Per configuration and dataset: τ, tokens/s, ratios, break-even τ (drafts only: an n-gram
    peer drafts in few rounds, and its other tokens are plain decode steps)."""
    table = {}
    for name, per_ds in runs.items():
        table[name] = {}
        for ds, m in per_ds.items():
            p = plain[ds]
            ratio = m["decode_tokens_per_s"] / p["decode_tokens_per_s"]
            tau = m["served_tau"]
            table[name][ds] = {
                "tau": tau, "decode_tokens_per_s": m["decode_tokens_per_s"],
                "plain_decode_tokens_per_s": p["decode_tokens_per_s"], "ratio": ratio,
                "wall_ratio": m["served_tokens_per_s"] / p["served_tokens_per_s"],
                "break_even_tau": tau / ratio if tau is not None and name in drafts else None,
                "rounds": m["rounds"], "tokens": m["tokens"]}
    return table


def print_table(table: dict) -> None:
    def f(v, fmt="{:.2f}"):
        return "–" if v is None else fmt.format(v)

    print("| run | dataset | τ | decode tok/s | plain tok/s | ratio | wall ratio | break-even τ |")
    print("|---|---|---|---|---|---|---|---|")
    for name, per_ds in table.items():
        for ds, m in per_ds.items():
            print(f"| {name} | {ds} | {f(m['tau'])} | {f(m['decode_tokens_per_s'], '{:.1f}')} | "
                  f"{f(m['plain_decode_tokens_per_s'], '{:.1f}')} | {f(m['ratio'], '{:.2f}×')} | "
                  f"{f(m['wall_ratio'], '{:.2f}×')} | {f(m['break_even_tau'])} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft", action="append", default=[], metavar="NAME=PATH[@opts]")
    ap.add_argument("--target", default=None, help="default: the first draft's recipe target")
    ap.add_argument("--target-type", default=None, choices=gguf_export.TARGET_OUTTYPES)
    ap.add_argument("--datasets", default="gsm8k,humaneval,mt-bench")
    ap.add_argument("--eval-dir", default="../shared/eval")
    ap.add_argument("--max-samples", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--peers", default=",".join(check.PEERS))
    ap.add_argument("--no-cost-curve", action="store_true")
    ap.add_argument("--out", default="bench-served")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    drafts = [parse_draft(d) for d in args.draft]
    configs = {}
    target = args.target
    for name, path, options in drafts:
        manifest, configs[name] = check.export_for_serving(
            resolve_draft_dir(path), out / f"{name}-gguf", target, options.get("dtype", "fp16"),
            options.get("n_max"), options.get("p_min"))
        target = target or manifest["target"]["id"]
    target = target or "smollm2-135m"
    for peer in split_list(args.peers):
        if peer not in check.PEERS:
            raise InputError(f"--peers {peer!r}: known peers are {', '.join(check.PEERS)}")
        configs[peer] = ["--spec-type", peer]
    info = describe_target(target)
    target_gguf = gguf_export.target_gguf(info, args.target_type)
    prompts = check.first_turn_prompts(args, load_tokenizer(info.source))
    print(f"target {target_gguf.name}; {sum(map(len, prompts.values()))} prompts; "
          f"max_new_tokens {args.max_new_tokens}", flush=True)
    result = {"config": {"target_gguf": str(target_gguf), "datasets": list(prompts),
                         "max_samples": args.max_samples, "max_new_tokens": args.max_new_tokens,
                         "servers": configs}}
    if not args.no_cost_curve:
        cost = batch_cost(target_gguf)
        result["batch_cost"] = cost
        step = cost["decode_step_ms"]
        print(f"plain decode step {step:.1f} ms; verifying n tokens in one batch costs (plain steps): "
              + ", ".join(f"n={n}: {ms / step:.2f}" for n, ms in cost["batch_ms"].items() if ms), flush=True)
    plain = check.serve_prompts(target_gguf, [], prompts, args.max_new_tokens, 4096)
    runs = {}
    for name, extra in configs.items():
        print(f"serving {name}: {' '.join(extra)}", flush=True)
        runs[name] = check.serve_prompts(target_gguf, extra, prompts, args.max_new_tokens, 4096)
    result["table"] = summarize(runs, plain, {name for name, _, _ in drafts})
    result["runs"] = {"plain": plain, **runs}
    print_table(result["table"])
    atomic_write_json(out / "served_bench.json", json_safe(result))
    print(f"wrote {out / 'served_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
