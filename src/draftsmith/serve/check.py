"""`draftsmith serve-check`: prove that what the draft measured offline holds in llama.cpp, and
say whether it pays there.

    draftsmith serve-check --draft RUN/step_latest --target smollm2-135m --datasets gsm8k \
        --eval-dir ../shared/eval --max-samples 20 --out DIR

1. Check every flag against the draft before anything is converted or served: `--p-min` needs a
   confidence head, `--n-max` at most the tokens the draft proposes per round, the target must
   have the draft's geometry (`export`'s check), the draft weight type one llama.cpp converts.
2. Choose the serve settings (`serve.tune`), unless all three are given as flags: draft weight
   type, `--spec-draft-n-max`, `--spec-draft-p-min`, by expected tokens per round over measured
   round cost — the target file's cost curve, each candidate weight type's fixed cost per round
   from a short served probe, and held-out rounds of draftsmith's engine at every n_max (on
   `--tune-datasets`, default mbpp, not the benchmark). Stored as DRAFT/serve_tuning.json and
   reused for the same target file, CPU and llama.cpp (`--retune` measures again); flags override.
3. Export the draft to GGUF with those settings (written into its manifest); render every prompt
   (first turn of each record) with the target's chat template and send the TOKEN IDS to
   llama-server (`/v1/completions`, T = 0), so chat-template drift cannot hide.
4. Serve the pair (one slot), plain decoding on the served target file and on each
   `--plain-types` conversion (default q8_0) — the fastest plain file is the speedup's
   denominator (`plain_fastest`) — and `ngram-simple` / `ngram-mod` as untrained peers, one
   server each, interleaved: every prompt goes to each server in turn, so the machine's speed
   drifting during the run cannot favour one of them. Per request the `/metrics` counter deltas
   give accepted draft tokens and verification steps (llama.cpp's `mean len` = 1 + accepted /
   steps, DESIGN §3.4).
5. Decode the same prompt tokens offline with draftsmith's engine under the same rule (fp32,
   T = 0, the same n_max block and p_min) and count τ llama.cpp's way.
6. Write OUT/served.json (`speedup` = served tokens/s / `plain_fastest.tokens_per_s`, pooled
   over datasets, with the draft's break-even τ) and print a table. Exit 1, naming the likely
   causes, when |served τ − offline τ| > tolerance (10 %) × offline τ on any dataset.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from pathlib import Path

import torch

from draftsmith.engines import llama_cpp
from draftsmith.eval.commands import load_datasets
from draftsmith.eval.datasets import render_prompt, split_list, stop_token_ids
from draftsmith.eval.metrics import Tally, json_safe
from draftsmith.eval.runner import Settings, build_decoders
from draftsmith.export import export, resolve_draft_dir
from draftsmith.export import gguf as gguf_export
from draftsmith.export.manifest import check_target_matches, describe_target, find_recipe, read_manifest
from draftsmith.decoding import SamplingConfig
from draftsmith.models.io import read_draft_config
from draftsmith.serve import tune
from draftsmith.targets.model import load_target_model, load_tokenizer
from draftsmith.utils.io import InputError, atomic_write_json, check_output_dir
from draftsmith.utils.dtypes import cpu_name

log = logging.getLogger(__name__)
TUNING_FILE = gguf_export.TUNING_FILE  # in the draft dir: the measured choice, reused on this machine
QUANT_TAU_LOSS = 0.03  # a weight type whose probe τ falls more than this below the best is dropped
PEERS = ("ngram-simple", "ngram-mod")
COUNTERS = {"accepted": "llamacpp:spec_decode_num_accepted_tokens_total",
            "steps": "llamacpp:spec_decode_num_drafts_total",
            "drafted": "llamacpp:spec_decode_num_draft_tokens_total"}
LIKELY_CAUSES = (
    "the layer-id convention (GGUF dflash.target_layers must be draftsmith ids + 1; see the "
    "manifest's layer_ids), a pruned draft served without d2t, a block length other than the "
    "trained one (--spec-draft-n-max), a mask token the server does not use, or a near-tie "
    "divergence between llama.cpp's and torch's arithmetic (compare the answers in served.json); "
    "the prompts are sent as token ids, so chat-template drift is ruled out")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", required=True, help="draft dir (RUN/step_N, or a RUN dir: its step_latest)")
    p.add_argument("--target", default=None, help="default: the draft's training recipe's target")
    p.add_argument("--datasets", default="gsm8k", help="names (in --eval-dir) or JSONL paths")
    p.add_argument("--eval-dir", default=None)
    p.add_argument("--max-samples", type=int, default=20, help="first N records per dataset")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--n-max", type=int, default=None,
                   help="--spec-draft-n-max (default: tuned; at most the draft's block)")
    p.add_argument("--p-min", type=float, default=None,
                   help="--spec-draft-p-min (default: tuned; drafts with a confidence head only)")
    p.add_argument("--draft-dtype", default=None, choices=gguf_export.DRAFT_GGUF_TYPES,
                   help="GGUF weight type of the draft (default: tuned)")
    p.add_argument("--no-tune", action="store_true",
                   help="do not measure: flags, else the manifest defaults (full block, no p_min, fp16)")
    p.add_argument("--retune", action="store_true", help="measure again even if DRAFT/serve_tuning.json fits")
    p.add_argument("--tune-datasets", default="mbpp", help="held-out prompts for tuning (names or JSONL)")
    p.add_argument("--tune-samples", type=int, default=6, help="first N records of each tuning set")
    p.add_argument("--tune-max-new-tokens", type=int, default=128)
    p.add_argument("--tune-dtypes", default="fp16,q8_0", help="draft weight types the tuning compares")
    p.add_argument("--plain-types", default="q8_0",
                   help="target conversions also decoded plainly; the fastest plain file is the "
                        "speedup's denominator ('' = the served file only)")
    p.add_argument("--peers", default=",".join(PEERS), help="untrained llama.cpp peers, comma-separated ('' = none)")
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed |served − offline| / offline τ")
    p.add_argument("--target-type", default=None, choices=gguf_export.TARGET_OUTTYPES,
                   help="serve the target converted to this GGUF type (for a GGUF target: from its "
                        "dequantized weights, the ones the offline side uses); default: a GGUF "
                        "target's own file, else f16")
    p.add_argument("--ctx-size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None, help="torch threads for the offline run")
    p.add_argument("--out", default=".", help="output dir (served.json, GGUF exports)")
    p.add_argument("--no-progress", action="store_true")


# --------------------------------------------------------------------------- the server side


def read_counters(server: llama_cpp.LlamaServer) -> dict[str, float]:
    """The speculative-decoding counters of llama-server's Prometheus `/metrics`."""
    values = {}
    for line in server.get_text("/metrics").splitlines():
        name, _, value = line.partition(" ")
        for key, metric in COUNTERS.items():
            if name == metric:
                values[key] = float(value)
    return {k: values.get(k, 0.0) for k in COUNTERS}


