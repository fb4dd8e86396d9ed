"""File I/O shared by every stage: atomic writes and JSONL reading that names file and line."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """Bad user input. The message names the file, the line and the field where it can."""


@dataclass(frozen=True)
class JsonlProblem:
    """One unreadable line of a JSONL file (the rest of the file is still read)."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def iter_jsonl(
    path: str | os.PathLike, problems: list[JsonlProblem] | None = None
) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, object) for every well-formed JSON-object line of `path`.

    Lines that are not UTF-8, not JSON, or not a JSON object are reported into `problems`
    (file, line, reason) and skipped, never silently. With `problems=None` the first bad line
    raises InputError instead. A final line cut mid-write (no trailing newline) counts as bad.
    """
    path = str(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            reason = None
            obj = None
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                reason = f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})"
            else:
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    reason = f"malformed JSON: {e.msg} (column {e.colno})"
                else:
                    if not isinstance(obj, dict):
                        reason = f"expected a JSON object, got {type(obj).__name__}"
            if reason is None:
                yield lineno, obj
                continue
            problem = JsonlProblem(path, lineno, reason)
            if problems is None:
                raise InputError(str(problem))
            problems.append(problem)


def append_jsonl_line(f, obj: dict) -> None:
    """Append one record as one line and make it durable before returning."""
    f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())
