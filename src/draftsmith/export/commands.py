"""`draftsmith export`: a draft checkpoint -> an engine-ready dir with a manifest."""

from __future__ import annotations

import argparse
import json
import sys

from draftsmith.export import DTYPES, FORMATS, GGUF_QUANT_DTYPES, export, resolve_draft_dir
from draftsmith.export.manifest import describe_target, read_manifest

DESCRIPTION = """Export a draft for an engine. Formats:
  deepspec     DeepSpec-compatible DSpark / DFlash (a pruned head: the llama.cpp extension)
  sglang       EAGLE-3 with nested layer ids (i); DSpark / DFlash for SGLang's DSPARK
  vllm         EAGLE-3 with top-level layer ids (i + 1); DSpark / DFlash for vLLM's dspark
  speculators  EAGLE-3 as speculators' Eagle3Speculator (vllm serve <dir> detects it)
  gguf         llama.cpp's converter (same source as llama-server), metadata checked after
  draftsmith   draftsmith's own draft dir (import a DeepSpec / z-lab / EAGLE-3 checkpoint for
               evaluation or `train --init-from`)
Every export carries draftsmith_manifest.json: target id, revision and chat-template hash,
layer-id convention, mask token, block size, max trained length, serve settings."""


def add_args(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--draft", required=True,
                   help="draft dir: a checkpoint RUN/step_N (a RUN dir means its step_latest), or "
                        "a DeepSpec / z-lab DFlash / EAGLE-3 dir")
    p.add_argument("--format", required=True, choices=FORMATS, dest="format")
    p.add_argument("--out", required=True, help="output dir (written atomically)")
    p.add_argument("--target", default=None,
                   help="the draft's target (alias, .gguf, HF dir, hub id); default: the training "
                        "recipe's (RUN/recipe.json) or the source manifest's")
    p.add_argument("--dtype", default=None, choices=[*DTYPES, *GGUF_QUANT_DTYPES],
                   help="weight dtype (default: f16 for gguf, what llama.cpp's CPU kernels run best; "
                        "bf16 otherwise, DeepSpec's checkpoint dtype); q8_0: gguf only")
    p.add_argument("--p-min", type=float, default=None,
                   help="serve setting for the manifest: llama.cpp's --spec-draft-p-min (drafts "
                        "with a confidence head only)")
    p.add_argument("--n-max", type=int, default=None,
                   help="serve setting for the manifest: llama.cpp's --spec-draft-n-max (default: the "
                        "draft's block, or the tuned value)")
    p.add_argument("--ignore-tuning", action="store_true",
                   help="gguf: ignore DRAFT/serve_tuning.json (the settings `serve-check` measured)")
    p.add_argument("--check-serve", action="store_true",
                   help="gguf: also load target + draft in llama-server and answer one request "
                        "(a non-GGUF target is converted to f16 once, into the cache)")


def _summary(out, manifest: dict) -> str:
    ids = manifest["layer_ids"]
    lines = [f"wrote {out} ({manifest['layout']}, {manifest['dtype']}): "
             f"{', '.join(manifest['files'])} + draftsmith_manifest.json",
             f"  target {manifest['target']['id']} ({manifest['target']['revision']})",
             f"  layer ids {ids['draftsmith']} -> {ids['engine_key']} = {ids['engine_values']} "
             f"({ids['engine_convention']})",
             f"  llama-server: -md <draft.gguf> {' '.join(manifest['serve']['llama_server_args'])}"]
    if "gguf" in manifest:
        lines.append(f"  GGUF metadata checked: {json.dumps(manifest['gguf']['metadata_checked'])}")
    lines += [f"  note: {n}" for n in manifest["notes"]]
    return "\n".join(lines)


def tuned_settings(args) -> dict:
    """For `--format gguf`: the dtype, n_max and p_min `serve-check` measured for this draft
    (DRAFT/serve_tuning.json, `serve.tune`), where flags leave them open."""
    if args.format != "gguf" or args.ignore_tuning:
        return {}
    from draftsmith.export import gguf

    draft_dir = resolve_draft_dir(args.draft)
    saved = gguf.read_tuning(draft_dir)
    tuned = gguf.tuned_serve(saved)
    if tuned:
        print(f"serve settings from {draft_dir / gguf.TUNING_FILE} (measured on {saved['machine'].get('cpu')}, "
              f"target file {saved['machine'].get('target_file')}): {tuned}; flags override", file=sys.stderr)
    return tuned


def run(args: argparse.Namespace) -> int:
    tuned = tuned_settings(args)
    p_min = args.p_min if args.p_min is not None else tuned.get("p_min")
    n_max = args.n_max if args.n_max is not None else tuned.get("n_max")
    serve = {k: v for k, v in (("p_min", p_min), ("n_max", n_max)) if v is not None}
    dtype = args.dtype or tuned.get("dtype") or ("fp16" if args.format == "gguf" else "bf16")
    out = export(args.draft, args.format, args.out, target=args.target, dtype=dtype,
                 manifest_extra={"serve": serve} if serve else None)
    manifest = read_manifest(out)
    print(_summary(out, manifest))
    if args.check_serve:
        if args.format != "gguf":
            print("--check-serve applies to --format gguf only; skipped", file=sys.stderr)
            return 0
        from draftsmith.export import gguf

        target = gguf.target_gguf(describe_target(args.target or manifest["target"]["id"]))
        result = gguf.serve_once(out / gguf.GGUF_FILE, target, manifest)
        text = result["reply"]["choices"][0]["text"]
        print(f"  llama-server loaded {target.name} + the draft and answered: {text!r}")
    return 0
