"""Training data: conversations JSONL -> rendered samples (ids + loss masks), train/held-out split,
token frequencies for draft-vocabulary pruning, and the deterministic sample order."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from draftsmith.data.conversations import read_conversations, split_by_size
from draftsmith.data.sources import is_heldout, sharegpt_conversation
from draftsmith.data.templates import RenderedSample, RenderStats, render_records
from draftsmith.train.recipe import DataConfig
from draftsmith.utils.io import InputError

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    train: list[RenderedSample]
    heldout: list[RenderedSample]
    lines: list[str] = field(default_factory=list)  # what happened, for the log and the report


def _read(path: str, limit: int | None = None) -> tuple[list[dict], list[str]]:
    file = read_conversations(path, limit)
    return file.records, file.problems


def _render(tokenizer, records: list[dict], cfg: DataConfig, what: str,
            windows: bool = False) -> tuple[list[RenderedSample], RenderStats]:
    samples, stats = render_records(tokenizer, records, cfg.max_length, cfg.template_kwargs,
                                    total=len(records), progress=False, windows=windows)
    for p in stats.problems[:5]:
        log.warning("%s: %s", what, p)
    kept = [s for s in samples if sum(s.loss_mask) > 0]
    return kept, stats


def _mix_records(cfg: DataConfig, n_main: int, held_keys: set[str]) -> tuple[list[dict], list[str]]:
    """The records of `cfg.mix`, held-out conversations removed, ids prefixed `mix<i>:`."""
    out, lines = [], []
    shares = sum(src.ratio or 0.0 for src in cfg.mix)
    if shares >= 1:
        raise InputError(f"data.mix ratios sum to {shares:g}: each is a source's share of the training "
                         "records, so together they must stay below 1 (--data keeps the rest)")
    for i, src in enumerate(cfg.mix):
        records, notes = _read(src.path)
        kept = [r for r in records if sharegpt_conversation(str(r["id"])) not in held_keys]
        excluded = len(records) - len(kept)
        if src.ratio is not None:
            wanted = round(src.ratio / (1 - shares) * n_main)
            if wanted > len(kept):
                lines.append(f"data.mix[{i}] {src.path}: ratio {src.ratio:g} asks for {wanted} records, "
                             f"the source has {len(kept)}: all used")
            kept = kept[:wanted]
        out += [{**r, "id": f"mix{i}:{r['id']}"} for r in kept]
        lines.append(f"data.mix[{i}] {src.path}: {len(kept)} records used; {excluded} held-out "
                     f"conversation record(s) excluded; {len(notes)} unusable line(s)")
    return out, lines


def prepare_data(data_path: str, tokenizer, cfg: DataConfig) -> TrainData:
    """Render the training file (and `cfg.mix`); split off held-out records by id hash (or read
    `cfg.heldout`). No held-out conversation reaches training through any source: records whose
    conversation (`sharegpt_conversation`: `<conversation>_<part>` ids share one) is held out
    are removed from --data and every mix source."""
    records, notes = _read(data_path, cfg.limit)
    if cfg.heldout:
        held_records, held_notes = _read(cfg.heldout)
        notes += held_notes
    else:
        held_records = [r for r in records if is_heldout(str(r["id"]), cfg.heldout_fraction)]
    held_keys = {sharegpt_conversation(str(r["id"])) for r in held_records}
    n_before = len(records)
    records = [r for r in records if sharegpt_conversation(str(r["id"])) not in held_keys]
    shared = n_before - len(records) - (0 if cfg.heldout else len(held_records))
    mixed, mix_lines = _mix_records(cfg, len(records), held_keys)
    records += mixed
    records, too_long = split_by_size(records, cfg.max_record_chars)
    held_records, held_too_long = split_by_size(held_records, cfg.max_record_chars)
    notes += [f"record {rid!r}: {n} characters, over data.max_record_chars {cfg.max_record_chars}: skipped"
              for rid, n in too_long + held_too_long]
    for n in notes[:10]:
        log.warning(n)
    train, tstats = _render(tokenizer, records, cfg, data_path, cfg.long_records == "windows")
    held, hstats = _render(tokenizer, held_records, cfg, cfg.heldout or "held-out")
    if not train:
        raise InputError(f"{data_path}: no trainable tokens (no record has an assistant answer the "
                         f"chat template renders; {len(notes)} unusable line(s))")
    lines = [f"train: {tstats.line()}", f"held-out: {hstats.line()}", *mix_lines]
    if shared:
        lines.append(f"{shared} --data record(s) of a held-out conversation excluded from training")
    if notes:
        lines.append(f"{len(notes)} unusable line(s), first: {notes[0]}")
    dropped = tstats.records - len(train) + hstats.records - len(held)
    if dropped:
        lines.append(f"{dropped} record(s) without a trainable token or unrenderable: not used")
    return TrainData(train, held[: cfg.max_heldout], lines)


def supervised_token_counts(samples: list[RenderedSample], vocab_size: int) -> torch.Tensor:
    """[V] int64: how often each token id is a training label (draft-vocabulary pruning)."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for s in samples:
        ids = torch.tensor(s.input_ids, dtype=torch.int64)
        mask = torch.tensor(s.loss_mask, dtype=torch.bool)
        counts += torch.bincount(ids[mask], minlength=vocab_size)[:vocab_size]
    return counts


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a permutation keyed by (seed, epoch) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()
