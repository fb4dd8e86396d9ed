"""Disk footprint of a feature cache, computed before anything is written.

Our layout (per shard, safetensors; see cache.py) against DeepSpec's (per token: input_ids int32,
loss_mask uint8, layer features bf16 [L*H], normed last hidden bf16 [H]):

| per token        | draftsmith                                       | DeepSpec      |
|------------------|--------------------------------------------------|---------------|
| token id         | uint16 when vocab <= 65536, else int32           | int32         |
| loss mask        | uint8                                            | uint8         |
| layer features   | L*H in fp32/bf16/fp16/fp8-e4m3 (+ fp32 scale per layer for fp8) | bf16 L*H |
| normed hidden    | H, only where the next token is supervised (bf16 for fp8 caches) | bf16 H, every token |

plus two int64 offsets per sample and a safetensors header per shard. The shard plan (which
samples go to which shard) is defined here and used by the builder, so the estimate counts the
same shards the builder writes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from draftsmith.data.templates import RenderedSample

DTYPES = ("fp32", "bf16", "fp16", "fp8-e4m3")
FEATURE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8-e4m3": 1}
# the normed hidden sets the target distribution p_t: fp8 caches keep it in bf16
HIDDEN_DTYPE = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp8-e4m3": "bf16"}
SCALE_BYTES = 4  # fp32 scale per token per layer (fp8 features only)
OFFSET_BYTES = 8  # int64
DEFAULT_SHARD_TOKENS = 1 << 15
SAFETENSORS_DTYPE = {"fp32": "F32", "bf16": "BF16", "fp16": "F16", "fp8-e4m3": "F8_E4M3"}


def token_dtype(vocab_size: int) -> str:
    """Narrowest unsigned dtype that holds every token id."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def deepspec_bytes_per_token(hidden_size: int, num_layers: int) -> int:
    """DeepSpec: int32 id + uint8 mask + bf16 [L*H] features + bf16 [H] normed hidden."""
    return 4 + 1 + 2 * num_layers * hidden_size + 2 * hidden_size


def plan_shards(lengths: Sequence[int], shard_tokens: int) -> list[tuple[int, int]]:
    """Sample ranges [start, end): a shard closes once it holds >= shard_tokens tokens (samples are
    never split, so a long sample may make a shard larger)."""
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    plan, start, acc = [], 0, 0
    for i, n in enumerate(lengths):
        acc += n
        if acc >= shard_tokens:
            plan.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(lengths):
        plan.append((start, len(lengths)))
    return plan


