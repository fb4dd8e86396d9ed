"""Which positions a drafter is trained on: anchor draws and per-slot validity (DESIGN §3.2).

A block anchored at position t (the last committed token) has slots k = 0..γ-1; slot k predicts
the token at t + k + 1. Rules shared by every drafter:

- candidate anchors are the positions t with `loss_mask[t] & loss_mask[t + 1]` (t + 1 < S): the
  anchor is itself a response token and so is the first token the block predicts;
- slot k is supervised while every label up to it lies inside the sequence and the response
  (`slot_validity`: a cumulative product, so supervision of a block stops at its first label
  outside the response);
- DSpark/DFlash draw up to `num_anchors` candidates per sequence uniformly without replacement
  (`sample_anchors`). The draw is keyed by (seed, epoch, sample id) through a hash-seeded
  `torch.Generator`, so it never depends on the process count, the rank or which other samples
  share the batch;
- Eagle3 has no draw: every candidate is trained. Its TTT chain at feature index i reads token
  i + 1 and step s predicts token i + 2 + s, i.e. it is the block anchored at t = i + 1
  (`all_anchors`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def anchor_candidates(loss_mask: torch.Tensor) -> torch.Tensor:
    """loss_mask [..., S] (any dtype, nonzero = supervised) -> bool [..., S]: True at t where
    loss_mask[t] and loss_mask[t + 1] (so never at the last position)."""
    m = loss_mask != 0
    cand = torch.zeros_like(m)
    cand[..., :-1] = m[..., :-1] & m[..., 1:]
    return cand


def sample_key(seed: int, epoch: int, sample_id: str | int) -> int:
    """A 63-bit generator seed from (seed, epoch, sample id), stable across processes and runs
    (sha256, not Python's salted `hash`)."""
    text = f"draftsmith-anchors\x00{int(seed)}\x00{int(epoch)}\x00{sample_id}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def sample_anchors(loss_mask: torch.Tensor, num_anchors: int, seed: int, epoch: int,
                   sample_id: str | int) -> torch.Tensor:
    """Anchors of one sequence: loss_mask [S] -> sorted positions [n] int64, n = min(num_anchors,
    #candidates), drawn uniformly without replacement. Trailing padding (zeros in loss_mask)
    does not change the draw."""
    if loss_mask.dim() != 1:
        raise ValueError(f"loss_mask must be [S], got {tuple(loss_mask.shape)}")
    cand = anchor_candidates(loss_mask.cpu()).nonzero().flatten()  # [C]
    if cand.numel() <= num_anchors:
        return cand.to(loss_mask.device)
    gen = torch.Generator().manual_seed(sample_key(seed, epoch, sample_id))
    pick = torch.randperm(cand.numel(), generator=gen)[:num_anchors]  # CPU draw: device-independent
    return torch.sort(cand[pick]).values.to(loss_mask.device)


def pad_anchors(anchors: Sequence[torch.Tensor], pad_to: int | None = None,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence anchor lists -> (anchor_pos [B, N] int64, anchor_valid [B, N] bool), padded
    with position 0 / False to N = max length (or `pad_to`)."""
    n = max([int(a.numel()) for a in anchors] + [0])
    N = n if pad_to is None else pad_to
    if N < n:
        raise ValueError(f"pad_to {pad_to} is smaller than the longest anchor list ({n})")
    device = device if device is not None else (anchors[0].device if len(anchors) else "cpu")
    pos = torch.zeros(len(anchors), N, dtype=torch.int64, device=device)
    valid = torch.zeros(len(anchors), N, dtype=torch.bool, device=device)
    for b, a in enumerate(anchors):
        pos[b, : a.numel()] = a.to(device)
        valid[b, : a.numel()] = True
    return pos, valid


def batch_anchors(loss_masks: torch.Tensor | Sequence[torch.Tensor], sample_ids: Sequence[str | int],
                  num_anchors: int, seed: int, epoch: int,
                  pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DSpark/DFlash anchors of a batch: loss masks ([B, S] right-padded, or B tensors [S_b]) ->
    (anchor_pos [B, N], anchor_valid [B, N]); row b is `sample_anchors(.., sample_ids[b])`."""
    if len(loss_masks) != len(sample_ids):
        raise ValueError(f"{len(loss_masks)} loss masks but {len(sample_ids)} sample ids")
    if num_anchors < 1:
        raise ValueError(f"num_anchors must be >= 1, got {num_anchors}")
    draws = [sample_anchors(m, num_anchors, seed, epoch, sid) for m, sid in zip(loss_masks, sample_ids)]
    device = loss_masks.device if isinstance(loss_masks, torch.Tensor) else None
    return pad_anchors(draws, pad_to, device)


def all_anchors(loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eagle3 (no draw): loss_mask [B, S] -> (anchor_pos [B, S-1], anchor_valid [B, S-1]) with
    anchor_pos[b, i] = i + 1 (the token TTT index i reads) and valid where that is a candidate."""
    B, S = loss_mask.shape
    pos = torch.arange(1, S, device=loss_mask.device).expand(B, -1)  # [S-1] -> [B, S-1]
    return pos, anchor_candidates(loss_mask)[:, 1:]


def slot_validity(loss_mask: torch.Tensor, anchor_pos: torch.Tensor,
                  anchor_valid: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """Supervised slots [B, N, γ] bool: slot k of the block at t is supervised iff the anchor is
    valid and every label position t + j + 1 (j <= k) is < S with loss_mask set."""
    S = loss_mask.shape[1]
    idx = anchor_pos[..., None] + 1 + torch.arange(block_size, device=anchor_pos.device)  # [B, N, γ]
    inside = idx < S
    flat = idx.clamp(max=S - 1).flatten(1)  # [B, N, γ] -> [B, N·γ]
    in_resp = loss_mask.gather(1, flat).view(idx.shape) != 0  # [B, N·γ] -> [B, N, γ]
    ok = inside & in_resp
    if anchor_valid is not None:
        ok = ok & anchor_valid[..., None].bool()
    return torch.cumprod(ok.to(torch.int32), dim=-1).bool()
