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


# --------------------------------------------------------------------------- layers: target
#
# `layers: target` starts a DSpark / DFlash backbone as a copy of the target's own last layers
# (same width, heads and MLP: the draft geometry is the target's). With n draft layers, draft
# layer i = target layer T - n + i, `fc` reads only the tapped output of layer T - n - 1 (the
# input those layers saw in the target; when it is not tapped, the highest tapped layer below it) and `hidden_norm` is the first copied layer's
# `input_layernorm`, so at step 0 the context keys/values of the first draft layer are the
# target's own. Their attention already knows recency under RoPE, where a random layer attends
# uniformly over hundreds of context rows (issue 14's leak measurement). Weights the target's
# layers lack (the draft's q_norm / k_norm on a Llama target) start as a constant: the typical
# RMS of the target's q / k at that layer, measured on training tokens, so the normalized
# projections keep the target's attention-logit scale.


def _typical_rms(layers: list[nn.Module], hf_target: nn.Module, ids: torch.Tensor) -> list[dict[str, float]]:
    """RMS of the q_proj / k_proj outputs of each of `layers` (target decoder layers) on `ids`
    [1, S]: one target forward with hooks on all of them."""
    seen: list[dict[str, float]] = [{} for _ in layers]
    hooks = []
    for out, layer in zip(seen, layers):
        for name in ("q_proj", "k_proj"):
            def hook(_m, _i, y, out=out, name=name):
                out[name] = float(y.float().pow(2).mean().sqrt())
            hooks.append(getattr(layer.self_attn, name).register_forward_hook(hook))
    try:
        hf_target(input_ids=ids.to(next(hf_target.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    if any(len(d) != 2 for d in seen):
        raise InputError("init.layers: a copied target layer has no q_proj/k_proj to measure")
    return seen


@torch.no_grad()
def init_layers_from_target(model: nn.Module, hf_target: nn.Module, samples) -> str:
    """Copy the target's last `num_hidden_layers` decoder layers into a DSpark/DFlash backbone
    (section comment above); returns a log line. InputError when the geometry does not match."""
    cfg = model.config
    if not hasattr(model, "fc") or not hasattr(model, "hidden_norm"):
        raise InputError("init.layers: target needs a DSpark or DFlash draft (Eagle3's first "
                         "layer reads [embedding; feature], which no target layer does)")
    if getattr(cfg, "family", None) == "gemma":
        raise InputError("init.layers: target is not supported for Gemma targets yet (their norms "
                         "scale by 1 + w, the draft's by w; use init.layers: random)")
    t_layers = hf_target.get_decoder().layers
    n, T = len(model.layers), len(t_layers)
    first = T - n
    below = [i for i in cfg.target_layer_ids if i < first]
    if not below:
        raise InputError(f"init.layers: target copies target layers {first}..{T - 1}, so "
                         f"model.target_layer_ids must include a layer below {first} for fc to read "
                         f"(ideally {first - 1}, their input); got {list(cfg.target_layer_ids)}")
    src = max(below)  # the tapped layer closest to the copied ones; ideally first - 1
    H = cfg.hidden_size
    sample = next(iter(samples), None)
    if sample is None:
        raise InputError("init.layers: target found no training sample to measure q/k scales on")
    ids = torch.tensor([sample.input_ids[:256]], dtype=torch.long)
    copied = []
    rms = None  # measured once, for every copied layer, when the draft has q/k norms the target lacks
    for i, (draft_layer, t_layer) in enumerate(zip(model.layers, t_layers[first:])):
        theirs = t_layer.state_dict()
        ours = draft_layer.state_dict()
        for name, p in ours.items():
            if name in theirs:
                if theirs[name].shape != p.shape:
                    raise InputError(f"init.layers: target layer {first + i} {name} has shape "
                                     f"{tuple(theirs[name].shape)}, the draft's {tuple(p.shape)}")
                p.copy_(theirs[name].to(p.dtype))
                copied.append(name)
        attn = draft_layer.self_attn
        missing = [m for m in ("q_norm.weight", "k_norm.weight") if m in ours and m not in theirs]
        if missing:
            rms = rms or _typical_rms(list(t_layers[first:]), hf_target, ids)
            for m in missing:
                getattr(attn, m.split(".")[0]).weight.fill_(rms[i][m[0] + "_proj"])
    k = list(cfg.target_layer_ids).index(src)
    model.fc.weight.zero_()
    model.fc.weight[:, k * H:(k + 1) * H] = torch.eye(H, dtype=model.fc.weight.dtype)  # [H, L·H]: pick layer src
    model.hidden_norm.weight.copy_(t_layers[first].input_layernorm.weight.to(model.hidden_norm.weight.dtype))
    skipped = f"; target layers {src + 1}..{first - 1} skipped" if src < first - 1 else ""
    return (f"draft layers initialized from target layers {first}..{T - 1} "
            f"({len(set(copied))} tensors each; fc reads target layer {src}{skipped})")
