"""EAGLE-3: one Llama-style decoder layer fed fused target features, chained token by token.

Layout the engines serve (DESIGN §3.3): `fc: Linear(3·H -> H)` fuses exactly three target layers;
one decoder layer `midlayer` (no q/k norm) whose attention reads the 2H-wide
`[input_layernorm(embed(token)); hidden_norm(h)]`; the residual is the raw fused hidden h
(`hidden_norm(h)` with `norm_before_residual`); `norm` + `lm_head` [V_draft, H] give the logits.
The features at position i pair with token i + 1; the next step is fed the pre-norm output.

Training-time test (TTT) unrolls `ttt_length` steps over the whole sequence at once. Step s at
index i reads token i + 1 + s and predicts token i + 2 + s (the target's next-token
distribution at position i + 1 + s); its query attends to step 0's keys at positions <= i and
to the diagonal keys (index i) of steps 1..s. RoPE: step s at index i sits at position i + s.

Inference: `extend` appends step-0 entries for committed (feature, next token) pairs to a KV
cache, `propose` drafts a chain of k tokens and rolls the cache back to the committed entries.
`extend_rows` / `propose_rows` do the same for a batch whose rows hold different numbers of
entries (a ragged cache with a length per row; masks hide each row's stale entries), so the decode
loop drafts every row with one batched forward per slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from draftsmith.models.base import DraftConfig
from draftsmith.models.layers import (
    DecoderLayer,
    KVCache,
    LayerSpec,
    RMSNorm,
    RotaryEmbedding,
    Sampler,
    check_layer_ids,
    init_weights,
)
from draftsmith.models.vocab import DraftVocabMixin

def default_eagle3_layers(num_target_layers: int) -> list[int]:
    """[1, L//2 - 1, L - 4]: the engines' default inputs [2, L//2, L - 3] in draftsmith's
    0-based "output of layer i" convention (DESIGN §3.1)."""
    L = num_target_layers
    return [1, L // 2 - 1, L - 4]


class Eagle3Config(DraftConfig):
    """EAGLE-3 draft config: target geometry + fused layers, TTT length, vocabulary."""

    drafter: ClassVar[str] = "eagle3"

    target_layer_ids: list[int]  # exactly 3; default default_eagle3_layers(num_target_layers)
    ttt_length: int = Field(7, ge=1)
    norm_before_residual: bool = False
    draft_vocab_size: int | None = Field(None, ge=1)  # None = the full target vocabulary
    num_hidden_layers: Literal[1] = 1
    train_lm_head: bool = True  # EAGLE-3 trains its (pruned) head; initialized from the target's

    @classmethod
    def default_layer_ids(cls, num_target_layers: int) -> list[int]:
        return default_eagle3_layers(num_target_layers)

    @model_validator(mode="after")
    def _check(self):
        self._check_geometry()
        if len(self.target_layer_ids) != 3:
            raise ValueError(f"target_layer_ids {self.target_layer_ids}: EAGLE-3 fuses exactly 3 "
                             "target layers (what llama.cpp, SGLang and vLLM load)")
        check_layer_ids("target_layer_ids", self.target_layer_ids, self.num_target_layers)
        self._check_draft_vocab()
        return self

    def build(self) -> Eagle3Model:
        return Eagle3Model(self)

    def engine_config(self) -> dict:
        """SGLang's EAGLE-3 config (nested layer ids, always `draft_vocab_size`)."""
        return {
            "architectures": ["LlamaForCausalLMEagle3"],
            "model_type": "llama",
            **self.geometry_json(),
            "num_hidden_layers": 1,
            "draft_vocab_size": self.draft_vocab,
            "target_hidden_size": self.hidden_size,
            "norm_before_residual": self.norm_before_residual,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(self.target_layer_ids)},
        }


