"""`draftsmith data regenerate`: answer every conversation again with the target model.

Input: conversations JSONL (`{"id", "conversations": [{"role", "content"}, ...]}`). Each
assistant turn is regenerated on the *regenerated* history (system + user1 -> a1'; system + user1
+ a1' + user2 -> a2'; ...), a conversation ending with a user turn gets an answer for it, and the
original assistant contents are discarded. Output record:
`{"id", ..., "conversations", "finish_reason", "completion_tokens", "sampling"}` where every
regenerated assistant message carries its own `finish_reason` (and `reasoning_content` when the
server split one off), the top-level `finish_reason` mirrors the last turn, `completion_tokens`
sums the turns (null if the server reported no usage) and `sampling` lists exactly the sampling
parameters sent. Only run-independent fields are written (no timings, ids, ports or URLs), so a
resumed run is byte-identical to an uninterrupted one. Other top-level input fields are kept.
Sampling flags left out are not sent (server defaults) except `--max-tokens` (default 2048);
`--seed S` sends each request a seed derived from (S, record id, turn), see `derive_seed`.

Files, for `--out regen.jsonl`:
  * `regen.jsonl` - succeeded records, always in input order, one fsynced line each;
  * `regen.jsonl.errors.jsonl` - one line per failed record of the latest run, in input order:
    `{"id", "file", "line", "reason", "status", "attempts", "turn"}`; bad input lines (malformed
    JSON, no user turn, ...) are there too, with file and line, and count as failed;
  * `regen.jsonl.retried.jsonl` - transient: successes of previously failed records while a rerun
    is under way (merged into the output at the end of the run, or at the start of the next one).

Resume (kill -9 at any point, then rerun the same command): the output is read back, a torn last
line is truncated away (and said so), and the rest must be a consistent subset of the input: known
ids, no duplicates, input order, same prompts, same `sampling`; otherwise the run stops with an
InputError rather than mixing two datasets. Ids already in the output are skipped. Every other
record is (re)processed, *including records that failed before*: a record that succeeds behind
records already written goes to the `.retried` side file and the output is re-merged in input
order by one atomic rewrite, which keeps every previously written line byte for byte. With
concurrency, results are written strictly in input order (finished ones wait for their
predecessors, at most `reorder_window` records ahead), so a kill loses only that unwritten work.

Exit codes of `run()`: 0 all records succeeded (or were already done); 3 the run finished but
some records failed (see the errors file; rerun to retry them); 2 bad input or arguments (nothing
done: duplicate ids, output not made from this input, ...); 4 no endpoint answered at start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from draftsmith.data.regen_client import (
    THINKING_CHOICES,
    Endpoint,
    EndpointUnavailable,
    RequestFailed,
    RetryPolicy,
    RunContext,
    SamplingParams,
    probe_endpoints,
    regenerate_conversation,
    split_endpoint,
)
from draftsmith.utils.io import (
    InputError,
    atomic_write_bytes,
    atomic_write_text,
    check_output_file,
    iter_jsonl,
)

__all__ = [
    "EndpointUnavailable",
    "RegenSummary",
    "RetryPolicy",
    "SamplingParams",
    "add_args",
    "regenerate",
    "run",
]

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
HTTP_LOGGERS = ("httpx", "httpcore")  # quiet below WARNING unless `draftsmith -v`
EXIT_OK, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_NO_ENDPOINT = 0, 2, 3, 4


# --------------------------------------------------------------------------- summary


@dataclass
class RegenSummary:
    """Reconciliation of one run: `total == succeeded + failed + skipped`."""

    total: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    length_cut: int = 0
    length_cut_all: int = 0
    bad_input: int = 0
    out_path: str = ""
    errors_path: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """3 when any record failed (bad input included), else 0."""
        return EXIT_FAILED if self.failed else EXIT_OK

    def line(self) -> str:
        """The summary line printed at the end of every run."""
        pct = 100.0 * self.length_cut / self.succeeded if self.succeeded else 0.0
        text = (
            f"regenerate: {self.total} input = {self.succeeded} succeeded + {self.failed} failed"
            f" + {self.skipped} skipped (already done) ; cut at max_tokens: {self.length_cut}"
            f" of {self.succeeded} ({pct:.1f}%)"
        )
        if self.skipped:
            done = self.succeeded + self.skipped
            text += f" ; in the whole output: {self.length_cut_all} of {done}"
        return text


# --------------------------------------------------------------------------- input


@dataclass(frozen=True)
class InputEntry:
    """One non-blank input line: where it is, its id, and why it is unusable (if it is)."""

    index: int
    lineno: int
    rec_id: str | None
    problem: str | None
    digest: str | None = None


def check_record(obj: dict) -> str | None:
    """Why a parsed input record cannot be regenerated, or None when it can."""
    rec_id = obj.get("id")
    if not isinstance(rec_id, str) or not rec_id:
        return "missing or non-string 'id'"
    conv = obj.get("conversations")
    if not isinstance(conv, list) or not conv:
        return "'conversations' is missing, empty or not a list"
    seen_user = False
    for i, msg in enumerate(conv):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            role = msg.get("role") if isinstance(msg, dict) else msg
            return f"turn {i}: role must be one of {', '.join(ROLES)} (got {role!r})"
        if not isinstance(msg.get("content"), str):
            return f"turn {i}: 'content' is not a string"
        if msg["role"] == "assistant" and not seen_user:
            return f"turn {i}: assistant turn before any user turn"
        seen_user = seen_user or msg["role"] == "user"
    if not seen_user:
        return "no user turn"
    return None


def prompt_digest(conv: list[dict]) -> str:
    """Digest of the non-assistant turns: what a regenerated record must share with its input."""
    kept = [[m.get("role"), m.get("content")] for m in conv if m.get("role") != "assistant"]
    return hashlib.sha1(json.dumps(kept, ensure_ascii=False).encode("utf-8")).hexdigest()


def scan_input(path: str) -> list[InputEntry]:
    """Read the input once (no conversations kept): entries in order, bad lines included.

    Raises InputError when an id occurs twice (both lines named) or the file is missing.
    """
    if not os.path.isfile(path):
        raise InputError(f"{path}: input file not found")
    problems: list = []
    entries: list[InputEntry] = []
    first_line: dict[str, int] = {}

    def flush_problems(upto: int) -> None:
        """Emit the unreadable lines before line `upto`, keeping the input order."""
        while problems and problems[0].line < upto:
            p = problems.pop(0)
            entries.append(InputEntry(len(entries), p.line, None, p.reason))

    for lineno, obj in iter_jsonl(path, problems):
        flush_problems(lineno)
        why = check_record(obj)
        rec_id = obj.get("id") if isinstance(obj.get("id"), str) else None
        if rec_id is not None:
            if rec_id in first_line:
                raise InputError(
                    f"{path}: duplicate id {rec_id!r} on lines {first_line[rec_id]} and {lineno}"
                )
            first_line[rec_id] = lineno
        digest = prompt_digest(obj["conversations"]) if why is None else None
        entries.append(InputEntry(len(entries), lineno, rec_id, why, digest))
    flush_problems(sys.maxsize)
    return entries


def iter_pending(
    path: str, pending: list[InputEntry]
) -> Iterator[tuple[int, InputEntry, dict | None]]:
    """Yield (position, entry, record) for the pending entries; record is None for bad lines."""
    lines = iter_jsonl(path, problems=[])
    for pos, entry in enumerate(pending):
        if entry.problem is not None:
            yield pos, entry, None
            continue
        for lineno, obj in lines:
            if lineno == entry.lineno:
                break
        else:
            raise InputError(f"{path}: changed during the run (line {entry.lineno} is gone)")
        if obj.get("id") != entry.rec_id:
            raise InputError(f"{path}:{entry.lineno}: changed during the run (id differs)")
        yield pos, entry, obj


# --------------------------------------------------------------------------- existing output


@dataclass
class Existing:
    """What earlier runs already wrote: done ids, the last input index written, length cuts."""

    done: set[str] = field(default_factory=set)
    last_index: int = -1
    length_cut: int = 0


def _note(notes: list[str], text: str) -> None:
    """Something repaired or merged in the output: say it now and keep it for the summary."""
    log.warning("%s", text)
    notes.append(text)


def read_lines_repairing(path: str, notes: list[str]) -> list[bytes]:
    """Complete lines of `path`; a torn last line (no newline) is truncated away and noted."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        _note(notes, f"{path}: last line was cut mid-write ({len(data) - keep} bytes, no"
                     " newline): truncated away, that record is redone")
        data = data[:keep]
    return [line for line in data.splitlines(keepends=True) if line.strip()]


