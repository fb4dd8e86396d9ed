"""`draftsmith serve-check`: prove that what the draft measured offline holds in llama.cpp.

    draftsmith serve-check --draft RUN/step_latest --target smollm2-135m --datasets gsm8k \
        --eval-dir ../shared/eval --max-samples 20 --out DIR

1. Export the draft to GGUF (`export --format gguf`: converter from the server's own source,
   metadata read back against the manifest); a GGUF target is served from its own file, any other
   (or `--target-type`) converted once into the cache.
2. Render every prompt (first turn of each record) with the target's chat template here, and send
   the TOKEN IDS to llama-server's OpenAI endpoint (`/v1/completions`, T = 0): server and offline
   engine see the same tokens, so chat-template drift cannot hide in the comparison.
3. Serve the pair with one slot, `--spec-type` and `--spec-draft-n-max` (= the block size) and
   `--spec-draft-p-min` from the manifest (flags override); then the target alone (the speedup's
   denominator); then `ngram-simple` / `ngram-mod` as untrained peers. Requests run in series;
   per request the `/metrics` counter deltas give accepted draft tokens and verification steps
   (llama.cpp's `mean len` = 1 + accepted / steps, DESIGN §3.4) and the response's `timings` the
   decode speed.
4. Decode the same prompt tokens offline with draftsmith's engine (fp32, T = 0, same truncation
   rule) and count τ llama.cpp's way (`tau_llama_cpp`: non-empty rounds only).
5. Write OUT/served.json and print a table. Exit 1, naming the likely causes, when
   |served τ − offline τ| > tolerance (10 %) × offline τ on any dataset.
"""

from __future__ import annotations

import argparse
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
from draftsmith.export.manifest import describe_target, read_manifest
from draftsmith.decoding import SamplingConfig
from draftsmith.targets.model import load_target_model, load_tokenizer
from draftsmith.utils.io import InputError, atomic_write_json, check_output_dir

log = logging.getLogger(__name__)
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
    p.add_argument("--n-max", type=int, default=None, help="override --spec-draft-n-max (default: block size)")
    p.add_argument("--p-min", type=float, default=None, help="override --spec-draft-p-min (manifest)")
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


def serve_prompts(target_gguf: Path, extra_args: list[str], prompts: dict[str, list[list[int]]],
                  max_tokens: int, ctx_size: int, progress=None) -> dict:
    """Start one llama-server, send every prompt in series; per dataset: pooled τ (llama.cpp's
    way), tokens/s (wall and decode-only), and per-request records."""
    out = {}
    with llama_cpp.LlamaServer(target_gguf, slots=1, ctx_size=ctx_size, seed=0, extra_args=extra_args) as srv:
        for ds, items in prompts.items():
            acc = steps = drafted = tokens = 0
            wall = decode_ms = 0.0
            requests = []
            for ids in items:
                before = read_counters(srv)
                tic = time.perf_counter()
                reply = complete(srv, ids, max_tokens)
                seconds = time.perf_counter() - tic
                after = read_counters(srv)
                d = {k: after[k] - before[k] for k in COUNTERS}
                timings = reply.get("timings", {})
                n = int(reply.get("usage", {}).get("completion_tokens", timings.get("predicted_n", 0)))
                acc, steps, drafted = acc + d["accepted"], steps + d["steps"], drafted + d["drafted"]
                tokens, wall, decode_ms = tokens + n, wall + seconds, decode_ms + float(timings.get("predicted_ms", 0.0))
                requests.append({"prompt_tokens": len(ids), "server_prompt_tokens": timings.get("prompt_n"),
                                 "completion_tokens": n, "accepted": d["accepted"], "steps": d["steps"],
                                 "drafted": d["drafted"], "seconds": seconds,
                                 "text": reply["choices"][0].get("text", "")})
                if progress is not None:
                    progress(1)
            out[ds] = {"served_tau": 1 + acc / steps if steps else None, "accepted": acc, "rounds": steps,
                       "drafted": drafted, "tokens": tokens, "seconds": wall,
                       "served_tokens_per_s": tokens / wall if wall else None,
                       "decode_tokens_per_s": 1000 * tokens / decode_ms if decode_ms else None,
                       "requests": requests}
    return out


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


# --------------------------------------------------------------------------- the offline side


def offline_tau(args, draft_dir: Path, target: str, tokenizer, prompts: dict[str, list[list[int]]],
                p_min) -> dict:
    """τ of draftsmith's engine on the same prompt tokens (T = 0, fp32), counted llama.cpp's way."""
    if args.threads:
        torch.set_num_threads(args.threads)
    hf, source = load_target_model(target, torch.float32)
    stops = stop_token_ids(tokenizer, hf.config, getattr(hf, "generation_config", None))
    truncate = f"p-min={p_min}" if p_min is not None else "none"
    settings = Settings(args.max_new_tokens, SamplingConfig(), stops, stops[0], truncate=truncate)
    decoder = build_decoders(hf, {"draft": str(draft_dir)}, [], settings, source)[-1]
    out = {}
    for ds, items in prompts.items():
        tally = Tally()
        for ids in items:
            tally.add(decoder.engine.generate([ids], args.max_new_tokens))
        s = tally.summary(False)
        out[ds] = {"offline_tau": s["tau_llama_cpp"], "offline_tau_paper": s["tau"], "offline_rounds": s["rounds"],
                   "offline_tokens_per_s": s["tokens_per_s"]}
    return out


