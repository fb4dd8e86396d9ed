"""`draftsmith cache estimate|build`: size a feature cache, then build it.

    draftsmith cache estimate --target smollm2-135m --data regen.jsonl --layers 1,8,15,21,27 \
        --max-length 2048 --dtype bf16
    draftsmith cache build    ... --out DIR

`estimate` reads only the target's config and tokenizer (no weights) and writes nothing; `build`
prints the same estimate first, then computes and writes the cache (resumable: rerun the same
command after an interruption). A record whose message contents exceed --max-record-chars is
skipped before it is tokenized; the data summary line counts and names (by record id) every record
skipped, failed, dropped or truncated at --max-length, and `build`'s last line repeats it.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from draftsmith.data.conversations import DEFAULT_MAX_RECORD_CHARS, read_conversations, split_by_size
from draftsmith.data.templates import RenderedSample, render_records
from draftsmith.features.cache import build_cache, check_top_k
from draftsmith.features.estimate import (
    DEFAULT_SHARD_TOKENS, DTYPES, Estimate, deepspec_bytes_per_token, estimate, human_bytes,
)
from draftsmith.features.online import TORCH_DTYPES, FeaturePolicy
from draftsmith.targets.model import check_layer_ids, load_target, load_tokenizer, materialized_dir
from draftsmith.targets.resolve import resolve_target
from draftsmith.utils.io import InputError, check_output_dir, file_sha256

MAX_SHOWN_PROBLEMS = 10
MAX_NAMED = 5  # record ids named per category in a summary line
# 1 M characters is ~250k tokens of text, far past any max_length. Measured (`cache estimate`, tiny
# target, peak RSS): tokenizing a 1 M-character record cost 164 MB over the 377 MB baseline; a 30 MB
# record skipped by the guard cost 82 MB (reading its JSON line); unguarded it had taken 4.8 GB.


def _add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="smollm2-135m", help="alias, .gguf file, HF dir or hub id")
    p.add_argument("--data", required=True, help="conversations JSONL (e.g. regenerated answers)")
    p.add_argument("--layers", default=None,
                   help="comma-separated 0-based decoder layers whose outputs are cached "
                        "(default: 5 evenly spaced from 1 to L-3, DeepSpec's DSpark choice)")
    p.add_argument("--max-length", type=int, default=2048,
                   help="tokens per sample (longer ones are cut) (default: %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16",
                   help="storage dtype of the layer features (fp8-e4m3: per-token-per-layer fp32 "
                        "scale, normed hidden kept in bf16)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help="tokens per shard file (samples are never split)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N records")
    p.add_argument("--max-record-chars", type=int, default=DEFAULT_MAX_RECORD_CHARS,
                   help="skip a record whose message contents exceed this many characters, before "
                        "tokenizing it (counted and named in the summary); 0: no limit "
                        "(default: %(default)s)")


def add_estimate_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `draftsmith cache estimate`."""
    _add_common_args(p)


