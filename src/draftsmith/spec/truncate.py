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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from draftsmith.spec.proposers import Proposal


def leading_true(mask: torch.Tensor) -> torch.Tensor:
    """[B, K] bool -> [B] length of the leading run of True."""
    return mask.to(torch.long).cumprod(dim=1).sum(dim=1)


def _confidence(proposal: Proposal, rule: str) -> torch.Tensor:
    if proposal.confidence is None:
        raise ValueError(f"{rule} needs a draft with a confidence head (DSpark with "
                         "enable_confidence_head); this proposal has no confidence")
    return torch.sigmoid(proposal.confidence.to(torch.float64))  # [B, K]


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

    def __call__(self, proposal: Proposal) -> torch.Tensor:
        survival = _confidence(proposal, "survival truncation").cumprod(dim=1)  # [B, K]
        return torch.minimum(leading_true(survival >= self.threshold), proposal.lengths)
