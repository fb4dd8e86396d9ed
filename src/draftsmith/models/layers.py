"""Building blocks shared by every draft architecture.

- `DraftGeometry`: the target geometry a draft copies (read from the target's HF config object,
  never from `draftsmith.targets`), the common base of every drafter config.
- `RMSNorm`, `RotaryEmbedding` + `apply_rope`, `MLP` (gated: SwiGLU for Llama/Qwen3, GeGLU-tanh
  for Gemma).
- `Attention`: GQA attention through `scaled_dot_product_attention` with an explicit mask, whose
  keys/values can be prefixed with *extra context* keys/values (DSpark/DFlash inject the
  projected target features this way: K = k_norm(k_proj([ctx; x])), V = v_proj([ctx; x])).
- `DecoderLayer` (Qwen3 style: pre-norm, q/k RMSNorm when `qk_norm`) and its one-level Gemma
  subclass `GemmaDecoderLayer` (sandwich norms and `layer_scalar`).
- `KVCache`: per-layer growable key/value buffers with `rollback(length)`.

Shape symbols: B batch, T/S sequence, h query heads, g key/value heads, d head_dim, H hidden.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from draftsmith.config import StrictConfig, build_config
from draftsmith.utils.io import InputError

log = logging.getLogger(__name__)

Activation = Literal["silu", "gelu_pytorch_tanh", "gelu"]


# --------------------------------------------------------------------------- target geometry


class DraftGeometry(StrictConfig):
    """What a draft copies from its target: sizes, heads, norm eps, RoPE, vocabulary, family."""

    hidden_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    rms_norm_eps: float = Field(1e-6, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    # Share of the rotary frequency pairs that rotate ("proportional" RoPE of Gemma4's global
    # layers); 1.0 = plain RoPE.
    rope_fraction: float = Field(1.0, gt=0, le=1)
    hidden_act: Activation = "silu"
    vocab_size: int = Field(gt=0)
    num_target_layers: int = Field(gt=0)
    max_position_embeddings: int = Field(4096, gt=0)
    # Draft layer style: "qwen3" (Llama and Qwen3 targets) or "gemma" (sandwich norms, ...).
    family: Literal["qwen3", "gemma"] = "qwen3"
    final_logit_softcapping: float | None = Field(None, gt=0)
    attention_k_eq_v: bool = False
    target_model_type: str = ""
    initializer_range: float = Field(0.02, gt=0)

    @classmethod
    def from_target(cls, target_config, **overrides):
        """Config for a draft of the target whose HF config is `target_config`.

        Geometry comes from the target; every other field from `overrides` or its default.
        Unknown or invalid keys raise InputError naming the field.
        """
        data = {**geometry_from_target(target_config), **overrides}
        return build_config(cls, data, where=cls.__name__)

    def _check_geometry(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )


def _get(cfg, name: str, default=None):
    """getattr that also survives transformers' per-layer ("ambiguous global") attributes."""
    try:
        value = getattr(cfg, name, default)
    except Exception:  # transformers raises RuntimeError for per-layer attributes
        return default
    return default if value is None else value


def _global_layer_config(cfg):
    """The config view of the first full-attention layer when the family has per-layer configs
    (Gemma4: head_dim / kv heads differ between sliding and global layers), else `cfg`."""
    per_layer = _get(cfg, "per_layer_config")
    types = _get(cfg, "layer_types") or []
    if per_layer is None or "full_attention" not in types:
        return cfg
    return per_layer[types.index("full_attention")]


def _rope_of(cfg) -> tuple[float, float]:
    """(rope_theta, rope_fraction) of the target's global-attention layers."""
    params = _get(cfg, "rope_parameters") or {}
    if "full_attention" in params:  # per-layer-type RoPE (Gemma3/4)
        params = params["full_attention"]
    theta = params.get("rope_theta", _get(cfg, "rope_theta", 10000.0))
    kind = params.get("rope_type", "default")
    fraction = 1.0
    if kind == "proportional":
        fraction = float(params.get("partial_rotary_factor", 1.0))
    elif kind != "default":
        log.warning("target RoPE type %r: the draft uses plain RoPE with theta %s "
                    "(its config says so explicitly)", kind, theta)
    return float(theta), fraction