def add_build_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `draftsmith cache build`."""
    _add_common_args(p)
    p.add_argument("--out", required=True, help="cache directory (created; resumed if interrupted)")
    p.add_argument("--top-k", type=int, default=None,
                   help="also store the target's k most likely next tokens and their probabilities at "
                        "every supervised position (a recipe's features.top_k trains from them)")
    p.add_argument("--target-dtype", choices=["auto", *sorted(TORCH_DTYPES)], default="auto",
                   help="dtype the target runs in; auto: bf16 where the hardware runs it natively "
                        "(CUDA, a CPU with AMX or AVX512-BF16), else fp32 (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--batching", choices=["auto", "unpadded", "padded"], default="auto",
                   help="auto: one unpadded sequence per forward on CPU (bitwise reproducible), "
                        "right-padded length-bucketed batches on GPU")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="padded batching: B x longest")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _named(ids: list[str]) -> str:
    """The first MAX_NAMED ids, quoted: "'a', 'b', +3 more" ("" when none)."""
    shown = ", ".join(repr(i) for i in ids[:MAX_NAMED])
    return shown + (f", +{len(ids) - MAX_NAMED} more" if len(ids) > MAX_NAMED else "")


def _in_parens(ids: list[str]) -> str:
    return f" ({_named(ids)})" if ids else ""


@dataclass
class LoadedData:
    """Rendered samples of a data file and the reconciliation of its records (by record id)."""

    path: str
    samples: list[RenderedSample]
    lines_bad: int = 0
    records_rejected: int = 0
    max_length: int | None = None
    max_record_chars: int = 0  # 0: no limit
    too_long: list[str] = field(default_factory=list)  # over max_record_chars: skipped, never tokenized
    render_failed: list[str] = field(default_factory=list)
    no_trainable: list[str] = field(default_factory=list)  # rendered, then dropped
    truncated: list[str] = field(default_factory=list)  # cut at max_length (kept or then dropped)
    length_capped: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        n = len(self.samples)
        tokens = sum(len(s.input_ids) for s in self.samples)
        trainable = sum(sum(s.loss_mask) for s in self.samples)
        capped = self.length_capped / max(n, 1)
        skipped = f": {_named(self.too_long)}" if self.too_long else ""
        dropped = f": {_named(self.no_trainable)}" if self.no_trainable else ""
        return (f"data {self.path}: {n} samples kept ({tokens} tokens, {trainable} trainable); "
                f"{self.lines_bad} unreadable lines, {self.records_rejected} records rejected, "
                f"{len(self.too_long)} over --max-record-chars {self.max_record_chars or 'off'} "
                f"(skipped{skipped}), {len(self.render_failed)} failed to render"
                f"{_in_parens(self.render_failed)}, {len(self.no_trainable)} without a trainable token "
                f"(dropped{dropped}); {len(self.truncated)} truncated at max_length {self.max_length}"
                f"{_in_parens(self.truncated)}; {self.length_capped} length-capped answers ({capped:.0%})")

    def reconciliation(self) -> str:
        """Records of the file that are not in the cache as written there (the build's last line)."""
        return (f"not cached: {self.lines_bad + self.records_rejected} unusable lines, "
                f"{len(self.too_long)} over --max-record-chars{_in_parens(self.too_long)}, "
                f"{len(self.render_failed)} failed to render{_in_parens(self.render_failed)}, "
                f"{len(self.no_trainable)} without a trainable token{_in_parens(self.no_trainable)}; "
                f"cut at max_length {self.max_length}: {len(self.truncated)}{_in_parens(self.truncated)}")

    def source(self) -> dict:
        """Provenance recorded in the cache manifest (counts, and the ids behind them)."""
        ids = {"skipped_too_long": self.too_long, "render_failed": self.render_failed,
               "dropped_no_trainable": self.no_trainable, "truncated": self.truncated}
        return {"data": str(self.path), "data_file_sha256": file_sha256(Path(self.path)),
                "lines_bad": self.lines_bad, "records_rejected": self.records_rejected,
                "max_record_chars": self.max_record_chars, **{k: len(v) for k, v in ids.items()},
                "length_capped": self.length_capped, "ids": ids}


def _guard_size(records: list[dict], data: LoadedData) -> list[dict]:
    """Records within data.max_record_chars; the others are named in data, never tokenized."""
    kept, over = split_by_size(records, data.max_record_chars)
    for rid, n in over:
        data.too_long.append(rid)
        data.problems.append(f"{data.path}: record {rid!r}: {n} characters > "
                             f"--max-record-chars {data.max_record_chars} (not tokenized)")
    return kept


def _unrendered(records: list[dict], samples: list[RenderedSample]) -> list[str]:
    """Ids of the records render_records reported instead of rendering."""
    left = Counter(s.id for s in samples)
    failed = []
    for r in records:
        rid = str(r.get("id"))
        if left[rid]:
            left[rid] -= 1
        else:
            failed.append(rid)
    return failed


def load_samples(path: str, tokenizer, max_length: int | None, limit: int | None = None,
                 progress: bool = True, max_record_chars: int = DEFAULT_MAX_RECORD_CHARS) -> LoadedData:
    """Read and render a conversations JSONL; refuse a file with no trainable token."""
    file = read_conversations(str(path), limit)
    data = LoadedData(str(path), [], lines_bad=file.lines_bad, records_rejected=file.records_rejected,
                      max_length=max_length, max_record_chars=max_record_chars, problems=list(file.problems))
    records = _guard_size(file.records, data)
    samples, stats = render_records(tokenizer, records, max_length, total=len(records), progress=progress)
    data.problems += stats.problems
    data.render_failed = _unrendered(records, samples)
    data.truncated = [s.id for s in samples if s.truncated]
    data.samples = [s for s in samples if any(s.loss_mask)]
    data.no_trainable = [s.id for s in samples if not any(s.loss_mask)]
    data.length_capped = sum(s.length_capped for s in data.samples)
    for p in data.problems[:MAX_SHOWN_PROBLEMS]:
        print(f"  skipped: {p}")
    if len(data.problems) > MAX_SHOWN_PROBLEMS:
        print(f"  ... and {len(data.problems) - MAX_SHOWN_PROBLEMS} more")
    if not data.samples:
        raise InputError(f"{path}: no trainable tokens: none of its {len(records)} readable records has an "
                         f"assistant token left to learn after rendering (max_length {max_length}; "
                         f"{len(data.too_long)} more skipped over --max-record-chars); is this a "
                         "conversations JSONL with assistant answers?")
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
    if args.max_record_chars < 0:
        raise InputError(f"--max-record-chars {args.max_record_chars}: must be >= 0 (0: no limit)")
    geometry = target_geometry(args.target)
    layers = parse_layers(args.layers, geometry["num_hidden_layers"])
    tokenizer = load_tokenizer(args.target)
    data = load_samples(args.data, tokenizer, args.max_length, args.limit,
                        progress=not getattr(args, "no_progress", False),
                        max_record_chars=args.max_record_chars)
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

    from draftsmith.utils.dtypes import resolve as resolve_dtype

    check_output_dir(args.out, "--out")
    geometry, layers, tokenizer, data, est = _prepare(args)
    check_top_k(args.top_k, geometry["vocab_size"], "--top-k")  # before the target is loaded
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    compute = resolve_dtype(args.target_dtype, device)
    print(f"cache build: the target computes in {compute.name} ({compute.reason})", flush=True)
    target = load_target(args.target, layers, compute.torch).to(device)
    policy = FeaturePolicy(batching=args.batching, max_batch_tokens=args.max_batch_tokens)
    report = build_cache(target, data.samples, args.out, dtype=args.dtype, shard_tokens=args.shard_tokens,
                         policy=policy, max_length=args.max_length, tokenizer=tokenizer,
                         source=data.source(), progress=not args.no_progress, top_k=args.top_k)
    ds = deepspec_bytes_per_token(geometry["hidden_size"], len(layers))
    print(f"cache {report.out_dir}: {report.samples} samples, {report.tokens} tokens, "
          f"{human_bytes(report.total_bytes)} on disk ({report.total_bytes} bytes) = "
          f"{report.bytes_per_token:.1f} B/token vs DeepSpec's layout {ds} B/token "
          f"({report.bytes_per_token / ds:.3f}x); estimate was {human_bytes(est.total_bytes)}; "
          f"{report.shards_built} shard(s) built, {report.shards_reused} reused; {data.reconciliation()}")
    return 0
