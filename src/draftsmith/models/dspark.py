"""DSpark: a parallel block drafter with a sequential Markov head and a confidence head.

DeepSpec's anchor-first block (DESIGN §3.2): a block has γ slots; slot 0 holds the anchor (the
last committed token) at position `anchor_pos`, slots 1..γ-1 hold `mask_token_id` at positions
`anchor_pos + k`, and slot k predicts the token at `anchor_pos + k + 1`. Every draft layer attends
bidirectionally inside the block and to the target-feature context strictly before the anchor:

    ctx = hidden_norm(fc(concat(target layer features)))          computed once per position
    K   = k_norm(k_proj([ctx; input_layernorm(x)]))               RoPE at the real positions
    V   = v_proj([ctx; input_layernorm(x)])

The LM head and the embedding are frozen copies of the target's. The Markov head adds a
transition bias `W2 · W1[x_{k-1}]` (x_0 = anchor) to slot k's logits and is sampled left to right
at inference; the confidence head predicts σ(w·[h_k; W1[x_{k-1}]] + b).

Training: `forward(features, input_ids, anchor_pos, anchor_valid)` runs many blocks per sequence
at once and returns post-norm hidden states [B, N, γ, H]; the caller computes logits in chunks
with `draft_logits` / `confidence`. Inference: `new_cache` / `append_context` project the
features of committed tokens once into per-layer context K/V, `propose` drafts one block (γ
slots, or fewer: `num_slots`), `cache.rollback(n)` forgets positions >= n. `GemmaDSparkModel` is
the one-level Gemma subclass.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from draftsmith.config import build_config
from draftsmith.models.base import DraftConfig
from draftsmith.models.layers import (
    ContextRows,
    DecoderLayer,
    GemmaDecoderLayer,
    KVCache,
    LayerSpec,
    RMSNorm,
    RotaryEmbedding,
    Sampler,
    check_layer_ids,
    geometry_from_target,
    init_weights,
)
from draftsmith.models.vocab import DraftVocabMixin
from draftsmith.utils.io import InputError

def default_dspark_layers(num_target_layers: int) -> list[int]:
    """5 target layers evenly spaced from 1 to L-3 (DeepSpec's Qwen3 choice: L=36 ->
    [1, 9, 17, 25, 33]); fewer, deduplicated, for tiny targets."""
    lo, hi = 1, num_target_layers - 3
    if hi < lo:
        lo = hi = max(0, num_target_layers - 2)
    return sorted({int(math.floor(lo + k * (hi - lo) / 4 + 0.5)) for k in range(5)})


DEEPSPEC_ARCHITECTURES = ("Qwen3DSparkModel", "Gemma4DSparkModel")  # (Qwen3 / Llama, Gemma)
DEEPSPEC_LABEL_OFFSET = 1  # DeepSpec's block: slot k predicts anchor + k + 1
DEEPSPEC_OPTIONAL_KEYS = ("num_hidden_layers", "block_size", "mask_token_id", "target_layer_ids",
                          "num_anchors", "enable_confidence_head", "confidence_head_with_markov",
                          "markov_rank", "markov_head_type", "draft_vocab_size")


def deepspec_has_heads(data: dict) -> bool:
    """Whether a DeepSpec config.json has a Markov or a confidence head (DSpark; else DFlash)."""
    return int(data.get("markov_rank") or 0) > 0 or bool(data.get("enable_confidence_head"))


class DSparkConfig(DraftConfig):
    """DSpark draft config: target geometry + block, Markov and confidence options."""

    drafter: ClassVar[str] = "dspark"
    engine_architectures: ClassVar[tuple[str, ...]] = DEEPSPEC_ARCHITECTURES
    has_heads: ClassVar[bool] = True  # which DeepSpec configs it claims: with heads, or without

    num_hidden_layers: int = Field(5, ge=1)  # draft decoder layers
    block_size: int = Field(7, ge=1)  # γ
    mask_token_id: int
    target_layer_ids: list[int]  # default: default_dspark_layers(num_target_layers)
    markov_rank: int = Field(256, ge=0)  # 0 = no Markov head
    markov_head_type: Literal["vanilla", "gated", "rnn"] = "vanilla"
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True
    num_anchors: int = Field(512, ge=1)
    draft_vocab_size: int | None = Field(None, ge=1)  # None = the full target vocabulary
    loss_decay_gamma: float = Field(4.0, gt=0)

    @classmethod
    def default_layer_ids(cls, num_target_layers: int) -> list[int]:
        return default_dspark_layers(num_target_layers)

    @model_validator(mode="after")
    def _check(self):
        self._check_geometry()
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} is outside the embedding "
                             f"(vocab_size {self.vocab_size}: ids 0..{self.vocab_size - 1})")
        ids = self.target_layer_ids
        if not ids or any(b <= a for a, b in zip(ids, ids[1:])):
            raise ValueError(f"target_layer_ids {ids} must be non-empty and strictly increasing")
        check_layer_ids("target_layer_ids", ids, self.num_target_layers)
        self._check_draft_vocab()
        if self.enable_confidence_head and self.confidence_head_with_markov and self.markov_rank == 0:
            raise ValueError("confidence_head_with_markov needs a Markov head (markov_rank > 0); "
                             "set confidence_head_with_markov=false or markov_rank > 0")
        return self

    @property
    def label_offset(self) -> int:
        """Slot k predicts input position anchor + k + label_offset."""
        return DEEPSPEC_LABEL_OFFSET

    @property
    def deepspec_slots(self) -> bool:
        """Whether the block computes DeepSpec's function (slot 0 is the anchor, slot k predicts
        anchor + k + 1): what DeepSpec, llama.cpp's draft-dspark and draftsmith's trainer run."""
        return self.label_offset == DEEPSPEC_LABEL_OFFSET

    def build(self) -> DSparkModel:
        return build_dspark(self)

    def engine_config(self) -> dict:
        """DeepSpec's Qwen3DSparkModel config (Gemma4DSparkModel for the Gemma family), with
        DeepSpec's conditional keys present exactly when DeepSpec writes them."""
        gemma = self.family == "gemma"
        out = {
            "architectures": [DEEPSPEC_ARCHITECTURES[int(gemma)]],
            "model_type": "gemma4_text" if gemma else "qwen3",
            **self.geometry_json(),
            "num_hidden_layers": self.num_hidden_layers,
            "num_target_layers": self.num_target_layers,
            "block_size": self.block_size,
            "layer_types": ["full_attention"] * self.num_hidden_layers,
            "mask_token_id": self.mask_token_id,
            "target_layer_ids": list(self.target_layer_ids),
            "num_anchors": self.num_anchors,
            "enable_confidence_head": self.enable_confidence_head,
            "markov_rank": self.markov_rank,
        }
        if self.enable_confidence_head:
            out["confidence_head_with_markov"] = self.confidence_head_with_markov
        if self.markov_rank > 0:
            out["markov_head_type"] = self.markov_head_type
        if self.pruned:
            out["draft_vocab_size"] = self.draft_vocab
        if gemma:
            out.update(hidden_activation=self.hidden_act,
                       final_logit_softcapping=self.final_logit_softcapping,
                       attention_k_eq_v=self.attention_k_eq_v, global_head_dim=self.head_dim,
                       num_global_key_value_heads=self.num_key_value_heads)
        return out

    @classmethod
    def claims_engine_config(cls, data: dict) -> bool:
        return super().claims_engine_config(data) and deepspec_has_heads(data) == cls.has_heads

    @classmethod
    def from_engine_config(cls, data: dict, where: str) -> DSparkConfig:
        """A DeepSpec config.json (ours without the draftsmith sub-dict, or DeepSpec's released
        layout: a copy of the target's config plus its keys)."""
        missing = [k for k in ("num_target_layers", "mask_token_id", "target_layer_ids") if k not in data]
        if missing:
            raise InputError(f"{where}: DeepSpec config lacks {', '.join(missing)}")
        fields = {**geometry_from_target(types.SimpleNamespace(**data)),
                  "num_target_layers": data["num_target_layers"], "target_model_type": ""}
        fields.update({k: data[k] for k in DEEPSPEC_OPTIONAL_KEYS if k in data})
        return build_config(cls, fields, where=f"{where} (DeepSpec import)")