def ttt_step_tokens(input_ids: torch.Tensor, step: int, pad_id: int = 0):
    """Tokens read by TTT step `step`: [B, S] -> (tokens [B, S] with tokens[:, i] =
    input_ids[:, i + 1 + step] (pad_id past the end), valid [S] bool)."""
    B, S = input_ids.shape
    shift = step + 1
    tokens = input_ids.new_full((B, S), pad_id)
    if shift < S:
        tokens[:, : S - shift] = input_ids[:, shift:]
    valid = torch.arange(S, device=input_ids.device) < S - shift
    return tokens, valid


def ttt_attention_mask(seq_len: int, step: int, device=None) -> torch.Tensor:
    """Mask (True = may attend) [1, 1, S, (step + 1)·S] of TTT step `step` over the keys
    [step 0 (S); step 1 (S); ...; step `step` (S)]: causal on step 0, diagonal on the others."""
    i = torch.arange(seq_len, device=device)
    causal = i[None, :] <= i[:, None]  # [S, S]
    diag = i[None, :] == i[:, None]  # [S, S]
    return torch.cat([causal] + [diag] * step, dim=-1)[None, None]  # [S, (s+1)S] -> [1, 1, ...]


def ttt_attend(attn, q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]):
    """Attention of TTT step s = len(keys) - 1 >= 1 without the dense mask: query i sees step
    0's keys 0..i (causal) and key i of each later step, so those later steps add one logit per
    query, not a [S, S] block each. Same function as `attend` with `ttt_attention_mask` (tested);
    ~(s + 1)x less attention work, but it materializes the [S, S] probabilities, so the training
    forward uses it on CPUs only (the eagle3 recipe's step: ~5.5 -> ~4.8 s on a 2-core AMD EPYC
    with AVX512-BF16). q [B, h, S, d], keys/values (s + 1) x [B, g, S, d] -> o_proj output [B, S, H]."""
    B, h, S, d = q.shape
    rep = h // keys[0].shape[1]  # grouped-query attention: each kv head serves `rep` q heads
    k0, v0 = (t.repeat_interleave(rep, dim=1) for t in (keys[0], values[0]))  # [B, g, S, d] -> [B, h, S, d]
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    scores0 = (q @ k0.transpose(-1, -2)).masked_fill(~causal, float("-inf"))  # [B, h, S, S]
    diag = [(q * k.repeat_interleave(rep, dim=1)).sum(-1, keepdim=True) for k in keys[1:]]  # s x [B, h, S, 1]
    logits = torch.cat([scores0] + diag, dim=-1)  # [B, h, S, S + s]
    wide = torch.promote_types(logits.dtype, torch.float32)  # softmax in fp32 at least (bf16 autocast)
    probs = torch.softmax(logits.to(wide) * attn.scale, dim=-1).to(q.dtype)
    out = probs[..., :S] @ v0  # [B, h, S, S] @ [B, h, S, d] -> [B, h, S, d]
    for t, v in enumerate(values[1:]):
        out = out + probs[..., S + t, None] * v.repeat_interleave(rep, dim=1)  # [B, h, S, 1] * [B, h, S, d]
    out = out.transpose(1, 2).reshape(B, S, h * d)  # [B, h, S, d] -> [B, S, h*d]
    return attn.o_proj(out)


