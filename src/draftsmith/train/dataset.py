"""Training data: conversations JSONL -> rendered samples (ids + loss masks), train/held-out split,
token frequencies for draft-vocabulary pruning, and the deterministic sample order."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from draftsmith.data.conversations import (ConversationsFile, iter_conversations, read_conversations,
                                           record_chars, split_by_size)
from draftsmith.data.sources import is_heldout, sharegpt_conversation
from draftsmith.data.templates import RenderedSample, RenderStats, iter_rendered, render_records
from draftsmith.train.recipe import DataConfig
from draftsmith.train.samples import SampleStore
from draftsmith.utils.io import InputError, file_sha256

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    train: Sequence[RenderedSample]  # a list, or a SampleStore on disk (data.stream)
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


def _mix_takes(cfg: DataConfig, n_main: int) -> list[int | None]:
    """How many records each `cfg.mix` source gives beside --data's n_main (None: all of them)."""
    shares = sum(src.ratio or 0.0 for src in cfg.mix)
    if shares >= 1:
        raise InputError(f"data.mix ratios sum to {shares:g}: each is a source's share of the training "
                         "records, so together they must stay below 1 (--data keeps the rest)")
    return [None if src.ratio is None else round(src.ratio / (1 - shares) * n_main) for src in cfg.mix]


def _too_long_notes(too_long: list[tuple[str, int]], max_chars: int) -> list[str]:
    return [f"record {rid!r}: {n} characters, over data.max_record_chars {max_chars}: skipped" for rid, n in too_long]


def _mix_records(cfg: DataConfig, n_main: int, held_keys: set[str]) -> tuple[list[dict], list[str]]:
    """The records of `cfg.mix`, held-out conversations removed, ids prefixed `mix<i>:`."""
    out, lines = [], []
    takes = _mix_takes(cfg, n_main)
    for i, src in enumerate(cfg.mix):
        records, notes = _read(src.path)
        kept = [r for r in records if sharegpt_conversation(str(r["id"])) not in held_keys]
        excluded = len(records) - len(kept)
        if src.ratio is not None:
            wanted = takes[i]
            if wanted > len(kept):
                lines.append(f"data.mix[{i}] {src.path}: ratio {src.ratio:g} asks for {wanted} records, "
                             f"the source has {len(kept)}: all used")
            kept = kept[:wanted]
        out += [{**r, "id": f"mix{i}:{r['id']}"} for r in kept]
        lines.append(f"data.mix[{i}] {src.path}: {len(kept)} records used; {excluded} held-out "
                     f"conversation record(s) excluded; {len(notes)} unusable line(s)")
    return out, lines


def prepare_data(data_path: str, tokenizer, cfg: DataConfig, store: str | Path | None = None, *,
                 replace_store: bool = False, write_store: bool = True) -> TrainData:
    """Render the training file (and `cfg.mix`); split off held-out records by id hash (or read
    `cfg.heldout`). No held-out conversation reaches training through any source: records whose
    conversation (`sharegpt_conversation`: `<conversation>_<part>` ids share one) is held out
    are removed from --data and every mix source. `cfg.stream`: the training samples go to a
    `SampleStore` at `store` instead of a list (`prepare_stream`, which `replace_store` and
    `write_store` go to)."""
    if cfg.stream:
        if store is None:
            raise ValueError("data.stream needs a directory for the sample store")
        return prepare_stream(data_path, tokenizer, cfg, Path(store), replace=replace_store, write=write_store)
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
    notes += _too_long_notes(too_long + held_too_long, cfg.max_record_chars)
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


# --------------------------------------------------------------------------- streaming (data.stream)


def _stream_key(data_path: str, tokenizer, cfg: DataConfig) -> str:
    """What a stream's training samples are rendered from: every source file's bytes, the data
    config and the tokenizer (its name, size and chat template). Not the held-out file's path
    (its bytes count) nor max_heldout: neither changes a training sample."""
    files = [data_path, *(m.path for m in cfg.mix), *([cfg.heldout] if cfg.heldout else [])]
    for f in files:
        if not Path(f).is_file():
            raise InputError(f"{f}: data file not found")
    return hashlib.sha256(json.dumps({
        "files": [file_sha256(f) for f in files],
        "data": cfg.model_dump(mode="json", exclude={"max_heldout", "heldout"}),
        "tokenizer": [str(getattr(tokenizer, "name_or_path", "")), len(tokenizer),
                      getattr(tokenizer, "chat_template", None)],
    }, sort_keys=True, default=str).encode()).hexdigest()


def _open_store(store: Path, key: str, replace: bool) -> SampleStore | None:
    """The store at `store` when it was rendered from the same inputs; None when there is none
    (or, with `replace`, when it was rendered from other inputs: it is rewritten)."""
    if not (store / "manifest.json").is_file():
        return None
    existing = SampleStore(store)
    if existing.key == key:
        return existing
    if replace:
        return None
    raise InputError(f"{store}: a sample store rendered from other data (another --data, data.mix, "
                     "data config or tokenizer); train into a new --out, or start over with --no-resume")


def _source(path: str, held_keys: set[str], counts: dict, limit: int | None = None,
            take: int | None = None, prefix: str = "") -> Iterator[dict]:
    """Records of one source, held-out conversations skipped, the first `take` of the rest; the
    whole file is read either way, so `counts` (used, excluded, problems) cover all of it."""
    report = ConversationsFile(path)
    counts.update(used=0, excluded=0, take=take)
    for r in iter_conversations(path, report, limit):
        if sharegpt_conversation(str(r["id"])) in held_keys:
            counts["excluded"] += 1
        elif take is None or counts["used"] < take:
            counts["used"] += 1
            yield {**r, "id": f"{prefix}{r['id']}"} if prefix else r
    counts["problems"] = report.problems


