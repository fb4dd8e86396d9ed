"""How good must a draft be before it pays for itself in llama-server on this machine?

    .venv/bin/python bench/served_ceiling.py [--dataset gsm8k] [--eval-dir ../shared/eval] [--n 20] \
        [--minutes 12] [--out /tmp/served-ceiling]

A draft trained on the benchmark's own answers is the ceiling of what a draft can do there: it
proposes what the served target will say. This script builds that draft and measures it served,
next to plain decoding, so the break-even τ of `bench/served.py` can be read against a τ close
to the block's maximum (γ + 1):

1. the first `--n` prompts of `--dataset` (first turns) are answered by the served target itself
   (`draftsmith data regenerate --engine llama-cpp`, T = 0, 256 tokens): llama.cpp's own greedy
   answers, not the offline engine's (the shipped GGUF's quantized arithmetic diverges from the
   fp32 offline target within a few dozen tokens);
2. a DSpark draft with the `smollm2-135m/dspark` recipe's architecture is trained on exactly those
   answers (held-out = the same file: memorization is the point) for `--minutes`;
3. `bench/served.py` serves it and plain decoding on the same prompts and prints τ, the speed
   ratio and the measured break-even τ.

The result is a measurement of the serving path, not of a draft anyone would ship: it says what
τ the trained drafts would need on this CPU, and that the draft path itself can run faster than
plain decoding when the draft is right. Nothing else CPU-heavy should run beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def first_turns(dataset: str, eval_dir: str, n: int, dest: Path) -> None:
    """The dataset's first `n` usable records (eval's own loader: the same records `bench/served.py`
    serves with `--max-samples n`), first turns only, as conversations with ids (regenerate's input)."""
    from draftsmith.eval.datasets import load_dataset

    data = load_dataset(dataset, eval_dir, n)
    rows = [{"id": f"{data.name}_{i}", "conversations": [{"role": "user", "content": turns[0]}]}
            for i, turns in enumerate(data.records)]
    dest.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="gsm8k")
    p.add_argument("--eval-dir", default="../shared/eval")
    p.add_argument("--n", type=int, default=20, help="prompts (first records of the dataset)")
    p.add_argument("--minutes", type=float, default=12.0, help="training budget of the memorizing draft")
    p.add_argument("--out", default="/tmp/served-ceiling")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cli = str(Path(sys.executable).with_name("draftsmith"))
    prompts, answers, run_dir = out / "prompts.jsonl", out / "answers.jsonl", out / "run"
    first_turns(args.dataset, args.eval_dir, args.n, prompts)
    run([cli, "data", "regenerate", "--in", str(prompts), "--out", str(answers), "--engine", "llama-cpp",
         "--target", "smollm2-135m", "--temperature", "0", "--max-tokens", "256", "--no-progress"])
    run([cli, "train", "--recipe", "smollm2-135m/dspark", "--data", str(answers), "--heldout", str(answers),
         "--out", str(run_dir), "--set", "model.num_anchors=128", "--set", "train.epochs=100",
         "--set", f"train.time_budget_min={args.minutes}", "--set", "optim.lr=3e-3",
         "--set", "train.eval_every=30", "--set", "train.checkpoint_every=60"])
    run([sys.executable, str(HERE / "served.py"), "--draft", f"memorized={run_dir}/step_latest",
         "--datasets", args.dataset, "--eval-dir", args.eval_dir, "--max-samples", str(args.n),
         "--peers", "", "--out", str(out / "served")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
