"""Data-dependent initializations of draft parameters (recipe section `init`).

- `markov: bigram`: the vanilla Markov head starts as the best rank-r factorization of the
  training responses' smoothed log-bigram table. The head adds `W2 · W1[prev]` to slot k's logits
  (prev = x_{k-1}); trained from scratch, its rank-r factors see each previous token only when it
  occurs, so on a small corpus the head stays near zero for hundreds of steps. Starting from

      M[p, y] = log((count(p → y) + α·u(y)) / (count(p → ·) + α)) − mean_y(...)

  (u = the draft-vocabulary unigram of the labels, rows centred because a per-row constant does
  not change a softmax), truncated SVD M ≈ U S Vᵀ, W1[p] = U √S, W2 = V √S, gives every slot the
  bigram prior at step 0 (SmolLM2 recipe: held-out τ_sim 1.20 before any step, against 1.02 for
  the random init, with `final_norm` small so the backbone's initial logits do not drown it).
  Previous tokens that never occur keep W1[p] = 0 (no bias). The architecture and the exported
  tensors are unchanged: this only chooses where training starts.
"""

from __future__ import annotations

import torch
from torch import nn

from draftsmith.data.templates import RenderedSample
from draftsmith.models.vocab import ids_from_d2t
from draftsmith.utils.io import InputError


def bigram_pairs(samples: list[RenderedSample], vocab_size: int, kept: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prev target ids [n], next draft ids [n]) of every supervised label whose token is in the
    draft vocabulary (`kept`: target ids of the draft vocabulary, None = all)."""
    to_draft = torch.arange(vocab_size)
    if kept is not None:
        to_draft = torch.full((vocab_size,), -1, dtype=torch.long)
        to_draft[kept] = torch.arange(kept.numel())
    prev, nxt = [], []
    for s in samples:
        ids = torch.tensor(s.input_ids, dtype=torch.long)
        sup = torch.tensor(s.loss_mask, dtype=torch.bool)[1:]  # label t+1 is supervised
        prev.append(ids[:-1][sup])
        nxt.append(to_draft[ids[1:][sup]])
    prev, nxt = torch.cat(prev), torch.cat(nxt)
    keep = nxt >= 0
    return prev[keep], nxt[keep]


def log_bigram_factors(prev: torch.Tensor, nxt: torch.Tensor, draft_vocab: int, rank: int,
                       smoothing: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows [P] target ids that occur as prev, A [P, r], B [V_draft, r]) with A Bᵀ ≈ the
    row-centred smoothed log-bigram table (module docstring)."""
    rows, inv = torch.unique(prev, return_inverse=True)
    counts = torch.zeros(rows.numel(), draft_vocab)  # [P, V_draft]
    counts.index_put_((inv, nxt), torch.ones(inv.numel()), accumulate=True)
    uni = counts.sum(0) + 1
    uni = uni / uni.sum()
    table = torch.log((counts + smoothing * uni) / (counts.sum(1, keepdim=True) + smoothing))
    table = table - table.mean(1, keepdim=True)
    q = min(rank, *table.shape)
    torch.manual_seed(seed)  # svd_lowrank's random projection: the same init on every rank
    U, S, V = torch.svd_lowrank(table, q=q, niter=4)  # [P, q], [q], [V_draft, q]
    root = S.sqrt()
    return rows, U * root, V * root


@torch.no_grad()
def init_markov_from_bigrams(model: nn.Module, samples: list[RenderedSample], smoothing: float = 1.0) -> str:
    """Set the vanilla Markov head of a DSpark draft from the samples' bigrams; returns a log line."""
    head = getattr(model, "markov_head", None)
    cfg = model.config
    if head is None or getattr(cfg, "markov_head_type", "vanilla") != "vanilla":
        raise InputError("init.markov: bigram needs a vanilla Markov head (model.markov_rank > 0, "
                         "markov_head_type vanilla)")
    kept = ids_from_d2t(model.d2t).cpu() if cfg.pruned else None
    prev, nxt = bigram_pairs(samples, cfg.vocab_size, kept)
    if prev.numel() == 0:
        raise InputError("init.markov: bigram found no supervised label pairs in the training data")
    rows, a, b = log_bigram_factors(prev, nxt, cfg.draft_vocab, cfg.markov_rank, smoothing)
    w1, w2 = head.markov_w1.weight, head.markov_w2.weight
    w1.zero_()
    w1[rows.to(w1.device), : a.shape[1]] = a.to(w1)
    w2.zero_()
    w2[:, : b.shape[1]] = b.to(w2)
    return (f"Markov head initialized from {prev.numel()} label bigrams ({rows.numel()} distinct "
            f"previous tokens, rank {a.shape[1]})")
