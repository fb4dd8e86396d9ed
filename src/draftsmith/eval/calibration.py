"""Confidence-head calibration (DESIGN §3.5, paper §3.2): metrics, Sequential Temperature
Scaling, threshold sweeps and reliability diagrams, from rounds of real speculative decoding.

Data. Each row-round of a DSpark draft with a confidence head gives the raw confidence logits
c_1..c_n of its drafted slots (`RoundRecord.confidence`), how many slots were verified and how
many the target accepted. Position k's prediction is the cumulative survival
`s_k = Π_{i≤k} σ(c_i / T_i)`; its outcome is `accepted ≥ k`; only rounds that verified at
least k slots count at position k. Fit on rounds decoded without truncation (every drafted slot
verified), at the decoding temperature the calibration will be used at.

- `ece` (10 equal-width bins, weighted by bin size), `brier`, `auroc` (Mann-Whitney with tied
  ranks averaged; NaN when only one outcome occurs) per position.
- `fit_sts`: for k = 1..γ in turn, grid-search T_k (log-spaced 0.05..20) minimizing the ECE of
  s_k with T_1..T_{k-1} fixed; ties go to the temperature closest to 1.
- `threshold_sweep` (paper Fig. 5): cut every recorded round with the engine's own rules: at the
  first slot whose calibrated survival falls below a threshold (`SurvivalRule`), and separately
  at the first slot whose raw per-step σ(c_k) falls below p_min (`PMinRule`, llama.cpp's
  `--spec-draft-p-min`);
  report τ and verified draft tokens per round. With greedy verification a slot's acceptance does
  not depend on later slots, so accepted' = min(accepted, kept) is exact; at T > 0 it is an
  estimate (the verifier's random draws would differ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from draftsmith.decoding import PMinRule, Proposal, RoundRecord, SurvivalRule
from draftsmith.utils.plots import pyplot, save

STS_GRID = torch.exp(torch.linspace(math.log(0.05), math.log(20.0), 161, dtype=torch.float64))
ECE_BINS = 10
SWEEP_THRESHOLDS = [round(0.05 * i, 2) for i in range(20)]


@dataclass
class CalibrationSet:
    """Row-rounds with confidence: logits [N, K] float64 (NaN past a row's drafted slots),
    verified [N] and accepted [N] int64."""

    logits: torch.Tensor
    verified: torch.Tensor
    accepted: torch.Tensor

    @classmethod
    def from_rounds(cls, rounds: list[RoundRecord], require_confidence: bool = True) -> CalibrationSet:
        """Row-rounds with confidence logits; with `require_confidence=False` every row-round
        (logits NaN where the draft has none, verified = what was verified)."""
        if require_confidence:
            rows = [(c, p, a) for r in rounds if r.confidence is not None
                    for c, p, a in zip(r.confidence, r.proposed, r.accepted) if len(c) > 0]
        else:
            rows = [(c, p, a) for r in rounds
                    for c, p, a in zip(r.confidence or [[]] * len(r.rows), r.proposed, r.accepted)]
        K = max((max(len(c), p if not c else 0) for c, p, _ in rows), default=0)
        logits = torch.full((len(rows), K), float("nan"), dtype=torch.float64)
        for i, (c, _, _) in enumerate(rows):
            logits[i, : len(c)] = torch.tensor(c, dtype=torch.float64)
        verified = torch.tensor([min(p, len(c)) if c else p for c, p, _ in rows], dtype=torch.int64)
        accepted = torch.tensor([a for _, _, a in rows], dtype=torch.int64)
        return cls(logits, verified, accepted)

    @property
    def rounds(self) -> int:
        return self.logits.shape[0]

    @property
    def positions(self) -> int:
        return self.logits.shape[1]

    def step_probs(self, temperatures: list[float] | None = None) -> torch.Tensor:
        """σ(c_k / T_k) [N, K] (NaN past each row's drafted slots)."""
        logits = self.logits
        if temperatures is not None:
            t = torch.tensor(list(temperatures)[: self.positions], dtype=torch.float64)
            logits = logits / t
        return torch.sigmoid(logits)

    def survival(self, temperatures: list[float] | None = None) -> torch.Tensor:
        """Predicted cumulative survival s_k [N, K]."""
        return torch.nan_to_num(self.step_probs(temperatures), nan=0.0).cumprod(dim=1)

    def position(self, k: int, temperatures: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted s_k, observed accepted >= k) over rounds that verified >= k slots; k 1-based."""
        keep = self.verified >= k
        return self.survival(temperatures)[keep, k - 1], (self.accepted[keep] >= k).to(torch.float64)


# --------------------------------------------------------------------------- metrics


def calibration_bins(p: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS) -> list[tuple[float, float, int]]:
    """Equal-width bins of the predictions: (mean predicted, observed frequency, count) of every
    non-empty bin (what ECE sums and a reliability diagram draws)."""
    idx = (p * bins).long().clamp(0, bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        if m.any():
            out.append((p[m].mean().item(), y[m].mean().item(), int(m.sum())))
    return out


def ece(p: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error with equal-width bins."""
    if p.numel() == 0:
        return float("nan")
    return sum(n * abs(mp - my) for mp, my, n in calibration_bins(p, y, bins)) / p.numel()


def brier(p: torch.Tensor, y: torch.Tensor) -> float:
    return float(((p - y) ** 2).mean()) if p.numel() else float("nan")


def auroc(p: torch.Tensor, y: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counted 1/2 (average ranks)."""
    pos, n = int(y.sum().item()), y.numel()
    if pos == 0 or pos == n:
        return float("nan")
    order = torch.argsort(p)
    sorted_p = p[order]
    ranks = torch.empty(n, dtype=torch.float64)
    i = 0
    while i < n:  # average ranks over runs of equal scores
        j = i
        while j + 1 < n and sorted_p[j + 1] == sorted_p[i]:
            j += 1
        ranks[order[i: j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y.bool()].sum().item() - pos * (pos + 1) / 2
    return u / (pos * (n - pos))


def position_metrics(data: CalibrationSet, temperatures: list[float] | None = None) -> list[dict]:
    """Per position: rounds counted, mean predicted survival, observed survival, ECE, Brier, AUROC."""
    out = []
    for k in range(1, data.positions + 1):
        p, y = data.position(k, temperatures)
        out.append({"position": k, "rounds": int(p.numel()),
                    "predicted": float(p.mean()) if p.numel() else float("nan"),
                    "observed": float(y.mean()) if y.numel() else float("nan"),
                    "ece": ece(p, y), "brier": brier(p, y), "auroc": auroc(p, y)})
    return out


# --------------------------------------------------------------------------- STS


def fit_sts(data: CalibrationSet, grid: torch.Tensor = STS_GRID) -> list[float]:
    """Sequential Temperature Scaling: one temperature per position, fitted in order."""
    temps: list[float] = []
    for k in range(1, data.positions + 1):
        best, best_t = float("inf"), 1.0
        for t in grid.tolist():
            trial = temps + [t] + [1.0] * (data.positions - k)
            p, y = data.position(k, trial)
            e = ece(p, y)
            if math.isnan(e):
                break  # no round verified this position: keep T = 1
            closer = abs(math.log(t)) < abs(math.log(best_t))
            if e < best - 1e-12 or (abs(e - best) <= 1e-12 and closer):
                best, best_t = e, t
        temps.append(best_t)
    return temps


# --------------------------------------------------------------------------- threshold sweeps


def _sweep_row(kept: torch.Tensor, data: CalibrationSet, threshold: float) -> dict:
    acc = torch.minimum(data.accepted, kept)
    verified = kept.sum().item()
    return {"threshold": threshold, "tau": 1 + acc.double().mean().item(),
            "draft_tokens_per_round": kept.double().mean().item(),
            "acceptance_rate": acc.sum().item() / verified if verified else float("nan"),
            "empty_rounds": int((kept == 0).sum())}


def threshold_sweep(data: CalibrationSet, temperatures: list[float] | None,
                    thresholds: list[float] = SWEEP_THRESHOLDS) -> dict[str, list[dict]]:
    """{"survival": [...], "p_min": [...]}: offline τ and verified draft tokens per round when
    each recorded round is cut by the engine's own rules (`SurvivalRule` with the calibrated
    temperatures, `PMinRule` on raw σ(c_k), as llama.cpp applies it)."""
    rounds = Proposal(torch.zeros_like(data.verified)[:, None].expand(-1, data.positions), data.verified,
                      confidence=data.logits)
    return {"survival": [_sweep_row(SurvivalRule(t, temperatures)(rounds), data, t) for t in thresholds],
            "p_min": [_sweep_row(PMinRule(t)(rounds), data, t) for t in thresholds]}


# --------------------------------------------------------------------------- plots


def plot_reliability(data: CalibrationSet, temperatures: list[float], path: Path) -> None:
    """One panel per position: observed survival against predicted, before and after STS."""
    plt = pyplot()

    K = data.positions
    fig, axes = plt.subplots(1, K, figsize=(3.2 * K, 3.4), squeeze=False)
    for k in range(1, K + 1):
        ax = axes[0][k - 1]
        ax.plot([0, 1], [0, 1], color="#999999", lw=1, ls="--")
        for temps, label, color in ((None, "raw", "#d62728"), (temperatures, "STS", "#1f77b4")):
            p, y = data.position(k, temps)
            points = calibration_bins(p, y)
            ax.plot([x for x, _, _ in points], [o for _, o, _ in points], marker="o", color=color, label=f"{label} (ECE {ece(p, y):.3f})")
        ax.set_title(f"position {k} (T={temperatures[k - 1]:.2f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted survival Π σ(c)")
        if k == 1:
            ax.set_ylabel("observed P[accepted ≥ k]")
        ax.legend(fontsize=7, loc="upper left")
    save(fig, path)


def plot_sweep(sweep: dict[str, list[dict]], path: Path) -> None:
    """τ and verified draft tokens per round against the threshold, for both rules."""
    plt = pyplot()

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for rule, label, color in (("survival", "calibrated survival ≥ t", "#1f77b4"),
                               ("p_min", "raw σ(c_k) ≥ p_min (llama.cpp)", "#ff7f0e")):
        xs = [r["threshold"] for r in sweep[rule]]
        a1.plot(xs, [r["tau"] for r in sweep[rule]], marker=".", color=color, label=label)
        a2.plot(xs, [r["draft_tokens_per_round"] for r in sweep[rule]], marker=".", color=color, label=label)
    a1.set_xlabel("threshold")
    a1.set_ylabel("τ (offline)")
    a2.set_xlabel("threshold")
    a2.set_ylabel("verified draft tokens / round")
    a1.legend(fontsize=7)
    save(fig, path)