def complete(server: llama_cpp.LlamaServer, prompt: list[int], max_tokens: int) -> dict:
    """One greedy completion of a token-id prompt through the OpenAI endpoint."""
    return server.post_json("/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                "top_k": 1, "cache_prompt": False}, timeout=1800)


GAP_S = 0.1  # between requests to different servers: the last one's worker threads stop polling


def one_request(srv: llama_cpp.LlamaServer, ids: list[int], max_tokens: int) -> dict:
    """One greedy completion and what it cost: counter deltas, tokens, wall and decode time."""
    before = read_counters(srv)
    tic = time.perf_counter()
    reply = complete(srv, ids, max_tokens)
    seconds = time.perf_counter() - tic
    after = read_counters(srv)
    d = {k: after[k] - before[k] for k in COUNTERS}
    timings = reply.get("timings", {})
    n = int(reply.get("usage", {}).get("completion_tokens", timings.get("predicted_n", 0)))
    return {"prompt_tokens": len(ids), "server_prompt_tokens": timings.get("prompt_n"),
            "completion_tokens": n, "accepted": d["accepted"], "steps": d["steps"],
            "drafted": d["drafted"], "seconds": seconds, "decode_ms": float(timings.get("predicted_ms", 0.0)),
            "text": reply["choices"][0].get("text", "")}


def dataset_totals(requests: list[dict]) -> dict:
    """Pooled τ (llama.cpp's way: 1 + Σ accepted / Σ steps), tokens/s (wall and decode-only)."""
    acc, steps = sum(r["accepted"] for r in requests), sum(r["steps"] for r in requests)
    tokens, wall = sum(r["completion_tokens"] for r in requests), sum(r["seconds"] for r in requests)
    decode_ms = sum(r["decode_ms"] for r in requests)
    return {"served_tau": 1 + acc / steps if steps else None, "accepted": acc, "rounds": steps,
            "drafted": sum(r["drafted"] for r in requests), "tokens": tokens, "seconds": wall,
            "served_tokens_per_s": tokens / wall if wall else None,
            "decode_tokens_per_s": 1000 * tokens / decode_ms if decode_ms else None,
            "requests": requests}


def serve_many(configs: dict[str, tuple[Path, list[str]]], prompts: dict[str, list[list[int]]],
               max_tokens: int, ctx_size: int, progress=None) -> dict[str, dict]:
    """One llama-server per configuration (name -> (target GGUF, extra flags)), all started
    first; then every prompt goes to each server in turn, the order rotating from prompt to
    prompt, so a drift in this machine's speed (other tenants, thermal) falls on every
    configuration alike instead of on whichever ran last. Requests never overlap.
    -> {name: {dataset: totals and per-request records}}."""
    names = list(configs)
    requests = {name: {ds: [] for ds in prompts} for name in names}
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(llama_cpp.LlamaServer(
            gguf, slots=1, ctx_size=ctx_size, seed=0, extra_args=extra)) for name, (gguf, extra) in configs.items()}
        turn = 0
        for ds, items in prompts.items():
            for ids in items:
                for name in names[turn % len(names):] + names[:turn % len(names)]:
                    time.sleep(GAP_S)
                    requests[name][ds].append(one_request(servers[name], ids, max_tokens))
                    if progress is not None:
                        progress(1)
                turn += 1
    return {name: {ds: dataset_totals(reqs) for ds, reqs in per.items()} for name, per in requests.items()}