def _within_size(records: Iterator[dict], max_chars: int, too_long: list[tuple[str, int]]) -> Iterator[dict]:
    for r in records:
        n = record_chars(r)
        if max_chars and n > max_chars:
            too_long.append((str(r["id"]), n))
            continue
        yield r


def _stream_lines(cfg: DataConfig, stats: RenderStats, hstats: RenderStats, counts: list[dict],
                  kept: int, held_kept: int, n_held: int, notes: list[str]) -> list[str]:
    """The lines `prepare_data` writes for the same data, in the same order."""
    lines = [f"train: {stats.line()}", f"held-out: {hstats.line()}"]
    for i, (src, c) in enumerate(zip(cfg.mix, counts[1:])):
        if c["take"] is not None and c["used"] < c["take"]:
            lines.append(f"data.mix[{i}] {src.path}: ratio {src.ratio:g} asks for {c['take']} records, "
                         f"the source has {c['used']}: all used")
        lines.append(f"data.mix[{i}] {src.path}: {c['used']} records used; {c['excluded']} held-out "
                     f"conversation record(s) excluded; {len(c['problems'])} unusable line(s)")
    shared = counts[0]["excluded"] - (0 if cfg.heldout else n_held)
    if shared:
        lines.append(f"{shared} --data record(s) of a held-out conversation excluded from training")
    if notes:
        lines.append(f"{len(notes)} unusable line(s), first: {notes[0]}")
    dropped = stats.records - kept + hstats.records - held_kept
    if dropped:
        lines.append(f"{dropped} record(s) without a trainable token or unrenderable: not used")
    return lines


def prepare_stream(data_path: str, tokenizer, cfg: DataConfig, store: Path, *, replace: bool = False,
                   write: bool = True) -> TrainData:
    """`prepare_data` with the training samples in a `SampleStore` at `store`: the held-out
    records are found first (a pass over --data by id hash, or `cfg.heldout`), then every
    source's training records are read, rendered and written one at a time. A store rendered
    from the same inputs is reused; one from other inputs is refused (`replace`: rewritten).
    `write=False` (ranks other than 0) only opens the store rank 0 wrote."""
    key = _stream_key(data_path, tokenizer, cfg)
    held_report = ConversationsFile(cfg.heldout or data_path)
    if cfg.heldout:
        held_records = list(iter_conversations(cfg.heldout, held_report))
    else:
        held_records = [r for r in iter_conversations(data_path, held_report, cfg.limit)
                        if is_heldout(str(r["id"]), cfg.heldout_fraction)]
    n_held = len(held_records)
    held_keys = {sharegpt_conversation(str(r["id"])) for r in held_records}
    held_records, held_too_long = split_by_size(held_records, cfg.max_record_chars)
    held, hstats = _render(tokenizer, held_records, cfg, cfg.heldout or "held-out")
    train = _open_store(store, key, replace)
    if train is None and not write:
        raise InputError(f"{store}: no sample store with these inputs (rank 0 writes it first)")
    if train is None:
        train = _write_store(data_path, tokenizer, cfg, store, key, held_keys,
                             lambda stats, counts, too_long, kept: _stream_lines(
                                 cfg, stats, hstats, counts, kept, len(held), n_held,
                                 _notes(cfg, counts, held_report, too_long + held_too_long)))
    else:
        log.info("%s: sample store reused (%d samples rendered from the same inputs)", store, len(train))
    return TrainData(train, held[: cfg.max_heldout], list(train.manifest["lines"]))


def _notes(cfg: DataConfig, counts: list[dict], held_report: ConversationsFile,
           too_long: list[tuple[str, int]]) -> list[str]:
    """`prepare_data`'s notes: --data's (and the held-out file's) unusable lines, then records
    over the size guard."""
    notes = counts[0]["problems"] + (held_report.problems if cfg.heldout else [])
    notes += _too_long_notes(too_long, cfg.max_record_chars)
    for n in notes[:10]:
        log.warning(n)
    return notes


def _write_store(data_path: str, tokenizer, cfg: DataConfig, store: Path, key: str, held_keys: set[str],
                 lines_of) -> SampleStore:
    """Render every source's training records into the store, one record at a time."""
    counts = [{} for _ in range(len(cfg.mix) + 1)]
    sources = [_source(data_path, held_keys, counts[0], cfg.limit)]
    if cfg.mix:
        takes = _mix_takes(cfg, sum(1 for _ in _source(data_path, held_keys, {}, cfg.limit)))
        sources += [_source(src.path, held_keys, counts[i + 1], prefix=f"mix{i}:", take=takes[i])
                    for i, src in enumerate(cfg.mix)]
    stats, too_long = RenderStats(), []
    records = _within_size(itertools.chain(*sources), cfg.max_record_chars, too_long)
    rendered = iter_rendered(tokenizer, records, stats, cfg.max_length, cfg.template_kwargs,
                             cfg.long_records == "windows")
    store_of = SampleStore.write(
        store, (s for s in rendered if sum(s.loss_mask) > 0), key,
        lines_of=lambda kept: lines_of(stats, counts, too_long, kept),
        empty=f"{data_path}: no trainable tokens (no record has an assistant answer the chat template renders)")
    for p in stats.problems[:5]:
        log.warning("%s: %s", data_path, p)
    return store_of
