"""Benchmark metrics (DESIGN §3.4), pooled per (decoder, dataset) and over all datasets.

Definitions (a "row-round" is one row of one propose -> verify -> commit round):

- `tau`: mean over row-rounds of accepted + 1 (bonus included); an EOS-terminated last round
  counts only what it accepted (`decoding.RoundRecord.tau_counts`). Pooled: every row-round of every
  sample weighs the same, so long answers weigh more (as in the paper and in llama.cpp).
- `tau_uncapped`: the same over the samples that ended at an end-of-turn token only; answers cut at
  --max-new-tokens (often repetition loops on a small target) are left out, so loops do not pass
  for skill. `capped_share` is their share of the samples.
- `tau_llama_cpp`: llama.cpp's `mean len` = 1 + accepted / (row-rounds that verified a non-empty
  draft); comparable with served runs at T = 0.
- `survival[k-1]` = P[accepted >= k | k tokens verified]; `conditional_acceptance[k-1]` =
  P[accepted >= k | accepted >= k-1, k verified] (the paper's Fig. 2).
- `acceptance_rate` = accepted draft tokens / verified draft tokens; `mean_draft_len` = verified
  draft tokens per row-round.
- `verify_rate` = tokens the target verified (draft + 1 per row-round) per second of verify time;
  `draft_ms_per_round` / `verify_ms_per_round` = wall time per batched round (batch 1: per
  row-round). Draft time includes feeding the new target features to the drafter.
- `tokens_per_s` = generated tokens / (prefill + decode) wall time, the headline number (the
  first token of every answer comes from the prefill, so prefill belongs to its cost);
  `decode_tokens_per_s` = (generated tokens − one per sample) / decode time, prefill excluded.
  `speedup` and `decode_speedup` divide them by plain decoding's on the same prompts.
- `tau_ci`: a 95 % percentile bootstrap interval of the pooled `tau` over records (a record's
  answers, every turn, are resampled together with their row-rounds; `BOOTSTRAP_REPS` draws,
  seed 0). `comparisons` (per pair of drafts, in the order given): the ratio of their pooled τ
  with a *paired* bootstrap interval (both drafts answered the same records: one draw resamples
  the records once for both), so "A is 5 % above B" can be read with its uncertainty.
- `mismatches` (T = 0 only): answers that differ from plain decoding's answer to the same prompt;
  `mismatch_details` give the first differing position and the target's top-2 logit gap there (a
  near-tie shows a small gap). At T > 0 outputs are not comparable token for token: None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from draftsmith.decoding import Generation, RoundRecord, summarize

MAX_MISMATCH_DETAILS = 20  # per (decoder, dataset) in metrics.json
BOOTSTRAP_REPS = 2000
BOOTSTRAP_LEVEL = 0.95


def sample_tau_counts(gen: Generation) -> list[tuple[int, int]]:
    """Per answer of one generate call: (Σ τ counts, row-rounds) of its rounds."""
    sums = [[0, 0] for _ in gen.outputs]
    for r in gen.rounds:
        for row, t in zip(r.rows, r.tau_counts()):
            sums[row][0] += t
            sums[row][1] += 1
    return [(a, b) for a, b in sums]


def by_record(per_sample: list[tuple[object, int, int]]) -> list[tuple[int, int]]:
    """(key, Σ τ counts, row-rounds) per answer -> the sums per key (a record: all its turns),
    in first-seen order: the bootstrap's unit, since the turns of one record are not independent."""
    sums: dict[object, list[int]] = {}
    for key, num, den in per_sample:
        acc = sums.setdefault(key, [0, 0])
        acc[0] += num
        acc[1] += den
    return [(a, b) for a, b in sums.values()]


