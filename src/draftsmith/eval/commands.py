"""`draftsmith eval`: lossless speculative decoding benchmarks of drafts against plain decoding.

    draftsmith eval --draft dspark=RUN/step_latest --baselines ngram --target smollm2-135m \
        --datasets gsm8k,mt-bench,humaneval --eval-dir ../shared/eval --max-samples 10 \
        --max-new-tokens 256 --temperature 0 --out DIR

Writes DIR/metrics.json (`{"config", "drafts": {NAME: {"overall", "datasets": {DATASET}}},
"wall_s"}`; plain decoding and the baselines are entries of `drafts` too), DIR/answers.jsonl
(every answer of every decoder) and DIR/report.md with its PNG plots. See `eval.metrics` for the
definitions and `eval.runner` for how decoders share the target and the prompts.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from draftsmith.eval.datasets import (
    EvalDataset, load_dataset, render_prompt, split_list, stop_token_ids,
)
from draftsmith.eval.metrics import build_metrics, json_safe
from draftsmith.eval.report import comparison_lines, comparison_table, write_report
from draftsmith.eval.runner import (
    BASELINES, Benchmark, Settings, build_decoders, count_calls, parse_truncate, run_benchmark, warm_up,
)
from draftsmith.decoding import SamplingConfig
from draftsmith.decoding.proposers import check_n_max
from draftsmith.targets.model import load_target_model, load_tokenizer
from draftsmith.utils.dtypes import resolve as resolve_dtype
from draftsmith.utils.io import InputError, atomic_write_json, atomic_write_text, check_output_dir

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}


def add_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `draftsmith eval`."""
    p.add_argument("--target", default="smollm2-135m", help="alias, .gguf file, HF dir or hub id")
    p.add_argument("--draft", action="append", default=[], metavar="NAME=PATH",
                   help="a draft dir (e.g. RUN/step_latest) under a name; repeatable")
    p.add_argument("--baselines", default="", help=f"comma-separated: {', '.join(BASELINES)} "
                                                    "(plain decoding of the target always runs)")
    p.add_argument("--datasets", required=True,
                   help="comma-separated names (resolved in --eval-dir, then $DRAFTSMITH_EVAL_DIR) "
                        "and/or JSONL paths with one {\"turns\": [...]} per line")
    p.add_argument("--eval-dir", default=None, help="directory holding NAME.jsonl eval sets")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="per answer (per turn) (default: %(default)s)")
    p.add_argument("--max-samples", type=int, default=None, help="first N records per dataset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1,
                   help="prompts decoded together (default: %(default)s)")
    p.add_argument("--num-draft-tokens", type=int, default=7,
                   help="draft length of the n-gram baseline and EAGLE-3 drafts (DSpark/DFlash "
                        "draft their block size)")
    p.add_argument("--n-max", type=int, default=None, metavar="N",
                   help="llama.cpp's --spec-draft-n-max: at most N draft tokens per round. DSpark/DFlash "
                        "drafts run llama.cpp's shorter block (N slots; N + 1 for z-lab slots, slot 0 "
                        "dropped), which changes every slot's prediction; EAGLE-3 and n-gram draft "
                        "min(--num-draft-tokens, N) (default: off, the full block)")
    p.add_argument("--truncate", default="none",
                   help="proposal truncation for drafts with a confidence head: none, p-min=P "
                        "(llama.cpp's raw per-step rule) or survival=THRESHOLD (calibrated "
                        "cumulative survival; needs `draftsmith calibrate` first); lossless either way")
    p.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                   help="target and draft dtype; auto: bf16 where the hardware runs it natively "
                        "(CUDA, a CPU with AMX or AVX512-BF16), else fp32; fp64: bitwise-lossless "
                        "checks on tiny targets (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the target's forward (CUDA only; a logged no-op on CPU)")
    p.add_argument("--static-kv", action="store_true",
                   help="the target's KV cache in fixed-capacity buffers written in place (one key shape "
                        "per forward; pairs with --compile on CUDA; same tokens)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_drafts(items: list[str]) -> dict[str, str]:
    """["NAME=PATH", ...] -> {NAME: PATH} (names unique)."""
    drafts: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise InputError(f"--draft {item!r}: expected NAME=PATH (e.g. dspark=RUN/step_latest)")
        if name in drafts:
            raise InputError(f"--draft {name}=...: given twice")
        if not Path(path).is_dir():
            raise InputError(f"--draft {item!r}: {path} is not a directory (a draft dir holds "
                             "config.json + model.safetensors)")
        drafts[name] = path
    return drafts


def sampling_config(args) -> SamplingConfig:
    """--temperature / --top-k / --top-p (and --max-new-tokens >= 1), validated."""
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    try:
        return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    except ValueError as e:
        raise InputError(f"sampling options: {e}") from None


def check_baselines(names: list[str]) -> list[str]:
    unknown = [b for b in names if b not in BASELINES]
    if unknown:
        raise InputError(f"--baselines: unknown baseline {unknown[0]!r}; known baselines: {', '.join(BASELINES)}")
    return names


def check_sampling_args(args) -> SamplingConfig:
    """Every decoding flag (--truncate's syntax included), checked without a model."""
    parse_truncate(args.truncate)
    check_n_max(args.n_max)  # the draft's own limit is checked once it loads
    for flag, value in (("--batch-size", args.batch_size), ("--num-draft-tokens", args.num_draft_tokens)):
        if value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    return sampling_config(args)


def sampling_settings(args, stop_ids: list[int], pad_id: int) -> Settings:
    """Settings from the flags, validated (`check_sampling_args`)."""
    return Settings(args.max_new_tokens, check_sampling_args(args), stop_ids, pad_id, args.seed,
                    args.batch_size, args.num_draft_tokens, args.truncate, args.compile,
                    args.static_kv, n_max=args.n_max)


def load_datasets(args) -> list[EvalDataset]:
    """The --datasets of a command (names or JSONL paths, --eval-dir, --max-samples), validated,
    with their rejected records logged."""
    if args.max_samples is not None and args.max_samples < 1:
        raise InputError(f"--max-samples must be >= 1, got {args.max_samples}")
    specs = split_list(args.datasets)
    if not specs:
        raise InputError("--datasets: no dataset given")
    datasets = [load_dataset(s, args.eval_dir, args.max_samples) for s in specs]
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise InputError(f"--datasets: two entries resolve to the same name ({', '.join(names)})")
    for d in datasets:
        log.info("dataset %s: %d records (%d turns) from %s; %d rejected", d.name, len(d.records),
                 d.num_turns, d.path, len(d.rejected))
        for reason in d.rejected[:5]:
            log.warning("rejected: %s", reason)
    return datasets


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="eval (generate calls)", unit="call", disable=not enabled)


