"""Run the benchmark: every decoder (plain, baselines, drafts) on the same prompts, one process.

One target load. A draft reads the features of its own `target_layer_ids`, and a `TargetModel`
taps a fixed layer set, so each distinct layer set gets its own `TargetModel` over the SAME loaded
HF model (the weights exist once; each wrapper only adds forward hooks that keep references to
its layers' outputs). Plain decoding and the n-gram baseline use a wrapper without taps.

Interleaving: decoders take turns per batch and per turn (plain first, then the others in the
order given), so a change in machine load affects them alike. Every decoder gets the same seed
for the same batch and turn.

Multi-turn records: the turns are answered in sequence, and the prompt of turn k holds the
earlier turns with PLAIN decoding's answers. Every decoder therefore sees exactly the same
prompts; a lossless engine draws its answers from the same distribution, and at T = 0 gives the
same text, so this changes nothing but keeps one differing answer (a near-tie) from changing
every later prompt.

At T = 0 every answer of a drafter is compared with plain decoding's answer to the same prompt;
where they differ, the first differing position and the target's top-2 logit gap there (one extra
target forward over the prompt and plain's answer up to that point) are recorded.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from draftsmith.eval.datasets import EvalDataset, decode_answer, render_prompt
from draftsmith.eval.metrics import Tally
from draftsmith.models.calibration import load_calibration
from draftsmith.models.io import load_draft
from draftsmith.decoding import (
    KeepAll, NGramProposer, PlainProposer, PMinRule, Proposer, SamplingConfig, SpecEngine, SurvivalRule,
    capped_tokens, proposer_for,
)
from draftsmith.targets.model import TargetModel
from draftsmith.utils.io import InputError

log = logging.getLogger(__name__)

PLAIN = "plain"
BASELINES = ("ngram",)
ProposerFactory = Callable[..., Proposer]  # (draft model, num_tokens, n_max=None) -> Proposer


@dataclass
class Decoder:
    """One row of the comparison: a name, what it is, and its engine."""

    name: str
    kind: str  # "plain" | "ngram" | the draft's drafter kind (`config.drafter`)
    engine: SpecEngine
    path: str | None = None  # draft dir
    truncate: str = "none"  # the truncation rule this decoder runs with
    n_max: int | None = None  # llama.cpp's --spec-draft-n-max it runs with (None: no cap)

    def describe(self) -> dict:
        out = {"kind": self.kind, "path": self.path, "truncate": self.truncate, "n_max": self.n_max}
        proposer = self.engine.proposer
        if proposer.uses_features:
            out["target_layer_ids"] = list(proposer.target_layer_ids)
        return out


@dataclass
class Settings:
    max_new_tokens: int
    sampling: SamplingConfig
    stop_ids: list[int]
    pad_id: int
    seed: int = 0
    batch_size: int = 1
    num_draft_tokens: int = 7  # n-gram and EAGLE-3 draft lengths (DSpark/DFlash: the block size)
    truncate: str = "none"  # "none" | "p-min=P" | "survival=THRESHOLD" (confidence-head drafts)
    compile: bool = False  # torch.compile the target's forward (CUDA only; a logged no-op elsewhere)
    static_kv: bool = False  # the target's KV in fixed-capacity buffers (decoding.kv.StaticTargetKV)
    # llama.cpp's --spec-draft-n-max: draft tokens per round. DSpark/DFlash run llama.cpp's shorter
    # block (n_max slots, z-lab: n_max + 1); EAGLE-3 and n-gram cap num_draft_tokens. None = off
    n_max: int | None = None

    @property
    def compare(self) -> bool:
        return self.sampling.greedy


@dataclass
class Answer:
    """One generated answer (answers.jsonl)."""

    decoder: str
    dataset: str
    record: int
    turn: int
    ids: list[int]
    finish: str
    text: str = ""


# --------------------------------------------------------------------------- decoders


def parse_truncate(text: str) -> tuple[str, float | None]:
    """"none" | "p-min=P" | "survival=THRESHOLD" -> (rule, value)."""
    rule, _, value = text.partition("=")
    rule = rule.strip()
    if rule == "none" and not value:
        return "none", None
    if rule not in ("p-min", "survival") or not value:
        raise InputError(f"--truncate {text!r}: expected none, p-min=P or survival=THRESHOLD")
    try:
        v = float(value)
    except ValueError:
        raise InputError(f"--truncate {text!r}: {value!r} is not a number") from None
    if not 0 <= v <= 1:
        raise InputError(f"--truncate {text!r}: the value must lie in [0, 1]")
    return rule, v


def truncation_for(model, path: str, settings: Settings):
    """(rule, description) for one draft: confidence-head drafts get the requested rule
    (survival with the STS temperatures stored in the draft dir), the others verify everything."""
    rule, value = parse_truncate(settings.truncate)
    if rule == "none":
        return KeepAll(), "none"
    if getattr(model, "confidence_head", None) is None:
        log.warning("draft %s has no confidence head: --truncate %s does not apply, it verifies "
                    "every drafted token", path, settings.truncate)
        return KeepAll(), "none (no confidence head)"
    if rule == "p-min":
        return PMinRule(value), f"p-min={value:g} (raw per-step σ(c_k), llama.cpp's rule)"
    cal = load_calibration(path)
    if cal is None:
        raise InputError(f"--truncate {settings.truncate}: {path} has no calibration.json; run "
                         f"`draftsmith calibrate --draft {path} --temperature "
                         f"{settings.sampling.temperature:g} ...` first")
    temps = cal.temperatures_for(settings.sampling.temperature, f"{path}/calibration.json")
    return SurvivalRule(value, temps), f"survival={value:g} (STS-calibrated cumulative survival)"



def _check_draft(name: str, draft, hf_model) -> None:
    cfg, tcfg = draft.config, hf_model.config.get_text_config()
    if cfg.vocab_size != tcfg.vocab_size:
        raise InputError(f"draft {name!r}: vocabulary {cfg.vocab_size} != the target's {tcfg.vocab_size} "
                         "(was it trained for another target?)")
    hidden = getattr(cfg, "target_hidden_size", None) or cfg.hidden_size
    if hidden != tcfg.hidden_size:
        raise InputError(f"draft {name!r}: reads target features of width {hidden}, the target's "
                         f"hidden size is {tcfg.hidden_size}")


def build_decoders(hf_model, drafts: dict[str, str], baselines: list[str], settings: Settings,
                   source=None, proposer_for: ProposerFactory = proposer_for) -> list[Decoder]:
    """Plain decoding first, then the baselines, then the drafts (NAME -> draft dir), all over
    the one loaded `hf_model`. `proposer_for(draft model, num_draft_tokens, n_max)` makes each
    draft's proposer (default: the one `spec` registers for the model's class)."""
    wrappers: dict[tuple[int, ...], TargetModel] = {}
    dtype = next(hf_model.parameters()).dtype

    def target_for(layer_ids) -> TargetModel:
        key = tuple(layer_ids)
        if key not in wrappers:
            try:
                wrappers[key] = TargetModel(hf_model, list(key), source)
            except InputError as e:
                raise InputError(f"draft reads target layers {list(key)}: {e}") from None
        return wrappers[key]

    def engine(proposer, truncate=None) -> SpecEngine:
        return SpecEngine(target_for(proposer.target_layer_ids), proposer, settings.sampling, truncate,
                          eos_token_ids=settings.stop_ids, pad_token_id=settings.pad_id,
                          compile=settings.compile, static_kv=settings.static_kv)

    decoders = [Decoder(PLAIN, PLAIN, engine(PlainProposer()))]
    for b in baselines:
        if b not in BASELINES:
            raise InputError(f"unknown baseline {b!r}: known baselines are {', '.join(BASELINES)}")
        ngram = NGramProposer(num_tokens=capped_tokens(settings.num_draft_tokens, settings.n_max))
        decoders.append(Decoder(b, b, engine(ngram), n_max=settings.n_max))
    for name, path in drafts.items():
        if any(d.name == name for d in decoders):
            raise InputError(f"--draft {name}=...: the name {name!r} is taken (plain, baselines and "
                             "drafts need distinct names)")
        model = load_draft(path, dtype=dtype, device=next(hf_model.parameters()).device)
        _check_draft(name, model, hf_model)
        rule, described = truncation_for(model, str(path), settings)
        try:
            proposer = proposer_for(model, settings.num_draft_tokens, settings.n_max)
        except InputError as e:
            raise InputError(f"draft {name!r}: {e}") from None
        decoders.append(Decoder(name, model.config.drafter, engine(proposer, rule), str(path), described,
                                settings.n_max))
    return decoders


# --------------------------------------------------------------------------- near-ties


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where a and b differ (a length difference counts)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.no_grad()
def top2_gap(target: TargetModel, ids: list[int]) -> float:
    """The target's top-1 minus top-2 logit for the token after `ids` (one full forward)."""
    device = next(target.parameters()).device
    out = target(torch.tensor([ids], dtype=torch.long, device=device))
    top = target.logits(out.hidden[:, -1]).float().topk(2, dim=-1).values[0]  # [1, V] -> [2]
    return float(top[0] - top[1])


