"""Chat rendering with the target's own template, and loss masks from character offsets.

The conversation is rendered to text once with `tokenizer.apply_chat_template`, tokenized once
with offsets, and each assistant message is located in the rendered text (never by re-tokenizing
prefixes). The loss mask covers exactly the tokens of each assistant message's content and the
end-of-turn special token that closes it. A length-capped answer (`finish_reason == "length"`)
never had an end-of-turn: its end-of-turn token is not taught, and a capped final answer is cut
right after its content so nothing after it is fed either.
"""

from __future__ import annotations

import array
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from tqdm import tqdm

from draftsmith.utils.io import InputError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class RenderedSample:
    id: str
    input_ids: list[int]
    loss_mask: list[int]  # 1 = the drafter is trained to predict this token
    truncated: bool = False  # cut at max_length
    length_capped: bool = False  # the final answer hit max_tokens (no end-of-turn)

    @cached_property
    def fingerprint(self) -> str:
        """`record_fingerprint` of this sample, computed once (cache key, cache check, resume)."""
        return record_fingerprint(self.input_ids, self.loss_mask)


def record_fingerprint(input_ids: Sequence[int], loss_mask: Sequence[int]) -> str:
    """16 hex digits of blake2b over a sample's length, token ids (int64) and loss mask (uint8):
    what its cached features were computed from."""
    h = hashlib.blake2b(digest_size=8)
    h.update(len(input_ids).to_bytes(8, "little"))
    h.update(array.array("q", input_ids).tobytes())
    h.update(bytes(loss_mask))
    return h.hexdigest()


def samples_sha256(samples: Sequence[RenderedSample]) -> str:
    """sha256 over every sample's id, token ids and loss mask, in order (a feature cache's data
    key, a training run's data record)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(s.id.encode() + b"\0")
        h.update(array.array("q", s.input_ids).tobytes() + b"\1")
        h.update(bytes(s.loss_mask) + b"\2")
    return h.hexdigest()


@dataclass
class RenderStats:
    records: int = 0
    truncated: int = 0
    length_capped: int = 0
    no_trainable_tokens: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    windows: int = 0  # samples beyond one per record (long records split into windows)
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        share = self.length_capped / max(self.records, 1)
        split = f", {self.windows} extra windows of long records" if self.windows else ""
        return (f"rendered {self.records} records: {self.tokens} tokens, {self.trainable_tokens} "
                f"trainable; {self.truncated} truncated at max_length{split}, {self.length_capped} "
                f"length-capped answers ({share:.0%}), {self.no_trainable_tokens} with no trainable token")


def _finish_reasons(record: dict) -> list[str | None]:
    """finish_reason per assistant message (the record-level one stands for the last message)."""
    msgs = record["conversations"]
    reasons = [m.get("finish_reason") if m["role"] == "assistant" else None for m in msgs]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is not None and reasons[last] is None:
        reasons[last] = record.get("finish_reason")
    return reasons


def _locate(text: str, content: str, cursor: int) -> tuple[int, int] | None:
    """Char span of one assistant message's content in the rendered text, searching from `cursor`.

    Templates may strip the content, or (Qwen3 style) re-wrap `<think>…</think>` reasoning; the
    span then runs from the `<think>` tag to the end of the answer.
    """
    for candidate in (content, content.strip()):
        if candidate:
            i = text.find(candidate, cursor)
            if i >= 0:
                return i, i + len(candidate)
    if THINK_CLOSE not in content:
        return None
    reasoning, answer = content.split(THINK_CLOSE, 1)
    reasoning = reasoning.replace(THINK_OPEN, "").strip()
    answer = answer.strip()
    a = text.find(answer, cursor) if answer else -1
    if a < 0:
        return None
    r = text.find(reasoning, cursor, a) if reasoning else -1
    tag = text.rfind(THINK_OPEN, cursor, r if r >= 0 else a)
    start = tag if tag >= 0 else (r if r >= 0 else a)
    return start, a + len(answer)


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    for tid, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(tid))
    return ids


def assistant_spans(text: str, record: dict) -> list[tuple[int, int, bool]]:
    """(start, end, capped) in `text` for every assistant message, in order."""
    spans, cursor = [], 0
    for k, (msg, reason) in enumerate(zip(record["conversations"], _finish_reasons(record))):
        if msg["role"] != "assistant":
            continue
        span = _locate(text, msg["content"], cursor)
        if span is None:
            raise InputError(
                f"record {record.get('id')!r}: conversations[{k}] (assistant) not found in the text "
                "rendered by the chat template (the template rewrites assistant content?)"
            )
        spans.append((span[0], span[1], reason == "length"))
        cursor = span[1]
    return spans


def render_sample(tokenizer, record: dict, max_length: int | None = None,
                  template_kwargs: dict | None = None) -> RenderedSample:
    """Render one conversation record to token ids and a loss mask."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the target tokenizer has no chat template")
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("loss masks need a fast tokenizer (character offsets)")
    messages = [{"role": m["role"], "content": m["content"]} for m in record["conversations"]]
    text = tokenizer.apply_chat_template(messages, tokenize=False, **(template_kwargs or {}))
    spans = assistant_spans(text, record)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [0] * len(ids)
    special = _special_ids(tokenizer)
    capped_cut = None
    t = 0
    for start, end, capped in spans:
        while t < len(ids) and offsets[t][1] <= start:
            t += 1
        while t < len(ids) and offsets[t][0] < end:  # every token holding content characters
            mask[t] = 1
            t += 1
        eot = _end_of_turn(ids, offsets, text, t, special)
        if capped:
            capped_cut = t
        elif eot is not None:
            mask[eot] = 1
    length_capped = bool(spans) and spans[-1][2]
    if length_capped:  # a capped final answer: nothing after its content is fed
        ids, mask = ids[:capped_cut], mask[:capped_cut]
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
    return RenderedSample(str(record.get("id")), list(ids), mask, truncated, length_capped)