# --------------------------------------------------------------------------- blocks and masks


def block_attention_mask(anchor_pos: torch.Tensor, anchor_valid: torch.Tensor | None,
                         ctx_len: int, block_size: int) -> torch.Tensor:
    """Boolean mask (True = may attend) [B, 1, N·γ, ctx_len + N·γ] for N blocks of γ slots.

    Queries are the blocks' slots in order; keys are the ctx_len context positions, then the
    same N·γ slots. A slot sees every slot of its own block (bidirectional) and context position
    j iff j < its block's anchor (never the anchor's own features). Slots of an invalid (padded)
    block see only their own block, so no row is fully masked.
    """
    B, N = anchor_pos.shape
    nq = N * block_size
    dev = anchor_pos.device
    anchor_q = anchor_pos.repeat_interleave(block_size, dim=1)  # [B, N] -> [B, N·γ]
    ctx_ok = torch.arange(ctx_len, device=dev)[None, None, :] < anchor_q[..., None]  # [B, N·γ, S]
    if anchor_valid is not None:
        ctx_ok = ctx_ok & anchor_valid.repeat_interleave(block_size, dim=1)[..., None]
    block_of = torch.arange(nq, device=dev) // block_size  # [N·γ]
    same_block = (block_of[:, None] == block_of[None, :]).expand(B, nq, nq)  # [B, N·γ, N·γ]
    return torch.cat([ctx_ok, same_block], dim=-1).unsqueeze(1)  # [B, N·γ, S+N·γ] -> [B, 1, ...]