def compare_answer(target: TargetModel, prompt: list[int], plain: list[int], other: list[int]) -> dict | None:
    """None when equal, else where they differ and the target's top-2 gap there."""
    pos = first_difference(plain, other)
    if pos is None:
        return None
    gap = top2_gap(target, prompt + plain[:pos]) if pos < len(plain) and pos < len(other) else None
    return {"position": pos, "top2_gap": gap, "plain_token": plain[pos] if pos < len(plain) else None,
            "token": other[pos] if pos < len(other) else None}


# --------------------------------------------------------------------------- the loop


def turn_seed(seed: int, dataset: str, batch_start: int, turn: int) -> int:
    """The same seed for every decoder on the same prompts, stable across processes."""
    return zlib.crc32(f"{seed}:{dataset}:{batch_start}:{turn}".encode())


@torch.no_grad()
def warm_up(decoders: list[Decoder], prompt: list[int], tokens: int = 8) -> None:
    """One short untimed generation per decoder (first-call allocations, kernel selection)."""
    for d in decoders:
        d.engine.generate([prompt], tokens)


@dataclass
class Benchmark:
    """Results of `run_benchmark`: tallies[decoder][dataset] and every answer."""

    tallies: dict[str, dict[str, Tally]]
    answers: list[Answer] = field(default_factory=list)