# --------------------------------------------------------------------------- the command


def first_turn_prompts(args, tokenizer, datasets=None) -> dict[str, list[list[int]]]:
    """First turn of every record of `datasets` (default: `args.datasets`, loaded), rendered with
    the target's chat template, as token ids."""
    return {ds.name: [render_prompt(tokenizer, record[:1], []) for record in ds.records]
            for ds in (datasets if datasets is not None else load_datasets(args))}


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


def export_for_serving(draft_dir: Path, out_dir: Path, target: str | None, dtype: str = "fp16",
                       n_max: int | None = None, p_min: float | None = None) -> tuple[dict, list[str]]:
    """Export the draft to GGUF in `out_dir` (p_min recorded in its manifest) -> (manifest, the
    llama-server arguments that serve it: `-md` plus the manifest's spec flags with overrides)."""
    extra = {"serve": {"p_min": p_min}} if p_min is not None else None
    gguf_dir = export(draft_dir, "gguf", out_dir, target=target, dtype=dtype, manifest_extra=extra)
    manifest = read_manifest(gguf_dir)
    return manifest, ["-md", str(gguf_dir / gguf_export.GGUF_FILE), *spec_args(manifest, n_max, p_min)]


def _check_args(args: argparse.Namespace) -> list:
    """Every flag that can be checked without the draft or the target, before the GGUF export;
    returns the loaded datasets."""
    check_output_dir(args.out, "--out")
    for flag, value, low in (("--max-new-tokens", args.max_new_tokens, 1), ("--ctx-size", args.ctx_size, 1),
                             ("--n-max", args.n_max, 1)):
        if value is not None and value < low:
            raise InputError(f"{flag} must be >= {low}, got {value}")
    if args.p_min is not None and not 0 <= args.p_min <= 1:
        raise InputError(f"--p-min must lie in [0, 1], got {args.p_min}")
    if args.tolerance < 0:
        raise InputError(f"--tolerance must be >= 0, got {args.tolerance}")
    unknown = [p for p in split_list(args.peers) if p not in PEERS]
    if unknown:
        raise InputError(f"--peers {unknown[0]!r}: known peers are {', '.join(PEERS)}")
    return load_datasets(args)  # names, files, --max-samples


def run(args: argparse.Namespace) -> int:
    datasets = _check_args(args)
    draft_dir = resolve_draft_dir(args.draft)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest, draft_args = export_for_serving(draft_dir, out / "draft-gguf", args.target,
                                              n_max=args.n_max, p_min=args.p_min)
    target = args.target or manifest["target"]["id"]
    info = describe_target(target)
    target_gguf = gguf_export.target_gguf(info, args.target_type)
    tokenizer = load_tokenizer(info.source)
    prompts = first_turn_prompts(args, tokenizer, datasets)
    p_min = args.p_min if args.p_min is not None else manifest["serve"].get("p_min")
    peers = split_list(args.peers)
    from tqdm import tqdm

    total = sum(len(v) for v in prompts.values()) * (2 + len(peers))
    with tqdm(total=total, desc="serve-check (requests)", disable=args.no_progress) as bar:
        served = serve_prompts(target_gguf, draft_args, prompts, args.max_new_tokens, args.ctx_size, bar.update)
        plain = serve_prompts(target_gguf, [], prompts, args.max_new_tokens, args.ctx_size, bar.update)
        peer_runs = {p: serve_prompts(target_gguf, ["--spec-type", p], prompts, args.max_new_tokens,
                                      args.ctx_size, bar.update) for p in peers}
    offline = offline_tau(args, draft_dir, target, tokenizer, prompts, p_min)
    result = {"config": {"draft": str(draft_dir), "target": target, "target_gguf": str(target_gguf),
                         "llama_server_args": draft_args, "max_new_tokens": args.max_new_tokens,
                         "max_samples": args.max_samples, "tolerance": args.tolerance,
                         "tau": "pooled: 1 + Σ accepted / Σ verification steps (llama.cpp's mean len)"},
              "draft": {"datasets": {}}, "peers": {}}
    failures = []
    for ds in prompts:
        m = {**served[ds], **offline[ds], "plain_tokens_per_s": plain[ds]["served_tokens_per_s"]}
        m["speedup"] = _speedup(m["served_tokens_per_s"], m["plain_tokens_per_s"])
        s, o = m["served_tau"], m["offline_tau"]
        m["parity"] = None if s is None or o is None else abs(s - o) / o
        m["parity_ok"] = m["parity"] is not None and m["parity"] <= args.tolerance
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
    atomic_write_json(out / "served.json", json_safe(result))
    print("\n".join(table(result)))
    print(f"wrote {out / 'served.json'}")
    if failures:
        print(f"served τ differs from offline τ by more than {args.tolerance:.0%}: {'; '.join(failures)}. "
              f"Likely causes: {LIKELY_CAUSES}")
        return 1
    return 0