def serve_prompts(target_gguf: Path, extra_args: list[str], prompts: dict[str, list[list[int]]],
                  max_tokens: int, ctx_size: int, progress=None) -> dict:
    """One configuration alone (`serve_many` with one server)."""
    return serve_many({"one": (target_gguf, extra_args)}, prompts, max_tokens, ctx_size, progress)["one"]


def spec_args(manifest: dict, n_max: int | None, p_min: float | None) -> list[str]:
    """llama-server flags from the manifest's serve settings, with overrides."""
    args = list(manifest["serve"]["llama_server_args"])
    for flag, value in (("--spec-draft-n-max", n_max), ("--spec-draft-p-min", p_min)):
        if value is None:
            continue
        if flag in args:
            args[args.index(flag) + 1] = str(value)
        else:
            args += [flag, str(value)]
    return args


def pooled(per_dataset: dict) -> dict:
    """`serve_prompts` totals over every dataset: τ, tokens/s (wall and decode-only), counts."""
    keys = ("accepted", "rounds", "drafted", "tokens", "seconds")
    out = {k: sum(m[k] for m in per_dataset.values()) for k in keys}
    decode_s = sum(m["tokens"] / m["decode_tokens_per_s"] for m in per_dataset.values()
                   if m["decode_tokens_per_s"])
    out["served_tau"] = 1 + out["accepted"] / out["rounds"] if out["rounds"] else None
    out["served_tokens_per_s"] = out["tokens"] / out["seconds"] if out["seconds"] else None
    out["decode_tokens_per_s"] = out["tokens"] / decode_s if decode_s else None
    return out


# --------------------------------------------------------------------------- the offline side