def run_benchmark(decoders: list[Decoder], datasets: list[EvalDataset], tokenizer, settings: Settings,
                  progress: Callable[[int], None] | None = None) -> Benchmark:
    """Every decoder on every turn of every record of every dataset. `progress(n)` is called
    after each generate call."""
    if decoders[0].name != PLAIN:
        raise ValueError("plain decoding must come first (its answers build the later turns)")
    bench = Benchmark({d.name: {ds.name: Tally() for ds in datasets} for d in decoders})
    for ds in datasets:
        for start in range(0, len(ds.records), settings.batch_size):
            _run_batch(decoders, ds, start, tokenizer, settings, bench, progress)
    return bench


def _run_batch(decoders, ds: EvalDataset, start: int, tokenizer, settings: Settings,
               bench: Benchmark, progress) -> None:
    """All turns of records start..start+batch_size-1, each turn by every decoder in turn."""
    records = ds.records[start:start + settings.batch_size]
    history: list[list[str]] = [[] for _ in records]  # plain decoding's answers so far
    for turn in range(max(len(r) for r in records)):
        active = [i for i, r in enumerate(records) if turn < len(r)]
        prompts = [render_prompt(tokenizer, records[i], history[i]) for i in active]
        seed = turn_seed(settings.seed, ds.name, start, turn)
        plain_out: list[list[int]] = []
        for d in decoders:
            gen = d.engine.generate(prompts, settings.max_new_tokens, seed)
            bench.tallies[d.name][ds.name].add(gen, keys=[(ds.name, start + i) for i in active])
            if d.name == PLAIN:
                plain_out = gen.outputs
            for j, i in enumerate(active):
                text = decode_answer(tokenizer, gen.outputs[j], settings.stop_ids)
                bench.answers.append(Answer(d.name, ds.name, start + i, turn, gen.outputs[j],
                                            gen.finish[j], text))
                if d.name != PLAIN and settings.compare:
                    detail = compare_answer(decoders[0].engine.target, prompts[j], plain_out[j], gen.outputs[j])
                    if detail is not None:
                        detail.update(record=start + i, turn=turn)
                    bench.tallies[d.name][ds.name].add_comparison(detail)
            if progress is not None:
                progress(1)
        for j, i in enumerate(active):
            history[i].append(decode_answer(tokenizer, plain_out[j], settings.stop_ids))


def count_calls(decoders: list[Decoder], datasets: list[EvalDataset], batch_size: int) -> int:
    """Generate calls `run_benchmark` makes (for a progress bar)."""
    calls = 0
    for ds in datasets:
        for start in range(0, len(ds.records), batch_size):
            calls += max(len(r) for r in ds.records[start:start + batch_size])
    return calls * len(decoders)
