"""Proposers: what each algorithm plugs into the one decode loop (`spec.engine`).

Hooks (every one called by the engine with the rows still active, in batch order):

- `prefill(state, features, counts)`: after the prompt forward and the first sampled token.
  features [B, N, L·H] (right-padded) hold the target features of prompt positions
  0..counts[r]-1 (None for proposers that need no features).
- `propose(state) -> Proposal`: draft tokens after each row's last committed token.
- `commit(state, accepted, features, counts)`: the round's verify forward committed counts[r]
  (= accepted[r] + 1) more target positions per row; features [B, N, L·H] are theirs, taken from
  that same forward (no extra target pass). `state` already holds the new tokens. Anything
  speculative the proposer kept (a drafted chain, ...) is forgotten here: commit is also the
  rollback.
- `select(rows)`: keep only these rows (the others finished).

Invariant: a row with n committed tokens has target features for positions 0..n-2; the last
committed token (the anchor) has none yet, it is the first input of the next verify forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from draftsmith.models.dspark import DSparkModel
from draftsmith.models.eagle3 import Eagle3Model
from draftsmith.spec.kv import RaggedKVCache
from draftsmith.spec.sampling import SamplingConfig, probabilities, sample


@dataclass
class DecodeState:
    """The committed tokens of the active rows, owned by the engine, read by proposers."""

    seqs: list[list[int]]  # prompt + generated ids per active row
    prompt_lengths: list[int]
    rows: list[int]  # original prompt index of each active row
    sampling: SamplingConfig
    generator: torch.Generator | None
    device: torch.device

    @property
    def batch_size(self) -> int:
        return len(self.seqs)

    def last_tokens(self) -> torch.Tensor:
        """[B] the last committed token of each row (the next anchor)."""
        return torch.tensor([s[-1] for s in self.seqs], dtype=torch.long, device=self.device)

    def lengths(self) -> torch.Tensor:
        """[B] committed tokens per row."""
        return torch.tensor([len(s) for s in self.seqs], dtype=torch.long, device=self.device)

    def select(self, keep: list[int]) -> None:
        self.seqs = [self.seqs[i] for i in keep]
        self.prompt_lengths = [self.prompt_lengths[i] for i in keep]
        self.rows = [self.rows[i] for i in keep]


@dataclass
class Proposal:
    """Draft tokens of one round; row r proposes tokens[r, :lengths[r]]."""

    tokens: torch.Tensor  # [B, K] target ids
    lengths: torch.Tensor  # [B]
    # [B, K, V] over the TARGET vocabulary: the (transformed) distribution each token was drawn
    # from, zero outside a pruned draft vocabulary; None = deterministic proposal (one-hot).
    probs: torch.Tensor | None = None
    confidence: torch.Tensor | None = None  # [B, K] logits; σ = P(slot accepted | earlier ones)

    @property
    def width(self) -> int:
        return self.tokens.shape[1]


def pad_proposals(rows: list[list[int]], device, width: int | None = None) -> Proposal:
    """Per-row token lists -> a Proposal [B, K] padded with 0 (deterministic, no probs)."""
    K = max([len(r) for r in rows] + [0]) if width is None else width
    tokens = torch.zeros(len(rows), K, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r[:K], dtype=torch.long, device=device)
    lengths = torch.tensor([min(len(r), K) for r in rows], dtype=torch.long, device=device)
    return Proposal(tokens, lengths)


class Proposer:
    """Base: no features, nothing to keep in sync. Subclasses override the hooks they need.

    A proposer that runs a draft model names the model class in `drives`; defining the class
    registers it, and `proposer_for(draft)` picks the one registered for the draft's class (or
    its nearest base) and builds it with `for_draft`."""

    name = "base"
    target_layer_ids: list[int] = []  # target layers whose features the proposer reads
    drives: ClassVar[type | None] = None  # the draft model class this proposer runs
    _by_model: ClassVar[dict[type, type[Proposer]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("drives") is not None:
            Proposer._by_model[cls.drives] = cls

    @classmethod
    def for_draft(cls, model: torch.nn.Module, num_tokens: int = 7) -> Proposer:
        """This proposer for a loaded draft; `num_tokens`: the draft length where the draft
        does not fix it (a block drafter proposes its block)."""
        return cls(model)

    @property
    def uses_features(self) -> bool:
        return bool(self.target_layer_ids)

    def prefill(self, state: DecodeState, features: torch.Tensor | None, counts: torch.Tensor) -> None:
        pass

    def propose(self, state: DecodeState) -> Proposal:
        raise NotImplementedError

    def commit(self, state: DecodeState, accepted: torch.Tensor, features: torch.Tensor | None,
               counts: torch.Tensor) -> None:
        pass

    def select(self, rows: torch.Tensor) -> None:
        pass


class PlainProposer(Proposer):
    """No draft: every round verifies one token, i.e. plain target decoding through the same loop
    (the speedup denominator)."""

    name = "plain"

    def propose(self, state: DecodeState) -> Proposal:
        return pad_proposals([[] for _ in state.seqs], state.device, width=0)


class OracleProposer(Proposer):
    """Proposes the target's own greedy continuation, computed in advance (tests, upper bounds).

    continuations[i]: the greedy tokens generated after prompt i."""

    name = "oracle"

    def __init__(self, continuations: list[list[int]], num_tokens: int = 7):
        self.continuations = [list(c) for c in continuations]
        self.num_tokens = num_tokens

    def propose(self, state: DecodeState) -> Proposal:
        rows = []
        for seq, plen, row in zip(state.seqs, state.prompt_lengths, state.rows):
            done = len(seq) - plen
            rows.append(self.continuations[row][done:done + self.num_tokens])
        return pad_proposals(rows, state.device, width=self.num_tokens)


class NGramProposer(Proposer):
    """Prompt lookup: find the most recent earlier occurrence of the row's last n tokens
    (n = max_ngram down to min_ngram) and propose the tokens that followed it."""

    name = "ngram"

    def __init__(self, num_tokens: int = 7, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram ({min_ngram}) <= max_ngram ({max_ngram})")
        self.num_tokens, self.max_ngram, self.min_ngram = num_tokens, max_ngram, min_ngram

    def lookup(self, seq: list[int]) -> list[int]:
        for n in range(min(self.max_ngram, len(seq) - 1), self.min_ngram - 1, -1):
            suffix = seq[-n:]
            for start in range(len(seq) - n - 1, -1, -1):  # most recent earlier match first
                if seq[start:start + n] == suffix:
                    return seq[start + n:start + n + self.num_tokens]
        return []

    def propose(self, state: DecodeState) -> Proposal:
        return pad_proposals([self.lookup(s) for s in state.seqs], state.device, width=self.num_tokens)


@dataclass
class DraftSampler:
    """The `sampler` a draft model's `propose` calls per slot: draft logits [B, V_draft] ->
    draft ids [B]. It scatters the (pruned) logits to the target vocabulary (-inf outside),
    applies the sampling transform, draws, and records the distribution it drew from."""

    model: torch.nn.Module
    sampling: SamplingConfig
    generator: torch.Generator | None
    probs: list[torch.Tensor] = field(default_factory=list)  # per slot [B, V]

    def __call__(self, draft_logits: torch.Tensor) -> torch.Tensor:
        p = probabilities(self.model.full_vocab_logits(draft_logits), self.sampling)  # [B, V]
        self.probs.append(p)
        return self.model.to_draft_ids(sample(p, self.generator))

    def stacked(self) -> torch.Tensor:
        return torch.stack(self.probs, dim=1)  # K × [B, V] -> [B, K, V]


def draft_sampler(model, state: DecodeState) -> DraftSampler | None:
    """None when greedy: the models then take the argmax of the draft logits."""
    return None if state.sampling.greedy else DraftSampler(model, state.sampling, state.generator)


class DSparkProposer(Proposer):
    """DSpark and DFlash (`DSparkModel`): one full γ-slot block per round, batched over rows.

    The draft's context K/V live in a `RaggedKVCache` (one committed length per row): features
    of newly committed positions are projected once, at each row's own positions. The block is
    always the full γ slots (anchor + masks); truncation happens after drafting. Slot k predicts
    position anchor + k + `config.label_offset`: with DeepSpec's offset 1 all γ slots are
    proposals; with z-lab's offset 0 slot 0 predicts the anchor itself and is dropped, leaving
    γ-1 proposals.
    """

    name = "dspark"
    drives = DSparkModel

    def __init__(self, model: DSparkModel):
        self.model = model.eval()
        self.target_layer_ids = list(model.config.target_layer_ids)
        self.first_slot = 1 - model.config.label_offset  # the first slot that predicts a new token
        self.cache: RaggedKVCache | None = None

    def prefill(self, state, features, counts):
        self.cache = RaggedKVCache(len(self.model.layers), state.batch_size, device=features.device)
        self._append(features, counts)

    def _append(self, features: torch.Tensor, counts: torch.Tensor) -> None:
        """Project features [B, N, L·H] of positions row_length.. (counts[r] real) per row."""
        starts = self.cache.row_lengths
        for start in torch.unique(starts).tolist():
            rows = (starts == start).nonzero().squeeze(1)
            self.model.append_context(self.cache.writer(rows, start), features[rows])
        self.cache.set_lengths(starts + counts)

    @torch.no_grad()
    def propose(self, state):
        anchor_pos = self.cache.row_lengths  # [B] = committed length - 1
        if not torch.equal(anchor_pos, state.lengths() - 1):
            raise RuntimeError("DSpark context cache out of sync with the committed tokens")
        sampler = draft_sampler(self.model, state)
        block = self.model.propose(self.cache, state.last_tokens(), anchor_pos, sampler)
        s = self.first_slot
        tokens = block.tokens[:, s:]  # [B, γ] -> [B, K]
        probs = sampler.stacked()[:, s:] if sampler is not None else None
        conf = block.confidence_logits[:, s:] if block.confidence_logits is not None else None
        lengths = torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long, device=tokens.device)
        return Proposal(tokens, lengths, probs, conf)

    def commit(self, state, accepted, features, counts):
        self._append(features, counts)

    def select(self, rows):
        self.cache.select(rows)


class Eagle3Proposer(Proposer):
    """EAGLE-3 chain drafting. Its KV cache has one length per batch and the chain attends to
    every entry, so each row keeps its own batch-1 cache and rows are drafted one after the
    other (only the target verify is batched). Cache entry t pairs the features of position t
    with token t + 1; the pairs committed since the last round are handed to `propose`, which
    appends them and rolls its chain back to them."""

    name = "eagle3"
    drives = Eagle3Model

    @classmethod
    def for_draft(cls, model, num_tokens=7):
        return cls(model, num_tokens)

    def __init__(self, model: Eagle3Model, num_tokens: int = 7):
        self.model = model.eval()
        self.num_tokens = num_tokens
        self.target_layer_ids = list(model.config.target_layer_ids)
        self.caches: list = []
        self.pending: list[tuple[torch.Tensor, list[int]]] = []  # per row (features [n, 3H], next tokens)

    def prefill(self, state, features, counts):
        self.caches = [self.model.new_cache() for _ in state.seqs]
        self.pending = [(features[r, :n], seq[1:n + 1])
                        for r, (seq, n) in enumerate(zip(state.seqs, counts.tolist()))]

    @torch.no_grad()
    def propose(self, state):
        tokens, probs = [], []
        for r, (cache, (feats, nxt)) in enumerate(zip(self.caches, self.pending)):
            sampler = draft_sampler(self.model, state)
            ids = torch.tensor([nxt], dtype=torch.long, device=feats.device)  # [1, n]
            chain = self.model.propose(cache, feats[None], ids, self.num_tokens, sampler)
            if cache.length != len(state.seqs[r]) - 1:
                raise RuntimeError("EAGLE-3 cache out of sync with the committed tokens")
            tokens.append(chain.tokens)
            if sampler is not None:
                probs.append(sampler.stacked())
        self.pending = []
        tokens = torch.cat(tokens, dim=0)  # B × [1, K] -> [B, K]
        lengths = torch.full((tokens.shape[0],), self.num_tokens, dtype=torch.long, device=tokens.device)
        return Proposal(tokens, lengths, torch.cat(probs, dim=0) if probs else None)

    def commit(self, state, accepted, features, counts):
        self.pending = [(features[r, :n], seq[len(seq) - n:])
                        for r, (seq, n) in enumerate(zip(state.seqs, counts.tolist()))]

    def select(self, rows):
        keep = rows.tolist()
        self.caches = [self.caches[i] for i in keep]
        self.pending = [self.pending[i] for i in keep] if self.pending else []


def proposer_for(draft: torch.nn.Module, num_tokens: int = 7) -> Proposer:
    """The proposer of a loaded draft model (`models.io.load_draft`): the one registered for its
    class or its nearest base class (`Proposer.drives`)."""
    for cls in type(draft).__mro__:
        if cls in Proposer._by_model:
            return Proposer._by_model[cls].for_draft(draft, num_tokens)
    raise TypeError(f"no proposer drives {type(draft).__name__}")