class Offline:
    """draftsmith's engine over the fp32 target (loaded once), for the draft under llama.cpp's
    rules: a block of n_max tokens and the p_min cut."""

    def __init__(self, args, draft_dir: Path, target: str, tokenizer):
        if args.threads:
            torch.set_num_threads(args.threads)
        self.draft_dir = draft_dir
        self.hf, self.source = load_target_model(target, torch.float32)
        self.stops = stop_token_ids(tokenizer, self.hf.config, getattr(self.hf, "generation_config", None))

    def decoder(self, max_new_tokens: int, n_max: int | None, p_min: float | None):
        truncate = f"p-min={p_min}" if p_min else "none"
        settings = Settings(max_new_tokens, SamplingConfig(), self.stops, self.stops[0], truncate=truncate,
                            n_max=n_max)
        return build_decoders(self.hf, {"draft": str(self.draft_dir)}, [], settings, self.source)[-1]

    def tau(self, prompts: dict[str, list[list[int]]], max_new_tokens: int, n_max, p_min) -> dict:
        """τ on the same prompt tokens (T = 0), counted llama.cpp's way."""
        decoder = self.decoder(max_new_tokens, n_max, p_min)
        out = {}
        for ds, items in prompts.items():
            tally = Tally()
            for ids in items:
                tally.add(decoder.engine.generate([ids], max_new_tokens))
            s = tally.summary(False)
            out[ds] = {"offline_tau": s["tau_llama_cpp"], "offline_tau_paper": s["tau"],
                       "offline_rounds": s["rounds"], "offline_tokens_per_s": s["tokens_per_s"]}
        return out

    def rounds(self, prompts: list[list[int]], max_new_tokens: int, n_max: int):
        """Every round of an untruncated decode at this n_max (`tune.round_set`)."""
        decoder = self.decoder(max_new_tokens, n_max, None)
        recorded = []
        for ids in prompts:
            recorded += decoder.engine.generate([ids], max_new_tokens).rounds
        return tune.round_set(recorded)


# --------------------------------------------------------------------------- choosing the settings


def first_turn_prompts(args, tokenizer, datasets=None) -> dict[str, list[list[int]]]:
    """First turn of every record of `datasets` (default: `args.datasets`, loaded), rendered with
    the target's chat template, as token ids."""
    return {ds.name: [render_prompt(tokenizer, record[:1], []) for record in ds.records]
            for ds in (datasets if datasets is not None else load_datasets(args))}


def export_for_serving(draft_dir: Path, out_dir: Path, target: str | None, dtype: str = "fp16",
                       n_max: int | None = None, p_min: float | None = None) -> tuple[dict, list[str]]:
    """Export the draft to GGUF in `out_dir` (n_max and p_min recorded in its manifest) ->
    (manifest, the llama-server arguments that serve it: `-md` plus the manifest's spec flags)."""
    serve = {k: v for k, v in (("n_max", n_max), ("p_min", p_min)) if v is not None}
    gguf_dir = export(draft_dir, "gguf", out_dir, target=target, dtype=dtype,
                      manifest_extra={"serve": serve} if serve else None)
    manifest = read_manifest(gguf_dir)
    return manifest, ["-md", str(gguf_dir / gguf_export.GGUF_FILE), *spec_args(manifest, None, None)]


def machine_key(target_gguf: Path) -> dict:
    """What a tuning is valid for: this target file, this CPU, this llama.cpp."""
    return {"target_file": target_gguf.name, "target_bytes": target_gguf.stat().st_size,
            "cpu": cpu_name(), "llama_cpp": llama_cpp.LLAMA_CPP_VERSION}


