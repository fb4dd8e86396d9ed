"""`draftsmith calibrate`: fit the confidence head's Sequential Temperature Scaling on held-out
rounds and store it with the checkpoint.

    draftsmith calibrate --draft RUN/step_latest --target smollm2-135m --datasets mbpp \
        --eval-dir ../shared/eval --max-samples 20 --temperature 0 --out DIR

Decodes the prompts with the draft and no truncation (every drafted slot verified), collects the
per-round confidences and acceptances, fits STS at `--temperature` (`eval.calibration`), writes
DIR/calibration.json (metrics before/after, threshold sweeps), DIR/calibration.md with
reliability diagrams and the sweep plot, and DRAFT/calibration.json (unless `--no-write`), which
`draftsmith eval --truncate survival=THR` and the exporters read. Fit on prompts you do not
benchmark on (the default eval trio is gsm8k, mt-bench, humaneval; mbpp is held out).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from draftsmith.eval.calibration import (
    CalibrationSet, fit_sts, plot_reliability, plot_sweep, position_metrics, threshold_sweep,
)
from draftsmith.eval.commands import load_datasets, sampling_config
from draftsmith.eval.datasets import decode_answer, render_prompt, stop_token_ids
from draftsmith.eval.metrics import json_safe
from draftsmith.eval.report import fmt_num
from draftsmith.eval.runner import Settings, build_decoders
from draftsmith.models.calibration import Calibration, save_calibration
from draftsmith.models.io import read_draft_config
from draftsmith.targets.model import load_target_model, load_tokenizer
from draftsmith.utils.io import InputError, atomic_write_json, atomic_write_text, check_output_dir

log = logging.getLogger(__name__)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", required=True, help="a DSpark draft dir with a confidence head")
    p.add_argument("--target", default="smollm2-135m", help="alias, .gguf file, HF dir or hub id")
    p.add_argument("--datasets", default="mbpp", help="held-out prompt sets (names or JSONL paths)")
    p.add_argument("--eval-dir", default=None, help="directory holding NAME.jsonl eval sets")
    p.add_argument("--max-samples", type=int, default=20, help="first N records per dataset")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="the decoding temperature the calibration will be used at")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-write", action="store_true", help="do not write DRAFT/calibration.json")
    p.add_argument("--out", required=True, help="output directory for the report")
    p.add_argument("--no-progress", action="store_true")


def collect_rounds(decoder, datasets, tokenizer, max_new_tokens: int, seed: int, stop_ids, progress=None):
    """Every turn of every record decoded by `decoder` (its own answers form the history)."""
    rounds = []
    for ds in datasets:
        for i, record in enumerate(ds.records):
            history: list[str] = []
            for turn in range(len(record)):
                prompt = render_prompt(tokenizer, record, history)
                gen = decoder.engine.generate([prompt], max_new_tokens, seed + 1000 * i + turn)
                rounds += gen.rounds
                history.append(decode_answer(tokenizer, gen.outputs[0], stop_ids))
                if progress is not None:
                    progress(1)
    return rounds


def calibration_report(data: CalibrationSet, temps: list[float], temperature: float) -> dict:
    return {"decoding_temperature": temperature, "rounds": data.rounds, "positions": data.positions,
            "sts_temperatures": temps, "before": position_metrics(data), "after": position_metrics(data, temps),
            "sweep": threshold_sweep(data, temps),
            "sweep_note": "offline: recorded rounds truncated after the fact; exact under greedy "
                          "verification, an estimate at T > 0"}


def render_markdown(report: dict, plots: dict[str, str], draft: str) -> str:
    lines = [f"# Confidence calibration of `{draft}`", "",
             f"{report['rounds']} held-out row-rounds at decoding temperature "
             f"{report['decoding_temperature']:g}; Sequential Temperature Scaling temperatures: "
             + ", ".join(f"{t:.3g}" for t in report["sts_temperatures"]), "",
             "| position | rounds | observed survival | predicted (raw) | ECE raw | ECE STS | "
             "Brier raw | Brier STS | AUROC |", "|---|---|---|---|---|---|---|---|---|"]
    for b, a in zip(report["before"], report["after"]):
        lines.append(f"| {b['position']} | {b['rounds']} | {fmt_num(b['observed'])} | {fmt_num(b['predicted'])} | "
                     f"{fmt_num(b['ece'], '{:.3f}')} | {fmt_num(a['ece'], '{:.3f}')} | {fmt_num(b['brier'], '{:.3f}')} | "
                     f"{fmt_num(a['brier'], '{:.3f}')} | {fmt_num(b['auroc'], '{:.3f}')} |")
    lines += ["", f"![reliability]({plots['reliability']})", "",
              "## Threshold sweep (offline)", "", report["sweep_note"] + ".", "",
              "| threshold | τ survival rule | draft tokens/round | τ p-min rule | draft tokens/round |",
              "|---|---|---|---|---|"]
    for s, p in zip(report["sweep"]["survival"], report["sweep"]["p_min"]):
        lines.append(f"| {s['threshold']:.2f} | {fmt_num(s['tau'])} | {fmt_num(s['draft_tokens_per_round'])} | "
                     f"{fmt_num(p['tau'])} | {fmt_num(p['draft_tokens_per_round'])} |")
    lines += ["", f"![sweep]({plots['sweep']})", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    check_output_dir(args.out, "--out")
    if not Path(args.draft).is_dir():
        raise InputError(f"--draft {args.draft}: not a directory")
    cfg = read_draft_config(args.draft)  # before the target loads
    if not getattr(cfg, "enable_confidence_head", False):
        raise InputError(f"--draft {args.draft}: calibration needs a DSpark draft with a confidence "
                         f"head (this is a {cfg.drafter} draft without one)")
    datasets = load_datasets(args)
    sampling_config(args)
    hf_model, source = load_target_model(args.target, torch.float32)
    tokenizer = load_tokenizer(source)
    stop_ids = stop_token_ids(tokenizer, hf_model.config, getattr(hf_model, "generation_config", None))
    settings = Settings(args.max_new_tokens, sampling_config(args), stop_ids, stop_ids[0], args.seed)
    decoder = build_decoders(hf_model, {"draft": args.draft}, [], settings, source)[-1]
    if getattr(decoder.engine.proposer.model, "confidence_head", None) is None:
        raise InputError(f"--draft {args.draft}: calibration needs a DSpark draft with a confidence "
                         f"head (this is a {decoder.kind} draft without one)")
    from tqdm import tqdm

    total = sum(d.num_turns for d in datasets)
    with tqdm(total=total, desc="calibrate (turns)", disable=args.no_progress) as bar:
        rounds = collect_rounds(decoder, datasets, tokenizer, args.max_new_tokens, args.seed,
                                stop_ids, bar.update)
    data = CalibrationSet.from_rounds(rounds)
    if data.rounds == 0:
        raise InputError("no round drafted anything: nothing to calibrate on")
    temps = fit_sts(data)
    report = calibration_report(data, temps, args.temperature)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plots = {"reliability": "reliability.png", "sweep": "threshold_sweep.png"}
    plot_reliability(data, temps, out / plots["reliability"])
    plot_sweep(report["sweep"], out / plots["sweep"])
    atomic_write_json(out / "calibration.json", json_safe(report))
    atomic_write_text(out / "calibration.md", render_markdown(report, plots, args.draft))
    if not args.no_write:
        cal = Calibration(args.temperature, temps, data.rounds,
                          json_safe({"before": report["before"], "after": report["after"]}),
                          {"datasets": [d.name for d in datasets], "target": args.target,
                           "max_samples": args.max_samples, "max_new_tokens": args.max_new_tokens,
                           "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed})
        log.info("wrote %s", save_calibration(args.draft, cal))
    for b, a in zip(report["before"], report["after"]):
        print(f"position {b['position']}: observed {fmt_num(b['observed'])}  ECE {fmt_num(b['ece'], '{:.3f}')} -> "
              f"{fmt_num(a['ece'], '{:.3f}')}  AUROC {fmt_num(b['auroc'], '{:.3f}')}")
    print(f"STS temperatures: {', '.join(f'{t:.3g}' for t in temps)}; wrote {out / 'calibration.md'}")
    return 0
