"""A versioned, sharded, resumable on-disk cache of target features.

Layout of a cache directory:

    manifest.json             format "draftsmith-feature-cache", version 2, target identity
                              (name, config fingerprint, weights probe), layer_ids (0-based, output
                              of layer i), geometry, dtype, max_length, chat-template sha256, data
                              sha256, counts, complete flag, deviation vs fp32, and per shard: file,
                              sample range, tokens, bytes, sha256, crc32, and per sample its source
                              record id and record fingerprint (`RenderedSample.fingerprint`)
    shard_00000.safetensors   per-token arrays of consecutive samples, concatenated:
        input_ids      [T] uint16 (vocab <= 65536) or int32
        loss_mask      [T] uint8
        offsets        [n+1] int64   sample j is tokens offsets[j]:offsets[j+1]
        features       [T, L*H] fp32 | bf16 | fp16 | fp8-e4m3 (raw outputs of the tapped layers)
        feature_scale  [T, L] fp32   fp8 only: per token and layer, value = fp8 * scale
        hidden         [N, H] normed last hidden, only at positions t with loss_mask[t+1] == 1
                       (the only ones the loss reads p_t from); bf16 in fp8 caches
        hidden_offsets [n+1] int64   sample j's hidden rows
        topk_ids       [N, k] int32  only when the manifest's "top_k" is k (absent or null: none):
        topk_probs     [N, k] fp32   the target's k most likely next tokens at the hidden rows and
                                     their full-vocabulary probabilities p_t (T = 1); the rest of
                                     the mass, 1 - Σ topk_probs, is what training treats as
                                     outside (train/objectives.py); held-out τ_sim stays exact

Writes are atomic: a shard goes to a temp name, is fsynced and renamed; the manifest is rewritten
atomically after every shard (`complete: false`) and at the end (`complete: true`). Rerunning the
same build after a kill -9 keeps the shards the manifest lists (size and sha256 checked), redoes
the rest, and yields the same bytes as an uninterrupted build (unpadded CPU forwards are
deterministic). A build with other settings over an existing cache refuses.

Reads are checked: a run checks that every record it uses is in the cache with the same fingerprint
(token ids and loss mask) and max_length (`FeatureCache.check_samples`), and each shard's crc32 is
verified the first time the shard is opened in a process (0.9-2.8 GB/s on a busy 2-core AMD EPYC:
80-250 ms for a default 32768-token bf16 SmolLM2 shard of 227 MB; `verify=True` checks every shard's
sha256 at open instead). Version 1 caches (no fingerprints, no crc32) are refused: rebuild them.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import zlib
from bisect import bisect_right
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from draftsmith.data.templates import RenderedSample, samples_sha256
from draftsmith.features.estimate import (
    DEFAULT_SHARD_TOKENS, DTYPES, HIDDEN_DTYPE, plan_shards, shard_metadata, token_dtype,
)
from draftsmith.features.online import (
    FeaturePolicy, SampleFeatures, compute_features, supervised_hidden_mask, target_identity,
)
from draftsmith.targets.model import TargetModel
from draftsmith.utils.io import InputError, atomic_write_json, file_sha256

FORMAT = "draftsmith-feature-cache"
VERSION = 2
# what a cache of an older version lacks (the reason it must be rebuilt)
OLDER_VERSIONS = {1: "no record fingerprints or shard checksums"}
MANIFEST = "manifest.json"
STORE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                "fp8-e4m3": torch.float8_e4m3fn}
FP8_MAX = 448.0
FP16_MAX = 65504.0
# manifest keys that must agree for a rerun to resume (anything else: refuse)
BUILD_KEYS = ("layer_ids", "dtype", "max_length", "chat_template_sha256", "shard_tokens",
              "data_sha256", "batching", "records", "top_k")
TARGET_KEYS = ("fingerprint", "weights_probe", "dtype")


class FeatureCacheError(InputError):
    """A cache that cannot be used as asked (wrong target/layers, incomplete, missing/corrupt shard)."""


def shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


def chat_template_sha256(tokenizer) -> str | None:
    """sha256 of the tokenizer's chat template (None when there is none)."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(template, dict):  # named templates
        template = "\n".join(f"{k}\n{v}" for k, v in sorted(template.items()))
    return hashlib.sha256(template.encode()).hexdigest() if template else None


