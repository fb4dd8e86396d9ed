"""Served speed in llama.cpp's llama-server: plain decoding vs each trained draft vs the n-gram
peers, per dataset at T = 0, the ratios, and each draft's measured break-even τ — in one run.

    .venv/bin/python bench/served.py --draft dspark=RUN/step_latest [--draft NAME=PATH@n_max=2,p_min=0.3] \
        [--datasets gsm8k,humaneval,mt-bench] [--eval-dir ../shared/eval] [--max-samples 10] \
        [--target-type f32] [--out OUT]

- Every configuration is one llama-server (one slot, T = 0) answering the first turn of each
  record, rendered with the target's chat template and sent as token ids (as `serve-check` does);
  all servers start first, then each prompt goes to every one of them in turn (the order rotating
  per prompt; requests never overlap), so a drift in the machine's speed hits all alike.
- τ is llama.cpp's mean length, pooled per dataset (1 + Σ accepted / Σ verification steps).
- `ratio` = decode tokens/s of the configuration / decode tokens/s of plain decoding (prompt
  processing excluded; it is the same for all); `wall` = the same over whole requests.
- `break-even τ` = the cost of one draft-and-verify round in plain decode steps, measured:
  τ × plain decode tok/s / decode tok/s. A draft pays for itself where its τ exceeds it.
- The batch-cost table (`--cost-curve`, default on) measures what a verification of n tokens
  costs in this llama-server, in plain decode steps: on a compute-bound CPU it grows almost
  linearly, which is what sets the break-even τ.
- `NAME=PATH@key=value,...` per draft: `n_max` (--spec-draft-n-max), `p_min`
  (--spec-draft-p-min), `dtype` (GGUF weight type of the draft: fp16, bf16, fp32, q8_0);
  `--grid "dtype=fp16,q8_0;n_max=1,2,4;p_min=0,0.4"` serves every draft at every combination
  (the sweep behind a serve setting: τ, round cost = break-even τ, speedup per row).
- `with=ngram-simple` (or another peer) serves the draft behind an n-gram peer in one
  llama-server (`--spec-type ngram-simple,draft-dspark`): llama.cpp asks the n-gram first and
  runs the draft model only in the rounds where it finds no match (the draft still reads the
  target's features after every batch).
- `--target-type f32|f16|bf16|q8_0` serves the target converted from its dequantized weights
  (the ones the offline engine uses) instead of the shipped GGUF; plain decoding uses the same
  file, so every ratio compares like with like.
Numbers are this machine's, now; nothing else CPU-heavy should run beside it (llama-server slows
down many-fold when it shares the two cores).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from draftsmith.eval.datasets import split_list
from draftsmith.eval.metrics import json_safe
from draftsmith.export import resolve_draft_dir
from draftsmith.export import gguf as gguf_export
from draftsmith.export.manifest import describe_target
from draftsmith.serve import check, tune
from draftsmith.targets.model import load_tokenizer
from draftsmith.utils.io import InputError, atomic_write_json

OPTIONS = {"n_max": int, "p_min": float, "dtype": str, "with": str}


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


def behind_peer(args: list[str], peer: str, name: str) -> list[str]:
    """llama-server flags with an n-gram peer put ahead of the draft's own spec type."""
    if peer not in check.PEERS:
        raise InputError(f"--draft {name}: with={peer!r} is not an n-gram peer ({', '.join(check.PEERS)})")
    args = list(args)
    i = args.index("--spec-type") + 1
    args[i] = f"{peer},{args[i]}"
    return args


def parse_grid(text: str | None) -> dict[str, list]:
    """`dtype=fp16,q8_0;n_max=1,2;p_min=0,0.4` -> {key: [values]} (p_min 0 = off)."""
    grid = {}
    for part in (text or "").split(";"):
        if not part.strip():
            continue
        key, sep, values = part.partition("=")
        key = key.strip()
        if not sep or key not in OPTIONS or not split_list(values):
            raise InputError(f"--grid {text!r}: expected KEY=V1,V2;... with KEY in {', '.join(OPTIONS)}")
        grid[key] = [OPTIONS[key](v) for v in split_list(values)]
    return grid


def expand_grid(drafts: list[tuple[str, str, dict]], grid: dict[str, list]) -> list[tuple[str, str, dict]]:
    """Every draft at every grid combination (its own options fill the keys the grid leaves)."""
    if not grid:
        return drafts
    out = []
    for name, path, options in drafts:
        for combo in itertools.product(*grid.values()):
            opts = {**options, **dict(zip(grid, combo))}
            if not opts.get("p_min"):
                opts.pop("p_min", None)
            label = f"{name} {opts.get('dtype', 'fp16')} n{opts.get('n_max', 'max')} p{opts.get('p_min', 0)}"
            out.append((label, path, opts))
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
    ap.add_argument("--grid", default=None, metavar="dtype=fp16,q8_0;n_max=1,2,4;p_min=0,0.4",
                    help="serve every draft at every combination (p_min 0 = off); one row each, "
                         "named 'NAME dtype nN pP'")
    ap.add_argument("--out", default="bench-served")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    drafts = expand_grid([parse_draft(d) for d in args.draft], parse_grid(args.grid))
    if any(name == "plain" for name, _, _ in drafts):
        raise InputError("--draft plain=...: 'plain' names plain decoding; choose another name")
    configs = {}
    target = args.target
    exported = {}
    for name, path, options in drafts:
        dtype = options.get("dtype", "fp16")
        key = (path, dtype)
        if key not in exported:  # one export per draft and weight type; n_max, p_min are flags
            exported[key] = check.export_for_serving(resolve_draft_dir(path), out / f"{len(exported)}-{dtype}-gguf",
                                                     target, dtype)
        manifest, server_args = exported[key]
        configs[name] = [*server_args[:2], *check.spec_args(manifest, options.get("n_max"), options.get("p_min"))]
        if options.get("with"):
            configs[name] = behind_peer(configs[name], options["with"], name)
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
        cost = tune.batch_cost(target_gguf)
        result["batch_cost"] = cost
        step = cost["decode_step_ms"]
        print(f"plain decode step {step:.1f} ms; verifying n tokens in one batch costs (plain steps): "
              + ", ".join(f"n={n}: {ms / step:.2f}" for n, ms in cost["batch_ms"].items() if ms), flush=True)
    for name, extra in configs.items():
        print(f"serving {name}: {' '.join(extra)}", flush=True)
    print(f"every prompt goes to plain and to each of {len(configs)} servers in turn (interleaved)", flush=True)
    runs = check.serve_many({"plain": (target_gguf, []), **{n: (target_gguf, e) for n, e in configs.items()}},
                            prompts, args.max_new_tokens, 4096)
    plain = runs.pop("plain")
    result["table"] = summarize(runs, plain, {name for name, _, _ in drafts})
    result["runs"] = {"plain": plain, **runs}
    print_table(result["table"])
    atomic_write_json(out / "served_bench.json", json_safe(result))
    print(f"wrote {out / 'served_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
