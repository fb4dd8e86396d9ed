"""Draft-vocabulary pruning: which target ids a draft's LM head covers, and the id maps.

Conventions (EAGLE-3's, shared by SGLang, vLLM and llama.cpp):
- kept ids are sorted ascending target ids, one per draft id;
- `d2t[i]` is an *offset*: target id = i + d2t[i] (int64, [V_draft]);
- `t2d` is a bool mask over the target vocabulary ([V]): True where the id is in the draft vocab.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from draftsmith.utils.io import InputError


@dataclass(frozen=True)
class DraftVocab:
    kept_ids: torch.Tensor  # [V_draft] int64, sorted target ids
    d2t: torch.Tensor  # [V_draft] int64 offsets: target = i + d2t[i]
    t2d: torch.Tensor  # [V] bool

    @property
    def size(self) -> int:
        return int(self.kept_ids.numel())


def build_draft_vocab(token_counts: torch.Tensor, draft_vocab_size: int,
                      always_include: Iterable[int] = ()) -> DraftVocab:
    """Keep `always_include` (e.g. special ids) plus the most frequent target ids.

    token_counts [V]: occurrences of each target id in the training targets. Ties are broken by
    the lower id, so the result is deterministic.
    """
    counts = torch.as_tensor(token_counts).flatten()
    vocab = counts.numel()
    if not 0 < draft_vocab_size <= vocab:
        raise InputError(f"draft_vocab_size {draft_vocab_size} must be in 1..{vocab} "
                         f"(the target vocabulary size)")
    forced = sorted(set(int(i) for i in always_include))
    bad = [i for i in forced if not 0 <= i < vocab]
    if bad:
        raise InputError(f"always_include: ids {bad} are outside the target vocabulary (0..{vocab - 1})")
    if len(forced) > draft_vocab_size:
        raise InputError(f"always_include has {len(forced)} ids, more than draft_vocab_size "
                         f"{draft_vocab_size}")
    score = counts.to(torch.float64).clone()
    score[forced] = float("inf")
    # stable sort on -score keeps lower ids first among equal counts
    order = torch.sort(-score, stable=True).indices
    kept = torch.sort(order[:draft_vocab_size]).values.to(torch.int64)
    return DraftVocab(kept, d2t_from_ids(kept), t2d_from_ids(kept, vocab))


def d2t_from_ids(kept_ids: torch.Tensor) -> torch.Tensor:
    """Sorted kept target ids [V_draft] -> offsets d2t [V_draft] (target = i + d2t[i])."""
    kept = torch.as_tensor(kept_ids, dtype=torch.int64)
    return kept - torch.arange(kept.numel(), dtype=torch.int64, device=kept.device)


def ids_from_d2t(d2t: torch.Tensor) -> torch.Tensor:
    """Offsets d2t [V_draft] -> the kept target ids [V_draft]."""
    return d2t.to(torch.int64) + torch.arange(d2t.numel(), dtype=torch.int64, device=d2t.device)


def t2d_from_ids(kept_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Kept target ids -> bool mask [V]."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=kept_ids.device)
    mask[kept_ids] = True
    return mask


def check_vocab_maps(d2t: torch.Tensor, t2d: torch.Tensor) -> None:
    """Raise InputError unless d2t and t2d describe the same sorted set of target ids."""
    ids = ids_from_d2t(d2t)
    if ids.numel() and (ids[0] < 0 or ids[-1] >= t2d.numel() or bool((ids[1:] <= ids[:-1]).any())):
        raise InputError("d2t does not map draft ids to strictly increasing target ids in range")
    if int(t2d.sum()) != ids.numel() or not bool(t2d[ids].all()):
        raise InputError("t2d does not mark exactly the target ids that d2t maps to")


def draft_to_target(draft_ids: torch.Tensor, d2t: torch.Tensor) -> torch.Tensor:
    """Draft ids (any shape) -> target ids."""
    return draft_ids + d2t[draft_ids]


def target_to_draft(target_ids: torch.Tensor, t2d: torch.Tensor) -> torch.Tensor:
    """Target ids (any shape) -> draft ids, -1 where the id is outside the draft vocabulary."""
    rank = torch.cumsum(t2d.to(torch.int64), 0) - 1  # [V]: draft id of each kept target id
    return torch.where(t2d[target_ids], rank[target_ids], torch.full_like(target_ids, -1))


def scatter_draft_logits(logits: torch.Tensor, d2t: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Draft logits [..., V_draft] -> full-vocabulary logits [..., V] with -inf outside the draft
    vocabulary (what serving engines do)."""
    full = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf"))  # [..., V]
    full[..., ids_from_d2t(d2t)] = logits
    return full