class Eagle3MidLayer(DecoderLayer):
    """Eagle3 difference from the Llama layer: the attention input is
    [input_layernorm(embed); hidden_norm(h)] (2H wide) and the residual is the fused hidden
    h (hidden_norm(h) when `norm_before_residual`)."""

    def __init__(self, spec: LayerSpec, norm_before_residual: bool):
        super().__init__(spec)
        self.hidden_norm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.norm_before_residual = norm_before_residual

    def attention_input(self, emb: torch.Tensor, hidden: torch.Tensor):
        """emb, hidden [B, T, H] -> (attention input [B, T, 2H], residual [B, T, H])."""
        h = self.hidden_norm(hidden)
        x = torch.cat([self.input_layernorm(emb.to(h.dtype)), h], dim=-1)  # 2 × [B, T, H] -> [B, T, 2H]
        return x, (h if self.norm_before_residual else hidden)

    def finish(self, attn_out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Residual add and MLP -> pre-norm output [B, T, H]."""
        h = residual + attn_out
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward(self, emb, hidden, cos, sin, mask, prefix_kv=None, is_causal=False):
        x, residual = self.attention_input(emb, hidden)
        return self.finish(self.self_attn(x, cos, sin, mask, prefix_kv, is_causal), residual)


@dataclass
class Eagle3Proposal:
    tokens: torch.Tensor  # [B, k] target ids
    logits: torch.Tensor  # [B, k, V_draft] logits each token was sampled from


class Eagle3Model(DraftVocabMixin, nn.Module):
    """EAGLE-3 draft with `midlayer.*` tensor names and `d2t` / `t2d` buffers."""

    def __init__(self, config: Eagle3Config):
        nn.Module.__init__(self)
        self.config = c = config
        H = c.hidden_size
        spec = LayerSpec(H, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                         c.intermediate_size, c.rms_norm_eps, c.hidden_act,
                         attn_in_features=2 * H, qk_norm=False)
        self.embed_tokens = nn.Embedding(c.vocab_size, H)
        self.fc = nn.Linear(3 * H, H, bias=False)
        self.midlayer = Eagle3MidLayer(spec, c.norm_before_residual)
        self.norm = RMSNorm(H, c.rms_norm_eps)
        self.lm_head = nn.Linear(H, c.draft_vocab, bias=False)
        self.rotary = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_fraction)
        self._init_vocab_buffers(persistent_d2t=True, persistent_t2d=True)
        init_weights(self, c.initializer_range)
        self.embed_tokens.requires_grad_(False)
        self.lm_head.requires_grad_(c.train_lm_head)

    @property
    def draft_vocab(self) -> int:
        return self.config.draft_vocab

    def init_from_target(self, target: nn.Module, kept_ids: torch.Tensor | None = None):
        """Copy the target's embedding (frozen) and its LM-head rows of the draft vocabulary
        (the starting point of the trained draft head)."""
        return self._copy_target_embeddings(target, kept_ids, train_lm_head=self.config.train_lm_head)

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Post-norm hidden [..., H] -> logits [..., V_draft]."""
        return self.lm_head(hidden)

    def _qkv(self, emb, hidden, pos):
        """One step's attention inputs at positions pos [B, T] -> (q, k, v, residual)."""
        x, residual = self.midlayer.attention_input(emb, hidden)
        cos, sin = self.rotary(pos, x.dtype)
        attn = self.midlayer.self_attn
        k, v = attn.project_kv(x, cos, sin)
        return attn.project_q(x, cos, sin), k, v, residual

    # -- training

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor,
                ttt_length: int | None = None) -> list[torch.Tensor]:
        """TTT unroll. features [B, S, 3·H], input_ids [B, S] (right padding only) -> one
        post-norm hidden [B, S, H] per step; `draft_logits` turns a step's hidden into logits.
        Step s at index i predicts token i + 2 + s; `ttt_step_tokens(..)[1]` says which indices
        are inside the sequence."""
        steps = ttt_length or self.config.ttt_length
        B, S, _ = features.shape
        hidden = self.fc(features.to(self.fc.weight.dtype))  # [B, S, 3H] -> [B, S, H]
        pos = torch.arange(S, device=features.device).expand(B, S)  # [B, S]
        attn = self.midlayer.self_attn
        keys, values, outs = [], [], []
        for s in range(steps):
            tokens, _ = ttt_step_tokens(input_ids, s)
            q, k, v, residual = self._qkv(self.embed_tokens(tokens), hidden, pos + s)
            keys.append(k)
            values.append(v)
            if s == 0:
                attn_out = attn.attend(q, k, v, None, is_causal=True)
            elif features.device.type == "cpu":  # step 0's causal block + each later step's diagonal
                attn_out = ttt_attend(attn, q, keys, values)
            else:  # GPU kernels take the mask without materializing [S, S] probabilities
                mask = ttt_attention_mask(S, s, features.device)
                k_all = torch.cat(keys, dim=2)  # (s+1) × [B, g, S, d] -> [B, g, (s+1)S, d]
                attn_out = attn.attend(q, k_all, torch.cat(values, dim=2), mask)
            hidden = self.midlayer.finish(attn_out, residual)  # pre-norm, fed to the next step
            outs.append(self.norm(hidden))
        return outs

    # -- inference

    def new_cache(self) -> KVCache:
        """Empty draft KV cache; entry t holds (feature t, token t + 1) at position t."""
        return KVCache(1)

    @torch.no_grad()
    def extend(self, cache: KVCache, features: torch.Tensor, next_tokens: torch.Tensor):
        """Append step-0 entries for committed pairs: features [B, n, 3·H] of positions
        cache.length.. and the tokens that follow them, next_tokens [B, n] ->
        (pre-norm outputs [B, n, H], logits [B, n, V_draft])."""
        B, n, _ = features.shape
        start, dev = cache.length, features.device
        hidden = self.fc(features.to(self.fc.weight.dtype))  # [B, n, 3H] -> [B, n, H]
        pos = torch.arange(start, start + n, device=dev).expand(B, n)  # [B, n]
        q, k, v, residual = self._qkv(self.embed_tokens(next_tokens), hidden, pos)
        cache.append(0, k, v)
        k_all, v_all = cache.get(0)
        mask = (torch.arange(start + n, device=dev)[None, :] <= pos[0, :, None])[None, None]  # [1, 1, n, T]
        out = self.midlayer.finish(self.midlayer.self_attn.attend(q, k_all, v_all, mask), residual)
        return out, self.draft_logits(self.norm(out))

    @torch.no_grad()
    def propose(self, cache: KVCache, features: torch.Tensor, next_tokens: torch.Tensor,
                num_tokens: int, sampler: Sampler | None = None) -> Eagle3Proposal:
        """Extend the cache with newly committed pairs (see `extend`; at least one), then draft a
        chain of `num_tokens` tokens. The chain's cache entries are rolled back before
        returning, so the cache holds committed entries only."""
        out, logits = self.extend(cache, features, next_tokens)
        committed = cache.length
        proposal = self._draft_chain(out[:, -1:], logits[:, -1], num_tokens, sampler,
                                     lambda s, token, hidden: self._chain_step(cache, token, hidden, committed + s))
        cache.rollback(committed)
        return proposal

    def _draft_chain(self, hidden, step_logits, num_tokens: int, sampler, step) -> Eagle3Proposal:
        """Sample `num_tokens` tokens left to right from hidden [B, 1, H] / logits [B, V_draft];
        `step(s, token, hidden) -> (hidden, logits)` runs the draft one position further."""
        tokens, all_logits = [], []
        for s in range(num_tokens):
            draft_id = sampler(step_logits) if sampler is not None else step_logits.argmax(-1)
            token = self.to_target_ids(draft_id)
            tokens.append(token)
            all_logits.append(step_logits)
            if s + 1 < num_tokens:
                hidden, step_logits = step(s, token, hidden)
        return Eagle3Proposal(torch.stack(tokens, dim=1), torch.stack(all_logits, dim=1))

    def _chain_step(self, cache: KVCache, token: torch.Tensor, hidden: torch.Tensor, position: int):
        """One drafted step at `position`: token [B], previous pre-norm output hidden [B, 1, H]
        -> (pre-norm output [B, 1, H], logits [B, V_draft]); its K/V are appended."""
        B = token.shape[0]
        pos = torch.full((B, 1), position, device=token.device)
        q, k, v, residual = self._qkv(self.embed_tokens(token[:, None]), hidden, pos)
        cache.append(0, k, v)
        k_all, v_all = cache.get(0)  # every entry so far is visible to the newest one
        out = self.midlayer.finish(self.midlayer.self_attn.attend(q, k_all, v_all, None), residual)
        return out, self.draft_logits(self.norm(out))[:, 0]

    # -- inference, batched over rows of different lengths

    @torch.no_grad()
    def extend_rows(self, cache, features: torch.Tensor, next_tokens: torch.Tensor,
                    counts: torch.Tensor, bound: int):
        """`extend` for rows holding different numbers of entries. cache: a ragged cache
        (`decoding.kv.RaggedKVCache`: `row_lengths` [B], `scatter`, `prefix`, `set_lengths`); row r
        appends the first counts[r] of its pairs (features [B, n, 3·H], next_tokens [B, n]) at
        its own positions; the other pairs land past its new length (stale). bound (host): the
        longest row's length afterwards (exact: a single row then needs no chain mask).
        -> (pre-norm output [B, 1, H], logits [B, V_draft]) of each row's last new entry."""
        B, n, _ = features.shape
        dev, start = features.device, cache.row_lengths  # [B]
        pos = start[:, None] + torch.arange(n, device=dev)  # [B, n]
        hidden = self.fc(features.to(self.fc.weight.dtype))  # [B, n, 3H] -> [B, n, H]
        q, k, v, residual = self._qkv(self.embed_tokens(next_tokens), hidden, pos)
        cache.scatter(0, k, v, pos, bound + n)
        k_all, v_all = cache.prefix(0, bound)
        keys = torch.arange(bound, device=dev)
        mask = (keys[None, None, :] <= pos[:, :, None])[:, None]  # [B, n, T] -> [B, 1, n, T]
        out = self.midlayer.finish(self.midlayer.self_attn.attend(q, k_all, v_all, mask), residual)
        last = (counts - 1)[:, None, None].expand(B, 1, out.shape[-1])  # [B] -> [B, 1, H]
        out = out.gather(1, last)  # [B, n, H] -> [B, 1, H]
        cache.set_lengths(start + counts)
        return out, self.draft_logits(self.norm(out))[:, 0]

    @torch.no_grad()
    def propose_rows(self, cache, features: torch.Tensor, next_tokens: torch.Tensor,
                     counts: torch.Tensor, num_tokens: int, bound: int,
                     sampler: Sampler | None = None) -> Eagle3Proposal:
        """`propose` for a batch of rows of different lengths (see `extend_rows`): one batched
        forward per drafted slot. Chain entries are written past each row's committed length
        and stay stale (the cache's lengths are the committed ones on return)."""
        hidden, step_logits = self.extend_rows(cache, features, next_tokens, counts, bound)
        committed = cache.row_lengths  # [B]
        return self._draft_chain(
            hidden, step_logits, num_tokens, sampler,
            lambda s, token, hidden: self._chain_step_rows(cache, token, hidden, committed + s, bound + s + 1))

    def _chain_step_rows(self, cache, token: torch.Tensor, hidden: torch.Tensor,
                         position: torch.Tensor, bound: int):
        """One drafted step of every row at its own position [B] (< bound, host) ->
        (pre-norm output [B, 1, H], logits [B, V_draft]); its K/V are written at `position`."""
        pos = position[:, None]  # [B, 1]
        q, k, v, residual = self._qkv(self.embed_tokens(token[:, None]), hidden, pos)
        cache.scatter(0, k, v, pos, bound)
        k_all, v_all = cache.prefix(0, bound)
        mask = None  # a single row at the exact bound sees every entry
        if token.shape[0] > 1:
            keys = torch.arange(bound, device=pos.device)[None, :]  # [1, T]
            mask = (keys <= pos)[:, None, None]  # [B, T] -> [B, 1, 1, T]
        out = self.midlayer.finish(self.midlayer.self_attn.attend(q, k_all, v_all, mask), residual)
        return out, self.draft_logits(self.norm(out))[:, 0]