def _run_info(args, datasets, decoders, settings: Settings, compute) -> dict:
    return {
        "target": args.target, "dtype": compute.name, "dtype_reason": compute.reason,
        "device": str(_device(args.device)),
        "threads": torch.get_num_threads(), "temperature": args.temperature, "top_k": args.top_k,
        "top_p": args.top_p, "max_new_tokens": args.max_new_tokens, "max_samples": args.max_samples,
        "seed": args.seed, "batch_size": args.batch_size, "num_draft_tokens": args.num_draft_tokens,
        "truncate": settings.truncate, "n_max": settings.n_max,
        "stop_token_ids": settings.stop_ids,
        "datasets": {d.name: {"path": str(d.path), "records": len(d.records), "turns": d.num_turns,
                              "rejected": len(d.rejected)} for d in datasets},
        "decoders": {d.name: d.describe() for d in decoders},
        "timing": "tokens_per_s = generated tokens / (prefill + decode) wall time; "
                  "decode_tokens_per_s leaves the prefill (and its first token) out",
    }


def _write_outputs(out: Path, metrics: dict, bench: Benchmark) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics)
    lines = [json.dumps(asdict(a), ensure_ascii=False) for a in bench.answers]
    atomic_write_text(out / "answers.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    return write_report(metrics, out)


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")
    start = time.perf_counter()
    drafts = parse_drafts(args.draft)
    baselines = check_baselines(split_list(args.baselines))
    datasets = load_datasets(args)
    check_sampling_args(args)  # before the target loads
    if args.threads:
        torch.set_num_threads(args.threads)
    compute = resolve_dtype(args.dtype, _device(args.device))
    log.info("target and drafts compute in %s (%s)", compute.name, compute.reason)
    hf_model, source = load_target_model(args.target, compute.torch)
    hf_model.to(_device(args.device))
    tokenizer = load_tokenizer(source)
    stop_ids = stop_token_ids(tokenizer, hf_model.config, getattr(hf_model, "generation_config", None))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    settings = sampling_settings(args, stop_ids, pad_id)
    decoders = build_decoders(hf_model, drafts, baselines, settings, source)
    if len(decoders) == 1:
        log.warning("no --draft and no --baselines: measuring plain decoding only")
    warm_up(decoders, render_prompt(tokenizer, datasets[0].records[0][:1], []))
    with _progress_bar(count_calls(decoders, datasets, settings.batch_size), not args.no_progress) as bar:
        bench = run_benchmark(decoders, datasets, tokenizer, settings, progress=bar.update)
    metrics = build_metrics(bench.tallies, compare=settings.compare)
    metrics = json_safe({"config": _run_info(args, datasets, decoders, settings, compute),
                         "drafts": metrics["drafts"], "comparisons": metrics["comparisons"], "wall_s": time.perf_counter() - start})
    report = _write_outputs(Path(args.out), metrics, bench)
    print("\n".join(comparison_table(metrics) + comparison_lines(metrics)))
    print(f"wrote {Path(args.out) / 'metrics.json'} and {report}")
    return 0
