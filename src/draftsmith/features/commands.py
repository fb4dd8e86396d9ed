"""`draftsmith cache estimate|build`: size a feature cache, then build it.

    draftsmith cache estimate --target smollm2-135m --data regen.jsonl --layers 1,8,15,21,27 \
        --max-length 2048 --dtype bf16
    draftsmith cache build    ... --out DIR

`estimate` reads only the target's config and tokenizer (no weights) and writes nothing; `build`
prints the same estimate first, then computes and writes the cache (resumable: rerun the same
command after an interruption).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from draftsmith.data.conversations import read_conversations
from draftsmith.data.templates import RenderedSample, render_records
from draftsmith.features.cache import build_cache, file_sha256
from draftsmith.features.estimate import (
    DEFAULT_SHARD_TOKENS, DTYPES, Estimate, deepspec_bytes_per_token, estimate, human_bytes,
)
from draftsmith.features.online import TORCH_DTYPES, FeaturePolicy
from draftsmith.target.model import check_layer_ids, load_target, load_tokenizer, materialized_dir
from draftsmith.target.resolve import resolve_target
from draftsmith.utils.io import InputError

MAX_SHOWN_PROBLEMS = 10


def _add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="smollm2-135m", help="alias, .gguf file, HF dir or hub id")
    p.add_argument("--data", required=True, help="conversations JSONL (e.g. regenerated answers)")
    p.add_argument("--layers", default=None,
                   help="comma-separated 0-based decoder layers whose outputs are cached "
                        "(default: 5 evenly spaced from 1 to L-3, DeepSpec's DSpark choice)")
    p.add_argument("--max-length", type=int, default=2048, help="tokens per sample (longer ones are cut)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16",
                   help="storage dtype of the layer features (fp8-e4m3: per-token-per-layer fp32 "
                        "scale, normed hidden kept in bf16)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help="tokens per shard file (samples are never split)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N records")


def add_estimate_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `draftsmith cache estimate`."""
    _add_common_args(p)


def add_build_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `draftsmith cache build`."""
    _add_common_args(p)
    p.add_argument("--out", required=True, help="cache directory (created; resumed if interrupted)")
    p.add_argument("--target-dtype", choices=sorted(TORCH_DTYPES), default="fp32",
                   help="dtype the target runs in")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--batching", choices=["auto", "unpadded", "padded"], default="auto",
                   help="auto: one unpadded sequence per forward on CPU (bitwise reproducible), "
                        "right-padded length-bucketed batches on GPU")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="padded batching: B x longest")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@dataclass
class LoadedData:
    """Rendered samples of a data file and the reconciliation of its records."""

    path: str
    samples: list[RenderedSample]
    lines_bad: int = 0
    records_rejected: int = 0
    render_failed: int = 0
    no_trainable: int = 0
    truncated: int = 0
    length_capped: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        n = len(self.samples)
        tokens = sum(len(s.input_ids) for s in self.samples)
        trainable = sum(sum(s.loss_mask) for s in self.samples)
        capped = self.length_capped / max(n, 1)
        return (f"data {self.path}: {n} samples kept ({tokens} tokens, {trainable} trainable); "
                f"{self.lines_bad} unreadable lines, {self.records_rejected} records rejected, "
                f"{self.render_failed} failed to render, {self.no_trainable} without a trainable token "
                f"(dropped); {self.truncated} truncated at max_length; {self.length_capped} "
                f"length-capped answers ({capped:.0%})")

    def source(self) -> dict:
        """Provenance recorded in the cache manifest."""
        return {"data": str(self.path), "data_file_sha256": file_sha256(Path(self.path)),
                "lines_bad": self.lines_bad, "records_rejected": self.records_rejected,
                "render_failed": self.render_failed, "dropped_no_trainable": self.no_trainable,
                "truncated": self.truncated, "length_capped": self.length_capped}


def load_samples(path: str, tokenizer, max_length: int | None, limit: int | None = None,
                 progress: bool = True) -> LoadedData:
    """Read and render a conversations JSONL; refuse a file with no trainable token."""
    file = read_conversations(str(path), limit)
    records = file.records
    data = LoadedData(str(path), [], lines_bad=file.lines_bad, records_rejected=file.records_rejected,
                      problems=list(file.problems))
    samples, stats = render_records(tokenizer, records, max_length, total=len(records), progress=progress)
    data.render_failed = len(stats.problems)
    data.problems += stats.problems
    data.samples = [s for s in samples if any(s.loss_mask)]
    data.no_trainable = len(samples) - len(data.samples)
    data.truncated = sum(s.truncated for s in data.samples)
    data.length_capped = sum(s.length_capped for s in data.samples)
    for p in data.problems[:MAX_SHOWN_PROBLEMS]:
        print(f"  skipped: {p}")
    if len(data.problems) > MAX_SHOWN_PROBLEMS:
        print(f"  ... and {len(data.problems) - MAX_SHOWN_PROBLEMS} more")
    if not data.samples:
        raise InputError(f"{path}: no trainable tokens: none of its {len(records)} readable records has an "
                         f"assistant token left to learn after rendering (max_length {max_length}); "
                         "is this a conversations JSONL with assistant answers?")
    return data


def target_geometry(target: str) -> dict:
    """num_hidden_layers, hidden_size, vocab_size from the target's config (no weights loaded)."""
    from transformers import AutoConfig

    source = resolve_target(target)
    if source.kind == "gguf":
        cached = materialized_dir(source)
        if (cached / "config.json").is_file():
            config = AutoConfig.from_pretrained(cached)
        else:
            config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
    else:
        config = AutoConfig.from_pretrained(source.path)
    text = config.get_text_config()
    return {"num_hidden_layers": int(text.num_hidden_layers), "hidden_size": int(text.hidden_size),
            "vocab_size": int(text.vocab_size)}