def file_crc32(path: Path) -> str:
    """crc32 of a file as 8 hex digits (the cheap per-read corruption check)."""
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


# ---- codec: float32 <-> stored dtype ---------------------------------------------------------

def encode_features(x: torch.Tensor, num_layers: int, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """[S, L*H] float -> (stored [S, L*H], fp8 scale [S, L] or None, values saturated)."""
    x = x.float()
    if dtype == "fp8-e4m3":
        per_layer = x.view(x.shape[0], num_layers, -1)  # [S, L*H] -> [S, L, H]
        scale = per_layer.abs().amax(dim=-1) / FP8_MAX  # [S, L]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = (per_layer / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return q.view(x.shape[0], -1), scale, 0  # [S, L, H] -> [S, L*H]
    return _cast(x, dtype)


def _cast(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, None, int]:
    """Plain cast; fp16 saturates at ±65504 instead of overflowing to inf (and counts it)."""
    saturated = 0
    if dtype == "fp16":
        saturated = int((x.abs() > FP16_MAX).sum())
        x = x.clamp(-FP16_MAX, FP16_MAX)
    return x.to(STORE_DTYPES[dtype]), None, saturated


def decode_features(q: torch.Tensor, scale: torch.Tensor | None, num_layers: int) -> torch.Tensor:
    """Stored [S, L*H] (+ fp8 scale [S, L]) -> float32 [S, L*H]."""
    if scale is None:
        return q.float()
    S = q.shape[0]
    return (q.float().view(S, num_layers, -1) * scale[..., None]).view(S, -1)  # via [S, L, H]


@dataclass
class Deviation:
    """Sums for the relative RMS error of stored values against the computed ones."""

    err_f: float = 0.0
    ref_f: float = 0.0
    err_h: float = 0.0
    ref_h: float = 0.0
    tokens: int = 0
    saturated: int = 0

    def add(self, ref: torch.Tensor, got: torch.Tensor, hidden: bool) -> None:
        err = float((got.double() - ref.double()).pow(2).sum())
        norm = float(ref.double().pow(2).sum())
        if hidden:
            self.err_h, self.ref_h = self.err_h + err, self.ref_h + norm
        else:
            self.err_f, self.ref_f = self.err_f + err, self.ref_f + norm

    def as_dict(self, dtype: str, reference: str) -> dict:
        rel = lambda e, r: math.sqrt(e / r) if r > 0 else 0.0  # noqa: E731
        return {"dtype": dtype, "reference": reference, "shard": shard_name(0), "tokens": self.tokens,
                "features_rel_rms": rel(self.err_f, self.ref_f),
                "hidden_rel_rms": rel(self.err_h, self.ref_h), "saturated_values": self.saturated}


# ---- writer ----------------------------------------------------------------------------------

@dataclass
class BuildReport:
    """What a build did."""

    out_dir: Path
    samples: int
    tokens: int
    shard_bytes: int
    total_bytes: int  # shards + manifest
    shards_built: int
    shards_reused: int
    deviation: dict | None
    messages: list[str] = field(default_factory=list)

    @property
    def bytes_per_token(self) -> float:
        return self.total_bytes / max(self.tokens, 1)


@torch.no_grad()
def top_k_of(target: TargetModel, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """normed hidden [N, H] -> the target's k most likely tokens [N, k] int32 and their
    full-vocabulary probabilities [N, k] fp32 (T = 1; softcap applied by `TargetModel.logits`)."""
    probs = torch.softmax(target.logits(hidden).float(), dim=-1)  # [N, V]
    top = probs.topk(k, dim=-1)
    return top.indices.to(torch.int32).cpu(), top.values.cpu()


def _encode_sample(sf: SampleFeatures, num_layers: int, dtype: str, tok_dtype: torch.dtype,
                   dev: Deviation | None, topk: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> dict[str, torch.Tensor]:
    """One sample's stored tensors (CPU); accumulates the deviation when `dev` is given."""
    feats = sf.features.float().cpu()
    q, scale, sat = encode_features(feats, num_layers, dtype)
    hidden = sf.hidden.float().cpu()[sf.hidden_mask.cpu()]  # [N, H], supervised positions only
    hq, _, hsat = _cast(hidden, HIDDEN_DTYPE[dtype])
    if dev is not None:
        dev.add(feats, decode_features(q, scale, num_layers), hidden=False)
        dev.add(hidden, hq.float(), hidden=True)
        dev.tokens += feats.shape[0]
        dev.saturated += sat + hsat
    out = {"input_ids": sf.input_ids.cpu().to(tok_dtype), "loss_mask": sf.loss_mask.cpu().to(torch.uint8),
           "features": q, "hidden": hq}
    if scale is not None:
        out["feature_scale"] = scale
    if topk is not None:
        out["topk_ids"], out["topk_probs"] = topk
    return out


def _write_shard(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write to a temp name, fsync, rename: a reader never sees a partial shard under its name."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # the usual file mode, like utils.io's atomic writes
    os.replace(tmp, path)


def _build_shard(target: TargetModel, samples: Sequence[RenderedSample], k: int, a: int, b: int,
                 ctx: dict, bar: tqdm) -> tuple[dict, Deviation | None]:
    """Compute, encode and write shard k (samples a..b); return its manifest entry."""
    dtype, L = ctx["dtype"], len(ctx["layer_ids"])
    dev = Deviation() if k == 0 else None
    parts: list[dict[str, torch.Tensor]] = []
    step = 1 if ctx["batching"] == "unpadded" else max(1, ctx["policy"].max_batch_tokens // 256)
    for i in range(a, b, step):
        chunk = list(samples[i:min(i + step, b)])
        for sf in compute_features(target, chunk, ctx["policy"]):
            topk = top_k_of(target, sf.hidden[sf.hidden_mask], ctx["top_k"]) if ctx["top_k"] else None
            parts.append(_encode_sample(sf, L, dtype, ctx["tok_dtype"], dev, topk))
        bar.update(len(chunk))
    lengths = [p["input_ids"].shape[0] for p in parts]
    hrows = [p["hidden"].shape[0] for p in parts]
    tensors = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    tensors["offsets"] = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
    tensors["hidden_offsets"] = torch.tensor([0] + hrows, dtype=torch.int64).cumsum(0)
    path = ctx["out_dir"] / shard_name(k)
    _write_shard(tensors, path, shard_metadata(dtype))
    entry = {"file": path.name, "samples": [a, b], "tokens": sum(lengths), "hidden_positions": sum(hrows),
             "bytes": path.stat().st_size, "sha256": file_sha256(path), "crc32": file_crc32(path),
             "record_ids": [s.id for s in samples[a:b]],
             "record_fingerprints": [s.fingerprint for s in samples[a:b]]}
    return entry, dev


def _settings(target: TargetModel, samples: Sequence[RenderedSample], dtype: str, shard_tokens: int,
              policy: FeaturePolicy, batching: str, max_length: int | None, tokenizer,
              top_k: int | None = None) -> dict:
    """The manifest's build settings (everything but shards, counts, deviation, timestamps)."""
    identity = target_identity(target)
    return {
        "format": FORMAT, "version": VERSION, "complete": False, "target": identity,
        "layer_ids": list(target.layer_ids),
        "layer_semantics": "0-based decoder layer i: raw output of layer i (HF hidden_states[i + 1])",
        "hidden_size": identity["hidden_size"], "feature_dim": len(target.layer_ids) * identity["hidden_size"],
        "dtype": dtype, "hidden_dtype": HIDDEN_DTYPE[dtype],
        "token_dtype": token_dtype(identity["vocab_size"]),
        "hidden_at": "positions t with loss_mask[t + 1] == 1",
        "max_length": max_length, "chat_template_sha256": chat_template_sha256(tokenizer),
        "data_sha256": samples_sha256(samples), "shard_tokens": shard_tokens, "batching": batching,
        "policy": policy.model_dump(), "records": len(samples), "top_k": top_k,
    }


def _differences(old: dict, new: dict) -> list[str]:
    """Settings that differ between an existing manifest and this build."""
    diffs = [f"{k}: {old.get(k)!r} in the cache, {new[k]!r} now" for k in BUILD_KEYS if old.get(k) != new[k]]
    old_t = old.get("target") or {}
    diffs += [f"target {k}: {old_t.get(k)!r} in the cache, {new['target'][k]!r} now"
              for k in TARGET_KEYS if old_t.get(k) != new["target"][k]]
    return diffs


def _resume_state(out_dir: Path, settings: dict, plan: list[tuple[int, int]]) -> tuple[dict[int, dict], dict]:
    """Shards of an earlier run of the same build that are intact, and the earlier manifest."""
    path = out_dir / MANIFEST
    if not path.is_file():
        leftovers = [p.name for p in out_dir.iterdir() if not p.name.startswith(".")] if out_dir.is_dir() else []
        if leftovers:
            raise FeatureCacheError(f"{out_dir}: not empty and not a feature cache (no {MANIFEST}; "
                                    f"holds {', '.join(sorted(leftovers)[:5])}); choose an empty --out")
        return {}, {}
    old = _read_manifest(out_dir)
    diffs = _differences(old, settings)
    if diffs:
        raise FeatureCacheError(f"{out_dir} holds a feature cache built with other settings, refusing to "
                                "overwrite it:\n  " + "\n  ".join(diffs) +
                                "\nuse another --out, or delete the directory to rebuild")
    done = {}
    for k, entry in enumerate(old.get("shards", [])):
        f = out_dir / entry["file"]
        if (k < len(plan) and entry["samples"] == list(plan[k]) and f.is_file()
                and f.stat().st_size == entry["bytes"] and file_sha256(f) == entry["sha256"]):
            done[k] = entry
        else:
            break  # shards are written in order: the first bad one and all after it are redone
    return done, old


def build_cache(target: TargetModel, samples: Sequence[RenderedSample], out_dir: str | os.PathLike,
                dtype: str = "bf16", shard_tokens: int = DEFAULT_SHARD_TOKENS,
                policy: FeaturePolicy | None = None, max_length: int | None = None, tokenizer=None,
                source: dict | None = None, progress: bool = True,
                log: Callable[[str], None] = tqdm.write, top_k: int | None = None) -> BuildReport:
    """Compute features of `samples` with `target` and write them as a cache in `out_dir`
    (resuming an interrupted build of the same settings); `top_k`: also store the target's k
    most likely next tokens and their probabilities at every supervised position."""
    if dtype not in DTYPES:
        raise InputError(f"cache dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    check_top_k(top_k, target.config.vocab_size)
    if not samples:
        raise InputError("no samples to cache")
    policy = (policy or FeaturePolicy()).model_copy(update={"hidden_at": "supervised"})
    batching = policy.resolved(next(target.parameters()).device)
    out_dir = Path(out_dir)
    plan = plan_shards([len(s.input_ids) for s in samples], shard_tokens)
    settings = _settings(target, samples, dtype, shard_tokens, policy, batching, max_length, tokenizer, top_k)
    done, old = _resume_state(out_dir, settings, plan)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*.tmp"):  # torn writes of a killed run
        stale.unlink()
    manifest = {**settings, "source": source, "deviation": old.get("deviation") if 0 in done else None,
                "timestamps": dict(old.get("timestamps") or {"created": _now()}),
                "shards": [done[k] for k in sorted(done)]}
    ctx = {"dtype": dtype, "layer_ids": list(target.layer_ids), "batching": batching, "policy": policy,
           "tok_dtype": torch.uint16 if settings["token_dtype"] == "uint16" else torch.int32, "out_dir": out_dir,
           "top_k": top_k}
    reused = len(done)
    with tqdm(total=len(samples), initial=sum(b - a for a, b in plan[:reused]), desc="cache",
              unit="sample", disable=not progress) as bar:
        for k in range(reused, len(plan)):
            entry, dev = _build_shard(target, samples, k, *plan[k], ctx, bar)
            manifest["shards"].append(entry)
            if dev is not None:
                manifest["deviation"] = dev.as_dict(dtype, f"target output ({settings['target']['dtype']})")
                log(_deviation_line(manifest["deviation"]))
            _write_manifest(out_dir, manifest, complete=False)
    _write_manifest(out_dir, manifest, complete=True)
    return _report(out_dir, manifest, len(plan) - reused, reused)


def check_top_k(top_k: int | None, vocab_size: int, field: str = "top_k") -> None:
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise InputError(f"{field} {top_k}: must lie in 1..{vocab_size} (the target's vocabulary)")


def _deviation_line(d: dict) -> str:
    return (f"{d['dtype']} vs {d['reference']} on {d['shard']} ({d['tokens']} tokens): relative RMS "
            f"error features {d['features_rel_rms']:.2e}, normed hidden {d['hidden_rel_rms']:.2e}"
            + (f"; {d['saturated_values']} values saturated" if d["saturated_values"] else ""))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write_manifest(out_dir: Path, manifest: dict, complete: bool) -> None:
    """Recount and atomically rewrite the manifest."""
    shards = manifest["shards"]
    manifest["complete"] = complete
    manifest["tokens"] = sum(s["tokens"] for s in shards)
    manifest["hidden_positions"] = sum(s["hidden_positions"] for s in shards)
    manifest["shard_bytes"] = sum(s["bytes"] for s in shards)
    manifest["timestamps"]["updated"] = _now()
    if complete:
        manifest["timestamps"].setdefault("finished", _now())
    atomic_write_json(out_dir / MANIFEST, manifest)


def _report(out_dir: Path, manifest: dict, built: int, reused: int) -> BuildReport:
    total = manifest["shard_bytes"] + (out_dir / MANIFEST).stat().st_size
    return BuildReport(out_dir, manifest["records"], manifest["tokens"], manifest["shard_bytes"], total,
                       built, reused, manifest.get("deviation"))


# ---- reader ----------------------------------------------------------------------------------

def _read_manifest(root: Path) -> dict:
    import json

    path = root / MANIFEST
    if not path.is_file():
        raise FeatureCacheError(f"{root}: not a feature cache (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FeatureCacheError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise FeatureCacheError(f"{path}: format {got!r}, expected {FORMAT!r}")
    version = manifest.get("version")
    if version != VERSION:
        why = f" ({OLDER_VERSIONS[version]})" if version in OLDER_VERSIONS else ""
        raise FeatureCacheError(f"{path}: {FORMAT} version {version!r}{why}; this draftsmith reads version "
                                f"{VERSION}: rebuild the cache (delete {root} and rerun the build or the "
                                "training run that made it) or use another --cache")
    return manifest


def _describe_target(t: dict) -> str:
    return (f"{t.get('name')!r} ({t.get('model_type')}, {t.get('num_hidden_layers')} layers, "
            f"H={t.get('hidden_size')}, config fingerprint {t.get('fingerprint')}, "
            f"weights probe {t.get('weights_probe')})")


def _check_target(root: Path, manifest: dict, expect: TargetModel | dict | str) -> None:
    """The cache must come from the expected target (config fingerprint, then weights probe)."""
    have = manifest["target"]
    if isinstance(expect, str):
        if expect not in (have.get("name"), have.get("fingerprint")):
            raise FeatureCacheError(f"{root}: cache was built for target {_describe_target(have)}, "
                                    f"not {expect!r}")
        return
    want = target_identity(expect) if isinstance(expect, TargetModel) else expect
    if want.get("fingerprint") != have.get("fingerprint"):
        raise FeatureCacheError(f"{root}: cache was built for another target: {_describe_target(have)}; "
                                f"expected {_describe_target(want)} (config fingerprints differ)")
    if want.get("weights_probe") and want.get("weights_probe") != have.get("weights_probe"):
        raise FeatureCacheError(f"{root}: cache was built for a target with the same config but other "
                                f"weights: weights probe {have.get('weights_probe')} in the cache, "
                                f"{want.get('weights_probe')} expected ({_describe_target(have)})")


def _check_shards(root: Path, manifest: dict, verify: bool) -> None:
    """Every shard exists with the manifest's size (and sha256 when verify; the crc32 is checked
    when a shard is first read)."""
    for entry in manifest["shards"]:
        f = root / entry["file"]
        if not f.is_file():
            raise FeatureCacheError(f"{root}: shard {entry['file']} (samples {entry['samples'][0]}.."
                                    f"{entry['samples'][1] - 1}) is missing; rerun the build to redo it")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise FeatureCacheError(f"{root}: shard {entry['file']} is {size} bytes, the manifest says "
                                    f"{entry['bytes']} (truncated or replaced)")
        if verify and file_sha256(f) != entry["sha256"]:
            raise FeatureCacheError(f"{root}: shard {entry['file']} is corrupt (sha256 differs from "
                                    "the manifest's)")


@dataclass
class _OpenShard:
    handle: object  # safetensors safe_open
    offsets: list[int]
    hidden_offsets: list[int]


class FeatureCache:
    """Read access to a complete cache: `cache[i]` -> SampleFeatures (float32, dequantized)."""

    def __init__(self, root: Path, manifest: dict, max_open_shards: int = 4):
        self.root = Path(root)
        self.manifest = manifest
        self.max_open_shards = max(1, max_open_shards)
        self._starts = [e["samples"][0] for e in manifest["shards"]]
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()
        self._verified: set[int] = set()  # shards whose checksum this process has checked
        self._columns: torch.Tensor | None = None  # feature columns of a subset of the layers
        self._selected: list[int] | None = None  # that subset, in the asked order

    def select_layers(self, layer_ids: Sequence[int]) -> None:
        """Read only these stored layers' features, in this order (a draft that taps fewer
        layers than the cache holds)."""
        stored, H = self.manifest["layer_ids"], self.manifest["hidden_size"]
        missing = [i for i in layer_ids if i not in stored]
        if missing:
            raise FeatureCacheError(f"{self.root}: cache holds features of target layers {stored}, not {missing}")
        self._columns = torch.cat([torch.arange(stored.index(i) * H, (stored.index(i) + 1) * H)
                                   for i in layer_ids])
        self._selected = list(layer_ids)

    @classmethod
    def open(cls, path: str | os.PathLike, expect_target: TargetModel | dict | str | None = None,
             expect_layer_ids: Sequence[int] | None = None, verify: bool = False,
             max_open_shards: int = 4) -> FeatureCache:
        """Open and validate a cache; `expect_*` check it was built for this target and these layers;
        `verify` also checks every shard's sha256 now (else each shard's crc32 on its first read)."""
        root = Path(path)
        manifest = _read_manifest(root)
        if expect_target is not None:
            _check_target(root, manifest, expect_target)
        if expect_layer_ids is not None and not set(expect_layer_ids) <= set(manifest["layer_ids"]):
            raise FeatureCacheError(f"{root}: cache holds features of target layers {manifest['layer_ids']}, "
                                    f"expected layers {list(expect_layer_ids)} (a cache serves its layers "
                                    "or any subset of them)")
        if not manifest.get("complete"):
            done = sum(e["samples"][1] - e["samples"][0] for e in manifest["shards"])
            raise FeatureCacheError(f"{root}: incomplete cache ({done} of {manifest['records']} samples "
                                    "written); rerun the same build command to finish it")
        _check_shards(root, manifest, verify)
        cache = cls(root, manifest, max_open_shards)
        if expect_layer_ids is not None and list(expect_layer_ids) != manifest["layer_ids"]:
            cache.select_layers(expect_layer_ids)
        if verify:
            cache._verified.update(range(len(manifest["shards"])))
        return cache

    def check_samples(self, samples: Sequence[RenderedSample], max_length: int | None) -> None:
        """The cache holds every one of `samples` (a run's records, maybe a subset of the cache's)
        as rendered now: same max_length, same token ids and loss mask (record fingerprints)."""
        advice = f"rebuild the cache (delete {self.root} and rerun its build) or use another --cache"
        built = self.manifest.get("max_length")
        if built != max_length:
            raise FeatureCacheError(f"{self.root}: cache was built with max_length {built}, this run renders "
                                    f"samples with max_length {max_length}; {advice}")
        cached = {rid: fp for e in self.manifest["shards"]
                  for rid, fp in zip(e["record_ids"], e["record_fingerprints"])}
        missing = [s.id for s in samples if s.id not in cached]
        if missing:
            raise FeatureCacheError(f"{self.root}: the cache lacks {len(missing)} of the run's {len(samples)} "
                                    f"samples (first: {missing[0]!r}); it was built from other data; {advice}")
        changed = [s.id for s in samples if cached[s.id] != s.fingerprint]
        if changed:
            shown = ", ".join(repr(rid) for rid in changed[:5]) + (", ..." if len(changed) > 5 else "")
            changed_ids = set(changed)
            repeated = [rid for rid, n in Counter(self.record_ids).items() if n > 1 and rid in changed_ids]
            note = (f" ({len(repeated)} of these ids occur more than once, e.g. {repeated[0]!r}: a cache "
                    "serves one record per id, so ids must be unique)" if repeated else "")
            raise FeatureCacheError(f"{self.root}: {len(changed)} of the run's {len(samples)} records differ from "
                                    f"the cached ones with the same id (token ids or loss mask changed since "
                                    f"the cache was built): {shown}{note}; it would train on stale features; "
                                    f"{advice}")

    def __len__(self) -> int:
        return self.manifest["records"]

    @property
    def top_k(self) -> int | None:
        """k of the stored top-k p_t (None: the cache has none)."""
        return self.manifest.get("top_k")

    @property
    def layer_ids(self) -> list[int]:
        """The layers whose features a sample carries (the stored ones, or the selected subset)."""
        return list(self._selected if self._selected is not None else self.manifest["layer_ids"])

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def record_ids(self) -> list[str]:
        return [rid for e in self.manifest["shards"] for rid in e["record_ids"]]

    def record_id(self, i: int) -> str:
        k, j = self._locate(i)
        return self.manifest["shards"][k]["record_ids"][j]

    def _locate(self, i: int) -> tuple[int, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range (cache has {len(self)})")
        i %= len(self)
        k = bisect_right(self._starts, i) - 1
        return k, i - self._starts[k]

    def _shard(self, k: int) -> _OpenShard:
        """Open shard k lazily; keep at most max_open_shards open (least recently used closed)."""
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        name = self.manifest["shards"][k]["file"]
        self._verify(k)
        try:
            handle = safe_open(str(self.root / name), framework="pt")
            shard = _OpenShard(handle, handle.get_tensor("offsets").tolist(),
                               handle.get_tensor("hidden_offsets").tolist())
        except Exception as e:  # safetensors raises its own error types
            raise FeatureCacheError(f"{self.root}: shard {name} cannot be read ({e})") from None
        self._open[k] = shard
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return shard

    def _verify(self, k: int) -> None:
        """Check shard k's crc32 against the manifest, once per process (before it is read)."""
        if k in self._verified:
            return
        entry = self.manifest["shards"][k]
        try:
            got = file_crc32(self.root / entry["file"])
        except OSError as e:
            raise FeatureCacheError(f"{self.root}: shard {entry['file']} cannot be read ({e})") from None
        if got != entry["crc32"]:
            raise FeatureCacheError(f"{self.root}: shard {entry['file']} is corrupt (crc32 {got}, the manifest "
                                    f"says {entry['crc32']}: changed after it was written); rebuild the cache "
                                    f"(delete {self.root} and rerun its build) or use another --cache")
        self._verified.add(k)

    def __getitem__(self, i: int) -> SampleFeatures:
        k, j = self._locate(i)
        entry, shard = self.manifest["shards"][k], self._shard(k)
        a, b = shard.offsets[j], shard.offsets[j + 1]
        ha, hb = shard.hidden_offsets[j], shard.hidden_offsets[j + 1]
        f = shard.handle
        loss_mask = f.get_slice("loss_mask")[a:b]
        scale = f.get_slice("feature_scale")[a:b] if self.dtype == "fp8-e4m3" else None
        features = decode_features(f.get_slice("features")[a:b], scale, len(self.manifest["layer_ids"]))
        if self._columns is not None:
            features = features[:, self._columns]  # [S, L*H] -> [S, L'*H], the selected layers
        hmask = supervised_hidden_mask(loss_mask)
        H = self.manifest["hidden_size"]
        if int(hmask.sum()) != hb - ha:
            raise FeatureCacheError(f"{self.root}: shard {entry['file']} is corrupt (sample {i}: "
                                    f"{hb - ha} hidden rows for {int(hmask.sum())} supervised positions)")
        hidden = torch.zeros(b - a, H, dtype=torch.float32)
        if hb > ha:
            hidden[hmask] = f.get_slice("hidden")[ha:hb].float()
        ids = f.get_slice("input_ids")[a:b].to(torch.int64)
        topk_ids = topk_probs = None
        if self.top_k:
            topk_ids = torch.zeros(b - a, self.top_k, dtype=torch.int64)
            topk_probs = torch.zeros(b - a, self.top_k, dtype=torch.float32)
            if hb > ha:
                topk_ids[hmask] = f.get_slice("topk_ids")[ha:hb].to(torch.int64)
                topk_probs[hmask] = f.get_slice("topk_probs")[ha:hb].float()
        return SampleFeatures(entry["record_ids"][j], ids, loss_mask, features, hidden, hmask, topk_ids, topk_probs)

    def __getstate__(self) -> dict:  # DataLoader workers reopen shards themselves
        return {**self.__dict__, "_open": OrderedDict()}

    def close(self) -> None:
        self._open.clear()