def geometry_from_target(target_config) -> dict:
    """The `DraftGeometry` fields read from a target's HF `PretrainedConfig`."""
    cfg = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
    layer = _global_layer_config(cfg)
    model_type = str(_get(cfg, "model_type", ""))
    hidden, heads = int(cfg.hidden_size), int(cfg.num_attention_heads)
    k_eq_v = bool(_get(cfg, "attention_k_eq_v", False))  # absent (Gemma3, Llama, Qwen3) = False
    # DeepSpec's Gemma4 draft uses the global layers' head_dim (a flat config dict carries it as
    # global_head_dim; a transformers Gemma4 config through its per-layer view).
    head_dim = _get(cfg, "global_head_dim") or _get(layer, "head_dim") or _get(cfg, "head_dim")
    kv_heads = _get(layer, "num_key_value_heads")
    if k_eq_v:
        kv_heads = _get(cfg, "num_global_key_value_heads", kv_heads)
    theta, fraction = _rope_of(cfg)
    act = _get(cfg, "hidden_act") or _get(cfg, "hidden_activation") or "silu"
    return dict(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads or _get(cfg, "num_key_value_heads", heads)),
        head_dim=int(head_dim or hidden // heads),
        intermediate_size=int(_get(cfg, "intermediate_size") or _get(layer, "intermediate_size")),
        rms_norm_eps=float(_get(cfg, "rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_fraction=fraction,
        hidden_act=act,
        vocab_size=int(cfg.vocab_size),
        num_target_layers=int(cfg.num_hidden_layers),
        max_position_embeddings=int(_get(cfg, "max_position_embeddings", 4096)),
        family="gemma" if model_type.startswith("gemma") else "qwen3",
        final_logit_softcapping=_get(cfg, "final_logit_softcapping"),
        attention_k_eq_v=k_eq_v,
        target_model_type=model_type,
    )


def check_layer_ids(field: str, ids: list[int], num_target_layers: int) -> None:
    """Target layer ids are 0-based decoder layers, never the final one (DESIGN §3.1)."""
    last = num_target_layers - 1
    for i in ids:
        if not 0 <= i < last:
            what = "is out of range"
            if i == last:
                what = "is the final layer (its output is what the LM head reads)"
            raise ValueError(f"{field}: layer id {i} {what}; valid ids are 0..{last - 1} "
                             f"for a target with {num_target_layers} layers")


# --------------------------------------------------------------------------- layer spec


@dataclass(frozen=True)
class LayerSpec:
    """Geometry and family options of one draft decoder layer."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_eps: float
    hidden_act: str = "silu"
    attn_in_features: int | None = None  # width of the attention input (Eagle3: 2H); None = H
    qk_norm: bool = True  # Qwen3-style RMSNorm on q and k (Eagle3: off)
    k_eq_v: bool = False  # Gemma: V reuses k_proj's output, no v_proj
    v_norm: bool = False  # Gemma: scale-free RMSNorm on V
    attn_scale: float | None = None  # None = 1/sqrt(head_dim) (Gemma with q/k norms: 1.0)


def init_weights(module: nn.Module, std: float) -> None:
    """HF-style init: Linear/Embedding ~ N(0, std), biases 0, norm scales 1."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, RMSNorm) and m.weight is not None:
            nn.init.ones_(m.weight)


# --------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in at least float32."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.to(y.dtype)
        return y.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE at arbitrary (real) positions, standard rotate-half layout.

    `fraction` < 1 is "proportional" RoPE: only the first fraction·d/2 frequency pairs rotate,
    the rest have frequency 0 (identity). No buffers, so `.to(dtype)` cannot degrade the tables.
    """

    def __init__(self, head_dim: int, theta: float, fraction: float = 1.0):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.rotating_pairs = int(fraction * head_dim // 2)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [..., T] int -> (cos, sin) each [..., T, d] in `dtype`."""
        calc = torch.float64 if dtype == torch.float64 else torch.float32
        pairs = torch.arange(self.head_dim // 2, device=positions.device, dtype=calc)
        inv_freq = self.theta ** (-2.0 * pairs / self.head_dim)
        inv_freq = torch.where(pairs < self.rotating_pairs, inv_freq, torch.zeros_like(inv_freq))
        freqs = positions.to(calc)[..., None] * inv_freq  # [..., T] -> [..., T, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [..., T, d/2] -> [..., T, d]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, d]; cos/sin [B, T, d] (or [T, d])."""
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # [B, T, d] -> [B, 1, T, d]
    return x * cos + rotate_half(x) * sin


def activation(name: str):
    if name == "silu":
        return F.silu
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise InputError(f"hidden_act {name!r} is not supported (silu, gelu_pytorch_tanh, gelu)")


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)) — SwiGLU with silu."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


Sampler = Callable[[torch.Tensor], torch.Tensor]  # logits [B, V_draft] -> draft ids [B]


@dataclass
class ContextRows:
    """Context rows [B, S, H] with their RoPE tables, projected to keys/values *inside* the
    layer's forward (so FSDP2, which gathers a layer's weights only around its forward, works)."""

    rows: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


class Attention(nn.Module):
    """GQA attention; keys/values may be prefixed with precomputed context keys/values.

    `project_kv` is applied identically to context rows and to the layer's own tokens
    (k_norm, then RoPE at the given real positions; V without norm unless `decoding.v_norm`), so the
    context K/V of committed tokens can be computed once and cached.
    """

    def __init__(self, spec: LayerSpec):
        super().__init__()
        d_in = spec.attn_in_features or spec.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.scale = spec.attn_scale if spec.attn_scale is not None else 1.0 / math.sqrt(spec.head_dim)
        self.q_proj = nn.Linear(d_in, spec.num_heads * spec.head_dim, bias=False)
        self.k_proj = nn.Linear(d_in, spec.num_kv_heads * spec.head_dim, bias=False)
        # Gemma difference (k_eq_v): V is k_proj's output before k_norm/RoPE, no v_proj.
        self.v_proj = None if spec.k_eq_v else nn.Linear(d_in, spec.num_kv_heads * spec.head_dim, bias=False)
        self.o_proj = nn.Linear(spec.num_heads * spec.head_dim, spec.hidden_size, bias=False)
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_eps) if spec.qk_norm else None
        self.v_norm = RMSNorm(spec.head_dim, spec.rms_eps, with_scale=False) if spec.v_norm else None

    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, d_in] -> q [B, h, T, d] (q_norm, RoPE)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)  # [B, T, h*d] -> [B, T, h, d]
        if self.q_norm is not None:
            q = self.q_norm(q)
        return apply_rope(q.transpose(1, 2), cos, sin)  # [B, T, h, d] -> [B, h, T, d]

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, d_in] -> (k, v) each [B, g, T, d]: k = RoPE(k_norm(k_proj x)), v = v_proj x."""
        B, T, _ = x.shape
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # [B, T, g*d] -> [B, T, g, d]
        v = k if self.v_proj is None else self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if self.v_norm is not None:
            v = self.v_norm(v)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # [B, T, g, d] -> [B, g, T, d]
        return k, v.transpose(1, 2)  # [B, T, g, d] -> [B, g, T, d]

    def attend(self, q, k, v, mask: torch.Tensor | None, is_causal: bool = False) -> torch.Tensor:
        """q [B, h, Tq, d], k/v [B, g, Tk, d], mask bool (True = may attend) or additive,
        broadcastable to [B, h, Tq, Tk] -> o_proj output [B, Tq, H]."""
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        B, _, Tq, _ = out.shape
        # [B, h, Tq, d] -> [B, Tq, h*d]
        out = out.transpose(1, 2).reshape(B, Tq, self.num_heads * self.head_dim)
        return self.o_proj(out)

    def forward(self, x, cos, sin, mask, prefix_kv=None, is_causal: bool = False) -> torch.Tensor:
        """Attend from x to [prefix_kv; x]; mask covers all those keys ([B|1, 1, T, P + T])."""
        if isinstance(prefix_kv, ContextRows):
            prefix_kv = self.project_kv(prefix_kv.rows, prefix_kv.cos, prefix_kv.sin)
        q = self.project_q(x, cos, sin)
        k, v = self.project_kv(x, cos, sin)
        if prefix_kv is not None:
            k = torch.cat([prefix_kv[0], k], dim=2)  # [B, g, P, d] + [B, g, T, d] -> [B, g, P+T, d]
            v = torch.cat([prefix_kv[1], v], dim=2)
        return self.attend(q, k, v, mask, is_causal)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: h = x + attn(norm(x) | ctx); out = h + mlp(norm(h)).

    Context keys/values (`prefix_kv`) are projected by the caller from features that do not pass
    through `input_layernorm`.
    """

    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.mlp = MLP(spec.hidden_size, spec.intermediate_size, spec.hidden_act)

    def forward(self, x, cos, sin, mask, prefix_kv=None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, prefix_kv)
        return h + self.mlp(self.post_attention_layernorm(h))