def _end_of_turn(ids, offsets, text: str, t: int, special: set[int]) -> int | None:
    """Index of the special token closing the turn: the first token after the content, allowing
    only whitespace in between."""
    while t < len(ids):
        if ids[t] in special:
            return t
        if text[offsets[t][0]:offsets[t][1]].strip():
            return None
        t += 1
    return None


def split_windows(sample: RenderedSample, length: int) -> list[RenderedSample]:
    """A rendered sample longer than `length` -> consecutive windows of at most `length` tokens
    (ids `<id>#w<k>`), those with a trainable token; a shorter one unchanged. Each window is its
    own sequence: the target and the draft read it from its first token."""
    if len(sample.input_ids) <= length:
        return [sample]
    out = []
    for k, start in enumerate(range(0, len(sample.input_ids), length)):
        ids, mask = sample.input_ids[start:start + length], sample.loss_mask[start:start + length]
        if sum(mask[1:]) and len(ids) > 1:  # position 0 of a window has no context to predict from
            last = start + length >= len(sample.input_ids)
            out.append(RenderedSample(f"{sample.id}#w{k}", ids, [0] + mask[1:], False, sample.length_capped and last))
    return out


def iter_rendered(tokenizer, records: Iterable[dict], stats: RenderStats, max_length: int | None = None,
                  template_kwargs: dict | None = None, windows: bool = False) -> Iterator[RenderedSample]:
    """Render records one at a time; a record that cannot be rendered is counted in `stats` and
    reported there, never silently dropped. `windows`: a record longer than max_length becomes
    several windows (`split_windows`) instead of being truncated; `stats.windows` counts the
    extra samples."""
    for record in records:
        stats.records += 1
        try:
            s = render_sample(tokenizer, record, None if windows else max_length, template_kwargs)
        except InputError as e:
            stats.problems.append(str(e))
            continue
        parts = split_windows(s, max_length) if windows and max_length else [s]
        stats.windows += len(parts) - 1
        for s in parts:
            stats.truncated += s.truncated
            stats.length_capped += s.length_capped
            stats.tokens += len(s.input_ids)
            n = sum(s.loss_mask)
            stats.trainable_tokens += n
            stats.no_trainable_tokens += n == 0
            yield s


def render_records(tokenizer, records: Iterable[dict], max_length: int | None = None,
                   template_kwargs: dict | None = None, total: int | None = None,
                   progress: bool = True, windows: bool = False) -> tuple[list[RenderedSample], RenderStats]:
    """Render many records into a list (`iter_rendered`), with a progress bar."""
    stats = RenderStats()
    bar = tqdm(records, total=total, desc="render", unit="rec", disable=not progress)
    samples = list(iter_rendered(tokenizer, bar, stats, max_length, template_kwargs, windows))
    return samples, stats
