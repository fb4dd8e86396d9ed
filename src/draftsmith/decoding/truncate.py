"""Truncation rules: how many drafted tokens of each row to verify (applied after drafting).

A rule maps a `Proposal` to lengths [B] (never more than proposed). All rules here stay
lossless: whether slot k is verified depends only on the confidence c_k, which the draft
computed from its hidden state and the *previous* token x_{k-1}, never on x_k or later tokens
(the non-anticipating property of DSpark §3.2.2); a row whose draft is cut to nothing simply
gets one target token from the verify forward.

- `KeepAll`: verify everything (the default).
- `FixedLength(k)`: at most k tokens.
- `PMinRule(p_min)`: llama.cpp's `--spec-draft-p-min`: stop at the first slot whose raw per-step
  σ(c_k) < p_min.
- `SurvivalRule(threshold)`: stop at the first slot whose cumulative survival Π_{i<=k} σ(c_i)
  falls below the threshold.
- `PrefixScheduler(steps_per_second)`: the paper's hardware-aware scheduler (Algorithm 1) over
  the whole batch: admit (row, slot) pairs by descending survival while the expected throughput
  τ*·SPS(B) improves, and stop at the first admission that does not (the early stop keeps it
  non-anticipating: ties are broken by slot, so a slot is never ranked behind a later slot of its
  own row).

The survival rules and the scheduler take optional per-position temperatures (Sequential
Temperature Scaling, DESIGN §3.5): σ(c_k / T_k). p-min uses raw σ(c_k), as llama.cpp does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from draftsmith.decoding.proposers import Proposal


def leading_true(mask: torch.Tensor) -> torch.Tensor:
    """[B, K] bool -> [B] length of the leading run of True."""
    return mask.to(torch.long).cumprod(dim=1).sum(dim=1)


def _confidence(proposal: Proposal, rule: str, temperatures=None) -> torch.Tensor:
    """σ(c_k / T_k) [B, K] in float64."""
    if proposal.confidence is None:
        raise ValueError(f"{rule} needs a draft with a confidence head (DSpark with "
                         "enable_confidence_head); this proposal has no confidence")
    logits = proposal.confidence.to(torch.float64)
    if temperatures is not None:
        K = logits.shape[1]
        temps = torch.as_tensor(list(temperatures)[:K], dtype=torch.float64, device=logits.device)
        if temps.numel() < K:
            raise ValueError(f"{len(temperatures)} temperatures for {K} draft positions")
        logits = logits / temps
    return torch.sigmoid(logits)  # [B, K]


class KeepAll:
    def __call__(self, proposal: Proposal) -> torch.Tensor:
        return proposal.lengths


@dataclass
class FixedLength:
    max_tokens: int

    def __call__(self, proposal: Proposal) -> torch.Tensor:
        return proposal.lengths.clamp(max=self.max_tokens)


@dataclass
class PMinRule:
    p_min: float

    def __call__(self, proposal: Proposal) -> torch.Tensor:
        keep = leading_true(_confidence(proposal, "p-min truncation") >= self.p_min)
        return torch.minimum(keep, proposal.lengths)


@dataclass
class SurvivalRule:
    threshold: float
    temperatures: list[float] | None = None

    def __call__(self, proposal: Proposal) -> torch.Tensor:
        conf = _confidence(proposal, "survival truncation", self.temperatures)
        survival = conf.cumprod(dim=1)  # [B, K]
        return torch.minimum(leading_true(survival >= self.threshold), proposal.lengths)


@dataclass
class PrefixScheduler:
    """Algorithm 1 of the DSpark paper. steps_per_second(B): the engine's profiled verify rate
    for a forward of B tokens."""

    steps_per_second: Callable[[int], float]
    temperatures: list[float] | None = None

    def __call__(self, proposal: Proposal) -> torch.Tensor:
        conf = _confidence(proposal, "the prefix scheduler", self.temperatures)
        survival = conf.cumprod(dim=1).tolist()  # [B, K]
        R = len(survival)
        candidates = sorted((-a, j, r) for r, row in enumerate(survival)
                            for j, a in enumerate(row[:int(proposal.lengths[r])]) if a > 0)
        lengths = [0] * R
        tokens, expected = R, float(R)
        best = expected * self.steps_per_second(tokens)
        for neg_a, j, r in candidates:
            tokens, expected = tokens + 1, expected - neg_a
            theta = expected * self.steps_per_second(tokens)
            if theta <= best:
                break
            best, lengths[r] = theta, j + 1
        return torch.tensor(lengths, dtype=torch.long, device=proposal.lengths.device)
