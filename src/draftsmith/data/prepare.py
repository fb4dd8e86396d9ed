"""`draftsmith data prepare`: prompts from a source into train / held-out conversations JSONL.

Every raw item of the source ends up in exactly one place: the train file, the held-out file or
the rejects file (with a reason code). The command prints a reconciliation of those counts and
fails when they do not add up. Outputs are written to temporary files and moved into place only
once everything reconciled, so a failed run leaves the previous outputs untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from draftsmith.data.sources import Record, Rejection, Source, dedupe_ids, is_heldout, open_source
from draftsmith.utils.io import InputError, check_output_file

DEFAULT_HELDOUT_FRACTION = 0.02


def add_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `draftsmith data prepare`."""
    parser.add_argument("--source", required=True,
                        help="'sharegpt' (the embedded ShareGPT V3), a JSONL/JSON path, or hf:NAME[:split]")
    parser.add_argument("--out", required=True, help="train conversations JSONL")
    parser.add_argument("--heldout-out", default=None,
                        help="held-out conversations JSONL (without it every kept record goes to --out)")
    parser.add_argument("--heldout-fraction", type=float, default=None,
                        help="share of records held out, by a hash of the id "
                             f"(default {DEFAULT_HELDOUT_FRACTION})")
    parser.add_argument("--limit", type=int, default=None,
                        help="stop after this many kept records (train + held-out)")
    parser.add_argument("--rejects-out", default=None,
                        help="one JSON line per rejected item (default: <out stem>.rejected.jsonl)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


class _AtomicJsonl:
    """A JSONL file written to a temporary name and moved into place by `commit()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        self._f: IO[bytes] = os.fdopen(fd, "wb", buffering=1 << 20)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self._tmp, 0o666 & ~umask)  # mkstemp's 0600 would make outputs private

    def write(self, obj: dict[str, Any]) -> None:
        # backslashreplace keeps a stray lone surrogate as a valid JSON \\uXXXX escape
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        self._f.write(line.encode("utf-8", "backslashreplace"))
        self.count += 1

    def commit(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)

    def discard(self) -> None:
        if not self._f.closed:
            self._f.close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)


@dataclass
class Tally:
    """What happened to every item, for the reconciliation line."""

    train: int = 0
    heldout: int = 0
    rejected: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    limited: bool = False

    @property
    def kept(self) -> int:
        return self.train + self.heldout

    def note(self, record: Record) -> None:
        """Count the facts about kept records that the design document quotes."""
        roles = [t["role"] for t in record.conversations]
        if roles[0] == "system":
            self.notes["start with a system turn"] += 1
        if record.sharegpt_keys and "user" in record.raw_roles:
            self.notes["use role 'user' verbatim"] += 1
        if any(a == b for a, b in zip(roles, roles[1:])):
            self.notes["have consecutive same-role turns"] += 1
        if record.id_generated:
            self.notes["got a generated id"] += 1


def _rejects_path(out: Path, explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + ".rejected.jsonl")


def _check_args(args: argparse.Namespace) -> tuple[Path, Path | None, Path, float]:
    """Validate flags; return (out, heldout_out, rejects_out, heldout_fraction)."""
    fraction = DEFAULT_HELDOUT_FRACTION if args.heldout_fraction is None else args.heldout_fraction
    if not 0.0 <= fraction <= 1.0:
        raise InputError(f"--heldout-fraction must be within [0, 1], got {fraction}")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be at least 1, got {args.limit}")
    out = Path(args.out)
    heldout = Path(args.heldout_out) if args.heldout_out else None
    rejects = _rejects_path(out, args.rejects_out)
    source = {"--source": args.source if os.path.isfile(args.source) else None}
    for flag, path in (("--out", out), ("--heldout-out", heldout), ("--rejects-out", rejects)):
        if path is not None:
            check_output_file(path, flag, not_same_as=source)
    paths = [p.resolve() for p in (out, heldout, rejects) if p is not None]
    if len(set(paths)) != len(paths):
        raise InputError("--out, --heldout-out and --rejects-out must be three different files")
    return out, heldout, rejects, fraction


def _route(source: Source, writers: dict[str, _AtomicJsonl | None], fraction: float,
           limit: int | None, tally: Tally) -> None:
    """Send every outcome of `source` to train, held-out or rejects."""
    for item in dedupe_ids(source.outcomes(), source.name):
        if isinstance(item, Rejection):
            writers["rejects"].write(item.to_json())
            tally.rejected[item.reason] += 1
            continue
        held = writers["heldout"] is not None and is_heldout(source.split_key(item.id), fraction)
        writers["heldout" if held else "train"].write(item.to_json())
        if held:
            tally.heldout += 1
        else:
            tally.train += 1
        tally.note(item)
        if limit is not None and tally.kept >= limit:
            tally.limited = True
            return
    for item in source.dropped:
        writers["rejects"].write(item.to_json())
        tally.dropped[item.reason] += 1


def _bracket(counter: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.most_common())


def reconciliation(source: Source, tally: Tally, limit: int | None) -> tuple[str, bool]:
    """The summary line and whether items == train + held-out + rejected."""
    rejected = sum(tally.rejected.values())
    ok = source.items == tally.kept + rejected
    read = f"{source.items} {source.noun}"
    if tally.limited:
        read += f" read (stopped at --limit {limit}; the rest not read)"
    ndrop = sum(tally.dropped.values())
    if ndrop:
        parts = (f"{v} {k.replace('_', ' ')} dropped" for k, v in tally.dropped.items())
        read += " (+" + ", ".join(parts) + ")"
    line = f"{source.name}: {read} = {tally.train} train + {tally.heldout} held-out + {rejected} rejected"
    if rejected:
        line += f" [{_bracket(tally.rejected)}]"
    if not ok:
        line += f"  <-- DOES NOT ADD UP ({tally.kept + rejected} accounted for)"
    return line, ok


def _report(source: Source, tally: Tally, writers: dict[str, _AtomicJsonl | None]) -> None:
    """Lines after the reconciliation: notes on kept records, dropped tails, files written."""
    if tally.notes:
        notes = ", ".join(f"{v} {k}" for k, v in tally.notes.items())
        print(f"  kept {tally.kept}: {notes}")
    for item in source.dropped:
        print(f"  dropped: {item.reason}: {item.message}")
    for warning in source.warnings:
        print(f"  warning: {warning}")
    for w in writers.values():
        if w is not None:
            print(f"  wrote {w.path} ({w.count} lines)")


def _execute(args: argparse.Namespace) -> int:
    out, heldout, rejects, fraction = _check_args(args)
    if heldout is None and args.heldout_fraction is not None:
        print("note: no --heldout-out, so --heldout-fraction is ignored: every kept record goes to --out",
              file=sys.stderr)
    source = open_source(args.source, progress=False if args.no_progress else None)
    started = time.monotonic()
    writers: dict[str, _AtomicJsonl | None] = {"train": _AtomicJsonl(out), "heldout": None}
    try:
        writers["heldout"] = _AtomicJsonl(heldout) if heldout else None
        writers["rejects"] = _AtomicJsonl(rejects)
        tally = Tally()
        _route(source, writers, fraction, args.limit, tally)
        line, ok = reconciliation(source, tally, args.limit)
        print(line)
        if not ok or tally.kept == 0:
            why = "the counts do not reconcile" if not ok else "no usable record"
            print(f"error: {why}; nothing written", file=sys.stderr)
            raise _Abort
        for w in writers.values():
            if w is not None:
                w.commit()
    except BaseException:
        for w in writers.values():
            if w is not None:
                w.discard()
        raise
    _report(source, tally, writers)
    print(f"  done in {time.monotonic() - started:.1f} s")
    return 0


class _Abort(Exception):
    """Raised to discard the outputs after the failure was already reported."""


def run(args: argparse.Namespace) -> int:
    """Entry point of `draftsmith data prepare`; returns the exit status."""
    try:
        return _execute(args)
    except _Abort:
        return 1
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
