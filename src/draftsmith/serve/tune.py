"""Choose how llama.cpp serves a draft on this machine: draft weight type, `--spec-draft-n-max`
and `--spec-draft-p-min`, by expected tokens per round over measured round cost (DESIGN §3.5).

Inputs, all measured:

- the target file's **cost curve** (`batch_cost`): the ms of one plain decode step and of
  evaluating n tokens in one batch after a cached prefix (what a verification of n tokens costs);
- the draft's **own cost per round** for each candidate weight type, from short served probes:
  n_max 1 and the full block with every round drafting (`round_overhead`: measured cost per round
  minus what its verification costs on the curve) and n_max 1 with p_min 1 (no round drafts:
  `idle_overhead`), split by `fit_overhead` into a part every round pays (the draft runs even when
  p_min cuts everything), a part per block slot, and a part only drafting rounds pay (measured
  here: the served verification of a draft costs more than the same batch on the curve);
- held-out **rounds** of draftsmith's engine for each candidate n_max (`CalibrationSet`: raw
  confidence logits, drafted and accepted counts per round). llama.cpp feeds the draft a block
  of n_max tokens, and a DSpark block attends within itself, so every n_max has its own rounds.

The model (`CostModel.round_cost`): a round that drafts d tokens from a block of n slots costs
one plain decode step, plus the draft's cost (fixed + n × per slot, also when p_min leaves d = 0:
the draft has run), plus, when d > 0, the drafting extra and what evaluating d + 1 tokens costs
beyond evaluating 1. Under
llama.cpp's rule (truncate at the first slot whose raw σ(c_k) < p_min, `decoding.PMinRule`) a
recorded round drafts d = its kept prefix and yields 1 + min(accepted, d) tokens — exact at
T = 0 for a round that starts where the recorded one did (acceptance of a slot does not depend
on later slots). The expected speedup over plain decoding of the same file is tokens / cost,
summed over rounds; `choose` maximizes it over the grid. Rounds start where the recorded run's
rounds started, not where the truncated run's would: the served and offline checks that
follow measure the choice itself.
"""

from __future__ import annotations

import bisect
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from draftsmith.decoding import PMinRule, Proposal, RoundRecord
from draftsmith.engines import llama_cpp
from draftsmith.eval.calibration import CalibrationSet

P_MIN_GRID = [round(0.05 * i, 2) for i in range(20)]  # 0 = no truncation (llama.cpp's default)
COST_SIZES = (1, 2, 3, 4, 5, 6, 8)


def batch_cost(target_gguf: Path, ctx_tokens: int = 200, sizes=COST_SIZES, reps: int = 9) -> dict:
    """Median ms to evaluate n new tokens in one batch after a cached `ctx_tokens` prefix
    (`batch_ms`), and the ms per plain decode step (`decode_step_ms`), in one llama-server."""
    rng = random.Random(0)
    prefix = [rng.randrange(100, 40000) for _ in range(ctx_tokens)]
    out = {"file": str(target_gguf), "batch_ms": {}}
    with llama_cpp.LlamaServer(target_gguf, slots=1, ctx_size=2048, seed=0) as srv:
        for n in sizes:
            ms = []
            for _ in range(reps):
                tokens = prefix + [rng.randrange(100, 40000) for _ in range(n)]
                t = srv.post_json("/completion", {"prompt": tokens, "n_predict": 1, "temperature": 0,
                                                  "cache_prompt": True}, timeout=120)["timings"]
                if t["prompt_n"] == n:  # the prefix came from the cache
                    ms.append(t["prompt_ms"])
            out["batch_ms"][n] = statistics.median(ms) if ms else None
        t = srv.post_json("/completion", {"prompt": prefix, "n_predict": 64, "temperature": 0,
                                          "cache_prompt": True, "ignore_eos": True}, timeout=300)["timings"]
        out["decode_step_ms"] = t["predicted_per_token_ms"]
    return out


@dataclass
class CostModel:
    """Round costs in plain decode steps of the target file."""

    batch: dict[int, float]  # n -> cost of evaluating n tokens in one batch, in plain steps
    overhead: float = 0.0  # the draft's fixed cost per round, in plain steps
    per_slot: float = 0.0  # and its cost per slot of the block it runs
    drafting: float = 0.0  # what a round that verifies drafted tokens pays beyond the curve
    sizes: list[int] = field(init=False)

    def __post_init__(self):
        self.batch = {int(n): float(c) for n, c in self.batch.items() if c is not None}
        if 1 not in self.batch or len(self.batch) < 2:
            raise ValueError(f"a cost curve needs n = 1 and one more size, got {sorted(self.batch)}")
        self.sizes = sorted(self.batch)

    @classmethod
    def from_measurement(cls, cost: dict, overhead: float = 0.0) -> CostModel:
        step = cost["decode_step_ms"]
        return cls({n: ms / step for n, ms in cost["batch_ms"].items() if ms}, overhead)

    def verify(self, n: float) -> float:
        """Cost of evaluating n tokens in one batch: linear between measured sizes, and beyond
        the largest along the last segment's slope."""
        s = self.sizes
        i = min(max(bisect.bisect_left(s, n), 1), len(s) - 1)
        lo, hi = s[i - 1], s[i]
        return self.batch[lo] + (self.batch[hi] - self.batch[lo]) * (n - lo) / (hi - lo)

    def round_cost(self, drafted: float, slots: int = 0) -> float:
        """One plain step + the draft's cost for a block of `slots` + what d drafted tokens add
        to the batch."""
        base = 1.0 + self.overhead + self.per_slot * slots
        return base + (self.drafting + self.verify(drafted + 1) - self.verify(1) if drafted > 0 else 0.0)