def measure_tuning(args, draft_dir: Path, cfg, target: str, target_gguf: Path, offline: Offline,
                   tokenizer, out: Path) -> dict:
    """Measure what `tune.choose` needs and choose (see the module docstring, step 2)."""
    tune_sets = load_datasets(argparse.Namespace(datasets=args.tune_datasets, eval_dir=args.eval_dir,
                                                 max_samples=args.tune_samples))
    probe = {"tune": [ids for items in first_turn_prompts(args, tokenizer, tune_sets).values() for ids in items]}
    n_tokens = args.tune_max_new_tokens
    log.info("tuning: cost curve of %s", target_gguf.name)
    curve = tune.batch_cost(target_gguf)
    base = tune.CostModel.from_measurement(curve)
    most = gguf_export.max_n_max(cfg)
    has_confidence = bool(getattr(cfg, "enable_confidence_head", False))
    dtypes = split_list(args.tune_dtypes)
    configs = {"plain": (target_gguf, [])}
    for dtype in dtypes:  # the draft's cost: fixed + per block slot; at p_min 1 what a cut round costs
        manifest, draft_args = export_for_serving(draft_dir, out / "tune" / f"draft-{dtype}", target, dtype)
        for n in sorted({1, most}):
            configs[f"{dtype} n{n}"] = (target_gguf, [*draft_args[:2], *spec_args(manifest, n, None)])
        if has_confidence:
            configs[f"{dtype} idle"] = (target_gguf, [*draft_args[:2], *spec_args(manifest, 1, 1.0)])
    log.info("tuning: served probes, interleaved (%s; %d prompts)", ", ".join(configs), len(probe["tune"]))
    runs = {name: pooled(r) for name, r in serve_many(configs, probe, n_tokens, args.ctx_size).items()}
    plain = runs["plain"]
    probes, costs = {}, {}
    for dtype in dtypes:
        probes[dtype] = {"served_tau": None, "round_overhead": {}}
        for n in sorted({1, most}):
            served = {**runs[f"{dtype} n{n}"], "plain_decode_tokens_per_s": plain["decode_tokens_per_s"]}
            overhead = tune.round_overhead(served, base)
            if overhead is not None:
                probes[dtype]["round_overhead"][n] = overhead
            if n == most:
                probes[dtype].update(served_tau=served["served_tau"], decode_tokens_per_s=served["decode_tokens_per_s"])
        idle = None
        if has_confidence:
            idle = probes[dtype]["idle_overhead"] = tune.idle_overhead(
                {**runs[f"{dtype} idle"], "plain_decode_tokens_per_s": plain["decode_tokens_per_s"]})
        if probes[dtype]["round_overhead"]:
            fixed, per_slot, drafting = tune.fit_overhead(probes[dtype]["round_overhead"], idle)
            probes[dtype].update(fixed=fixed, per_slot=per_slot, drafting=drafting)
            costs[dtype] = tune.CostModel(base.batch, fixed, per_slot, drafting)
    full_tau = max((p["served_tau"] or 0) for p in probes.values())
    for dtype, p in probes.items():  # a weight type that loses acceptance is not a candidate
        p["kept"] = dtype in costs and (p["served_tau"] or 0) >= (1 - QUANT_TAU_LOSS) * full_tau
        if not p["kept"]:
            costs.pop(dtype, None)
    log.info("tuning: held-out rounds of draftsmith's engine at n_max 1..%d", most)
    rounds = {n: offline.rounds(probe["tune"], n_tokens, n) for n in range(1, most + 1)}
    choice = tune.choose(rounds, costs, has_confidence)
    return {"version": gguf_export.TUNING_VERSION, "machine": machine_key(target_gguf), "cost_curve": curve, "probes": probes,
            "plain_decode_tokens_per_s": plain["decode_tokens_per_s"], "tune_datasets": args.tune_datasets,
            "tune_samples": args.tune_samples, "tune_max_new_tokens": n_tokens,
            "choice": choice["best"], "table": choice["table"]}


def serve_choice(args, draft_dir: Path, cfg, target_gguf: Path, measure) -> tuple[dict, dict | None]:
    """(dtype, n_max, p_min) to serve with, and the tuning it came from (None: flags/defaults).
    Flags win; the rest comes from DRAFT/serve_tuning.json when it fits this machine and target
    file, else from `measure()` (saved there)."""
    flags = {"dtype": args.draft_dtype, "n_max": args.n_max, "p_min": args.p_min}
    tuning = None
    if not args.no_tune and any(v is None for v in flags.values()):
        saved = gguf_export.read_tuning(draft_dir)
        if saved is not None and not args.retune and saved.get("machine") == machine_key(target_gguf):
            tuning = saved
            log.info("serve settings from %s (measured on %s)", draft_dir / TUNING_FILE, saved["machine"]["cpu"])
        else:
            tuning = measure()
            atomic_write_json(draft_dir / TUNING_FILE, json_safe(tuning))
    best = gguf_export.tuned_serve(tuning)
    chosen = {k: v if v is not None else best.get(k) for k, v in flags.items()}
    chosen["dtype"] = chosen["dtype"] or "fp16"
    if chosen["p_min"] == 0:
        chosen["p_min"] = None  # llama.cpp's 0 = no truncation
    return chosen, tuning


# --------------------------------------------------------------------------- the command


def _speedup(tokens_per_s, plain_tokens_per_s):
    return tokens_per_s / plain_tokens_per_s if tokens_per_s and plain_tokens_per_s else None


def table(result: dict) -> list[str]:
    lines = ["| run | dataset | served τ | offline τ | tok/s | plain tok/s | speedup |", "|---|---|---|---|---|---|---|"]

    def fmt(v, f="{:.2f}"):
        return "–" if v is None else f.format(v)

    rows = [("draft", result["draft"])] + [(f"peer {k}", v) for k, v in result["peers"].items()]
    for name, entry in rows:
        for ds, m in entry["datasets"].items():
            lines.append(f"| {name} | {ds} | {fmt(m.get('served_tau'))} | {fmt(m.get('offline_tau'))} | "
                         f"{fmt(m.get('served_tokens_per_s'), '{:.1f}')} | {fmt(m.get('plain_tokens_per_s'), '{:.1f}')} | "
                         f"{fmt(m.get('speedup'), '{:.2f}×')} |")
    return lines


