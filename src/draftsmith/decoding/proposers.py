"""Proposers: what each algorithm plugs into the one decode loop (`decoding.engine`).

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
from draftsmith.decoding.kv import RaggedKVCache
from draftsmith.decoding.sampling import SamplingConfig, probabilities, sample
from draftsmith.utils.io import InputError


@dataclass
class DecodeState:
    """The committed tokens of the active rows, owned by the engine, read by proposers.

    Tokens stay on the device: `tokens` [B, capacity] holds row r's prompt + generated ids in
    tokens[r, :lengths[r]] (the rest is stale), grown geometrically. The host keeps only what
    the engine's one sync per round brings back anyway: the exact `host_lengths`, and per row
    its prompt length and original prompt index."""

    tokens: torch.Tensor  # [B, capacity] committed ids, right-padded
    lengths: torch.Tensor  # [B] committed tokens per row
    prompt_lens: torch.Tensor  # [B] prompt tokens per row (device twin of prompt_lengths)
    host_lengths: list[int]  # exact host copy of `lengths`, refreshed by the engine every round
    prompt_lengths: list[int]
    rows: list[int]  # original prompt index of each active row
    sampling: SamplingConfig
    generator: torch.Generator | None
    device: torch.device

    @classmethod
    def from_prompts(cls, prompts: list[list[int]], sampling: SamplingConfig,
                     generator: torch.Generator | None, device, capacity: int) -> DecodeState:
        P = max(len(p) for p in prompts)
        cap = max(capacity, P)
        host = torch.tensor([list(p) + [0] * (cap - len(p)) for p in prompts], dtype=torch.long)
        n = [len(p) for p in prompts]
        lengths = torch.tensor(n, dtype=torch.long).to(device)
        return cls(host.to(device), lengths, lengths.clone(), list(n), list(n),
                   list(range(len(prompts))), sampling, generator, device)

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    @property
    def max_length(self) -> int:
        """The longest row (host, exact: no sync)."""
        return max(self.host_lengths, default=0)

    @property
    def seqs(self) -> list[list[int]]:
        """Host copy of every row's prompt + generated ids (one device -> host sync): for
        host-side proposers (n-gram lookup, oracle) and tests, not for the decode loop."""
        return [t[:n] for t, n in zip(self.tokens.tolist(), self.host_lengths)]

    def last_tokens(self) -> torch.Tensor:
        """[B] the last committed token of each row (the next anchor)."""
        return self.tokens.gather(1, (self.lengths - 1)[:, None]).squeeze(1)  # [B, 1] -> [B]

    def window(self, starts: torch.Tensor, width: int) -> torch.Tensor:
        """[B, width] the tokens at starts[r], starts[r] + 1, ... (clamped to the buffer)."""
        index = starts[:, None] + torch.arange(width, device=starts.device)  # [B, width]
        return self.tokens.gather(1, index.clamp(min=0, max=self.tokens.shape[1] - 1))

    def _reserve(self, needed: int) -> None:
        cap = self.tokens.shape[1]
        if needed > cap:
            grown = self.tokens.new_zeros(self.tokens.shape[0], max(2 * cap, needed))  # [B, cap']
            grown[:, :cap] = self.tokens
            self.tokens = grown

    def append(self, new: torch.Tensor, counts: torch.Tensor) -> None:
        """Append new[r, :counts[r]] to row r (new [B, n], counts [B]); tensor ops only. All n
        are written: those past the new length are stale. The engine refreshes `host_lengths`
        after its sync."""
        self._reserve(self.max_length + new.shape[1])
        index = self.lengths[:, None] + torch.arange(new.shape[1], device=new.device)  # [B, n]
        self.tokens.scatter_(1, index, new)
        self.lengths = self.lengths + counts

    def select(self, keep: list[int], index: torch.Tensor) -> None:
        """Keep rows `keep` (host) = `index` (the same on the device)."""
        self.tokens, self.lengths, self.prompt_lens = (
            self.tokens[index], self.lengths[index], self.prompt_lens[index])
        self.host_lengths = [self.host_lengths[i] for i in keep]
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


def check_n_max(n_max: int | None, limit: int | None = None, why: str = "") -> int | None:
    """`n_max` (llama.cpp's --spec-draft-n-max: draft tokens proposed per round) validated: None,
    or an int in 1..limit (no upper bound when limit is None); `why` explains the limit."""
    if n_max is None:
        return None
    whole = isinstance(n_max, int) and not isinstance(n_max, bool)
    if not whole or n_max < 1 or (limit is not None and n_max > limit):
        bound = "be >= 1" if limit is None else f"lie in 1..{limit}"
        raise InputError(f"n_max {n_max!r} must {bound}{why}")
    return n_max


def capped_tokens(num_tokens: int, n_max: int | None) -> int:
    """The draft length of a chain or lookup proposer under `n_max` (llama.cpp drafts at most
    n_max tokens per round): min(num_tokens, n_max)."""
    n_max = check_n_max(n_max)
    return num_tokens if n_max is None else min(num_tokens, n_max)


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
    def for_draft(cls, model: torch.nn.Module, num_tokens: int = 7, n_max: int | None = None) -> Proposer:
        """This proposer for a loaded draft; `num_tokens`: the draft length where the draft
        does not fix it (a block drafter proposes its block); `n_max`: at most this many draft
        tokens per round, llama.cpp's --spec-draft-n-max (None = no cap)."""
        if n_max is not None:
            raise InputError(f"n_max {n_max!r}: the {cls.name} proposer cannot cap its draft length")
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
        empty = torch.zeros(state.batch_size, 0, dtype=torch.long, device=state.device)  # [B, 0]
        return Proposal(empty, torch.zeros(state.batch_size, dtype=torch.long, device=state.device))


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
    """DSpark and DFlash (`DSparkModel`): one block per round, batched over rows.

    The draft's context K/V live in a `RaggedKVCache` (one committed length per row): features
    of newly committed positions are projected once, at each row's own positions. The block is
    the full γ slots (anchor + masks); truncation rules cut after drafting. Slot k predicts
    position anchor + k + `config.label_offset`: with DeepSpec's offset 1 all γ slots are
    proposals; with z-lab's offset 0 slot 0 predicts the anchor itself and is dropped, leaving
    γ-1 proposals.

    `n_max` (llama.cpp's --spec-draft-n-max) runs llama.cpp's shorter block instead: n_max slots
    (DeepSpec) or n_max + 1 (z-lab, slot 0 dropped), so n_max proposals per round. The block is
    bidirectional, so every slot differs from the full block's: not a cut after drafting.
    """

    name = "dspark"
    drives = DSparkModel

    @classmethod
    def for_draft(cls, model, num_tokens=7, n_max=None):
        return cls(model, n_max)

    def __init__(self, model: DSparkModel, n_max: int | None = None):
        self.model = model.eval()
        self.target_layer_ids = list(model.config.target_layer_ids)
        self.first_slot = 1 - model.config.label_offset  # the first slot that predicts a new token
        g = model.config.block_size
        slots = "DeepSpec" if self.first_slot == 0 else "z-lab"
        why = f" (the draft proposes at most {g - self.first_slot} tokens: block_size {g}, {slots} slots)"
        self.n_max = check_n_max(n_max, g - self.first_slot, why)
        self.num_slots = None if n_max is None else n_max + self.first_slot  # None: the full block
        self.cache: RaggedKVCache | None = None

    def prefill(self, state, features, counts):
        self.cache = RaggedKVCache(len(self.model.layers), state.batch_size, device=features.device)
        self._append(state, features, counts)

    def _append(self, state: DecodeState, features: torch.Tensor, counts: torch.Tensor) -> None:
        """Project features [B, N, L·H] of positions row_length.. (counts[r] real) per row, all
        rows in one batched write; entries past counts[r] land past the row's length (stale)."""
        bound = state.max_length - 1  # every row's committed length - 1, before and after
        self.model.append_context(self.cache.rows_writer(bound), features)
        self.cache.set_lengths(self.cache.row_lengths + counts, bound)

    @torch.no_grad()
    def propose(self, state):
        anchor_pos = self.cache.row_lengths  # [B] = committed length - 1
        if anchor_pos.device.type == "cpu" and not torch.equal(anchor_pos, state.lengths - 1):
            raise RuntimeError("DSpark context cache out of sync with the committed tokens")
        sampler = draft_sampler(self.model, state)
        block = self.model.propose(self.cache, state.last_tokens(), anchor_pos, sampler, self.num_slots)
        s = self.first_slot
        tokens = block.tokens[:, s:]  # [B, n] -> [B, K] (n = γ, or n_max + first_slot)
        probs = sampler.stacked()[:, s:] if sampler is not None else None
        conf = block.confidence_logits[:, s:] if block.confidence_logits is not None else None
        lengths = torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long, device=tokens.device)
        return Proposal(tokens, lengths, probs, conf)

    def commit(self, state, accepted, features, counts):
        self._append(state, features, counts)

    def select(self, rows):
        self.cache.select(rows)


