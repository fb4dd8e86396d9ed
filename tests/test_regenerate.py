"""`draftsmith data regenerate` against a deterministic fake OpenAI chat server."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import pytest

from draftsmith.data.regen_client import derive_seed
from draftsmith.data.regenerate import (
    EndpointUnavailable,
    RetryPolicy,
    SamplingParams,
    add_args,
    regenerate,
    run,
)
from draftsmith.utils.io import InputError
from fake_openai_server import FakeOpenAIServer, answer_for, refused_url

FAST = RetryPolicy(retries=2, timeout=5.0, backoff=0.01)
PARAMS = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, max_tokens=64, seed=7)
SRC = Path(__file__).resolve().parents[1] / "src"


# --------------------------------------------------------------------------- helpers


def conv(rec_id: str, *turns: tuple[str, str]) -> dict:
    return {"id": rec_id, "conversations": [{"role": r, "content": c} for r, c in turns]}


def single(rec_id: str, question: str | None = None) -> dict:
    return conv(rec_id, ("user", question or f"question {rec_id}"))


def write_input(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def expected_conversation(record: dict, params: SamplingParams = PARAMS) -> list[dict]:
    """What the fake server's answers make of `record` when regenerated turn by turn."""
    turns = list(record["conversations"])
    if turns[-1]["role"] != "assistant":
        turns.append({"role": "assistant", "content": ""})
    out: list[dict] = []
    for pos, msg in enumerate(turns):
        if msg["role"] != "assistant":
            out.append(dict(msg))
            continue
        seed = None if params.seed is None else derive_seed(params.seed, record["id"], pos)
        content, finish = answer_for(out, seed, params.max_tokens)
        out.append({"role": "assistant", "content": content, "finish_reason": finish})
    return out


def mixed_records(n: int) -> list[dict]:
    """Single- and multi-turn conversations, some with a system prompt and old answers."""
    records = []
    for i in range(n):
        rid = f"r{i:03d}"
        if i % 3 == 0:
            records.append(conv(rid, ("system", "be brief"), ("user", f"q{i} first"),
                                ("assistant", "OLD"), ("user", f"q{i} second")))
        else:
            records.append(single(rid, f"q{i} only"))
    return records


@pytest.fixture
def server():
    with FakeOpenAIServer() as srv:
        yield srv


@contextlib.contextmanager
def two_servers(**state):
    with FakeOpenAIServer(**state) as a, FakeOpenAIServer(**state) as b:
        yield a, b


def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_args(parser)
    return parser.parse_args(list(argv))


def assert_reconciles(summary) -> None:
    assert summary.total == summary.succeeded + summary.failed + summary.skipped


# --------------------------------------------------------------------------- content


def test_single_turn_answers_fields_and_request_body(server, tmp_path):
    records = [
        single("a", "what is two plus two"),
        conv("b", ("system", "you are terse"), ("user", "name a colour"), ("assistant", "OLD")),
        dict(single("c", "third"), source="sharegpt"),
    ]
    out = tmp_path / "out.jsonl"
    summary = regenerate(write_input(tmp_path / "in.jsonl", records), out, [server.url], PARAMS,
                         retry=FAST)
    got = read_jsonl(out)
    assert [r["id"] for r in got] == ["a", "b", "c"]
    for rec, src in zip(got, records):
        assert rec["conversations"] == expected_conversation(src)
        assert rec["finish_reason"] == rec["conversations"][-1]["finish_reason"] == "stop"
        assert rec["completion_tokens"] == len(rec["conversations"][-1]["content"].split())
        assert rec["sampling"] == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                   "max_tokens": 64, "seed": 7}
        assert "OLD" not in json.dumps(rec)
    assert list(got[0]) == ["id", "conversations", "finish_reason", "completion_tokens", "sampling"]
    assert got[2]["source"] == "sharegpt"  # other input fields are kept
    body = server.state.requests[0]
    assert body["model"] == "fake-model" and body["stream"] is False
    assert body["top_k"] == 20 and body["seed"] == derive_seed(7, "a", 1)
    assert "cache_prompt" not in body and "chat_template_kwargs" not in body and "min_p" not in body
    assert (summary.succeeded, summary.failed, summary.skipped) == (3, 0, 0)
    assert Path(f"{out}.errors.jsonl").read_text() == ""