class DraftVocabMixin:
    """Draft-vocabulary state for draft models: buffers `d2t` / `t2d` and the frozen copies of
    the target's embedding and LM head. Expects `self.config.vocab_size`, `self.embed_tokens`,
    `self.lm_head` and a `draft_vocab` property."""

    def _init_vocab_buffers(self, persistent_d2t: bool, persistent_t2d: bool) -> None:
        """Identity maps (draft id i = target id i) until `set_draft_vocab`; persistent buffers
        are part of the checkpoint."""
        V, Vd = self.config.vocab_size, self.draft_vocab
        self.register_buffer("d2t", torch.zeros(Vd, dtype=torch.int64), persistent=persistent_d2t)
        self.register_buffer("t2d", torch.arange(V) < Vd, persistent=persistent_t2d)

    def set_draft_vocab(self, kept_ids: torch.Tensor) -> None:
        """Use these sorted target ids [V_draft] as the draft vocabulary."""
        kept = torch.as_tensor(kept_ids, dtype=torch.int64).to(self.d2t.device)
        if kept.numel() != self.draft_vocab:
            raise InputError(f"kept_ids has {kept.numel()} ids, the draft vocabulary {self.draft_vocab}")
        self.d2t.copy_(d2t_from_ids(kept))
        self.t2d.copy_(t2d_from_ids(kept, self.config.vocab_size))
        check_vocab_maps(self.d2t, self.t2d)

    def refresh_t2d(self) -> None:
        """Recompute `t2d` from `d2t` (after loading a checkpoint that stores only d2t)."""
        self.t2d.copy_(t2d_from_ids(ids_from_d2t(self.d2t), self.config.vocab_size))

    def restore_vocab_maps(self) -> None:
        """After loading weights: rebuild `t2d` where the checkpoint does not store it, then
        check that `d2t` and `t2d` describe the same draft vocabulary."""
        if "t2d" in self._non_persistent_buffers_set:
            self.refresh_t2d()
        check_vocab_maps(self.d2t, self.t2d)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_to_target(draft_ids, self.d2t)

    def to_draft_ids(self, target_ids: torch.Tensor) -> torch.Tensor:
        return target_to_draft(target_ids, self.t2d)

    def full_vocab_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return scatter_draft_logits(logits, self.d2t, self.config.vocab_size)

    def _copy_target_embeddings(self, target: nn.Module, kept_ids, train_lm_head: bool = False):
        """Copy the target's input embedding (frozen) and LM head rows of the draft vocabulary."""
        emb = target.get_input_embeddings().weight.detach()
        head = target.get_output_embeddings().weight.detach()
        V, H = self.config.vocab_size, self.config.hidden_size
        if tuple(emb.shape) != (V, H) or tuple(head.shape) != (V, H):
            raise InputError(f"target embedding {tuple(emb.shape)} / LM head {tuple(head.shape)} "
                             f"do not match the draft config (vocab_size {V}, hidden_size {H})")
        if self.draft_vocab != V:
            if kept_ids is None:
                raise InputError(f"draft_vocab_size {self.draft_vocab} < vocab_size {V}: pass the "
                                 "kept target ids (vocab.build_draft_vocab)")
            self.set_draft_vocab(kept_ids)
            head = head[ids_from_d2t(self.d2t).to(head.device)]
        with torch.no_grad():
            self.embed_tokens.weight.copy_(emb)
            self.lm_head.weight.copy_(head)
        self.embed_tokens.requires_grad_(False)
        self.lm_head.requires_grad_(train_lm_head)
        return self
