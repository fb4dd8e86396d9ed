"""Rendered training samples on disk, read one at a time (`data.stream`): memory grows with the
number of samples (their ids, offsets and the epoch's permutation), not with their tokens.

    RUN/samples/
      manifest.json   {"format": "draftsmith.samples", "version": 1, "samples": n, "tokens": T,
                       "key": what the samples were rendered from (sources, data config, tokenizer)}
      tokens.bin      int32 [T]  token ids of every sample, concatenated
      masks.bin       uint8 [T]  loss masks, aligned with tokens.bin
      offsets.bin     int64 [n + 1]  where each sample starts (and the end)
      flags.bin       uint8 [n]  bit 0 truncated, bit 1 length-capped
      ids.txt         one sample id per line

Written into a staging directory beside the store and renamed into place (`utils.io.atomic_dir`:
a killed build leaves no store); opened with validation (every file's size agrees with the manifest). The arrays are
memory-mapped: a sample is read when the loader asks for it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from draftsmith.data.templates import RenderedSample
from draftsmith.utils.io import InputError, atomic_dir

STORE_DIR = "samples"  # RUN/samples
FORMAT = "draftsmith.samples"
VERSION = 1
FLUSH_TOKENS = 1 << 16  # tokens buffered in memory while a store is written


class SampleStore(Sequence):
    """A read-only sequence of `RenderedSample`s backed by the files above."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        try:
            self.manifest = json.loads((self.root / "manifest.json").read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{self.root}/manifest.json: not a readable sample store ({e})") from None
        m = self.manifest
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise InputError(f"{self.root}/manifest.json: format {m.get('format')!r} version {m.get('version')!r}; "
                             f"expected {FORMAT!r} version {VERSION}")
        n, t = int(m["samples"]), int(m["tokens"])
        for name, size in (("tokens.bin", 4 * t), ("masks.bin", t), ("offsets.bin", 8 * (n + 1)), ("flags.bin", n)):
            have = (self.root / name).stat().st_size if (self.root / name).is_file() else None
            if have != size:
                raise InputError(f"{self.root}/{name}: {have} bytes, the manifest says {size}: a damaged store; "
                                 "delete it to render the data again")
        with open(self.root / "ids.txt", encoding="utf-8", newline="") as f:
            ids = f.read().split("\n")
        if len(ids) != n + 1 or ids[-1]:
            raise InputError(f"{self.root}/ids.txt: {len(ids) - 1} ids for {n} samples: a damaged store; "
                             "delete it to render the data again")
        self.ids = ids[:n]
        self.offsets = np.fromfile(self.root / "offsets.bin", dtype=np.int64)
        self.flags = np.fromfile(self.root / "flags.bin", dtype=np.uint8)
        self.tokens = np.memmap(self.root / "tokens.bin", dtype=np.int32, mode="r") if t else np.zeros(0, np.int32)
        self.masks = np.memmap(self.root / "masks.bin", dtype=np.uint8, mode="r") if t else np.zeros(0, np.uint8)

    @property
    def key(self) -> str:
        return self.manifest["key"]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        f = int(self.flags[i])
        return RenderedSample(self.ids[i], self.tokens[a:b].tolist(), self.masks[a:b].tolist(),
                              bool(f & 1), bool(f & 2))

    def __add__(self, other):
        return ConcatSamples(self, other)

    @classmethod
    def write(cls, root: str | os.PathLike, samples: Iterable[RenderedSample], key: str,
              lines_of: Callable[[int], list[str]] | None = None, empty: str = "no samples to store") -> SampleStore:
        """Write `samples` (consumed once, in order) as a store at `root`, atomically; an older
        store there (ours: it holds the manifest) is replaced only once the new one is whole.
        `lines_of(n)`, called once the n samples are consumed, gives the log lines kept in the
        manifest (what rendering them reported, shown again when the store is reused). No
        samples: InputError(`empty`), and nothing is published."""
        with atomic_dir(root, marker="manifest.json", key="format") as stage:
            offsets, flags, n_tokens = [0], bytearray(), 0
            buf_ids: list[int] = []
            buf_mask: list[int] = []
            with open(stage / "tokens.bin", "wb") as ft, open(stage / "masks.bin", "wb") as fm, \
                    open(stage / "ids.txt", "w", encoding="utf-8", newline="") as fi:
                for s in samples:
                    if "\n" in s.id or "\r" in s.id:
                        raise InputError(f"sample id {s.id!r} holds a line break: data.stream stores one id per line")
                    buf_ids += s.input_ids
                    buf_mask += s.loss_mask
                    n_tokens += len(s.input_ids)
                    offsets.append(n_tokens)
                    flags.append(int(s.truncated) | 2 * int(s.length_capped))
                    fi.write(s.id + "\n")
                    if len(buf_ids) >= FLUSH_TOKENS:
                        _flush(ft, fm, buf_ids, buf_mask)
                _flush(ft, fm, buf_ids, buf_mask)
            if not flags:
                raise InputError(empty)
            np.asarray(offsets, dtype=np.int64).tofile(stage / "offsets.bin")
            (stage / "flags.bin").write_bytes(bytes(flags))
            (stage / "manifest.json").write_text(json.dumps(
                {"format": FORMAT, "version": VERSION, "samples": len(flags), "tokens": n_tokens, "key": key,
                 "lines": lines_of(len(flags)) if lines_of else []}, indent=1))
        return cls(root)


def _flush(ft, fm, ids: list[int], mask: list[int]) -> None:
    np.asarray(ids, dtype=np.int32).tofile(ft)
    np.asarray(mask, dtype=np.uint8).tofile(fm)
    ids.clear()
    mask.clear()


class ConcatSamples(Sequence):
    """Two sample sequences read as one (a store's training samples + the held-out list)."""

    def __init__(self, first: Sequence, second: Sequence):
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        n = len(self.first)
        return self.first[i] if i < n else self.second[i - n]