def parse_layers(text: str | None, num_layers: int) -> list[int]:
    """`--layers 1,8,15` -> [1, 8, 15]; None -> 5 evenly spaced from 1 to L-3."""
    if text is None:
        from draftsmith.models.dspark import default_dspark_layers

        return default_dspark_layers(num_layers)
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--layers {text!r}: expected comma-separated integers, e.g. 1,8,15,21,27") from None
    if not ids or len(set(ids)) != len(ids):
        raise InputError(f"--layers {text!r}: expected distinct layer ids")
    check_layer_ids(ids, num_layers)
    return ids


def _prepare(args) -> tuple[dict, list[int], object, LoadedData, Estimate]:
    """Geometry, layers, tokenizer, rendered data and the estimate (shared by estimate and build)."""
    if args.max_length is not None and args.max_length < 2:
        raise InputError(f"--max-length {args.max_length}: must be at least 2")
    geometry = target_geometry(args.target)
    layers = parse_layers(args.layers, geometry["num_hidden_layers"])
    tokenizer = load_tokenizer(args.target)
    data = load_samples(args.data, tokenizer, args.max_length, args.limit,
                        progress=not getattr(args, "no_progress", False))
    print(data.line())
    est = estimate(data.samples, hidden_size=geometry["hidden_size"], layer_ids=layers,
                   vocab_size=geometry["vocab_size"], dtype=args.dtype, shard_tokens=args.shard_tokens)
    print(f"target {args.target}: {geometry['num_hidden_layers']} layers, H={geometry['hidden_size']}, "
          f"vocab {geometry['vocab_size']}; cached layers {layers} (0-based, output of layer i)")
    for line in est.lines():
        print(line)
    return geometry, layers, tokenizer, data, est


def run_estimate(args) -> int:
    """`draftsmith cache estimate`: print the sizes, write nothing."""
    _prepare(args)
    return 0


def run_build(args) -> int:
    """`draftsmith cache build`: print the estimate, then build (or resume) the cache."""
    import torch

    geometry, layers, tokenizer, data, est = _prepare(args)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    target = load_target(args.target, layers, TORCH_DTYPES[args.target_dtype]).to(device)
    policy = FeaturePolicy(batching=args.batching, max_batch_tokens=args.max_batch_tokens)
    report = build_cache(target, data.samples, args.out, dtype=args.dtype, shard_tokens=args.shard_tokens,
                         policy=policy, max_length=args.max_length, tokenizer=tokenizer,
                         source=data.source(), progress=not args.no_progress)
    ds = deepspec_bytes_per_token(geometry["hidden_size"], len(layers))
    print(f"cache {report.out_dir}: {report.samples} samples, {report.tokens} tokens, "
          f"{human_bytes(report.total_bytes)} on disk ({report.total_bytes} bytes) = "
          f"{report.bytes_per_token:.1f} B/token vs DeepSpec's layout {ds} B/token "
          f"({report.bytes_per_token / ds:.3f}x); estimate was {human_bytes(est.total_bytes)}; "
          f"{report.shards_built} shard(s) built, {report.shards_reused} reused")
    return 0