def bootstrap_ratio(*series: list[tuple[int, int]], reps: int = BOOTSTRAP_REPS, seed: int = 0,
                    level: float = BOOTSTRAP_LEVEL) -> tuple[float, float]:
    """Percentile interval of Σnum/Σden over resampled units: one series gives the pooled τ;
    two aligned series (the same records) give the paired ratio τ_first / τ_second (one draw
    resamples the records once for both)."""
    n = len(series[0])
    if n == 0 or any(len(s) != n for s in series):
        return (math.nan, math.nan)
    idx = np.random.default_rng(seed).integers(0, n, size=(reps, n))  # [reps, n]
    taus = []
    for s in series:
        arr = np.asarray(s, dtype=np.float64)  # [n, 2]
        with np.errstate(invalid="ignore", divide="ignore"):
            taus.append(arr[idx, 0].sum(1) / arr[idx, 1].sum(1))  # [reps, n] -> [reps]
    with np.errstate(invalid="ignore", divide="ignore"):
        stat = taus[0] if len(taus) == 1 else taus[0] / taus[1]
    stat = stat[np.isfinite(stat)]
    if not len(stat):
        return (math.nan, math.nan)
    tail = (1 - level) / 2
    lo, hi = np.quantile(stat, [tail, 1 - tail])
    return (float(lo), float(hi))


def keep_rows(rounds: list[RoundRecord], rows) -> list[RoundRecord]:
    """The rounds restricted to the given rows (prompt indices of one `generate` call). Round
    times are split evenly over the rows active in the round."""
    keep = set(rows)
    out = []
    for r in rounds:
        idx = [i for i, row in enumerate(r.rows) if row in keep]
        if not idx:
            continue

        def pick(values, idx=idx):
            return [values[i] for i in idx]

        share = len(idx) / len(r.rows)
        out.append(RoundRecord(pick(r.rows), pick(r.drafted), pick(r.proposed), pick(r.accepted),
                               pick(r.committed), pick(r.cut), r.draft_s * share, r.verify_s * share,
                               None if r.confidence is None else pick(r.confidence)))
    return out


@dataclass
class Tally:
    """Everything one decoder produced on one dataset (or, merged, on all of them)."""

    rounds: list[RoundRecord] = field(default_factory=list)
    uncapped_rounds: list[RoundRecord] = field(default_factory=list)
    samples: int = 0
    capped: int = 0
    tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compared: int = 0  # answers compared with plain decoding's (T = 0)
    mismatch_details: list[dict] = field(default_factory=list)
    per_sample: list[tuple[object, int, int]] = field(default_factory=list)  # (record key, Σ τ counts, row-rounds) per answer

    def add(self, gen: Generation, keys: list | None = None) -> None:
        """Add one `SpecEngine.generate` result; `keys`: the record of each answer (the turns of
        one record share it), default one record per answer."""
        self.rounds += gen.rounds
        if keys is None:
            keys = [("answer", len(self.per_sample) + j) for j in range(len(gen.outputs))]
        self.per_sample += [(k, a, b) for k, (a, b) in zip(keys, sample_tau_counts(gen))]
        ended = [i for i, f in enumerate(gen.finish) if f != "length"]
        self.uncapped_rounds += keep_rows(gen.rounds, ended)
        self.samples += len(gen.outputs)
        self.capped += len(gen.outputs) - len(ended)
        self.tokens += sum(len(o) for o in gen.outputs)
        self.prefill_s += gen.prefill_s
        self.decode_s += gen.decode_s

    def add_comparison(self, detail: dict | None) -> None:
        """One answer compared with plain decoding's; `detail` describes a mismatch (None: equal)."""
        self.compared += 1
        if detail is not None:
            self.mismatch_details.append(detail)

    def merged(self, other: Tally) -> Tally:
        return Tally(self.rounds + other.rounds, self.uncapped_rounds + other.uncapped_rounds,
                     self.samples + other.samples, self.capped + other.capped,
                     self.tokens + other.tokens, self.prefill_s + other.prefill_s,
                     self.decode_s + other.decode_s, self.compared + other.compared,
                     self.mismatch_details + other.mismatch_details, self.per_sample + other.per_sample)

    def summary(self, compare: bool) -> dict:
        """The metrics of this tally (module docstring); `compare`: report mismatches."""
        s = summarize(self.rounds)
        rows = [(a, p) for r in self.rounds for a, p in zip(r.accepted, r.proposed)]
        accepted, proposed = sum(a for a, _ in rows), sum(p for _, p in rows)
        n_rounds = len(self.rounds)
        seconds = self.prefill_s + self.decode_s
        out = {
            "tau": s["tau"],
            "tau_ci": list(bootstrap_ratio(by_record(self.per_sample))),
            "tau_uncapped": summarize(self.uncapped_rounds)["tau"],
            "tau_llama_cpp": s["tau_llama_cpp"],
            "rounds": s["row_rounds"],
            "empty_rounds": s["empty_rounds"],
            "acceptance_rate": _ratio(accepted, proposed),
            "mean_draft_len": _ratio(proposed, len(rows)),
            "survival": s["survival"],
            "conditional_acceptance": s["conditional_acceptance"],
            "draft_s": s["draft_s"],
            "verify_s": s["verify_s"],
            "draft_ms_per_round": _ratio(1000 * s["draft_s"], n_rounds),
            "verify_ms_per_round": _ratio(1000 * s["verify_s"], n_rounds),
            "verify_rate": _ratio(proposed + len(rows), s["verify_s"]),
            "samples": self.samples,
            "capped": self.capped,
            "capped_share": _ratio(self.capped, self.samples),
            "tokens": self.tokens,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "seconds": seconds,
            "tokens_per_s": _ratio(self.tokens, seconds),
            "decode_tokens_per_s": _ratio(self.tokens - self.samples, self.decode_s),
        }
        out["mismatches"] = len(self.mismatch_details) if compare else None
        out["compared"] = self.compared if compare else None
        out["mismatch_details"] = self.mismatch_details[:MAX_MISMATCH_DETAILS] if compare else []
        return out


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def add_speedups(entry: dict, plain: dict) -> dict:
    """Speedups of one summary against plain decoding's summary of the same prompts."""
    entry["plain_tokens_per_s"] = plain["tokens_per_s"]
    entry["plain_decode_tokens_per_s"] = plain["decode_tokens_per_s"]
    entry["speedup"] = _ratio(entry["tokens_per_s"], plain["tokens_per_s"])
    entry["decode_speedup"] = _ratio(entry["decode_tokens_per_s"], plain["decode_tokens_per_s"])
    return entry


