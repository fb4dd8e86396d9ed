"""File I/O shared by every stage: atomic writes and JSONL reading that names file and line."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
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


def file_sha256(path: str | os.PathLike, block: int = 1 << 23) -> str:
    """sha256 (hex) of a whole file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


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


def read_json_file(path: str | os.PathLike, advice: str = "") -> Any | None:
    """A JSON file's value; None when the file is absent; InputError naming file and line (and
    `advice`) when it is not valid JSON."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg}){'; ' + advice if advice else ''}") from None


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


# --------------------------------------------------------------------------- output directories


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def has_marker(path: Path, marker: str, key: str | None = None) -> bool:
    """Whether the dir `path` holds the file `marker` (with `key`: a JSON object holding `key`)."""
    file = path / marker
    if not file.is_file():
        return False
    if key is None:
        return True
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and key in data


def check_replaceable_dir(final: str | os.PathLike, marker: str, key: str | None = None) -> None:
    """The one rule for replacing a directory: InputError unless `final` is absent, an empty
    directory, or a directory holding its writer's marker (`has_marker`), i.e. something
    draftsmith wrote. A file, a symlink, or the working directory (or one above it) is never
    replaced."""
    path = Path(final)
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        raise InputError(f"{final}: exists and is not a directory (or is a symlink); give a new "
                         "directory path")
    cwd = Path.cwd().resolve()
    if path.resolve() == cwd or path.resolve() in cwd.parents:
        raise InputError(f"{final}: is the working directory (or holds it); give a new "
                         "directory path")
    if any(path.iterdir()) and not has_marker(path, marker, key):
        raise InputError(f"{final}: exists and was not written by draftsmith (no {marker} in it); "
                         "refusing to replace it: give a new path, or move it away first")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, marker: str, key: str | None = None) -> Iterator[Path]:
    """Stage a directory and rename it to `final` when the body finishes.

    Yields a hidden staging dir next to `final`; the body writes everything there, the marker
    included (`marker`, a JSON object with `key` when given; checked: it is how a later run
    recognizes the dir as ours). `final` is replaced
    only under `check_replaceable_dir` (checked on entry and again before the rename); the old
    dir is moved aside and deleted only after the new one is in place. On any failure the
    staging dir is deleted and `final` is left as it was. Readers see the old dir or the whole
    new one, never half a dir."""
    final = Path(os.path.abspath(final))  # "." and ".." name their real dir
    check_replaceable_dir(final, marker, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; give the dir the usual mode
        yield staging
        if not has_marker(staging, marker, key):
            raise RuntimeError(f"{final}: staged without its marker {marker}; not published")
        check_replaceable_dir(final, marker, key)
        _publish(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _publish(staging: Path, final: Path) -> None:
    """Rename `staging` to `final`; an old `final` is moved aside first, deleted after."""
    if not os.path.lexists(final):
        os.rename(staging, final)
        return
    old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
    os.rename(final, old / final.name)
    try:
        os.rename(staging, final)
    except BaseException:
        os.rename(old / final.name, final)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def _not_a_dir(path: Path) -> Path | None:
    """The nearest existing one of `path` and its parents when it is not a directory, else None."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return None if path.is_dir() else path


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """`flag PATH` names a directory to write: absent (created later) or a directory.
    InputError, one line naming the flag and the path, otherwise."""
    blocker = _not_a_dir(Path(path))
    if blocker == Path(os.path.abspath(path)):
        raise InputError(f"{flag} {path}: exists and is not a directory; {flag} takes a directory")
    if blocker is not None:
        raise InputError(f"{flag} {path}: {blocker} is a file, not a directory")
    return Path(path)


def check_output_file(path: str | os.PathLike, flag: str,
                      not_same_as: Mapping[str, str | os.PathLike | None] | None = None) -> Path:
    """`flag PATH` names a file to write: not a directory, under a directory, and not the same
    file as any input in `not_same_as` ({flag: path}). InputError naming the flag otherwise."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{flag} {path}: is a directory; {flag} takes a file path")
    blocker = _not_a_dir(Path(os.path.abspath(p)).parent)
    if blocker is not None:
        raise InputError(f"{flag} {path}: {blocker} is a file, not a directory")
    for other_flag, other in (not_same_as or {}).items():
        if other is not None and os.path.realpath(other) == os.path.realpath(p):
            raise InputError(f"{flag} {path}: is the same file as {other_flag}; writing it would "
                             "overwrite the input: give another path")
    return p
