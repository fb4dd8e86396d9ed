"""Reading a conversations JSONL for rendering: every unusable line or record is reported with
file and line, never dropped silently. Shared by the feature cache, training and the demo."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from draftsmith.utils.io import InputError, JsonlProblem, iter_jsonl


@dataclass
class ConversationsFile:
    path: str
    records: list[dict] = field(default_factory=list)
    lines_bad: int = 0  # not UTF-8 / not JSON / not an object
    records_rejected: int = 0  # readable, but not a usable conversations record
    problems: list[str] = field(default_factory=list)  # "file:line: reason", bad lines first


# records longer than this (characters of message contents) are skipped before tokenizing: one
# 30 MB record once made `cache estimate` use 4.8 GB
DEFAULT_MAX_RECORD_CHARS = 1_000_000


def record_chars(record: dict) -> int:
    """Characters of a conversations record's message contents (what tokenizing it costs)."""
    return sum(len(m["content"]) for m in record["conversations"])


def split_by_size(records: list[dict], max_chars: int) -> tuple[list[dict], list[tuple[str, int]]]:
    """(records within `max_chars` characters, (id, characters) of the others); 0 = no limit."""
    kept, over = [], []
    for r in records:
        n = record_chars(r)
        if max_chars and n > max_chars:
            over.append((str(r["id"]), n))
        else:
            kept.append(r)
    return kept, over


def record_problem(record: dict) -> str | None:
    """Why a conversations record cannot be rendered (None when it can)."""
    if not isinstance(record.get("id"), (str, int)):
        return "field 'id' missing or not a string"
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        return "field 'conversations' missing, empty or not a list"
    for k, m in enumerate(convs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"conversations[{k}]: expected an object with string 'role' and 'content'"
    return None


def iter_conversations(path: str, out: ConversationsFile, limit: int | None = None) -> Iterator[dict]:
    """Well-formed records of the JSONL file, one at a time (the first `limit`); once the file
    is read, `out` holds the counts and problems ("file:line: reason", bad lines first)."""
    bad_lines: list[JsonlProblem] = []
    rejected: list[str] = []
    kept = 0
    try:
        for lineno, record in iter_jsonl(path, bad_lines):
            if limit is not None and kept >= limit:
                break
            reason = record_problem(record)
            if reason:
                rejected.append(f"{path}:{lineno}: {reason}")
                continue
            kept += 1
            yield record
    except FileNotFoundError:
        raise InputError(f"{path}: data file not found") from None
    out.lines_bad, out.records_rejected = len(bad_lines), len(rejected)
    out.problems = [str(p) for p in bad_lines] + rejected


def read_conversations(path: str, limit: int | None = None) -> ConversationsFile:
    """Well-formed records of the JSONL file (the first `limit`); bad lines and records reported."""
    out = ConversationsFile(str(path))
    out.records = list(iter_conversations(path, out, limit))
    return out