def _check_output_line(
    raw: bytes, where: str, by_id: dict[str, InputEntry], sampling: dict
) -> InputEntry:
    """Validate one already-written output line against the input; return its input entry."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{where}: corrupt output line ({e}); move the file away to start over")
    if not isinstance(obj, dict) or check_record(obj) is not None:
        raise InputError(f"{where}: not a regenerated record; move the file away to start over")
    rec_id = obj["id"]
    entry = by_id.get(rec_id)
    if entry is None or entry.problem is not None:
        raise InputError(
            f"{where}: id {rec_id!r} is not a usable record of the input: wrong --out?"
        )
    if prompt_digest(obj["conversations"]) != entry.digest:
        raise InputError(
            f"{where}: id {rec_id!r} does not match input line {entry.lineno}: the input"
            " changed since this output was written; use a new --out"
        )
    if obj.get("sampling") != sampling:
        raise InputError(
            f"{where}: written with sampling {obj.get('sampling')} but this run uses {sampling};"
            " use a new --out or the same parameters"
        )
    return entry


def _load_file(
    path: str, by_id: dict[str, InputEntry], sampling: dict, notes: list[str], ordered: bool
) -> list[tuple[InputEntry, bytes]]:
    """Parse and validate every complete line of an output (or side) file."""
    rows: list[tuple[InputEntry, bytes]] = []
    seen: set[str] = set()
    for n, raw in enumerate(read_lines_repairing(path, notes), start=1):
        entry = _check_output_line(raw, f"{path}:{n}", by_id, sampling)
        assert entry.rec_id is not None
        if entry.rec_id in seen:
            raise InputError(f"{path}:{n}: id {entry.rec_id!r} written twice")
        if ordered and rows and entry.index < rows[-1][0].index:
            raise InputError(f"{path}:{n}: id {entry.rec_id!r} is out of input order")
        seen.add(entry.rec_id)
        rows.append((entry, raw))
    return rows


def load_existing(
    out_path: str, side_path: str, entries: list[InputEntry], sampling: dict, notes: list[str]
) -> Existing:
    """Validate (and repair) what earlier runs wrote, merging a leftover side file first."""
    by_id = {e.rec_id: e for e in entries if e.rec_id is not None}
    rows = _load_file(out_path, by_id, sampling, notes, ordered=True)
    side = _load_file(side_path, by_id, sampling, notes, ordered=False)
    if side:
        written = {e.rec_id: raw for e, raw in rows}
        fresh = []
        for entry, raw in side:
            if entry.rec_id not in written:
                fresh.append((entry, raw))
            elif written[entry.rec_id] != raw:
                raise InputError(f"{side_path}: id {entry.rec_id!r} differs from {out_path}")
        if fresh:
            rows = sorted(rows + fresh, key=lambda row: row[0].index)
            atomic_write_bytes(out_path, b"".join(raw for _, raw in rows))
            _note(notes, f"{out_path}: merged {len(fresh)} retried records back into input order")
    if os.path.exists(side_path):
        os.unlink(side_path)
    state = Existing()
    for entry, raw in rows:
        state.done.add(entry.rec_id)  # type: ignore[arg-type]
        state.last_index = max(state.last_index, entry.index)
        state.length_cut += json.loads(raw).get("finish_reason") == "length"
    return state


# --------------------------------------------------------------------------- ordered writer


@dataclass
class Success:
    """A regenerated record, ready to be written."""

    record: dict


@dataclass
class Failure:
    """A record that failed: why, after how many attempts, at which turn."""

    entry: InputEntry
    reason: str
    attempts: int = 0
    status: int | None = None
    turn: int | None = None
    bad_input: bool = False


class OrderedWriter:
    """Writes outcomes strictly in input order; frees a reorder-window slot per written record.

    Successes go to the output, or to the side file when earlier runs already wrote records
    after them (they are merged at the end); failures go to the errors file.
    """

    def __init__(self, paths: tuple[str, str, str], in_path: str, last_done: int,
                 window: asyncio.Semaphore, summary: RegenSummary, bar: tqdm) -> None:
        self.out_path, self.side_path, self.err_path = paths
        self.in_path = in_path
        self.last_done = last_done
        self.window = window
        self.summary = summary
        self.bar = bar
        self.pending: dict[int, tuple[InputEntry, Success | Failure]] = {}
        self.next_pos = 0
        self.files: dict[str, Any] = {}

    def put(self, pos: int, entry: InputEntry, outcome: Success | Failure) -> None:
        """Record the outcome of pending position `pos` and write every record now in order."""
        self.pending[pos] = (entry, outcome)
        while self.next_pos in self.pending:
            entry, outcome = self.pending.pop(self.next_pos)
            self._write(entry, outcome)
            self.next_pos += 1
            self.window.release()

    def _write(self, entry: InputEntry, outcome: Success | Failure) -> None:
        """Append one outcome to its file and count it."""
        s = self.summary
        if isinstance(outcome, Success):
            path = self.side_path if entry.index < self.last_done else self.out_path
            _append_line(self._file(path), outcome.record)
            s.succeeded += 1
            cut = outcome.record["finish_reason"] == "length"
            s.length_cut += cut
            s.length_cut_all += cut
        else:
            _append_line(self._file(self.err_path), {
                "id": entry.rec_id, "file": self.in_path, "line": entry.lineno,
                "reason": outcome.reason, "status": outcome.status,
                "attempts": outcome.attempts, "turn": outcome.turn,
            })
            s.failed += 1
            s.bad_input += outcome.bad_input
        self.bar.update(1)
        self.bar.set_postfix(failed=s.failed, cut=s.length_cut, refresh=False)

    def _file(self, path: str) -> Any:
        """The append handle of `path`, opened on first use (no side file unless needed)."""
        if path not in self.files:
            self.files[path] = open(path, "a", encoding="utf-8")
        return self.files[path]

    def close(self) -> None:
        """Close every file opened by the writer."""
        for f in self.files.values():
            f.close()
        self.files.clear()


def _append_line(f: Any, obj: dict) -> None:
    """One record, one line, durable before returning (compact separators as everywhere)."""
    f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


# --------------------------------------------------------------------------- one record


async def _guarded(ctx: RunContext, ep: Endpoint, entry: InputEntry, obj: dict,
                   pos: int, writer: OrderedWriter) -> None:
    """Run one record and hand its outcome to the writer, whatever happens."""
    try:
        outcome: Success | Failure = Success(await regenerate_conversation(ctx, ep, obj))
    except RequestFailed as e:
        outcome = Failure(entry, e.reason, e.attempts, e.status, e.turn)
    except Exception as e:  # a bug must not stall the ordered writer: the record fails, loudly
        log.exception("internal error on record %s", entry.rec_id)
        outcome = Failure(entry, f"internal error: {type(e).__name__}: {e}")
    writer.put(pos, entry, outcome)


# --------------------------------------------------------------------------- the run


@dataclass
class _Plan:
    """What the async part of a run works on."""

    in_path: str
    pending: list[InputEntry]
    urls: list[str]
    model: str | None
    concurrency: int
    window: int


async def _start(client: httpx.AsyncClient, plan: _Plan, policy: RetryPolicy) -> list[Endpoint]:
    """Probe the endpoints (only when some record needs a server) and set their slot caps."""
    if not any(e.problem is None for e in plan.pending):
        return []
    probe_timeout = min(10.0, policy.timeout)
    endpoints = await probe_endpoints(client, plan.urls, plan.model, timeout=probe_timeout)
    _warn_model_mismatch(endpoints)
    for ep in endpoints:
        ep.slots = asyncio.Semaphore(plan.concurrency)
    return endpoints


async def _run_async(plan: _Plan, ctx_args: dict, writer_args: dict) -> None:
    """Probe the endpoints, then regenerate the pending records with bounded concurrency."""
    limits = httpx.Limits(max_connections=plan.concurrency * len(plan.urls) + 4)
    # proxies from the environment are not used for loopback servers (local engines)
    trust_env = not all(_is_loopback(url) for url in plan.urls)
    async with httpx.AsyncClient(limits=limits, trust_env=trust_env) as client:
        endpoints = await _start(client, plan, ctx_args["policy"])
        out_path, _, err_path = writer_args["paths"]
        atomic_write_text(err_path, "")  # describes this run's failures only (all are retried)
        if not os.path.exists(out_path):
            atomic_write_text(out_path, "")
        ctx = RunContext(client=client, **ctx_args)
        window = asyncio.Semaphore(plan.window)
        writer = OrderedWriter(window=window, **writer_args)
        tasks: set[asyncio.Task] = set()
        launched = 0
        try:
            for pos, entry, obj in iter_pending(plan.in_path, plan.pending):
                await window.acquire()
                if obj is None:
                    bad = Failure(entry, f"bad input: {entry.problem}", bad_input=True)
                    writer.put(pos, entry, bad)
                    continue
                ep = endpoints[launched % len(endpoints)]  # round-robin over records
                launched += 1
                task = asyncio.create_task(_guarded(ctx, ep, entry, obj, pos, writer))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*list(tasks))
        finally:
            writer.close()


def _is_loopback(url: str) -> bool:
    """Whether `url` points at this machine (no proxy should ever be used for it)."""
    host = httpx.URL(url).host
    return host in ("localhost", "::1") or host.startswith("127.")


def _warn_model_mismatch(endpoints: list[Endpoint]) -> None:
    """Different model ids across endpoints usually mean different targets: say so."""
    models = sorted({ep.model or "" for ep in endpoints})
    if len(models) > 1:
        log.warning("endpoints serve different model ids %s: is it the same target?", models)


def regenerate(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    endpoints: list[str],
    params: SamplingParams | None = None,
    *,
    model: str | None = None,
    concurrency: int = 1,
    retry: RetryPolicy | None = None,
    prompt_cache: bool = True,
    progress: bool = False,
    reorder_window: int | None = None,
) -> RegenSummary:
    """Regenerate the answers of `in_path` into `out_path` (resuming what is already there).

    `endpoints`: base URLs (`http://host:port` or `.../v1`), assigned round-robin per record,
    each with at most `concurrency` requests in flight. `model`: default, each endpoint's first
    id from GET /v1/models. `prompt_cache=False` sends `cache_prompt: false` (llama.cpp).
    Raises InputError (bad input / inconsistent output) and EndpointUnavailable (probe failed).
    """
    params = params or SamplingParams()
    retry = retry or RetryPolicy()
    _check_args(endpoints, concurrency, params, retry)
    in_path, out = str(in_path), str(out_path)
    summary = RegenSummary(out_path=out, errors_path=f"{out}.errors.jsonl")
    entries = scan_input(in_path)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    side_path = f"{out}.retried.jsonl"
    existing = load_existing(out, side_path, entries, params.record(), summary.notes)
    pending = [e for e in entries if e.rec_id not in existing.done or e.problem is not None]
    summary.total, summary.skipped = len(entries), len(entries) - len(pending)
    summary.length_cut_all = existing.length_cut
    window = reorder_window or max(16, 8 * concurrency * max(1, len(endpoints)))
    plan = _Plan(in_path, pending, list(endpoints), model, concurrency, window)
    ctx_args = {"params": params, "policy": retry, "prompt_cache": prompt_cache}
    with tqdm(total=summary.total, initial=summary.skipped, desc="regenerate", unit="rec",
              disable=not progress, dynamic_ncols=True) as bar:
        writer_args = {"paths": (out, side_path, summary.errors_path), "in_path": in_path,
                       "last_done": existing.last_index, "summary": summary, "bar": bar}
        asyncio.run(_run_async(plan, ctx_args, writer_args))
    _merge_side_file(out, side_path, entries, params.record(), summary.notes)
    return summary


def _check_args(endpoints: list[str], concurrency: int, params: SamplingParams,
                retry: RetryPolicy) -> None:
    """Reject malformed URLs and nonsensical numbers before anything is read or written."""
    for url in endpoints:
        split_endpoint(url)  # raises InputError
    if concurrency < 1:
        raise InputError(f"concurrency must be >= 1, got {concurrency}")
    if params.max_tokens is not None and params.max_tokens < 1:
        raise InputError(f"max_tokens must be >= 1, got {params.max_tokens}")
    if retry.retries < 0 or retry.timeout <= 0 or retry.backoff < 0:
        raise InputError(f"retries must be >= 0, timeout > 0 and backoff >= 0: got {retry}")


def _merge_side_file(out: str, side_path: str, entries: list[InputEntry], sampling: dict,
                     notes: list[str]) -> None:
    """Merge records retried behind already-written ones back into input order (atomically)."""
    if os.path.exists(side_path):
        load_existing(out, side_path, entries, sampling, notes)


# --------------------------------------------------------------------------- CLI


def add_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `draftsmith data regenerate`."""
    parser.add_argument("--in", dest="in_path", required=True, help="conversations JSONL")
    parser.add_argument("--out", required=True,
                        help="output JSONL (resumed if it exists); errors go to <out>.errors.jsonl")
    parser.add_argument("--endpoint", action="append", default=[],
                        help="OpenAI-compatible base URL (http://host:port or .../v1); repeatable")
    parser.add_argument("--model",
                        help="model name to request (default: first id of GET /v1/models)")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="requests in flight per endpoint (default 1)")
    g = parser.add_argument_group("sampling (omitted ones are left to the server's defaults)")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--min-p", type=float)
    g.add_argument("--max-tokens", type=int, default=2048, help="cap per answer (default 2048)")
    g.add_argument("--seed", type=int, help="base seed; each request gets one derived from it")
    g.add_argument("--thinking", choices=THINKING_CHOICES, default="default",
                   help="send chat_template_kwargs.enable_thinking (on/off)")
    g.add_argument("--no-prompt-cache", action="store_true",
                   help="send cache_prompt: false (llama.cpp): no dependence on cache reuse")
    r = parser.add_argument_group("robustness")
    r.add_argument("--retries", type=int, default=3,
                   help="retries per request (timeouts, 5xx, empty answers) (default: %(default)s)")
    r.add_argument("--timeout", type=float, default=600.0,
                   help="seconds per request (default: %(default)s)")
    r.add_argument("--retry-backoff", type=float, default=1.0,
                   help="first backoff in seconds (default: %(default)s)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    e = parser.add_argument_group("engine (start a server instead of --endpoint)")
    e.add_argument("--engine", choices=("none", "llama-cpp"), default="none")
    e.add_argument("--target", help="target model for --engine")
    e.add_argument("--slots", type=int, default=1,
                   help="parallel slots of the engine (= concurrency)")


def _from_args(args: argparse.Namespace, endpoints: list[str], concurrency: int,
               prompt_cache: bool) -> RegenSummary:
    """Call `regenerate()` with the parameters parsed by `add_args`."""
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        max_tokens=args.max_tokens, seed=args.seed, thinking=args.thinking,
    )
    retry = RetryPolicy(retries=args.retries, timeout=args.timeout, backoff=args.retry_backoff)
    return regenerate(args.in_path, args.out, endpoints, params, model=args.model,
                      concurrency=concurrency, retry=retry, prompt_cache=prompt_cache,
                      progress=not args.no_progress)