def block_input_ids(input_ids: torch.Tensor, anchor_pos: torch.Tensor, block_size: int,
                    mask_token_id: int) -> torch.Tensor:
    """[B, S] ids, [B, N] anchors -> block inputs [B, N, γ]: the anchor token, then mask tokens."""
    ids = torch.full((*anchor_pos.shape, block_size), mask_token_id,
                     dtype=input_ids.dtype, device=input_ids.device)
    ids[..., 0] = input_ids.gather(1, anchor_pos)
    return ids


def block_labels(input_ids: torch.Tensor, anchor_pos: torch.Tensor, block_size: int,
                 offset: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels [B, N, γ] = input_ids[anchor + k + offset] and whether that index is inside the
    sequence. offset 1: DeepSpec slots (slot k predicts anchor+k+1); 0: z-lab slots."""
    S = input_ids.shape[1]
    idx = anchor_pos[..., None] + offset + torch.arange(block_size, device=anchor_pos.device)  # [B, N, γ]
    in_range = idx < S
    flat = idx.clamp(max=S - 1).flatten(1)  # [B, N, γ] -> [B, N·γ]
    return input_ids.gather(1, flat).view(idx.shape), in_range  # [B, N·γ] -> [B, N, γ]


def block_prev_tokens(input_ids: torch.Tensor, anchor_pos: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
    """Teacher-forced previous tokens [B, N, γ] for the Markov/confidence heads:
    [anchor, labels[..., :-1]]."""
    anchor = input_ids.gather(1, anchor_pos)[..., None]  # [B, N] -> [B, N, 1]
    return torch.cat([anchor, labels[..., :-1]], dim=-1)


# --------------------------------------------------------------------------- heads


class MarkovHead(nn.Module):
    """Vanilla Markov head: bias(x_{k-1}) = W2 · W1[x_{k-1}] over the draft vocabulary.

    W1 `markov_w1` [V, r] is indexed by target ids; W2 `markov_w2` [V_draft, r].
    """

    def __init__(self, vocab: int, draft_vocab: int, rank: int, hidden: int):
        super().__init__()
        self.markov_w1 = nn.Embedding(vocab, rank)
        self.markov_w2 = nn.Linear(rank, draft_vocab, bias=False)

    def prev_embedding(self, prev: torch.Tensor) -> torch.Tensor:
        """prev target ids [...] -> W1[prev] [..., r]."""
        return self.markov_w1(prev)

    def step(self, hidden: torch.Tensor, prev: torch.Tensor, state=None):
        """One slot: hidden [..., H], prev [...] -> (bias [..., V_draft], next state)."""
        return self.markov_w2(self.prev_embedding(prev)), None

    def block_bias(self, hidden: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Teacher-forced: hidden [..., γ, H], prev [..., γ] -> bias [..., γ, V_draft]."""
        return self.step(hidden, prev)[0]


class GatedMarkovHead(MarkovHead):
    """Research variant: g = σ(gate_proj([h_k; W1[x_{k-1}]])) ∈ (0,1)^r scales the Markov
    embedding before W2, so the backbone decides per slot how much transition bias applies."""

    def __init__(self, vocab: int, draft_vocab: int, rank: int, hidden: int):
        super().__init__(vocab, draft_vocab, rank, hidden)
        self.gate_proj = nn.Linear(hidden + rank, rank)

    def step(self, hidden, prev, state=None):
        e = self.prev_embedding(prev)
        gate = torch.sigmoid(self.gate_proj(torch.cat([hidden, e.to(hidden.dtype)], dim=-1)))
        return self.markov_w2(gate * e), None


class RNNMarkovHead(MarkovHead):
    """Research variant (paper eq. 6): a gated recurrent state over the block's prefix.

    [g; c; o] = joint_proj([s_{k-1}; W1[x_{k-1}]; h_k]),
    s_k = σ(g) ⊙ s_{k-1} + (1 − σ(g)) ⊙ tanh(c),  bias_k = W2 · tanh(o),  s_0 = 0.
    """

    def __init__(self, vocab: int, draft_vocab: int, rank: int, hidden: int):
        super().__init__(vocab, draft_vocab, rank, hidden)
        self.rank = rank
        self.joint_proj = nn.Linear(2 * rank + hidden, 3 * rank)

    def step(self, hidden, prev, state=None):
        e = self.prev_embedding(prev).to(hidden.dtype)
        if state is None:
            state = hidden.new_zeros(*hidden.shape[:-1], self.rank)
        gate, cand, out = self.joint_proj(torch.cat([state, e, hidden], dim=-1)).chunk(3, dim=-1)
        gate = torch.sigmoid(gate)
        new_state = gate * state + (1 - gate) * torch.tanh(cand)
        return self.markov_w2(torch.tanh(out)), new_state

    def block_bias(self, hidden, prev):
        state, out = None, []
        for k in range(hidden.shape[-2]):
            bias, state = self.step(hidden[..., k, :], prev[..., k], state)
            out.append(bias)
        return torch.stack(out, dim=-2)  # γ × [..., V_draft] -> [..., γ, V_draft]


MARKOV_HEADS = {"vanilla": MarkovHead, "gated": GatedMarkovHead, "rnn": RNNMarkovHead}


class ConfidenceHead(nn.Module):
    """Logit of the per-slot acceptance probability: w·features + b (σ applied by the caller)."""

    def __init__(self, in_features: int):
        super().__init__()
        self.proj = nn.Linear(in_features, 1, bias=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).squeeze(-1)  # [..., in] -> [...]


@dataclass
class DSparkProposal:
    """One drafted block of n slots (n = γ unless `propose` ran a shorter block)."""

    tokens: torch.Tensor  # [B, n] target ids, sampled left to right
    logits: torch.Tensor  # [B, n, V_draft] Markov-corrected (the distribution verification uses)
    hidden: torch.Tensor  # [B, n, H] post-norm hidden states
    confidence_logits: torch.Tensor | None  # [B, n]; σ(.) = predicted per-slot acceptance


# --------------------------------------------------------------------------- model


class DSparkModel(DraftVocabMixin, nn.Module):
    """DeepSpec's Qwen3DSparkModel layout (tensor names of DESIGN §4)."""

    layer_cls: ClassVar[type[DecoderLayer]] = DecoderLayer

    def __init__(self, config: DSparkConfig):
        nn.Module.__init__(self)
        self.config = config
        H, c = config.hidden_size, config
        spec = self.layer_spec()
        self.embed_tokens = nn.Embedding(c.vocab_size, H)
        self.fc = nn.Linear(len(c.target_layer_ids) * H, H, bias=False)
        self.hidden_norm = RMSNorm(H, c.rms_norm_eps)
        self.layers = nn.ModuleList(self.layer_cls(spec) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(H, c.rms_norm_eps)
        self.rotary = RotaryEmbedding(spec.head_dim, c.rope_theta, c.rope_fraction)
        self.lm_head = nn.Linear(H, c.draft_vocab, bias=False)
        self.markov_head = None
        if c.markov_rank > 0:
            self.markov_head = MARKOV_HEADS[c.markov_head_type](c.vocab_size, c.draft_vocab, c.markov_rank, H)
        self.confidence_head = None
        if c.enable_confidence_head:
            with_markov = c.confidence_head_with_markov and self.markov_head is not None
            self.confidence_head = ConfidenceHead(H + (c.markov_rank if with_markov else 0))
        self._init_vocab_buffers(persistent_d2t=c.pruned, persistent_t2d=False)
        init_weights(self, c.initializer_range)
        self.embed_tokens.requires_grad_(False)
        self.lm_head.requires_grad_(False)

    def layer_spec(self) -> LayerSpec:
        c = self.config
        return LayerSpec(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                         c.intermediate_size, c.rms_norm_eps, c.hidden_act, qk_norm=True)

    @property
    def draft_vocab(self) -> int:
        return self.config.draft_vocab

    def init_from_target(self, target: nn.Module, kept_ids: torch.Tensor | None = None):
        """Copy the target's embedding and LM head (rows of `kept_ids` when pruned), frozen.
        `target`: the HF causal LM (anything with get_input/output_embeddings)."""
        return self._copy_target_embeddings(target, kept_ids, train_lm_head=False)

    # -- pieces shared by training and inference

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def base_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Post-norm hidden [..., H] -> LM-head logits [..., V_draft] (no Markov bias)."""
        return self.lm_head(hidden)

    def draft_logits(self, hidden: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
        """hidden [..., γ, H], prev_tokens [..., γ] target ids (x_{k-1}; x_0 = anchor) ->
        logits [..., γ, V_draft] = lm_head(h) + Markov bias. Chunk over leading axes, never γ
        (the rnn head runs along γ)."""
        logits = self.base_logits(hidden)
        if self.markov_head is not None:
            logits = logits + self.markov_head.block_bias(hidden, prev_tokens).to(logits.dtype)
        return logits

    def confidence(self, hidden: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor | None:
        """hidden [..., H], prev_tokens [...] -> confidence logits [...] (None without a head)."""
        if self.confidence_head is None:
            return None
        feats = hidden
        if self.confidence_head.proj.in_features > hidden.shape[-1]:
            e = self.markov_head.prev_embedding(prev_tokens).to(hidden.dtype)
            feats = torch.cat([hidden, e], dim=-1)  # [..., H] + [..., r] -> [..., H + r]
        return self.confidence_head(feats)

    def project_context(self, features: torch.Tensor) -> torch.Tensor:
        """Target features [B, S, L·H] -> context rows [B, S, H] = hidden_norm(fc(features))."""
        return self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))

    def _run_layers(self, x, pos, mask, ctx=None, ctx_pos=None, cache: KVCache | None = None):
        """x [B, T, H] at positions pos [B, T]; context either projected rows `ctx` [B, S, H] at
        `ctx_pos` [B, S] or a cache of per-layer context K/V -> post-norm hidden [B, T, H]."""
        cos, sin = self.rotary(pos, x.dtype)
        if ctx is not None:
            cos_c, sin_c = self.rotary(ctx_pos, x.dtype)
        for i, layer in enumerate(self.layers):
            if ctx is not None:
                kv = ContextRows(ctx, cos_c, sin_c)  # projected inside the layer's forward
            else:
                kv = cache.get(i) if cache is not None else None
            x = layer(x, cos, sin, mask, prefix_kv=kv)
        return self.norm(x)

    # -- training

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor, anchor_pos: torch.Tensor,
                anchor_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Many blocks per sequence at once.

        features [B, S, L·H] (target layer outputs), input_ids [B, S], anchor_pos [B, N] (each
        < S), anchor_valid [B, N] bool (False = padding) -> post-norm hidden [B, N, γ, H]
        (zeros for padded anchors). Padded anchors are moved last and trimmed, and context
        positions at or after the last anchor are never projected.
        """
        B, N = anchor_pos.shape
        valid = torch.ones_like(anchor_pos, dtype=torch.bool) if anchor_valid is None else anchor_valid.bool()
        if bool((anchor_pos[valid] >= input_ids.shape[1]).any()) or bool((anchor_pos[valid] < 0).any()):
            raise ValueError(f"anchor positions must lie in 0..{input_ids.shape[1] - 1}")
        n_keep = int(valid.sum(1).max()) if N else 0
        out_dtype = self.fc.weight.dtype
        out = torch.zeros(B, N, self.config.block_size, self.config.hidden_size,
                          dtype=out_dtype, device=features.device)
        if n_keep == 0:
            return out
        order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices[:, :n_keep]  # [B, N']
        keep = valid.gather(1, order)
        anchors = torch.where(keep, anchor_pos.gather(1, order), torch.zeros_like(order))
        ctx_len = int(anchors.max())  # context keys are strictly before every anchor
        hidden = self._blocks(features[:, :ctx_len], input_ids, anchors, keep)  # [B, N', γ, H]
        hidden = torch.where(keep[..., None, None], hidden, torch.zeros_like(hidden))
        index = order[..., None, None].expand(-1, -1, *hidden.shape[2:])  # [B, N'] -> [B, N', γ, H]
        return out.scatter(1, index, hidden.to(out_dtype))

    def _blocks(self, features, input_ids, anchors, keep) -> torch.Tensor:
        """Blocks at `anchors` [B, N] against context features [B, S', L·H] -> [B, N, γ, H]."""
        B, N = anchors.shape
        g, dev = self.config.block_size, anchors.device
        ctx = self.project_context(features)  # [B, S', L·H] -> [B, S', H]
        ids = block_input_ids(input_ids, anchors, g, self.config.mask_token_id)  # [B, N, γ]
        x = self.embed(ids).flatten(1, 2).to(ctx.dtype)  # [B, N, γ, H] -> [B, N·γ, H]
        pos = (anchors[..., None] + torch.arange(g, device=dev)).flatten(1)  # [B, N, γ] -> [B, N·γ]
        ctx_pos = torch.arange(ctx.shape[1], device=dev).expand(B, -1)  # [B, S']
        mask = block_attention_mask(anchors, keep, ctx.shape[1], g)
        h = self._run_layers(x, pos, mask, ctx=ctx, ctx_pos=ctx_pos)  # [B, N·γ, H]
        return h.view(B, N, g, -1)  # [B, N·γ, H] -> [B, N, γ, H]

    # -- inference

    def new_cache(self) -> KVCache:
        """An empty per-layer context K/V cache (entry t = committed position t)."""
        return KVCache(len(self.layers))

    @torch.no_grad()
    def append_context(self, cache: KVCache, features: torch.Tensor) -> None:
        """Project the features [B, n, L·H] of the next n committed positions once and append
        their context K/V to every layer. `cache.length`: an int, or [B] per-row starts (a
        ragged writer, `decoding.kv.RaggedKVCache.rows_writer`)."""
        B, n, _ = features.shape
        ctx = self.project_context(features)  # [B, n, L·H] -> [B, n, H]
        start = torch.as_tensor(cache.length, device=ctx.device).reshape(-1, 1)  # [B | 1, 1]
        pos = (start + torch.arange(n, device=ctx.device)).expand(B, -1)  # [B, n]
        cos, sin = self.rotary(pos, ctx.dtype)
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.project_kv(ctx, cos, sin)
            cache.append(i, k, v)

    @torch.no_grad()
    def propose(self, cache: KVCache, anchor_token: torch.Tensor, anchor_pos: int | torch.Tensor,
                sampler: Sampler | None = None, num_slots: int | None = None) -> DSparkProposal:
        """Draft one block of n = `num_slots` slots (default γ = block_size) at `anchor_pos`
        against the cached context: [anchor, mask × (n-1)], bidirectional inside the block, so a
        shorter block changes every slot (llama.cpp's --spec-draft-n-max), unlike cutting a γ-slot
        block after drafting.

        anchor_token [B] (target ids); anchor_pos int or [B], at most `cache.length` (context
        positions >= anchor_pos are masked). The Markov head is sampled left to right with
        `sampler(logits [B, V_draft]) -> draft ids [B]` (greedy argmax when None).
        """
        B, dev = anchor_token.shape[0], anchor_token.device
        g = self.block_slots(num_slots)
        anchor_pos = torch.as_tensor(anchor_pos, device=dev).expand(B).long()
        if dev.type == "cpu" and bool((anchor_pos > cache.length).any()):  # no sync on GPUs
            raise ValueError(f"anchor at {anchor_pos.tolist()} needs context up to it; "
                             f"the cache holds {cache.length} positions")
        ids = torch.full((B, g), self.config.mask_token_id, dtype=torch.long, device=dev)
        ids[:, 0] = anchor_token
        x = self.embed(ids).to(self.fc.weight.dtype)  # [B, n] -> [B, n, H]
        pos = anchor_pos[:, None] + torch.arange(g, device=dev)  # [B, n]
        mask = block_attention_mask(anchor_pos[:, None], None, cache.length, g)  # [B, 1, n, T+n]
        hidden = self._run_layers(x, pos, mask, cache=cache)  # [B, n, H]
        tokens, logits, conf = self.sample_block(hidden, anchor_token, sampler)
        return DSparkProposal(tokens, logits, hidden, conf)

    def block_slots(self, num_slots: int | None) -> int:
        """The slots of an inference block: `num_slots` (1..block_size), None = block_size."""
        g = self.config.block_size
        if num_slots is None:
            return g
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or not 1 <= num_slots <= g:
            raise ValueError(f"num_slots {num_slots!r} must lie in 1..{g} (block_size {g})")
        return num_slots

    def sample_block(self, hidden: torch.Tensor, anchor_token: torch.Tensor,
                     sampler: Sampler | None = None):
        """Left-to-right sampling of one block of any length n: hidden [B, n, H] -> (tokens
        [B, n] target ids, logits [B, n, V_draft], confidence logits [B, n] or None)."""
        base = self.base_logits(hidden)  # [B, n, V_draft]
        prev, state = anchor_token.long(), None
        tokens, logits, confs = [], [], []
        for k in range(hidden.shape[1]):
            step = base[:, k]
            if self.markov_head is not None:
                bias, state = self.markov_head.step(hidden[:, k], prev, state)
                step = step + bias.to(step.dtype)
            if self.confidence_head is not None:
                confs.append(self.confidence(hidden[:, k], prev))
            draft_id = sampler(step) if sampler is not None else step.argmax(-1)
            prev = self.to_target_ids(draft_id)
            tokens.append(prev)
            logits.append(step)
        conf = torch.stack(confs, dim=1) if confs else None  # n × [B] -> [B, n]
        return torch.stack(tokens, dim=1), torch.stack(logits, dim=1), conf


class GemmaDSparkModel(DSparkModel):
    """Gemma differences (DeepSpec's Gemma4DSparkModel), nothing else:

    - sandwich-norm layers with `layer_scalar` (`GemmaDecoderLayer`);
    - attention: scale-free RMSNorm on V, attention scale 1 (q and k are RMS-normed), and
      K = V without `v_proj` when the target has `attention_k_eq_v`;
    - embeddings scaled by √H;
    - final-logit softcap on the draft's LM-head logits (before the Markov bias).
    """

    layer_cls = GemmaDecoderLayer

    def layer_spec(self) -> LayerSpec:
        return replace(super().layer_spec(), k_eq_v=self.config.attention_k_eq_v,
                       v_norm=True, attn_scale=1.0)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        e = super().embed(ids)
        return e * torch.tensor(math.sqrt(self.config.hidden_size), dtype=e.dtype)

    def base_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().base_logits(hidden)
        cap = self.config.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits


def build_dspark(config: DSparkConfig) -> DSparkModel:
    """The DSpark model class for the config's family."""
    return GemmaDSparkModel(config) if config.family == "gemma" else DSparkModel(config)