class Eagle3Proposer(Proposer):
    """EAGLE-3 chain drafting, batched over rows. The draft KV is one `RaggedKVCache` with a
    length per row; entry t of row r pairs the features of position t with token t + 1. The
    pairs committed since the last round (features of the verify forward, counts[r] real per
    row, their next tokens read from the device state) wait in `pending` until `propose`
    appends them and drafts the chain of every row with one batched forward per slot."""

    name = "eagle3"
    drives = Eagle3Model

    @classmethod
    def for_draft(cls, model, num_tokens=7, n_max=None):
        return cls(model, capped_tokens(num_tokens, n_max))

    def __init__(self, model: Eagle3Model, num_tokens: int = 7):
        self.model = model.eval()
        self.num_tokens = num_tokens
        self.target_layer_ids = list(model.config.target_layer_ids)
        self.cache: RaggedKVCache | None = None
        # (features [B, N, 3H], next tokens [B, N], counts [B]) committed since the last round
        self.pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def prefill(self, state, features, counts):
        self.cache = RaggedKVCache(1, state.batch_size, device=features.device)
        starts = torch.ones_like(counts)  # features of position t pair with token t + 1
        self.pending = (features, state.window(starts, features.shape[1]), counts)

    @torch.no_grad()
    def propose(self, state):
        feats, nxt, counts = self.pending
        sampler = draft_sampler(self.model, state)
        bound = state.max_length - 1  # the cache holds committed - 1 entries per row
        chain = self.model.propose_rows(self.cache, feats, nxt, counts, self.num_tokens, bound, sampler)
        if state.device.type == "cpu" and not torch.equal(self.cache.row_lengths, state.lengths - 1):
            raise RuntimeError("EAGLE-3 cache out of sync with the committed tokens")
        self.pending = None
        tokens = chain.tokens  # [B, K]
        lengths = torch.full((tokens.shape[0],), self.num_tokens, dtype=torch.long, device=tokens.device)
        return Proposal(tokens, lengths, sampler.stacked() if sampler is not None else None)

    def commit(self, state, accepted, features, counts):
        starts = state.lengths - counts  # the first newly committed token of each row
        self.pending = (features, state.window(starts, features.shape[1]), counts)

    def select(self, rows):
        self.cache.select(rows)
        if self.pending is not None:
            self.pending = tuple(x[rows] for x in self.pending)


def proposer_for(draft: torch.nn.Module, num_tokens: int = 7, n_max: int | None = None) -> Proposer:
    """The proposer of a loaded draft model (`models.io.load_draft`): the one registered for its
    class or its nearest base class (`Proposer.drives`). `n_max`: llama.cpp's
    --spec-draft-n-max (DSpark/DFlash: its shorter block; EAGLE-3: caps `num_tokens`)."""
    for cls in type(draft).__mro__:
        if cls in Proposer._by_model:
            return Proposer._by_model[cls].for_draft(draft, num_tokens, n_max)
    raise TypeError(f"no proposer drives {type(draft).__name__}")
