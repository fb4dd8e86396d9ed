"""Training throughput and peak memory of the three drafters, and the feature cache's bytes/token
against DeepSpec's layout — side by side, in one run.

    .venv/bin/python bench/train_bench.py [--steps 6] [--limit 64] [--target smollm2-135m] [--threads N]
        [--drafters dspark,eagle3] [--top-k K]

Each drafter trains its shipped recipe (`smollm2-135m/{dspark,dflash,eagle3}`) for a few steps in
its own process (so peak memory is its own): features come from the recipe's cache (built on the
first run, reused after), built and fed by the loop's own `build_trainer` / `Prefetcher`, the
first step is a warm-up, and the table reports anchor-blocks/s
(supervised blocks of γ slots; Eagle3: TTT chains), supervised slots/s, and peak RSS (CPU) or
peak allocated memory (GPU). Numbers are this machine's, now: run it again before comparing.
`--top-k K` runs every drafter twice, interleaved, from the exact cache and from a top-K cache
(`features.top_k`: p_t read from the stored top K instead of the full-vocabulary head each step);
without it each drafter runs its recipe's own setting (smollm2 dspark/dflash: top-32).
`--variant "NAME=k=v;k=v"` (repeatable; recipe_ab.py's syntax) runs each drafter once more per
variant with those recipe overrides (e.g. `a24=model.num_anchors=24;train.micro_batch=8`), right
after the recipe as shipped, so a cheaper step is priced side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time

from recipe_ab import parse_variant  # bench/ is on sys.path when a bench script runs

from draftsmith.drafters import REGISTRY


def child(drafter: str, target: str, data: str, steps: int, limit: int, threads: int | None = None,
          prefetch: str = "auto", top_k: int | None = None, overrides: list[str] | None = None) -> dict:
    """`steps` optimizer steps after a warm-up, built by the loop's own `build_trainer` and fed
    as the loop feeds them (on GPUs the next step's batches are made on the prefetch thread)."""
    import torch

    from draftsmith.drafters import objective_for
    from draftsmith.train import loop
    from draftsmith.train.parallel import init_distributed
    from draftsmith.train.prefetch import Prefetcher
    from draftsmith.train.recipe import load_recipe
    from draftsmith.train.setup import build_setup

    sets = [f"data.limit={limit}"] + ([f"train.threads={threads}"] if threads else [])
    # top_k None: the recipe's own p_t source; 0: the exact p_t; K: a top-K cache
    sets += [f"features.top_k={top_k or 'null'}"] if top_k is not None else []
    recipe = load_recipe(f"{target}/{drafter}", sets + list(overrides or []))
    info = init_distributed()
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    s = build_setup(recipe, data, info, progress=False)
    trainer = loop.build_trainer(recipe, s, info, objective_for(drafter), steps + 1,
                                 prefetch=None if prefetch == "auto" else prefetch == "on")
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    counts = []
    with Prefetcher(trainer.batches, range(steps + 1)) if trainer.prefetch else contextlib.nullcontext() as feed:
        get = feed.get if trainer.prefetch else trainer.batches
        trainer.train_step(0, get(0))  # warm-up
        tic = time.perf_counter()
        for step in range(1, steps + 1):
            counts.append(trainer.train_step(step, get(step)).counts)
        slots, blocks = torch.stack(counts).sum(0).tolist()  # the one host sync
        elapsed = time.perf_counter() - tic
    peak = (torch.cuda.max_memory_allocated() if info.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    trainable = sum(p.numel() for p in trainer.params)
    return {"drafter": drafter, "top_k": recipe.features.top_k, "prefetch": trainer.prefetch, "blocks_per_s": blocks / elapsed, "slots_per_s": slots / elapsed,
            "s_per_step": elapsed / steps, "peak_bytes": peak, "device": info.device.type,
            "trainable_params": trainable, "block_size": s.model.config.block_size
            if hasattr(s.model.config, "block_size") else s.model.config.ttt_length}


def cache_rows(target: str, data: str, limit: int) -> list[dict]:
    from draftsmith.features.commands import load_samples
    from draftsmith.features.estimate import estimate
    from draftsmith.targets.model import load_tokenizer
    from draftsmith.train.recipe import load_recipe
    from transformers import AutoConfig

    from draftsmith.targets.model import materialized_dir
    from draftsmith.targets.resolve import resolve_target

    recipe = load_recipe(f"{target}/dspark")
    tok = load_tokenizer(recipe.target)
    samples = load_samples(data, tok, recipe.data.max_length, limit, progress=False).samples
    source = resolve_target(recipe.target)
    cfg = AutoConfig.from_pretrained(materialized_dir(source) if source.kind == "gguf" else source.path)
    rows = []
    for dtype in ("bf16", "fp8-e4m3"):
        est = estimate(samples, hidden_size=cfg.hidden_size, layer_ids=recipe.model["target_layer_ids"],
                       vocab_size=cfg.vocab_size, dtype=dtype)
        rows.append({"dtype": dtype, "ours": est.bytes_per_token, "deepspec": est.deepspec_bytes_per_token})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--data", default="../shared/data/sharegpt-smollm2-regen.jsonl")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--limit", type=int, default=64, help="training records (the cache covers them)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the recipe's train.threads)")
    p.add_argument("--prefetch", choices=["auto", "on", "off"], default="auto",
                   help="make the next step's batches on the prefetch thread or inline (auto: as the "
                        "loop does, on GPUs only)")
    p.add_argument("--drafters", default=",".join(REGISTRY), help="comma-separated (default: all)")
    p.add_argument("--top-k", type=int, default=None, help="run each drafter from the exact p_t and from a top-K cache (0: exact only)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=K=V;K=V",
                   help="also run each drafter with these recipe overrides (repeatable)")
    p.add_argument("--child", choices=list(REGISTRY), help=argparse.SUPPRESS)
    p.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        row = child(a.child, a.target, a.data, a.steps, a.limit, a.threads, a.prefetch, a.top_k,
                    json.loads(a.overrides))
        print("RESULT " + json.dumps(row), flush=True)
        return 0
    unknown = sorted(set(a.drafters.split(",")) - set(REGISTRY))
    if unknown:
        p.error(f"--drafters {','.join(unknown)}: not a drafter; known: {', '.join(REGISTRY)}")
    variants = [("recipe", [])] + [parse_variant(v) for v in a.variant]
    results = []
    for d in a.drafters.split(","):
        for k in [0, a.top_k] if a.top_k else [None]:
            for name, overrides in variants:
                out = subprocess.run([sys.executable, __file__, "--child", d, "--target", a.target, "--data", a.data,
                                      "--steps", str(a.steps), "--limit", str(a.limit), "--prefetch", a.prefetch,
                                      "--overrides", json.dumps(overrides)]
                                     + (["--threads", str(a.threads)] if a.threads else [])
                                     + (["--top-k", str(k)] if k is not None else []),
                                     capture_output=True, text=True, check=False)
                line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                if out.returncode or not line:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                results.append({**json.loads(line[0][7:]), "variant": name})
    print(f"\ntraining throughput ({a.target}, shipped recipes, {a.steps} steps after a warm-up)")
    print(f"{'drafter':8} {'variant':10} {'p_t':>6} {'γ':>3} {'blocks/s':>9} {'slots/s':>9} {'s/step':>7} "
          f"{'peak MiB':>9} {'trainable':>10}")
    for r in results:
        pt = f"top{r['top_k']}" if r.get("top_k") else "exact"
        print(f"{r['drafter']:8} {r['variant']:10} {pt:>6} {r['block_size']:>3} {r['blocks_per_s']:>9.1f} "
              f"{r['slots_per_s']:>9.1f} {r['s_per_step']:>7.2f} {r['peak_bytes'] / 2**20:>9.0f} "
              f"{r['trainable_params'] / 1e6:>9.2f}M")
    for v, _ in variants[1:]:
        for d in a.drafters.split(","):
            base = [r for r in results if r["drafter"] == d and r["variant"] == "recipe"]
            mine = [r for r in results if r["drafter"] == d and r["variant"] == v]
            for b, m in zip(base, mine):
                print(f"{d} {v}: {m['s_per_step'] / b['s_per_step']:.2f}x the recipe's s/step")
    print(f"\nfeature cache bytes/token ({a.target}, {a.limit} records, DSpark layers)")
    print(f"{'dtype':9} {'draftsmith':>11} {'DeepSpec':>9} {'ratio':>6}")
    for r in cache_rows(a.target, a.data, a.limit):
        print(f"{r['dtype']:9} {r['ours']:>11.1f} {r['deepspec']:>9.1f} {r['ours'] / r['deepspec']:>6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