def build_metrics(tallies: dict[str, dict[str, Tally]], plain: str = "plain",
                  compare: bool = True) -> dict:
    """tallies[decoder][dataset] -> `{"drafts": {decoder: {"overall": {...}, "datasets":
    {dataset: {...}}}}}`; `overall` pools every round of every dataset. The plain decoder's
    own entry is included (speedup 1)."""
    if plain not in tallies:
        raise ValueError(f"no {plain!r} decoder: the speedup needs plain decoding of the target")
    plain_overall = _pooled(tallies[plain]).summary(False)
    plain_sets = {ds: t.summary(False) for ds, t in tallies[plain].items()}
    drafts = {}
    for name, per_set in tallies.items():
        cmp = compare and name != plain
        datasets = {ds: add_speedups(t.summary(cmp), plain_sets[ds]) for ds, t in per_set.items()}
        overall = add_speedups(_pooled(per_set).summary(cmp), plain_overall)
        drafts[name] = {"overall": overall, "datasets": datasets}
    return {"drafts": drafts, "comparisons": tau_comparisons(tallies, plain)}


def tau_comparisons(tallies: dict[str, dict[str, Tally]], plain: str = "plain") -> list[dict]:
    """Every pair of non-plain decoders (first / second in the order given): their pooled τ
    ratio and its paired bootstrap interval over the prompts both answered."""
    pooled = {name: _pooled(per_set) for name, per_set in tallies.items() if name != plain}
    out = []
    names = list(pooled)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ta, tb = summarize(pooled[a].rounds)["tau"], summarize(pooled[b].rounds)["tau"]
            ra, rb = by_record(pooled[a].per_sample), by_record(pooled[b].per_sample)
            lo, hi = bootstrap_ratio(ra, rb)
            out.append({"first": a, "second": b, "tau_ratio": _ratio(ta, tb), "ci": [lo, hi], "records": len(ra)})
    return out


def _pooled(per_set: dict[str, Tally]) -> Tally:
    total = Tally()
    for t in per_set.values():
        total = total.merged(t)
    return total


def json_safe(obj):
    """NaN / inf -> None, recursively (metrics.json stays strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
