"""Recipe A/B: held-out τ_sim of one recipe under named override sets, at equal optimizer steps.

Every variant trains the same recipe (default `smollm2-135m/dspark`) on the same `--data` for the
same number of steps (`--steps`; the learning-rate schedule is the recipe's, stretched to them) and
is measured on the same held-out split (the recipe's, taken from `--data`). The first variant is
the baseline every other one is compared with. A variant is `NAME=KEY=VALUE[;KEY=VALUE...]`
(recipe `--set` overrides; `NAME=` alone runs the recipe as shipped; `--reuse` reads a variant
already trained in OUT/NAME). Feature caches are shared
between variants with the same data and target settings, so only the first run builds one.

Writes OUT/recipe_ab.json, prints a markdown table (held-out τ_sim and τ greedy at the last step,
the change against the baseline, c* per slot, wall seconds) and plots OUT/recipe_ab.png (the
held-out τ_sim curve of every variant).

    .venv/bin/python bench/recipe_ab.py --out OUT --steps 300 \\
        --variant base= --variant layers="init.layers=target;init.final_norm=target"
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REGEN = "../shared/data/sharegpt-smollm2-regen.jsonl"


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'NAME=k=v;k=v' -> (NAME, ['k=v', 'k=v'])."""
    name, sep, sets = text.partition("=")
    if not sep or not name.strip():
        raise SystemExit(f"--variant {text!r}: expected NAME=KEY=VALUE[;KEY=VALUE...] or NAME=")
    return name.strip(), [s.strip() for s in sets.split(";") if s.strip()]


def run_variant(name: str, sets: list[str], args, out: Path) -> dict:
    from draftsmith.drafters import train
    from draftsmith.train.metrics import read_metrics
    from draftsmith.train.recipe import load_recipe

    fixed = [f"train.max_steps={args.steps}", f"train.eval_every={args.eval_every}",
             "train.checkpoint_every=100000", "train.time_budget_min=100000"]
    run = out / name
    t0 = time.time()
    done = run.exists() and any(m.get("step") == args.steps and "eval/tau_sim" in m for m in read_metrics(run))
    if not (args.reuse and done):
        train(load_recipe(args.recipe, fixed + sets), args.data, run, resume=False, progress=False)
    evals = [m for m in read_metrics(run) if "eval/tau_sim" in m]
    if not evals:
        raise SystemExit(f"variant {name}: no held-out evaluation in {run}/metrics.jsonl")
    last = evals[-1]
    seconds = None if args.reuse and done else round(time.time() - t0)
    return {"variant": name, "sets": sets, "steps": args.steps, "seconds": seconds,
            "tau_sim": last["eval/tau_sim"], "tau_greedy": last["eval/tau_greedy"],
            "c_star": last["eval/c_star"], "curve": [(m["step"], m["eval/tau_sim"]) for m in evals]}


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| variant | overrides | held-out τ_sim | Δ vs " + base["variant"] + " | τ greedy | c* per slot | s |",
             "|---|---|---:|---:|---:|---|---:|"]
    for r in rows:
        sets = "; ".join(f"`{s}`" for s in r["sets"]) or "(recipe)"
        lines.append(f"| {r['variant']} | {sets} | {r['tau_sim']:.3f} | {r['tau_sim'] - base['tau_sim']:+.3f} | "
                     f"{r['tau_greedy']:.3f} | {', '.join(f'{c:.3f}' for c in r['c_star'])} | {r['seconds'] or 'reused'} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    from draftsmith.utils.plots import pyplot, save

    fig, ax = pyplot().subplots(figsize=(7, 4))
    for r in rows:
        steps, taus = zip(*r["curve"])
        ax.plot(steps, taus, marker="o", label=r["variant"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out τ_sim")
    ax.set_title(f"recipe A/B, {rows[0]['steps']} steps per variant")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="smollm2-135m/dspark")
    p.add_argument("--data", default=REGEN)
    p.add_argument("--variant", action="append", required=True,
                   help="NAME=KEY=VALUE[;KEY=VALUE...]; the first is the baseline")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--reuse", action="store_true",
                   help="read a variant whose OUT/NAME already holds its last held-out eval instead of retraining it")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"--variant names must differ: {names}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, sets in variants:
        rows.append(run_variant(name, sets, args, out))
        (out / "recipe_ab.json").write_text(json.dumps(rows, indent=1))
        print(f"{name}: tau_sim {rows[-1]['tau_sim']:.3f} ({rows[-1]['seconds'] or 'reused'} s)", flush=True)
    print("\n" + table(rows))
    plot(rows, out / "recipe_ab.png")


if __name__ == "__main__":
    main()
