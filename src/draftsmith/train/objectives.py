"""Training objectives: DSpark, DFlash and Eagle3 share one block loss (DESIGN §3.2, §3.3).

Every drafter is trained on *blocks*: a block anchored at position t has γ slots and slot k
predicts the token at t + k + 1 from the target distribution p_t = softmax(lm_head(hidden[t + k]))
(the target's normed last hidden, T = 1, full vocabulary). DSpark/DFlash draw their anchors
(`anchors.batch_anchors`); Eagle3's TTT chain at feature index i is the block anchored at i + 1,
its step s being slot s, so one code path computes every term and every metric.

Per supervised slot (`anchors.slot_validity`: a cumulative product, supervision stops at the
first label outside the response), with p_d = softmax(Markov-corrected draft logits):

    ce      = -log p_d(label)                  labels outside a pruned draft vocab are masked
    l1      = ‖p_d − p_t‖₁ over the FULL vocabulary, p_d = 0 outside the draft vocab:
              Σ_{d ∈ draft} |p_d(d) − p_t(d2t(d))| + (1 − Σ_{d ∈ draft} p_t(d2t(d)))
    c*      = 1 − ½·l1 (detached; what serving's rejection sampling accepts on average)
    bce     = BCE(σ(confidence logit), c*)
    soft_ce = −Σ_{d ∈ draft} q(d) log p_d(d),  q = p_t restricted to the draft vocab and
              renormalized (EAGLE-3/SpecForge practice); masked like ce.
    kl      = Σ_{d ∈ draft} q(d) (log q(d) − log p_d(d)), the forward KL(q ‖ p_d) (distillation;
              soft_ce's gradient, but 0 when the draft matches q); every supervised slot.
    ce_argmax = −log p_d(argmax_d q(d)), CE against the target's most likely token in the draft
              vocab (greedy distillation: the label is what the target would say, not the text).

Each term is `Σ w_k·ℓ / Σ w_k` with position weights w_k = exp(−k / loss_decay_gamma) (DSpark,
DFlash; k 0-based) or 0.8^s (Eagle3). The loss is Σ_term α_term·term with α = (ce 0.1, l1 0.9,
bce 1.0) for DSpark, ce 1.0 for DFlash, soft_ce 1.0 for Eagle3 (`LossWeights`; each drafter's
spec in `draftsmith.drafters` hands its weights to the objective; a recipe's `loss.weights`
replace them, terms it does not name being 0). kl and ce_argmax learn from p_t alone, so any text
can train a drafter with the target's distribution as the label (distillation).

Normalization across micro-batches and ranks. The denominators depend on the data only
(validity, weights, which labels are in the draft vocab), so the train loop computes them for
every micro-batch of a step first (`objective.denominators(batch)`), sums them and all-reduces
(SUM) them across ranks (`reduce_denominators`), then calls `objective(batch, denominators)`
per micro-batch. Each micro-batch's loss is then Σ_local w·ℓ / D_global, and the sum over
micro-batches and ranks is exactly the global-batch loss. DDP *averages* gradients over W ranks:
the train loop multiplies the loss by W before backward to get the global loss's gradient (FSDP2
is set to reduce sums, so it needs no factor). The objective is an `nn.Module` that owns the
draft (`objective.draft`, a submodule) and computes everything that has a gradient — the draft's
body and its heads — inside `forward`, so `DistributedDataParallel(objective)` or
`fully_shard(objective)` sees every trainable parameter its forward uses.

Memory. Full-vocabulary logits are never built for all slots at once: blocks are processed in
chunks of `chunk_size` anchors (never split along γ, where the rnn Markov head runs), and with
`recompute` each chunk's logits are recomputed in backward (activation checkpointing), so the
peak holds one chunk's logits. Blocks whose first slot is unsupervised are skipped; the target
head runs on supervised slots only; the draft head runs on whole blocks (the Markov head needs
them), so unsupervised tail slots of partially supervised blocks cost draft-head compute only.

Eagle3 pruning decision: soft_ce's target is p_t renormalized over the draft vocabulary (as
EAGLE-3 trains it), and positions whose *label* lies outside the draft vocab are masked and
counted — SpecForge masks by the target's argmax instead; the label rule keeps the
denominators a function of the data alone and matches the DSpark rule. l1, c* and τ_sim always
use the full-vocabulary p_t (p_d = 0 outside the draft vocab), exactly what serving does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from draftsmith.config import StrictConfig
from draftsmith.models.dspark import block_labels, block_prev_tokens
from draftsmith.models.vocab import ids_from_d2t, target_to_draft
from draftsmith.train.anchors import all_anchors, slot_validity
from draftsmith.utils.io import InputError

TargetHead = Callable[[torch.Tensor], torch.Tensor]  # normed target hidden [n, H] -> logits [n, V]
TERMS = ("ce", "soft_ce", "l1", "bce", "kl", "ce_argmax")
# which denominator each term is normalized by: all supervised slots, or those whose label is in
# the draft vocabulary
TERM_DENOMINATOR = {"ce": "vocab", "soft_ce": "vocab", "l1": "slots", "bce": "slots", "kl": "slots",
                    "ce_argmax": "slots"}
DISTILL_TERMS = ("soft_ce", "kl", "ce_argmax")  # computed from p_t when weighted (`_distill_terms`)


class LossWeights(StrictConfig):
    """α per loss term (0 = not part of the loss; still reported when computed). A term left out
    is 0: `LossWeights(kl=1)` is pure distillation."""

    ce: float = Field(0.0, ge=0)
    l1: float = Field(0.0, ge=0)
    bce: float = Field(0.0, ge=0)
    soft_ce: float = Field(0.0, ge=0)
    kl: float = Field(0.0, ge=0)
    ce_argmax: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _some_term(self):
        if not any(getattr(self, k) > 0 for k in TERMS):
            raise ValueError(f"every loss weight is 0; give at least one of {', '.join(TERMS)} a weight > 0")
        return self


class ObjectiveConfig(StrictConfig):
    """How the loss is computed (the formulas are fixed; see the module docstring)."""

    loss_weights: LossWeights | None = None  # None: the drafter's default (its DrafterSpec's)
    chunk_size: int = Field(32, ge=1)  # anchors (blocks) per loss chunk
    recompute: bool = True  # recompute each chunk's logits in backward instead of keeping them
    target_metrics: bool = True  # compute p_t (l1, c*, τ_sim) even when no loss term needs it
    eagle3_step_decay: float = Field(0.8, gt=0)  # Eagle3 step weights decay^s
    # how slots are averaged: "token" (every supervised slot weighs the same: long sequences, and
    # here looping answers, dominate) or "sequence" (each sequence's slots share one unit of
    # weight: DeepSpec's Eagle3 averages per sequence)
    average: Literal["token", "sequence"] = "token"


@dataclass
class TrainBatch:
    """A right-padded batch (padding has loss_mask 0)."""

    input_ids: torch.Tensor  # [B, S] int64
    loss_mask: torch.Tensor  # [B, S], nonzero = token the drafter is trained to predict
    features: torch.Tensor  # [B, S, L·H] target layer outputs
    target_hidden: torch.Tensor | None  # [B, S, H] target's normed last hidden (None: no p_t)
    anchor_pos: torch.Tensor | None = None  # [B, N] DSpark/DFlash anchors (anchors.batch_anchors)
    anchor_valid: torch.Tensor | None = None  # [B, N] bool
    # a top-k cache (features.top_k): p_t's k most likely tokens and their probabilities [B, S, k];
    # training steps read p_t from them, evaluation (no grad) from target_hidden
    target_topk_ids: torch.Tensor | None = None
    target_topk_probs: torch.Tensor | None = None


def position_weights(block_size: int, decay_gamma: float) -> torch.Tensor:
    """DSpark/DFlash slot weights [γ]: w_k = exp(−k / decay_gamma), k 0-based."""
    return torch.exp(-torch.arange(block_size, dtype=torch.float64) / decay_gamma)


def step_weights(ttt_length: int, decay: float = 0.8) -> torch.Tensor:
    """Eagle3 TTT step weights [T]: decay^s."""
    return decay ** torch.arange(ttt_length, dtype=torch.float64)


def target_head_from(lm_head: nn.Module | torch.Tensor, softcap: float | None = None) -> TargetHead:
    """A target head from an LM-head module or weight [V, H] (+ the family's final-logit softcap);
    hidden is cast to the weight's dtype. `TargetModel.logits` is one too."""
    weight = lm_head.weight if isinstance(lm_head, nn.Module) else lm_head

    def head(hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden.to(weight.dtype), weight)
        return torch.tanh(logits / softcap) * softcap if softcap else logits

    return head


def reduce_denominators(parts: Sequence[dict[str, torch.Tensor]],
                        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                        ) -> dict[str, torch.Tensor]:
    """Sum the denominators of a step's micro-batches, then across ranks with `all_reduce`
    (e.g. `lambda t: (dist.all_reduce(t), t)[1]`, a SUM): one collective for all terms."""
    keys = sorted(parts[0])
    flat = torch.stack([sum(p[k] for p in parts) for k in keys])  # [K]
    if all_reduce is not None:
        flat = all_reduce(flat)
    return dict(zip(keys, flat))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for the loss math (fp64 stays fp64, for exact tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _log_probs(logits: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
    """log-probabilities in the compute dtype: logits − logsumexp(logits), over every column,
    returned for `columns` only when given (a pruned draft needs p_t on its own vocabulary;
    the normalizer still spans the full vocabulary, and no full-size output is written). One
    formula for p_d and p_t, so equal logits give bit-equal probabilities."""
    x = logits.to(_compute_dtype(logits))
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    return (x if columns is None else x[:, columns]) - lse


# --------------------------------------------------------------------------- τ_sim


class TauSimMeter:
    """Teacher-forced acceptance statistics of supervised blocks (DESIGN §3.2, last bullet).

    τ_sim = 1 + Σ_k Π_{j≤k} c*_j (T = 1), averaged over supervised blocks (first slot supervised).
    A partially supervised block (its response ends inside it) counts only its supervised slots:
    decoding stops at the end of the response, so later slots cannot add accepted tokens.
    Greedy τ counts, per block, 1 + the leading slots whose draft argmax equals the target's
    argmax (teacher-forced: exact greedy acceptance when the labels are the target's argmax);
    it is counted when the objective runs without grad (evaluation), not in training steps.
    All state is sums (`sums()` / `load_sums()` for an all-reduce across ranks).
    """

    def __init__(self, block_size: int, device: torch.device | str | None = None):
        self.block_size = block_size
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.blocks = z(())
        self.c_star_sum, self.slot_count = z(block_size), z(block_size)  # Σ c*_k, #supervised
        self.survival_sum, self.greedy_survival_sum = z(block_size), z(block_size)

    def add_blocks(self, c_star: torch.Tensor, valid: torch.Tensor, match: torch.Tensor) -> None:
        """c_star [M, γ] (any value where invalid), valid [M, γ] (a prefix, slot 0 True),
        match [M, γ] bool (greedy draft == target argmax)."""
        cs = torch.where(valid, c_star.detach().to(torch.float64), 0.0)
        self.blocks += valid[:, 0].sum()
        self.c_star_sum += cs.sum(0)
        self.slot_count += valid.sum(0)
        self.survival_sum += torch.cumprod(cs, dim=-1).sum(0)
        self.greedy_survival_sum += torch.cumprod((match & valid).to(torch.float64), dim=-1).sum(0)

    def add(self, other: TauSimMeter | LossParts) -> None:
        """Accumulate another meter (or a batch's `LossParts`)."""
        other = other.tau if isinstance(other, LossParts) else other
        self.load_sums(self.sums() + other.sums().to(self.blocks.device))

    def sums(self) -> torch.Tensor:
        """All state as one float64 tensor [1 + 4γ] (all-reduce it with SUM, then `load_sums`)."""
        return torch.cat([self.blocks[None], self.c_star_sum, self.slot_count,
                          self.survival_sum, self.greedy_survival_sum])

    def load_sums(self, flat: torch.Tensor) -> None:
        g = self.block_size
        self.blocks = flat[0].clone()
        parts = flat[1:].view(4, g).clone()  # [4γ] -> [4, γ]
        self.c_star_sum, self.slot_count, self.survival_sum, self.greedy_survival_sum = parts

    def value(self) -> float:
        """τ_sim (nan without supervised blocks)."""
        b = float(self.blocks)
        return 1.0 + float(self.survival_sum.sum()) / b if b else math.nan

    def greedy_value(self) -> float:
        """Teacher-forced greedy τ (nan without supervised blocks)."""
        b = float(self.blocks)
        return 1.0 + float(self.greedy_survival_sum.sum()) / b if b else math.nan

    def per_position(self) -> dict[str, list[float]]:
        """Per slot: mean c* over supervised slots, mean survival Π_{j≤k} c*_j and greedy
        survival over supervised blocks (unsupervised tail slots count as 0)."""
        b = max(float(self.blocks), 1.0)
        return {"c_star": (self.c_star_sum / self.slot_count.clamp(min=1)).tolist(),
                "survival": (self.survival_sum / b).tolist(),
                "greedy_survival": (self.greedy_survival_sum / b).tolist()}


# --------------------------------------------------------------------------- loss parts


@dataclass
class LossParts:
    """One (micro-)batch's loss and detached metrics.

    Metrics are normalized by the same denominators as the loss: with global denominators they
    are this micro-batch's share and add up over micro-batches and ranks to the global value.
    """

    loss: torch.Tensor  # scalar with grad: Σ α·numerator / denominator
    sums: dict[str, torch.Tensor]  # detached weighted numerators of the computed terms
    denominators: dict[str, torch.Tensor]  # "slots": Σ w (supervised), "vocab": Σ w (in draft vocab)
    tau: TauSimMeter  # acceptance stats (empty when p_t was not computed)
    tokens: torch.Tensor  # supervised slots
    blocks: torch.Tensor  # supervised blocks
    pruned_labels: torch.Tensor  # supervised labels outside the draft vocab (masked from ce)

    def term(self, name: str) -> torch.Tensor | None:
        """Σ w·ℓ / Σ w of one term (None if it was not computed)."""
        if name not in self.sums:
            return None
        return self.sums[name] / self.denominators[TERM_DENOMINATOR[name]].clamp(min=1e-12)

    ce = property(lambda self: self.term("ce"))
    soft_ce = property(lambda self: self.term("soft_ce"))
    l1 = property(lambda self: self.term("l1"))
    bce = property(lambda self: self.term("bce"))

    @property
    def c_star(self) -> list[float]:
        """Mean c* per slot (γ values)."""
        return self.tau.per_position()["c_star"]

    def metrics(self) -> dict[str, float]:
        """Plain floats for logging (syncs with the device)."""
        out = {k: float(self.term(k)) for k in TERMS if k in self.sums}
        out.update(loss=float(self.loss.detach()), tokens=float(self.tokens),
                   blocks=float(self.blocks), pruned_labels=float(self.pruned_labels))
        if float(self.tau.blocks):
            out.update(tau_sim=self.tau.value(), tau_greedy=self.tau.greedy_value())
        return out


@dataclass
class Blocks:
    """The supervised blocks of a batch (first slot supervised), M of them, γ slots each."""

    rows: torch.Tensor  # [M] batch row
    cols: torch.Tensor  # [M] index on the anchor axis
    anchor: torch.Tensor  # [M] anchor position t
    prev: torch.Tensor  # [M, γ] teacher-forced previous tokens [anchor, labels[:-1]]
    valid: torch.Tensor  # [M, γ] bool, supervised slots (a prefix)
    label_draft: torch.Tensor  # [M, γ] draft ids of the labels (-1 outside the draft vocab)
    in_vocab: torch.Tensor  # [M, γ] bool, valid and label in the draft vocab
    weights: torch.Tensor  # [M, γ] slot weights: position weight × the block's sequence weight

    def denominators(self) -> dict[str, torch.Tensor]:
        """float64 sums of the weights of supervised slots ("slots") and of those whose label is
        in the draft vocabulary ("vocab")."""
        w = self.weights.to(torch.float64)
        return {"slots": (self.valid * w).sum(), "vocab": (self.in_vocab * w).sum()}


# --------------------------------------------------------------------------- objectives


class BlockObjective(nn.Module):
    """The shared block loss; subclasses say how blocks, hidden states and logits are made.

    `anchored`: whether batches carry drawn anchors (`collate` draws them with
    `anchors.sample_anchors`) or the objective supervises every position itself.
    Loss weights: the config's, else the drafter's (`loss_weights`), else the algorithm's
    `default_loss_weights`."""

    anchored: ClassVar[bool] = True
    default_loss_weights: ClassVar[LossWeights] = LossWeights(ce=0.1, l1=0.9, bce=1.0)

    def __init__(self, model: nn.Module, target_head: TargetHead | None,
                 config: ObjectiveConfig | None = None, loss_weights: LossWeights | None = None):
        super().__init__()
        self.draft = model  # a submodule: a wrapper of the objective sees the draft's parameters
        self.target_head = target_head  # a function (the frozen target's head), not a submodule
        self.config = config or ObjectiveConfig()
        self.loss_weights = self.config.loss_weights or loss_weights or self.default_loss_weights
        self.vocab_size = self.module.config.vocab_size
        self.pruned = self.module.config.draft_vocab != self.vocab_size

    @property
    def module(self) -> nn.Module:
        """The draft (its heads, config and vocabulary maps)."""
        return self.draft

    @property
    def may_skip_params(self) -> bool:
        """Whether a forward may leave a trainable head unused (a confidence head whose BCE needs
        p_t while no loss term does: steps without target metrics skip it)."""
        return self.has_confidence and not self.needs_target(False)

    # -- drafter hooks

    @property
    def block_size(self) -> int:
        raise NotImplementedError

    def slot_weights(self) -> torch.Tensor:
        """[γ] float64 position weights."""
        raise NotImplementedError

    def anchors(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(anchor_pos [B, N], anchor_valid [B, N])."""
        raise NotImplementedError

    def block_hidden(self, batch: TrainBatch, blocks: Blocks) -> torch.Tensor:
        """Run the draft: hidden [M, γ, H] of the supervised blocks."""
        raise NotImplementedError

    def slot_logits(self, hidden: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """hidden [c, γ, H], prev [c, γ] -> draft logits [c, γ, V_draft]."""
        raise NotImplementedError

    def slot_confidence(self, hidden: torch.Tensor, prev: torch.Tensor) -> torch.Tensor | None:
        """hidden [c, γ, H], prev [c, γ] -> confidence logits [c, γ] (None without a head)."""
        return None

    # -- shared

    @property
    def has_confidence(self) -> bool:
        return getattr(self.module, "confidence_head", None) is not None

    def needs_target(self, target_metrics: bool | None = None) -> bool:
        """Whether p_t is computed: for a loss term that needs it, or for the metrics
        (`target_metrics`, default the config's)."""
        w = self.loss_weights
        metrics = self.config.target_metrics if target_metrics is None else target_metrics
        return (metrics or w.l1 > 0 or any(getattr(w, k) > 0 for k in DISTILL_TERMS)
                or (self.has_confidence and w.bce > 0))

    def blocks(self, batch: TrainBatch) -> Blocks:
        """Labels, validity and vocabulary masks of the supervised blocks (no model call)."""
        anchor_pos, anchor_valid = self.anchors(batch)
        g = self.block_size
        valid = slot_validity(batch.loss_mask, anchor_pos, anchor_valid, g)  # [B, N, γ]
        labels, _ = block_labels(batch.input_ids, anchor_pos, g)  # [B, N, γ]
        prev = block_prev_tokens(batch.input_ids, anchor_pos, labels)  # [B, N, γ]
        rows, cols = valid[..., 0].nonzero(as_tuple=True)  # [M], [M]
        anchor, prev, valid = anchor_pos[rows, cols], prev[rows, cols], valid[rows, cols]  # [M], [M, γ]
        label_draft = target_to_draft(labels[rows, cols], self.module.t2d)  # [M, γ]
        in_vocab = valid & (label_draft >= 0)
        weights = self.slot_weights().to(batch.input_ids.device).expand(valid.shape)  # [γ] -> [M, γ]
        if self.config.average == "sequence":  # each row's supervised slots weigh 1 in all
            row_total = torch.zeros(batch.input_ids.shape[0], dtype=weights.dtype, device=weights.device)
            row_total.index_add_(0, rows, (weights * valid).sum(-1))  # [B]
            weights = weights / row_total[rows, None]  # [M, γ]
        return Blocks(rows, cols, anchor, prev, valid, label_draft, in_vocab, weights)

    def denominators(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """This micro-batch's denominators (sum them over micro-batches and ranks)."""
        return self.blocks(batch).denominators()

    def forward(self, batch: TrainBatch, denominators: dict[str, torch.Tensor] | None = None,
                target_metrics: bool | None = None) -> LossParts:
        """Loss and metrics of one (micro-)batch; `denominators` = the global ones
        (`reduce_denominators`), default this batch's own; `target_metrics` overrides the
        config's (p_t for the metrics when no loss term needs it)."""
        blocks = self.blocks(batch)
        den = blocks.denominators() if denominators is None else denominators
        with_target = self.needs_target(target_metrics)
        if with_target and (batch.target_hidden is None or self.target_head is None):
            raise ValueError("this objective needs the target head and batch.target_hidden (the "
                             "target's normed last hidden); or target_metrics=false with no term using p_t")
        hidden = self.block_hidden(batch, blocks)  # [M, γ, H]
        tau = TauSimMeter(self.block_size, hidden.device)
        nums = torch.zeros(len(TERMS), dtype=_compute_dtype(hidden), device=hidden.device)
        # at least one (maybe empty) chunk: the heads take part in every forward's graph
        for start in range(0, max(blocks.valid.shape[0], 1), self.config.chunk_size):
            sl = slice(start, start + self.config.chunk_size)
            nums = nums + self._chunk(batch, blocks, sl, hidden[sl], tau, with_target)
        return self._parts(nums, den, blocks, tau, hidden, with_target)

    def _chunk(self, batch, blocks: Blocks, sl: slice, hidden, tau: TauSimMeter, with_target: bool):
        """Numerators [4] (with grad) of blocks[sl]; adds their τ stats to `tau`."""
        valid, prev = blocks.valid[sl], blocks.prev[sl]
        tgt_h = topk = None
        if with_target:
            pos = blocks.anchor[sl, None] + torch.arange(self.block_size, device=valid.device)  # [c, γ]
            at = (blocks.rows[sl, None].expand_as(pos)[valid], pos[valid])  # the n supervised slots
            if batch.target_topk_ids is not None and torch.is_grad_enabled():
                topk = (batch.target_topk_ids[at], batch.target_topk_probs[at])  # [n, k] each
            else:
                tgt_h = batch.target_hidden[at]  # [n, H]
        args = (hidden, prev, valid, blocks.label_draft[sl], blocks.in_vocab[sl], blocks.weights[sl], tgt_h, topk)
        if self.config.recompute and torch.is_grad_enabled() and hidden.requires_grad:
            nums, c_star, match = checkpoint(self._chunk_terms, *args, use_reentrant=False)
        else:
            nums, c_star, match = self._chunk_terms(*args)
        if with_target:
            cs = torch.zeros(valid.shape, dtype=c_star.dtype, device=valid.device)
            cs[valid] = c_star
            mt = torch.zeros_like(valid)
            mt[valid] = match
            tau.add_blocks(cs, valid, mt)
        return nums

    def _chunk_terms(self, hidden, prev, valid, label_draft, in_vocab, weights, tgt_h, topk=None):
        """hidden [c, γ, H] -> (weighted numerators [4] in TERMS order, c* [n], greedy match [n])
        for the n supervised slots of the chunk; p_t from the target's hidden `tgt_h` [n, H] or
        from its top-k `topk` ([n, k] ids, [n, k] probabilities)."""
        logp = _log_probs(self.slot_logits(hidden, prev)[valid])  # [c, γ, Vd] -> [n, Vd]
        w = weights.to(logp.dtype)[valid]  # [c, γ] -> [n]
        wv = w * in_vocab[valid]
        zero = logp.new_zeros(())
        ce = -(logp.gather(1, label_draft[valid].clamp(min=0)[:, None])[:, 0] * wv).sum()
        nums = {**dict.fromkeys(TERMS, zero), "ce": ce}
        c_star = match = logp.new_zeros(0)
        if topk is not None:
            kept = self._kept_from_top_k(*topk, logp.dtype)  # [n, Vd]
            match = torch.zeros(kept.shape[0], dtype=torch.bool, device=kept.device)
        elif tgt_h is not None:
            evaluating = not torch.is_grad_enabled()
            with torch.no_grad():
                t_logits = self.target_head(tgt_h)  # [n, V]
                columns = ids_from_d2t(self.module.d2t) if self.pruned else None
                kept = _log_probs(t_logits, columns).exp()  # p_t on the draft vocabulary [n, Vd]
                match = torch.zeros(kept.shape[0], dtype=torch.bool, device=kept.device)
                if evaluating:  # greedy τ: evaluation only (one more full-vocabulary pass)
                    match = self.module.to_target_ids(logp.argmax(-1)) == t_logits.float().argmax(-1)
        if tgt_h is not None or topk is not None:
            l1 = (logp.exp() - kept).abs().sum(-1)  # [n]
            if self.pruned:
                l1 = l1 + (1 - kept.sum(-1)).clamp(min=0)  # p_t mass outside the draft vocab
            c_star = (1 - 0.5 * l1).detach().clamp(0, 1)
            nums["l1"] = (l1 * w).sum()
            nums.update(self._distill_terms(kept, logp, w, wv))
            conf = self.slot_confidence(hidden, prev)
            if conf is not None:
                bce = F.binary_cross_entropy_with_logits(conf[valid].to(logp.dtype), c_star, reduction="none")
                nums["bce"] = (bce * w).sum()
        return torch.stack([nums[k] for k in TERMS]), c_star, match

    @torch.no_grad()
    def _kept_from_top_k(self, ids: torch.Tensor, probs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """p_t on the draft vocabulary [n, Vd] from its top k (ids [n, k] target ids, probs [n, k]):
        top-k tokens outside the draft vocabulary and the mass beyond the top k are left out, so
        1 - Σ kept is counted as mass outside the draft vocabulary (L1 then overstates the true
        distance by at most twice the mass beyond the top k)."""
        cols = target_to_draft(ids, self.module.t2d)  # [n, k] draft ids, -1 outside the draft vocabulary
        kept = torch.zeros(ids.shape[0], self.module.config.draft_vocab, dtype=dtype, device=ids.device)
        return kept.scatter_add_(1, cols.clamp(min=0), torch.where(cols >= 0, probs.to(dtype), 0.0))

    def _distill_terms(self, kept, logp, w, wv) -> dict[str, torch.Tensor]:
        """soft_ce / kl / ce_argmax numerators (those with a weight) from p_t on the draft vocab
        `kept` [n, Vd] and the draft's log-probs `logp` [n, Vd]."""
        out, lw = {}, self.loss_weights
        if lw.soft_ce > 0 or lw.kl > 0:
            q = kept / kept.sum(-1, keepdim=True).clamp(min=1e-30)  # renormalized over draft vocab
            cross = -(q * logp).sum(-1)  # [n]
            if lw.soft_ce > 0:
                out["soft_ce"] = (cross * wv).sum()
            if lw.kl > 0:
                entropy = -(q * q.clamp(min=1e-30).log()).sum(-1)  # [n], no gradient
                out["kl"] = ((cross - entropy) * w).sum()
        if lw.ce_argmax > 0:
            out["ce_argmax"] = (-logp.gather(1, kept.argmax(-1, keepdim=True))[:, 0] * w).sum()
        return out

    def _parts(self, nums, den, blocks: Blocks, tau, hidden, with_target: bool) -> LossParts:
        """Combine numerators into the loss and the metrics."""
        loss = hidden.sum() * 0 if hidden.requires_grad else nums.new_zeros(())  # a graph even if empty
        computed = {"ce"} | ({"l1"} if with_target else set())
        if with_target:
            computed |= {k for k in DISTILL_TERMS if getattr(self.loss_weights, k) > 0}
        if with_target and self.has_confidence:
            computed.add("bce")
        for i, name in enumerate(TERMS):
            alpha = getattr(self.loss_weights, name)
            if alpha > 0 and name in computed:
                loss = loss + alpha * nums[i] / den[TERM_DENOMINATOR[name]].to(nums.dtype).clamp(min=1e-12)
        sums = {name: nums[i].detach() for i, name in enumerate(TERMS) if name in computed}
        M = torch.tensor(blocks.valid.shape[0], device=blocks.valid.device)
        return LossParts(loss, sums, den, tau, blocks.valid.sum(), M, (blocks.valid & ~blocks.in_vocab).sum())


class DSparkObjective(BlockObjective):
    """DSpark / DFlash (`DSparkModel`): the model's anchored blocks; by default
    0.1·CE + 0.9·L1 + 1.0·BCE (DFlash's drafter spec passes CE only)."""

    def __init__(self, model, target_head, config=None, loss_weights=None):
        if not model.config.deepspec_slots:
            raise InputError("training supports DeepSpec slots only (slot k predicts anchor + k + 1); "
                             "z-lab DFlash drafts are imported and evaluated, not trained")
        super().__init__(model, target_head, config, loss_weights)

    @property
    def block_size(self) -> int:
        return self.module.config.block_size

    def slot_weights(self) -> torch.Tensor:
        return position_weights(self.block_size, self.module.config.loss_decay_gamma)

    def anchors(self, batch):
        if batch.anchor_pos is None:
            raise ValueError(f"{type(self).__name__}: the batch has no anchors (anchors.batch_anchors)")
        return batch.anchor_pos, batch.anchor_valid

    def block_hidden(self, batch, blocks):
        hidden = self.draft(batch.features, batch.input_ids, batch.anchor_pos, batch.anchor_valid)
        return hidden[blocks.rows, blocks.cols]  # [B, N, γ, H] -> [M, γ, H]

    def slot_logits(self, hidden, prev):
        return self.module.draft_logits(hidden, prev)

    def slot_confidence(self, hidden, prev):
        return self.module.confidence(hidden, prev)


class Eagle3Objective(BlockObjective):
    """Eagle3: Σ_s 0.8^s·soft-CE over the TTT unroll; step s at feature index i is slot s of the
    block anchored at i + 1 (it reads token i + 1 + s and predicts token i + 2 + s)."""

    anchored: ClassVar[bool] = False  # every position (anchors.all_anchors)
    default_loss_weights: ClassVar[LossWeights] = LossWeights(soft_ce=1.0)

    @property
    def block_size(self) -> int:
        return self.module.config.ttt_length

    def slot_weights(self) -> torch.Tensor:
        return step_weights(self.block_size, self.config.eagle3_step_decay)

    def anchors(self, batch):
        return all_anchors(batch.loss_mask)

    def block_hidden(self, batch, blocks):
        steps = self.draft(batch.features, batch.input_ids, self.block_size)  # T × [B, S, H]
        return torch.stack([h[blocks.rows, blocks.cols] for h in steps], dim=1)  # T × [M, H] -> [M, T, H]

    def slot_logits(self, hidden, prev):
        return self.module.draft_logits(hidden)


# a drafter's objective, as the train loop builds it (draftsmith.drafters: DrafterSpec.build_objective)
ObjectiveFactory = Callable[[nn.Module, TargetHead | None, ObjectiveConfig | None], BlockObjective]