def _run_checked(args: argparse.Namespace) -> RegenSummary:
    """Dispatch on --engine; raise InputError for inconsistent arguments."""
    if args.engine == "llama-cpp":
        if args.endpoint:
            raise InputError("--engine llama-cpp starts its own server: drop --endpoint")
        if not args.target:
            raise InputError("--engine llama-cpp needs --target")
        if args.slots < 1:
            raise InputError(f"--slots must be >= 1, got {args.slots}")
        from draftsmith.data.engines import start_engine  # lazy: pulls in the engine stack

        with start_engine(args) as base_url:
            return _from_args(args, [base_url], args.slots, prompt_cache=False)
    if not args.endpoint:
        raise InputError("give at least one --endpoint URL, or --engine llama-cpp --target T")
    return _from_args(args, args.endpoint, args.concurrency, not args.no_prompt_cache)


def _plural(n: int, word: str) -> str:
    """`1 record`, `2 records`."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _failure_warning(summary: RegenSummary) -> str:
    """The warning printed when records failed; says what a rerun retries only if it retries any."""
    text = f"regenerate: warning: {_plural(summary.failed, 'record')} failed"
    if summary.bad_input:
        text += f" ({_plural(summary.bad_input, 'bad input line')})"
    text += f", see {summary.errors_path}"
    retry = summary.failed - summary.bad_input
    if retry and summary.bad_input:
        text += f"; rerunning the same command retries the other {retry}"
    elif retry:
        text += f"; rerunning the same command retries {'it' if retry == 1 else 'them'}"
    return text


@contextlib.contextmanager
def _quiet_http_logs(verbose: bool) -> Iterator[None]:
    """httpx logs every request at INFO: keep its loggers at WARNING unless asked for verbose."""
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in HTTP_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def run(args: argparse.Namespace) -> int:
    """Entry point of `draftsmith data regenerate`; returns the exit code (see module doc)."""
    try:
        check_output_file(args.out, "--out", not_same_as={"--in": args.in_path})
        with _quiet_http_logs(getattr(args, "verbose", False)):
            summary = _run_checked(args)
    except InputError as e:
        print(f"regenerate: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except EndpointUnavailable as e:
        print(f"regenerate: no answer from the server: {e}", file=sys.stderr)
        return EXIT_NO_ENDPOINT
    if summary.failed:
        print(_failure_warning(summary), file=sys.stderr)
    print(summary.line())
    return summary.exit_code


if __name__ == "__main__":  # `python -m draftsmith.data.regenerate ...` works without the CLI
    _parser = argparse.ArgumentParser(prog="draftsmith data regenerate")
    add_args(_parser)
    sys.exit(run(_parser.parse_args()))
