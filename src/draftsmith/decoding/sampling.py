"""Sampling transforms and lossless verification (DESIGN §3.4).

One transform turns logits into the distribution a token is drawn from: temperature, then top-k,
then top-p. It is applied identically to the target's and the draft's logits (a pruned draft's
logits are first scattered to the full vocabulary with -inf outside it), so verification compares
the two distributions the tokens were really drawn from.

Verification of one round, per row: the target forward fed [last committed token, d_1..d_k];
its distribution at input index i is the target's distribution for the token at draft slot i + 1,
so index i - 1 verifies d_i and index k gives the bonus after a fully accepted draft.

- Greedy (temperature 0): accept d_i while it equals the target argmax at index i - 1; the next
  token is the target argmax at the first mismatch (or at index k).
- Sampling: accept d_i with probability min(1, p_t(d_i) / p_d(d_i)); at the first rejection
  draw from normalize(max(p_t - p_d, 0)); after a fully accepted draft draw the bonus from p_t.
  A proposer without a distribution (n-gram, oracle) proposes deterministically: p_d is one-hot.
"""

from __future__ import annotations

import torch
from pydantic import Field

from draftsmith.config import StrictConfig


class SamplingConfig(StrictConfig):
    """How tokens are drawn. temperature 0 = greedy (top_k / top_p are then irrelevant)."""

    temperature: float = Field(0.0, ge=0)
    top_k: int = Field(0, ge=0)  # 0 = off
    top_p: float = Field(1.0, gt=0, le=1)  # 1 = off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def transform_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Logits [..., V] -> processed logits [..., V] (temperature, top-k, top-p; -inf = removed).
    Not for greedy configs."""
    x = logits / cfg.temperature
    V = x.shape[-1]
    if 0 < cfg.top_k < V:
        kth = torch.topk(x, cfg.top_k, dim=-1).values[..., -1:]  # [..., 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # [..., V] mass of strictly more likely tokens
        drop_sorted = mass_before >= cfg.top_p  # the most likely token always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def probabilities(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Logits [..., V] -> the distribution tokens are drawn from [..., V] (one-hot at the argmax
    when greedy), computed in at least float32."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if cfg.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    return transform_logits(logits, cfg).softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs [B, V] -> token ids [B]."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def residual_distribution(p_target: torch.Tensor, p_draft: torch.Tensor) -> torch.Tensor:
    """normalize(max(p_t - p_d, 0)) over the last axis; falls back to p_t where the difference
    has no mass (only possible through rounding, since a rejection implies p_t < p_d somewhere)."""
    diff = (p_target - p_draft).clamp(min=0)
    mass = diff.sum(-1, keepdim=True)
    return torch.where(mass > 0, diff / mass.clamp(min=torch.finfo(diff.dtype).tiny), p_target)


def accepted_prefix(accept: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """accept [B, K] bool per slot, lengths [B] valid slots -> accepted count [B] (leading run)."""
    K = accept.shape[1]
    valid = torch.arange(K, device=accept.device)[None, :] < lengths[:, None]  # [B, K]
    return (accept & valid).to(torch.long).cumprod(dim=1).sum(dim=1)


def verify_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor,
                  lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """target_logits [B, K+1, V] at inputs [last, d_1..d_K], draft_tokens [B, K], lengths [B]
    -> (accepted [B], next token [B]: the target argmax right after the accepted prefix)."""
    best = target_logits.argmax(-1)  # [B, K+1]
    accepted = accepted_prefix(draft_tokens == best[:, :-1], lengths)
    return accepted, best.gather(1, accepted[:, None]).squeeze(1)


def verify_sampled(target_probs: torch.Tensor, draft_probs: torch.Tensor | None,
                   draft_tokens: torch.Tensor, lengths: torch.Tensor,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling of one round.

    target_probs [B, K+1, V] (transformed target distributions at inputs [last, d_1..d_K]),
    draft_probs [B, K, V] (the distributions d_i were drawn from; None = one-hot proposals),
    draft_tokens [B, K], lengths [B] -> (accepted [B], next token [B]).
    """
    B, K1, V = target_probs.shape
    K = K1 - 1
    if draft_probs is None:
        draft_probs = torch.nn.functional.one_hot(draft_tokens, V).to(target_probs.dtype)  # [B, K, V]
    tok = draft_tokens[..., None]  # [B, K] -> [B, K, 1]
    p_t = target_probs[:, :K].gather(-1, tok).squeeze(-1)  # [B, K]
    p_d = draft_probs.gather(-1, tok).squeeze(-1)  # [B, K]
    u = torch.rand(B, K, generator=generator, device=target_probs.device, dtype=target_probs.dtype)
    accept = u * p_d < p_t  # u < p_t / p_d without dividing (p_d > 0 for a drawn token)
    accepted = accepted_prefix(accept, lengths)
    rows = torch.arange(B, device=target_probs.device)
    p_next = target_probs[rows, accepted]  # [B, V]
    rejected = accepted < lengths
    if K > 0:
        q_next = draft_probs[rows, accepted.clamp(max=K - 1)]  # [B, V]
        p_next = torch.where(rejected[:, None], residual_distribution(p_next, q_next), p_next)
    return accepted, sample(p_next, generator)