def test_multi_turn_regenerates_on_regenerated_history(server, tmp_path):
    record = conv("m", ("system", "sys"), ("user", "first [[length]]"), ("assistant", "OLD 1"),
                  ("user", "second"), ("assistant", "OLD 2"), ("user", "third"))
    out = tmp_path / "out.jsonl"
    summary = regenerate(write_input(tmp_path / "in.jsonl", [record]), out, [server.url], PARAMS,
                         retry=FAST)
    (got,) = read_jsonl(out)
    turns = got["conversations"]
    assert [m["role"] for m in turns] == ["system", "user", "assistant", "user", "assistant",
                                          "user", "assistant"]
    assert turns == expected_conversation(record)
    assert [m["finish_reason"] for m in turns if m["role"] == "assistant"] == ["length", "stop",
                                                                               "stop"]
    assert got["finish_reason"] == "stop"  # mirrors the last turn
    sent = [r["messages"] for r in server.state.requests]
    assert len(sent) == 3
    assert sent[1][2] == {"role": "assistant", "content": turns[2]["content"]}  # a1', not OLD 1
    assert sent[2][:5] == [{"role": m["role"], "content": m["content"]} for m in turns[:5]]
    assert got["completion_tokens"] == sum(len(m["content"].split()) for m in turns
                                           if m["role"] == "assistant")
    assert summary.length_cut == 0


def test_length_cut_share_in_summary(server, tmp_path):
    params = SamplingParams(max_tokens=2)
    records = [single("a"), single("b")]
    summary = regenerate(write_input(tmp_path / "in.jsonl", records), tmp_path / "o.jsonl",
                         [server.url], params, retry=FAST)
    assert all(r["finish_reason"] == "length" for r in read_jsonl(tmp_path / "o.jsonl"))
    assert summary.line() == ("regenerate: 2 input = 2 succeeded + 0 failed + 0 skipped"
                              " (already done) ; cut at max_tokens: 2 of 2 (100.0%)")


# --------------------------------------------------------------------------- endpoints


def test_round_robin_over_two_endpoints_respects_the_cap(tmp_path):
    records = [single(f"r{i:02d}") for i in range(16)]
    with two_servers(delay=0.08) as (a, b):
        summary = regenerate(write_input(tmp_path / "in.jsonl", records), tmp_path / "o.jsonl",
                             [a.url, b.url], PARAMS, concurrency=2, retry=FAST)
        asked_a = {r["messages"][-1]["content"] for r in a.state.requests}
        asked_b = {r["messages"][-1]["content"] for r in b.state.requests}
    assert summary.succeeded == 16
    assert asked_a == {f"question r{i:02d}" for i in range(0, 16, 2)}
    assert asked_b == {f"question r{i:02d}" for i in range(1, 16, 2)}
    assert a.state.max_in_flight == 2 and b.state.max_in_flight == 2
    assert [r["id"] for r in read_jsonl(tmp_path / "o.jsonl")] == [r["id"] for r in records]


def test_refused_endpoint_fails_fast_naming_it(server, tmp_path):
    dead = refused_url()
    inp = write_input(tmp_path / "in.jsonl", [single("a")])
    t0 = time.monotonic()
    with pytest.raises(EndpointUnavailable, match=re.escape(dead)):
        regenerate(inp, tmp_path / "o.jsonl", [server.url, dead], PARAMS, retry=FAST)
    assert time.monotonic() - t0 < 5
    assert not (tmp_path / "o.jsonl").exists()
    assert server.state.requests == []


def test_refused_endpoint_cli_exit_code(tmp_path, capsys):
    dead = refused_url()
    inp = write_input(tmp_path / "in.jsonl", [single("a")])
    code = run(cli_args("--in", str(inp), "--out", str(tmp_path / "o.jsonl"), "--endpoint", dead,
                        "--no-progress"))
    assert code == 4
    assert dead in capsys.readouterr().err