class GemmaDecoderLayer(DecoderLayer):
    """Gemma difference: sandwich norms (the attention and MLP outputs are normed before the
    residual add; `pre_feedforward_layernorm` feeds the MLP) and a per-layer `layer_scalar`."""

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.pre_feedforward_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.post_feedforward_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, x, cos, sin, mask, prefix_kv=None) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, prefix_kv)
        h = x + self.post_attention_layernorm(attn)
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h * self.layer_scalar


# --------------------------------------------------------------------------- caches


class KVCache:
    """Per-layer keys/values [B, g, T, d] in growable buffers (amortized O(1) appends).

    Positions are implicit: entry t of every layer sits at position t. `rollback(n)` keeps the
    first n entries (the storage is reused by later appends).
    """

    def __init__(self, num_layers: int):
        self._k: list[torch.Tensor | None] = [None] * num_layers
        self._v: list[torch.Tensor | None] = [None] * num_layers
        self._len = [0] * num_layers

    @property
    def length(self) -> int:
        return self._len[0]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append k/v [B, g, n, d] to `layer`'s buffers."""
        n, used = k.shape[2], self._len[layer]
        buf_k = self._k[layer]
        if buf_k is None or used + n > buf_k.shape[2]:
            cap = max(16, 2 * (used + n))
            new_k = k.new_empty(*k.shape[:2], cap, k.shape[3])  # [B, g, cap, d]
            new_v = v.new_empty(*v.shape[:2], cap, v.shape[3])
            if used:
                new_k[:, :, :used] = buf_k[:, :, :used]
                new_v[:, :, :used] = self._v[layer][:, :, :used]
            self._k[layer], self._v[layer] = new_k, new_v
        self._k[layer][:, :, used:used + n] = k
        self._v[layer][:, :, used:used + n] = v
        self._len[layer] = used + n

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The layer's cached (k, v) [B, g, T, d] (views), or None while empty."""
        if self._k[layer] is None:
            return None
        used = self._len[layer]
        return self._k[layer][:, :, :used], self._v[layer][:, :, :used]

    def rollback(self, length: int) -> None:
        """Keep the first `length` entries of every layer."""
        if not 0 <= length <= min(self._len):
            raise ValueError(f"rollback to {length}: the cache holds {min(self._len)} entries")
        self._len = [length] * len(self._len)