def round_overhead(served: dict, cost: CostModel) -> float | None:
    """The draft's fixed cost per round in plain steps, from a served run's totals (`serve_prompts`
    output for one dataset or pooled: decode tokens/s, rounds, drafted) and the plain step."""
    rounds, tokens = served.get("rounds") or 0, served.get("tokens") or 0
    rate, plain = served.get("decode_tokens_per_s"), served.get("plain_decode_tokens_per_s")
    if not rounds or not rate or not plain:
        return None
    steps_per_round = tokens / rounds * plain / rate  # measured plain-step equivalents per round
    return steps_per_round - cost.round_cost(served["drafted"] / rounds)


def round_set(rounds: list[RoundRecord]) -> CalibrationSet:
    """Every row-round of an untruncated decode (confidence logits NaN where the draft has no
    confidence head): verified = drafted tokens, accepted as recorded."""
    return CalibrationSet.from_rounds(rounds, require_confidence=False)


def idle_overhead(served: dict) -> float | None:
    """The draft's cost per round in plain steps when no round drafts (p_min 1): every token is
    one target step, so the cost is the slowdown."""
    rate, plain = served.get("decode_tokens_per_s"), served.get("plain_decode_tokens_per_s")
    return plain / rate - 1.0 if rate and plain else None


def fit_overhead(drafting: dict[int, float], idle: float | None = None) -> tuple[float, float, float]:
    """Draft costs measured with every round drafting ({block slots: cost per round}) and, for a
    draft with a confidence head, with no round drafting at one slot (`idle`) -> (fixed, per
    slot, drafting extra), each >= 0. Without `idle` the drafting extra is taken as 0 (the model
    then charges a cut round the full cost: conservative for p_min)."""
    (n1, o1), *rest = sorted(drafting.items())
    per_slot = max((rest[-1][1] - o1) / (rest[-1][0] - n1), 0.0) if rest else 0.0
    at_one = o1 - per_slot * (n1 - 1)  # drafting cost at one slot
    if idle is None:
        return max(at_one - per_slot, 0.0), per_slot, 0.0
    idle = min(max(idle, 0.0), max(at_one, 0.0))
    return max(idle - per_slot, 0.0), per_slot, max(at_one - idle, 0.0)


def expected(data: CalibrationSet, p_min: float, cost: CostModel, slots: int = 0) -> dict:
    """τ, drafted tokens and cost per round, and the expected speedup over plain decoding, when
    every recorded round is truncated by llama.cpp's p_min rule."""
    if data.rounds == 0:
        raise ValueError("no rounds recorded")
    if p_min > 0:
        proposal = Proposal(torch.zeros_like(data.logits, dtype=torch.long), data.verified,
                            confidence=torch.nan_to_num(data.logits, nan=float("-inf")))
        kept = PMinRule(p_min)(proposal)
    else:
        kept = data.verified
    accepted = torch.minimum(data.accepted, kept)
    tokens = float((1 + accepted).sum())
    costs = sum(cost.round_cost(d, slots) for d in kept.tolist())
    return {"p_min": p_min, "tau": tokens / data.rounds, "drafted_per_round": float(kept.double().mean()),
            "round_cost": costs / data.rounds, "speedup": tokens / costs}


def choose(rounds: dict[int, CalibrationSet], costs: dict[str, CostModel], has_confidence: bool,
           grid: list[float] = P_MIN_GRID) -> dict:
    """The (dtype, n_max, p_min) with the highest expected speedup. `rounds`: n_max -> held-out
    rounds decoded at that n_max; `costs`: draft weight type -> its cost model. Returns
    {"best": {...}, "table": [every candidate]}; ties go to the smaller n_max, then the smaller
    p_min, then the first dtype."""
    table = []
    for dtype, cost in costs.items():
        for n_max, data in sorted(rounds.items()):
            for p in (grid if has_confidence else [0.0]):
                table.append({"dtype": dtype, "n_max": n_max, **expected(data, p, cost, n_max)})
    if not table:
        raise ValueError("nothing to choose from: no rounds or no cost models")
    best = max(table, key=lambda r: (round(r["speedup"], 9), -r["n_max"], -r["p_min"]))
    return {"best": best, "table": table}
