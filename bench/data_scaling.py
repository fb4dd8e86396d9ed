"""How much data does a draft need? Held-out τ_sim against training data, at equal optimizer steps.

Every point trains the same recipe (default `smollm2-135m/dspark`) for the same number of steps on
another training set and is measured on the same held-out split: the regenerated answers' (the
target's own text, what serving sees), written once to OUT/heldout.jsonl and passed to every run
as `data.heldout`, so no held-out conversation reaches any training set (their ids are the same
ShareGPT conversations). Points, `--points` (comma-separated):

    regen:N   the first N regenerated answers (`--regen`, the target's own text)
    raw:N     the first N conversations of `--raw` (`data prepare --source sharegpt`: human text;
              every assistant turn, the labels taken from the target's p_t), N = all for every one
    mix:N:R   N regenerated answers plus raw conversations making share R of the set (`data.mix`
              ratio R in [0, 1): R / (1 - R) x N raw records)

Labels come from p_t for every point (`--loss`, default 0.9 L1 + 0.1 CE-argmax + 1 BCE: the
text's own tokens are never a label, so human text and the target's text are compared on equal
terms). Raw points use online features (no conversation is seen twice in short runs); the
features mode can be forced with `--set features.mode=...`. Writes OUT/data_scaling.json, prints
a markdown table, and plots OUT/tau_vs_data.png (held-out τ_sim and slot-0 greedy acceptance
against training conversations).

    .venv/bin/python bench/data_scaling.py --raw RAW.jsonl --out OUT \\
        --points regen:1400,raw:1400,raw:5000,raw:all --steps 300
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REGEN = "../shared/data/sharegpt-smollm2-regen.jsonl"
LOSS = ["loss.weights.l1=0.9", "loss.weights.ce_argmax=0.1", "loss.weights.bce=1.0"]


def heldout_file(regen: str, fraction: float, out: Path) -> Path:
    """The regenerated records a run with `data.heldout_fraction = fraction` holds out."""
    from draftsmith.data.sources import is_heldout

    path = out / "heldout.jsonl"
    with open(regen, encoding="utf-8") as f, open(path, "w", encoding="utf-8") as w:
        for line in f:
            if line.strip() and is_heldout(str(json.loads(line)["id"]), fraction):
                w.write(line)
    return path


def point_runs(spec: str, regen: str, raw: str | None) -> tuple[str, list[str]]:
    """A point's --data and recipe overrides."""
    kind, *args = spec.split(":")
    limit = [] if args and args[0] == "all" else [f"data.limit={int(args[0])}"] if args else []
    limit.append("features.top_k=null")  # exact p_t for every point (online features have no top-k)
    if kind == "regen":
        return regen, limit + ["features.mode=cache"]
    if raw is None:
        raise SystemExit(f"point {spec!r} needs --raw (a `data prepare --source sharegpt` JSONL)")
    if kind == "raw":
        return raw, limit + ["features.mode=online"]
    if kind == "mix":
        ratio = float(args[1])
        return regen, limit + ["features.mode=online", f"data.mix=[{{path: {raw}, ratio: {ratio}}}]"]
    raise SystemExit(f"point {spec!r}: expected regen:N, raw:N|all or mix:N:R")


def run_point(spec: str, args, held: Path, out: Path) -> dict:
    from draftsmith.drafters import train
    from draftsmith.train.metrics import read_metrics
    from draftsmith.train.recipe import load_recipe

    data, sets = point_runs(spec, args.regen, args.raw)
    sets = [f"data.heldout={held}", f"data.max_length={args.max_length}", "data.max_heldout=24",
            f"train.max_steps={args.steps}", f"train.eval_every={args.eval_every}",
            "train.checkpoint_every=100000", "train.time_budget_min=100000", *sets, *args.loss, *args.set]
    run = out / spec.replace(":", "_")
    t0 = time.time()
    train(load_recipe(args.recipe, sets), data, run, resume=False, progress=False)
    evals = [m for m in read_metrics(run) if "eval/tau_sim" in m]
    last = evals[-1]
    record = json.loads((run / "data.json").read_text())
    return {"point": spec, "steps": args.steps, "seconds": round(time.time() - t0),
            "train_sequences": record["train_records"], "heldout": record["heldout_records"],
            "tau_sim": last["eval/tau_sim"],
            "tau_greedy": last["eval/tau_greedy"], "c_star": last["eval/c_star"],
            "slot0_greedy": (last.get("eval/greedy_survival") or [float("nan")])[0],
            "curve": [(m["step"], m["eval/tau_sim"]) for m in evals]}


def plot(rows: list[dict], path: Path) -> None:
    from draftsmith.utils.plots import pyplot, save

    fig, ax = pyplot().subplots(figsize=(7, 4))
    for kind, marker in (("regen", "o"), ("raw", "s"), ("mix", "^")):
        pts = [r for r in rows if r["point"].startswith(kind) and r["train_sequences"]]
        if pts:
            ax.plot([r["train_sequences"] for r in pts], [r["tau_sim"] for r in pts], marker=marker,
                    label=f"{kind}: held-out τ_sim")
            ax.plot([r["train_sequences"] for r in pts], [1 + r["slot0_greedy"] for r in pts], marker=marker,
                    linestyle=":", label=f"{kind}: 1 + slot-0 greedy acceptance")
    ax.set_xscale("log")
    ax.set_xlabel("training sequences (log)")
    ax.set_ylabel("held-out (regenerated split)")
    ax.set_title(f"{rows[0]['steps']} optimizer steps per point")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regen", default=REGEN, help="regenerated answers (the held-out split comes from them)")
    p.add_argument("--raw", default=None, help="raw conversations JSONL (data prepare --source sharegpt)")
    p.add_argument("--points", default="regen:1400,raw:1400,raw:all")
    p.add_argument("--recipe", default="smollm2-135m/dspark")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--heldout-fraction", type=float, default=0.03)
    p.add_argument("--loss", nargs="*", default=LOSS, help="recipe overrides of the loss (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], help="more recipe overrides")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    held = heldout_file(args.regen, args.heldout_fraction, out)
    rows = []
    for spec in args.points.split(","):
        rows.append(run_point(spec, args, held, out))
        (out / "data_scaling.json").write_text(json.dumps(rows, indent=1))
        print(f"{spec}: tau_sim {rows[-1]['tau_sim']:.3f}, slot-0 greedy {rows[-1]['slot0_greedy']:.3f} "
              f"({rows[-1]['seconds']} s)", flush=True)
    print("\n| point | training sequences | steps | held-out τ_sim | τ greedy | slot-0 greedy | c* per slot | s |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['point']} | {r['train_sequences']} | {r['steps']} | {r['tau_sim']:.3f} | {r['tau_greedy']:.3f} | "
              f"{r['slot0_greedy']:.3f} | {', '.join(f'{c:.3f}' for c in r['c_star'])} | {r['seconds']} |")
    plot(rows, out / "tau_vs_data.png")


if __name__ == "__main__":
    main()