def shard_tensor_specs(samples: int, tokens: int, hidden_positions: int, num_layers: int,
                       hidden_size: int, vocab_size: int, dtype: str) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape) of every tensor in one shard."""
    hid = HIDDEN_DTYPE[dtype]
    specs = {
        "input_ids": ("U16" if token_dtype(vocab_size) == "uint16" else "I32", [tokens]),
        "loss_mask": ("U8", [tokens]),
        "offsets": ("I64", [samples + 1]),
        "hidden_offsets": ("I64", [samples + 1]),
        "features": (SAFETENSORS_DTYPE[dtype], [tokens, num_layers * hidden_size]),
        "hidden": (SAFETENSORS_DTYPE[hid], [hidden_positions, hidden_size]),
    }
    if dtype == "fp8-e4m3":
        specs["feature_scale"] = ("F32", [tokens, num_layers])
    return specs


_ITEM = {"U8": 1, "U16": 2, "I32": 4, "I64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1}


def shard_bytes(specs: dict[str, tuple[str, list[int]]], metadata: dict[str, str]) -> int:
    """Size of a safetensors file with these tensors: 8-byte length, JSON header padded to 8, data
    (tensors laid out as safetensors does: by alignment, then name)."""
    header, offset = {"__metadata__": metadata}, 0
    for name, (dt, shape) in sorted(specs.items(), key=lambda kv: (-_ITEM[kv[1][0]], kv[0])):
        n = _ITEM[dt]
        for d in shape:
            n *= d
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"))
    return 8 + (len(text) + 7) // 8 * 8 + offset


@dataclass
class Estimate:
    """Bytes a cache will take, ours and DeepSpec's, for the same samples and target geometry."""

    samples: int
    tokens: int
    hidden_positions: int
    hidden_positions_assumed: bool  # token counts only: every position but the last of a sample
    num_layers: int
    hidden_size: int
    vocab_size: int
    dtype: str
    shards: int
    shard_bytes: int  # all shard files
    manifest_bytes: int  # approximate
    deepspec_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)  # tensor -> bytes over all shards

    @property
    def total_bytes(self) -> int:
        return self.shard_bytes + self.manifest_bytes

    @property
    def bytes_per_token(self) -> float:
        return self.total_bytes / max(self.tokens, 1)

    @property
    def deepspec_bytes_per_token(self) -> float:
        return self.deepspec_bytes / max(self.tokens, 1)

    def lines(self) -> list[str]:
        """Human-readable summary (printed before anything is written)."""
        ds = deepspec_bytes_per_token(self.hidden_size, self.num_layers)
        share = self.hidden_positions / max(self.tokens, 1)
        parts = ", ".join(f"{k} {v / max(self.tokens, 1):.1f}" for k, v in self.breakdown.items())
        return [
            f"estimate: {self.samples} samples, {self.tokens} tokens, {self.num_layers} layers x "
            f"H={self.hidden_size}, dtype {self.dtype}, {self.shards} shard(s)",
            f"  draftsmith layout: {self.bytes_per_token:.1f} B/token ({parts}); normed hidden kept at "
            f"{share:.1%} of positions{' (assumed: token counts only)' if self.hidden_positions_assumed else ''}; "
            f"total {human_bytes(self.total_bytes)}",
            f"  DeepSpec layout:   {ds} B/token (int32 id, uint8 mask, bf16 features, bf16 hidden at "
            f"every token); total {human_bytes(self.deepspec_bytes)}",
            f"  ratio: {self.total_bytes / max(self.deepspec_bytes, 1):.3f} of DeepSpec's bytes",
        ]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _counts(data: Sequence[RenderedSample] | Sequence[int]) -> tuple[list[int], list[int], bool]:
    """Per-sample token counts and hidden positions (exact from samples, assumed from counts)."""
    if data and isinstance(data[0], RenderedSample):
        lengths = [len(s.input_ids) for s in data]  # type: ignore[union-attr]
        hidden = [sum(1 for m in s.loss_mask[1:] if m) for s in data]  # type: ignore[union-attr]
        return lengths, hidden, False
    lengths = [int(n) for n in data]  # type: ignore[arg-type]
    return lengths, [max(n - 1, 0) for n in lengths], True


def _manifest_bytes(data, samples: int, shards: int) -> int:
    """Approximate manifest size: fixed part, per-shard entry, one indented line per record id and
    one per record fingerprint (16 hex digits)."""
    if data and isinstance(data[0], RenderedSample):
        ids = sum(len(json.dumps(s.id, ensure_ascii=False).encode()) for s in data)
    else:
        ids = 12 * samples
    return 2200 + 400 * shards + ids + (10 + 26) * samples


def estimate(data: Sequence[RenderedSample] | Sequence[int], *, hidden_size: int,
             layer_ids: Sequence[int], vocab_size: int, dtype: str,
             shard_tokens: int = DEFAULT_SHARD_TOKENS) -> Estimate:
    """Bytes our cache and DeepSpec's would take for `data` (rendered samples, or token counts)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    L = len(layer_ids)
    lengths, hidden, assumed = _counts(data)
    plan = plan_shards(lengths, shard_tokens)
    total, breakdown = 0, {}
    for a, b in plan:
        specs = shard_tensor_specs(b - a, sum(lengths[a:b]), sum(hidden[a:b]), L, hidden_size,
                                   vocab_size, dtype)
        total += shard_bytes(specs, shard_metadata(dtype))
        for name, (dt, shape) in specs.items():
            n = _ITEM[dt]
            for d in shape:
                n *= d
            breakdown[name] = breakdown.get(name, 0) + n
    tokens = sum(lengths)
    return Estimate(len(lengths), tokens, sum(hidden), assumed, L, hidden_size, vocab_size, dtype,
                    len(plan), total, _manifest_bytes(data, len(lengths), len(plan)),
                    tokens * deepspec_bytes_per_token(hidden_size, L), breakdown)


def shard_metadata(dtype: str) -> dict[str, str]:
    """The safetensors metadata of every shard. One key only: safetensors writes metadata keys in
    hash-map order, so several keys would make identical builds differ byte for byte."""
    return {"draftsmith-feature-cache": f"version=1 dtype={dtype}"}