def test_model_from_models_list_or_flag(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", [single("a")])
    with FakeOpenAIServer(model="served-name", models_status=404) as srv:
        with pytest.raises(EndpointUnavailable, match="pass --model"):
            regenerate(inp, tmp_path / "o.jsonl", [srv.url], PARAMS, retry=FAST)
        regenerate(inp, tmp_path / "o.jsonl", [srv.url + "/v1/"], PARAMS, model="mine",
                   retry=FAST)
        assert srv.state.requests[-1]["model"] == "mine"
    with FakeOpenAIServer(model="served-name") as srv:
        regenerate(inp, tmp_path / "o2.jsonl", [srv.url], PARAMS, retry=FAST)
        assert srv.state.requests[-1]["model"] == "served-name"


def test_endpoint_dying_mid_run_fails_only_its_records(tmp_path):
    records = [single(f"r{i:02d}") for i in range(20)]
    with two_servers(delay=0.05) as (a, b):
        threading.Timer(0.2, b.crash).start()
        summary = regenerate(write_input(tmp_path / "in.jsonl", records), tmp_path / "o.jsonl",
                             [a.url, b.url], PARAMS, concurrency=1,
                             retry=RetryPolicy(retries=1, timeout=2.0, backoff=0.01))
    done = {r["id"] for r in read_jsonl(tmp_path / "o.jsonl")}
    errors = read_jsonl(tmp_path / "o.jsonl.errors.jsonl")
    assert {f"r{i:02d}" for i in range(0, 20, 2)} <= done  # every record of the live endpoint
    assert summary.failed == len(errors) > 0 and summary.succeeded == len(done)
    assert all(e["reason"].startswith("connection error") and e["attempts"] == 2 for e in errors)
    assert_reconciles(summary)


# --------------------------------------------------------------------------- retries and errors


def test_retries_5xx_then_succeeds(server, tmp_path):
    records = [single("a", "flaky [[status:500:2]]"), single("b")]
    out = tmp_path / "o.jsonl"
    summary = regenerate(write_input(tmp_path / "in.jsonl", records), out, [server.url], PARAMS,
                         retry=RetryPolicy(retries=3, timeout=5.0, backoff=0.01))
    assert summary.succeeded == 2 and summary.failed == 0
    asked = [r["messages"][-1]["content"] for r in server.state.requests]
    assert asked.count("flaky [[status:500:2]]") == 3
    assert read_jsonl(out)[0]["conversations"] == expected_conversation(records[0])


def test_5xx_until_retries_run_out(server, tmp_path):
    records = [single("a"), single("b", "broken [[status:503]]"), single("c")]
    out = tmp_path / "o.jsonl"
    summary = regenerate(write_input(tmp_path / "in.jsonl", records), out, [server.url], PARAMS,
                         retry=FAST)
    (err,) = read_jsonl(Path(f"{out}.errors.jsonl"))
    assert err["id"] == "b" and err["line"] == 2 and err["file"] == str(tmp_path / "in.jsonl")
    assert err["status"] == 503 and err["attempts"] == 3 and err["turn"] == 1
    assert err["reason"].startswith("HTTP 503")
    assert [r["id"] for r in read_jsonl(out)] == ["a", "c"]
    assert summary.exit_code == 3


def test_4xx_fails_without_retry(server, tmp_path):
    records = [single("a", "bad [[status:400]]")]
    out = tmp_path / "o.jsonl"
    regenerate(write_input(tmp_path / "in.jsonl", records), out, [server.url], PARAMS, retry=FAST)
    (err,) = read_jsonl(Path(f"{out}.errors.jsonl"))
    assert err["status"] == 400 and err["attempts"] == 1 and "HTTP 400" in err["reason"]
    assert len(server.state.requests) == 1


def test_timeout_goes_to_errors_file(tmp_path):
    records = [single("a"), single("slow", "wait [[hang]]"), single("c")]
    out = tmp_path / "o.jsonl"
    with FakeOpenAIServer(hang_seconds=10) as srv:
        t0 = time.monotonic()
        summary = regenerate(write_input(tmp_path / "in.jsonl", records), out, [srv.url], PARAMS,
                             concurrency=2, retry=RetryPolicy(retries=1, timeout=0.3, backoff=0.01))
        assert time.monotonic() - t0 < 5
    (err,) = read_jsonl(Path(f"{out}.errors.jsonl"))
    assert err["id"] == "slow" and err["attempts"] == 2 and "timeout" in err["reason"]
    assert [r["id"] for r in read_jsonl(out)] == ["a", "c"]
    assert (summary.succeeded, summary.failed) == (2, 1)


def test_bad_input_lines_are_named_in_errors_file(server, tmp_path, capsys):
    lines = [
        json.dumps(single("ok1")),
        "{not json",
        json.dumps(conv("early", ("assistant", "hi"), ("user", "x"))),
        json.dumps(conv("sys-only", ("system", "s"))),
        json.dumps({"conversations": [{"role": "user", "content": "no id"}]}),
        json.dumps(single("ok2")),
    ]
    inp = write_input(tmp_path / "in.jsonl", lines)
    out = tmp_path / "o.jsonl"
    code = run(cli_args("--in", str(inp), "--out", str(out), "--endpoint", server.url,
                        "--no-progress", "--retry-backoff", "0.01"))
    assert code == 3
    errors = read_jsonl(Path(f"{out}.errors.jsonl"))
    assert [e["line"] for e in errors] == [2, 3, 4, 5]
    assert all(e["file"] == str(inp) and e["reason"].startswith("bad input") for e in errors)
    assert "malformed JSON" in errors[0]["reason"]
    assert "assistant turn before any user turn" in errors[1]["reason"]
    assert "no user turn" in errors[2]["reason"] and "'id'" in errors[3]["reason"]
    assert [r["id"] for r in read_jsonl(out)] == ["ok1", "ok2"]
    assert "6 input = 2 succeeded + 4 failed + 0 skipped" in capsys.readouterr().out


def test_duplicate_ids_are_an_input_error_naming_both_lines(server, tmp_path):
    inp = write_input(tmp_path / "in.jsonl", [single("a"), single("b"), single("a")])
    with pytest.raises(InputError, match=r"duplicate id 'a' on lines 1 and 3"):
        regenerate(inp, tmp_path / "o.jsonl", [server.url], PARAMS)


# --------------------------------------------------------------------------- CLI and engine


def test_cli_sends_thinking_min_p_and_no_prompt_cache(server, tmp_path, capsys):
    inp = write_input(tmp_path / "in.jsonl", [single("a")])
    code = run(cli_args("--in", str(inp), "--out", str(tmp_path / "o.jsonl"),
                        "--endpoint", server.url + "/v1", "--thinking", "off", "--min-p", "0.05",
                        "--temperature", "0", "--no-prompt-cache", "--no-progress"))
    assert code == 0
    body = server.state.requests[0]
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["min_p"] == 0.05 and body["temperature"] == 0.0 and body["cache_prompt"] is False
    assert "seed" not in body and body["max_tokens"] == 2048
    rec = read_jsonl(tmp_path / "o.jsonl")[0]
    assert rec["sampling"] == {"temperature": 0.0, "min_p": 0.05, "max_tokens": 2048,
                               "thinking": False}
    assert re.fullmatch(r"regenerate: 1 input = 1 succeeded \+ 0 failed \+ 0 skipped \(already"
                        r" done\) ; cut at max_tokens: 0 of 1 \(0\.0%\)\n", capsys.readouterr().out)


def test_engine_hook_runs_one_endpoint_with_slots(monkeypatch, tmp_path):
    started = []
    with FakeOpenAIServer(delay=0.05) as srv:

        @contextlib.contextmanager
        def start_engine(args):
            started.append(args.target)
            yield srv.url

        fake = types.ModuleType("draftsmith.data.engines")
        fake.start_engine = start_engine
        monkeypatch.setitem(sys.modules, "draftsmith.data.engines", fake)
        inp = write_input(tmp_path / "in.jsonl", [single(f"r{i}") for i in range(12)])
        code = run(cli_args("--in", str(inp), "--out", str(tmp_path / "o.jsonl"),
                            "--engine", "llama-cpp", "--target", "smollm2", "--slots", "3",
                            "--no-progress"))
        assert code == 0 and started == ["smollm2"]
        assert srv.state.max_in_flight == 3
        assert all(r["cache_prompt"] is False for r in srv.state.requests)
    assert run(cli_args("--in", str(inp), "--out", str(tmp_path / "x.jsonl"),
                        "--engine", "llama-cpp")) == 2  # no --target


# --------------------------------------------------------------------------- resume


def test_rerun_skips_done_records_and_changes_nothing(server, tmp_path):
    inp = write_input(tmp_path / "in.jsonl", mixed_records(6))
    out = tmp_path / "o.jsonl"
    regenerate(inp, out, [server.url], PARAMS, retry=FAST)
    before, n_requests = out.read_bytes(), len(server.state.requests)
    summary = regenerate(inp, out, [server.url], PARAMS, retry=FAST)
    assert (summary.succeeded, summary.failed, summary.skipped) == (0, 0, 6)
    assert out.read_bytes() == before and len(server.state.requests) == n_requests


def test_rerun_needs_no_server_when_all_done(server, tmp_path):
    inp = write_input(tmp_path / "in.jsonl", [single("a")])
    out = tmp_path / "o.jsonl"
    regenerate(inp, out, [server.url], PARAMS, retry=FAST)
    summary = regenerate(inp, out, [refused_url()], PARAMS, retry=FAST)
    assert summary.skipped == 1 and summary.exit_code == 0


def test_torn_last_line_is_repaired_and_redone(server, tmp_path):
    inp = write_input(tmp_path / "in.jsonl", mixed_records(5))
    out = tmp_path / "o.jsonl"
    regenerate(inp, out, [server.url], PARAMS, retry=FAST)
    reference = out.read_bytes()
    out.write_bytes(reference[:-25])  # the last record was cut mid-write
    summary = regenerate(inp, out, [server.url], PARAMS, retry=FAST)
    assert out.read_bytes() == reference
    assert (summary.succeeded, summary.skipped) == (1, 4)
    assert any("cut mid-write" in note for note in summary.notes)


def test_output_of_another_input_or_sampling_is_refused(server, tmp_path):
    inp = write_input(tmp_path / "in.jsonl", [single("a"), single("b")])
    out = tmp_path / "o.jsonl"
    regenerate(inp, out, [server.url], PARAMS, retry=FAST)
    with pytest.raises(InputError, match="sampling"):
        regenerate(inp, out, [server.url], SamplingParams(temperature=0.1), retry=FAST)
    other = write_input(tmp_path / "other.jsonl", [single("b"), single("c")])
    with pytest.raises(InputError, match="not a usable record of the input"):
        regenerate(other, out, [server.url], PARAMS, retry=FAST)
    changed = write_input(tmp_path / "changed.jsonl", [single("a", "new text"), single("b")])
    with pytest.raises(InputError, match="input changed"):
        regenerate(changed, out, [server.url], PARAMS, retry=FAST)
    swapped = write_input(tmp_path / "swapped.jsonl", [single("b"), single("a")])
    with pytest.raises(InputError, match="out of input order"):
        regenerate(swapped, out, [server.url], PARAMS, retry=FAST)


def reference_output(server, tmp_path: Path, inp: Path) -> bytes:
    """The output of one uninterrupted run on a healthy server."""
    ref = tmp_path / "reference" / "o.jsonl"
    saved = (server.state.delay, dict(server.state.status_by_text))
    server.state.delay, server.state.status_by_text = 0.0, {}
    regenerate(inp, ref, [server.url], PARAMS, concurrency=3, retry=FAST)
    server.state.delay, server.state.status_by_text = saved
    return ref.read_bytes()


def test_failed_records_are_retried_on_rerun_and_merged_in_order(server, tmp_path):
    records = [single(f"r{i}", f"q{i} flaky" if i in (2, 6) else f"q{i}") for i in range(10)]
    inp = write_input(tmp_path / "in.jsonl", records)
    out = tmp_path / "o.jsonl"
    server.state.status_by_text = {"flaky": 503}
    first = regenerate(inp, out, [server.url], PARAMS, concurrency=2, retry=FAST)
    assert first.failed == 2 and first.exit_code == 3
    assert [e["id"] for e in read_jsonl(Path(f"{out}.errors.jsonl"))] == ["r2", "r6"]
    written = out.read_bytes()
    server.state.status_by_text = {}
    second = regenerate(inp, out, [server.url], PARAMS, concurrency=2, retry=FAST)
    assert (second.succeeded, second.failed, second.skipped) == (2, 0, 8)
    assert any("merged 2 retried records" in note for note in second.notes)
    assert out.read_bytes() == reference_output(server, tmp_path, inp)
    kept = {json.loads(line)["id"]: line for line in written.splitlines()}
    assert all(line in out.read_bytes().splitlines() for line in kept.values())
    assert Path(f"{out}.errors.jsonl").read_text() == ""
    assert not Path(f"{out}.retried.jsonl").exists()


KILL_SCRIPT = textwrap.dedent("""
    import json, sys
    from draftsmith.data.regenerate import RetryPolicy, SamplingParams, regenerate
    cfg = json.loads(sys.argv[1])
    regenerate(cfg["in"], cfg["out"], [cfg["url"]], SamplingParams(**cfg["params"]),
               concurrency=3, retry=RetryPolicy(retries=1, timeout=10.0, backoff=0.01))
""")


def start_and_kill(tmp_path: Path, inp: Path, out: Path, url: str, watch: Path,
                   lines: int) -> None:
    """Run regenerate() in a subprocess and SIGKILL it once `watch` has `lines` lines."""
    script = tmp_path / "regen_once.py"
    script.write_text(KILL_SCRIPT)
    params = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_tokens": 64, "seed": 7}
    cfg = json.dumps({"in": str(inp), "out": str(out), "url": url, "params": params})
    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.Popen([sys.executable, str(script), cfg], env=env)
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if watch.exists() and watch.read_bytes().count(b"\n") >= lines:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_kill9_then_rerun_equals_an_uninterrupted_run(server, tmp_path):
    inp = write_input(tmp_path / "in.jsonl", mixed_records(60))
    out = tmp_path / "o.jsonl"
    reference = reference_output(server, tmp_path, inp)
    server.state.delay = 0.03
    start_and_kill(tmp_path, inp, out, server.url, out, lines=10)
    killed = out.read_bytes()
    complete = killed[: killed.rfind(b"\n") + 1]
    n_done = complete.count(b"\n")
    assert 10 <= n_done < 60
    out.write_bytes(complete + b'{"id": "r0')  # and a torn last line on top of it
    server.state.delay = 0.0
    summary = regenerate(inp, out, [server.url], PARAMS, concurrency=3, retry=FAST)
    final = out.read_bytes()
    assert final.startswith(complete)  # what was written before the kill is unchanged
    assert final == reference  # same ids, order, conversations, finish reasons, everything
    assert (summary.skipped, summary.succeeded, summary.failed) == (n_done, 60 - n_done, 0)
    assert any("cut mid-write" in note for note in summary.notes)
    assert_reconciles(summary)


def test_kill9_while_retrying_failed_records(server, tmp_path):
    records = [single(f"r{i:02d}", f"q{i} flaky" if i % 3 == 1 else f"q{i}") for i in range(30)]
    inp = write_input(tmp_path / "in.jsonl", records)
    out = tmp_path / "o.jsonl"
    reference = reference_output(server, tmp_path, inp)
    server.state.status_by_text = {"flaky": 503}
    assert regenerate(inp, out, [server.url], PARAMS, retry=FAST).failed == 10
    after_first = out.read_bytes()
    server.state.status_by_text, server.state.delay = {}, 0.1
    side = Path(f"{out}.retried.jsonl")
    start_and_kill(tmp_path, inp, out, server.url, side, lines=2)
    assert out.read_bytes() == after_first  # retried records wait in the side file
    server.state.delay = 0.0
    summary = regenerate(inp, out, [server.url], PARAMS, retry=FAST)
    assert out.read_bytes() == reference and not side.exists()
    assert summary.total == 30 and summary.failed == 0
    assert_reconciles(summary)


def test_bad_endpoint_url_is_an_argument_error(tmp_path, capsys):
    inp = write_input(tmp_path / "in.jsonl", [single("a")])
    code = run(cli_args("--in", str(inp), "--out", str(tmp_path / "o.jsonl"),
                        "--endpoint", "localhost:8080", "--no-progress"))
    assert code == 2 and "http://" in capsys.readouterr().err


def test_reasoning_content_is_kept_on_the_message():
    from draftsmith.data.regen_client import parse_chat_response

    result = parse_chat_response({
        "choices": [{"message": {"content": "42", "reasoning_content": "think"},
                     "finish_reason": "stop"}],
        "usage": {"completion_tokens": 5},
    })
    assert (result.content, result.reasoning, result.completion_tokens) == ("42", "think", 5)
    with pytest.raises(ValueError, match="not a chat completion"):
        parse_chat_response({"choices": []})


# --------------------------------------------------------------------------- issue 13


def test_empty_or_null_answers_are_retried_errors(server, tmp_path):
    records = [single("a"), single("empty", "say nothing [[empty]]"),
               single("null", "say null [[null]]"), single("once", "empty once [[empty:1]]"),
               single("e")]
    out = tmp_path / "o.jsonl"
    summary = regenerate(write_input(tmp_path / "in.jsonl", records), out, [server.url], PARAMS,
                         retry=FAST)
    assert [r["id"] for r in read_jsonl(out)] == ["a", "once", "e"]
    assert read_jsonl(out)[1]["conversations"] == expected_conversation(records[3])
    errors = read_jsonl(Path(f"{out}.errors.jsonl"))
    assert [e["id"] for e in errors] == ["empty", "null"]
    assert all("empty answer" in e["reason"] and e["attempts"] == 3 and e["turn"] == 1
               for e in errors)
    asked = [r["messages"][-1]["content"] for r in server.state.requests]
    assert asked.count("say nothing [[empty]]") == asked.count("say null [[null]]") == 3
    assert asked.count("empty once [[empty:1]]") == 2
    assert (summary.succeeded, summary.failed, summary.exit_code) == (3, 2, 3)
    assert_reconciles(summary)


def test_failure_warning_is_grammatical_and_omits_nothing_to_retry(server, tmp_path, capsys):
    def warning(*lines: str) -> str:
        inp = write_input(tmp_path / "in.jsonl", list(lines))
        out = tmp_path / f"o{len(list(tmp_path.iterdir()))}.jsonl"
        code = run(cli_args("--in", str(inp), "--out", str(out), "--endpoint", server.url,
                            "--no-progress", "--retries", "0"))
        assert code == 3
        return " ".join(capsys.readouterr().err.split())

    ok, broken = json.dumps(single("ok")), json.dumps(single("b", "x [[status:400]]"))
    only_bad = warning(ok, "{not json")
    assert "1 record failed (1 bad input line)" in only_bad
    assert "retries" not in only_bad and "other 0" not in only_bad
    one_retry = warning(ok, broken)
    assert "1 record failed," in one_retry and "bad input" not in one_retry
    assert "rerunning the same command retries it" in one_retry
    mixed = warning(ok, broken, "{not json", "[]")
    assert "3 records failed (2 bad input lines)" in mixed
    assert "rerunning the same command retries the other 1" in mixed


def test_http_requests_are_not_logged_unless_verbose(server, tmp_path, caplog):
    inp = write_input(tmp_path / "in.jsonl", [single("a")])
    caplog.set_level(logging.INFO)
    args = cli_args("--in", str(inp), "--out", str(tmp_path / "o.jsonl"), "--endpoint",
                    server.url, "--no-progress")
    assert run(args) == 0
    assert not [r for r in caplog.records if r.name.startswith(("httpx", "httpcore"))]
    caplog.clear()
    args.verbose, args.out = True, str(tmp_path / "o2.jsonl")
    assert run(args) == 0
    assert [r for r in caplog.records if r.name.startswith("httpx")]
    assert logging.getLogger("httpx").level == logging.NOTSET  # restored after the run


def test_help_shows_retry_and_timeout_defaults():
    parser = argparse.ArgumentParser()
    add_args(parser)
    text = " ".join(parser.format_help().split())
    assert "(default: 3)" in text and "(default: 600.0)" in text