def summary_line(result: dict) -> str:
    """One line: the served speedup against the fastest plain file, and the break-even τ."""
    f, d = result["plain_fastest"], result["draft"]["overall"]
    s = result["serve"]
    return (f"served speedup {fmt_x(result['speedup'])} against plain {Path(f['file']).name} "
            f"({f['tokens_per_s']:.1f} tok/s) on {result['machine']['cpu']}: served τ {fmt_f(d['served_tau'])}, "
            f"break-even τ {fmt_f(d['break_even_tau'])} (draft {s['dtype']}, n_max {s['n_max']}, "
            f"p_min {s['p_min'] if s['p_min'] is not None else 'off'})")


def fmt_x(v) -> str:
    return "–" if v is None else f"{v:.2f}×"


def fmt_f(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def _check_args(args: argparse.Namespace) -> list:
    """Every flag that can be checked without the draft or the target, before the GGUF export;
    returns the loaded datasets."""
    check_output_dir(args.out, "--out")
    for flag, value, low in (("--max-new-tokens", args.max_new_tokens, 1), ("--ctx-size", args.ctx_size, 1),
                             ("--n-max", args.n_max, 1), ("--tune-samples", args.tune_samples, 1),
                             ("--tune-max-new-tokens", args.tune_max_new_tokens, 1)):
        if value is not None and value < low:
            raise InputError(f"{flag} must be >= {low}, got {value}")
    if args.p_min is not None and not 0 <= args.p_min <= 1:
        raise InputError(f"--p-min must lie in [0, 1], got {args.p_min}")
    if args.tolerance < 0:
        raise InputError(f"--tolerance must be >= 0, got {args.tolerance}")
    for flag, given, known in (("--peers", args.peers, PEERS), ("--plain-types", args.plain_types,
                                                                gguf_export.TARGET_OUTTYPES),
                               ("--tune-dtypes", args.tune_dtypes, gguf_export.DRAFT_GGUF_TYPES)):
        unknown = [p for p in split_list(given) if p not in known]
        if unknown:
            raise InputError(f"{flag} {unknown[0]!r}: choose from {', '.join(known)}")
    return load_datasets(args)  # names, files, --max-samples


def _check_draft(args, draft_dir: Path, target: str) -> tuple:
    """The flags against the draft and the target, before anything is converted or served."""
    cfg = read_draft_config(draft_dir)
    info = describe_target(target)
    check_target_matches(cfg, info)  # a target of another model than the draft's
    gguf_export.check_servable(cfg)
    gguf_export.serve_settings(cfg, args.p_min, args.n_max, names=("--p-min", "--n-max"))
    return cfg, info


def run(args: argparse.Namespace) -> int:
    datasets = _check_args(args)
    draft_dir = resolve_draft_dir(args.draft)
    target = args.target or (find_recipe(draft_dir) or {}).get("target") or \
        (read_manifest(draft_dir) or {}).get("target", {}).get("id")
    if not target:
        raise InputError(f"{draft_dir}: no target recorded next to the draft; pass --target")
    cfg, info = _check_draft(args, draft_dir, target)
    target_gguf = gguf_export.target_gguf(info, args.target_type)
    tokenizer = load_tokenizer(info.source)
    prompts = first_turn_prompts(args, tokenizer, datasets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    offline = Offline(args, draft_dir, target, tokenizer)
    chosen, tuning = serve_choice(args, draft_dir, cfg, target_gguf, lambda: measure_tuning(
        args, draft_dir, cfg, target, target_gguf, offline, tokenizer, out))
    manifest, draft_args = export_for_serving(draft_dir, out / "draft-gguf", target, chosen["dtype"],
                                              chosen["n_max"], chosen["p_min"])
    chosen["n_max"] = manifest["serve"]["n_max"]
    plain_files = [target_gguf] + [f for f in (gguf_export.target_gguf(info, t) for t in split_list(args.plain_types))
                                   if f != target_gguf]
    peers = split_list(args.peers)
    from tqdm import tqdm

    total = sum(len(v) for v in prompts.values()) * (1 + len(plain_files) + len(peers))
    configs = {"draft": (target_gguf, draft_args), **{f"plain {f}": (f, []) for f in plain_files},
               **{f"peer {p}": (target_gguf, ["--spec-type", p]) for p in peers}}
    with tqdm(total=total, desc="serve-check (requests, interleaved)", disable=args.no_progress) as bar:
        runs = serve_many(configs, prompts, args.max_new_tokens, args.ctx_size, bar.update)
    served = runs["draft"]
    plains = {str(f): runs[f"plain {f}"] for f in plain_files}
    peer_runs = {p: runs[f"peer {p}"] for p in peers}
    off = offline.tau(prompts, args.max_new_tokens, chosen["n_max"], chosen["p_min"])
    result, failures = assemble(args, draft_dir, target, target_gguf, draft_args, chosen, tuning,
                                served, plains, peer_runs, off)
    atomic_write_json(out / "served.json", json_safe(result))
    print("\n".join(table(result)))
    print(summary_line(result))
    print(f"wrote {out / 'served.json'}")
    if failures:
        print(f"served τ differs from offline τ by more than {args.tolerance:.0%}: {'; '.join(failures)}. "
              f"Likely causes: {LIKELY_CAUSES}")
        return 1
    return 0


def assemble(args, draft_dir, target, target_gguf, draft_args, chosen, tuning, served, plains, peer_runs,
             offline) -> tuple[dict, list[str]]:
    """served.json and the parity failures."""
    plain = plains[str(target_gguf)]
    fastest = max(plains, key=lambda f: pooled(plains[f])["served_tokens_per_s"] or 0)
    overall = pooled(served)
    own = pooled(plain)
    ratio = _speedup(overall["decode_tokens_per_s"], own["decode_tokens_per_s"])
    overall["break_even_tau"] = overall["served_tau"] / ratio if overall["served_tau"] and ratio else None
    result = {"config": {"draft": str(draft_dir), "target": target, "target_gguf": str(target_gguf),
                         "llama_server_args": draft_args, "max_new_tokens": args.max_new_tokens,
                         "max_samples": args.max_samples, "tolerance": args.tolerance,
                         "tau": "pooled: 1 + Σ accepted / Σ verification steps (llama.cpp's mean len)"},
              "machine": machine_key(target_gguf), "serve": chosen,
              "tuning": None if tuning is None else {k: tuning[k] for k in ("choice", "probes", "cost_curve")},
              "plain_fastest": {"file": fastest, "tokens_per_s": pooled(plains[fastest])["served_tokens_per_s"],
                                "decode_tokens_per_s": pooled(plains[fastest])["decode_tokens_per_s"]},
              "plain": {f: {k: v for k, v in pooled(r).items()} for f, r in plains.items()},
              "draft": {"overall": overall, "datasets": {}}, "peers": {}}
    result["speedup"] = _speedup(overall["served_tokens_per_s"], result["plain_fastest"]["tokens_per_s"])
    failures = []
    for ds in served:
        m = {**served[ds], **offline[ds], "plain_tokens_per_s": plain[ds]["served_tokens_per_s"]}
        m["speedup"] = _speedup(m["served_tokens_per_s"], m["plain_tokens_per_s"])
        m["speedup_vs_fastest"] = _speedup(m["served_tokens_per_s"], plains[fastest][ds]["served_tokens_per_s"])
        s, o = m["served_tau"], m["offline_tau"]
        m["parity"] = None if s is None or o is None else abs(s - o) / o
        # both None: neither side drafted a token under this rule (p_min cut every round)
        m["parity_ok"] = (s is None and o is None) or (m["parity"] is not None and m["parity"] <= args.tolerance)
        if not m["parity_ok"]:
            failures.append(f"{ds}: served τ {s} vs offline τ {o}")
        result["draft"]["datasets"][ds] = m
    for name, runs in peer_runs.items():
        result["peers"][name] = {"datasets": {
            ds: {**r, "plain_tokens_per_s": plain[ds]["served_tokens_per_s"],
                 "speedup": _speedup(r["served_tokens_per_s"], plain[ds]["served_tokens_per_s"])}
            for ds, r in runs.items()}}
    result["peers"]["plain"] = {"datasets": {ds: {**r, "plain_tokens_per_s": r["served_tokens_per_s"], "speedup": 1.0}
                                             for ds, r in plain.items()}}
    return result, failures
