"""`data regenerate --engine llama-cpp`: a real llama-server, kill -9 mid-run, exact resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.llama, pytest.mark.slow]

PROMPTS = [
    "What is the capital of France?", "Give me two rhymes for cat.", "What is 12 times 7?",
    "Name a primary color.", "Write a haiku about rain.", "What does CPU stand for?",
    "Say hello in Spanish.", "How many legs does a spider have?", "What is water made of?",
    "Suggest a name for a dog.", "What is the opposite of hot?", "Define the word 'brief'.",
]


def _prompts(path: Path) -> Path:
    with open(path, "w") as f:
        for i, p in enumerate(PROMPTS):
            f.write(json.dumps({"id": f"p{i:02d}", "conversations": [{"role": "user", "content": p}]}) + "\n")
    return path


def _cmd(inp: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "draftsmith.cli", "data", "regenerate", "--engine", "llama-cpp",
            "--target", "smollm2-135m", "--in", str(inp), "--out", str(out), "--temperature", "0",
            "--max-tokens", "64", "--seed", "0", "--no-progress"]


def _llama_servers() -> set[int]:
    pids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                comm, state = stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2]
                if comm == "llama-server" and state not in "ZX":  # a zombie is dead, not yet reaped
                    pids.add(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return pids


def _no_new_servers(before: set[int], within: float = 10.0) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        if not _llama_servers() - before:
            return True
        time.sleep(0.1)
    return False


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_kill9_and_rerun_reproduces_uninterrupted_run(tmp_path):
    from draftsmith.engines.llama_cpp import ensure_llama_server

    ensure_llama_server()  # build outside the timed part (cached after the first time)
    before = _llama_servers()
    inp = _prompts(tmp_path / "in.jsonl")
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    subprocess.run(_cmd(inp, ref), check=True, timeout=600)
    assert len(_records(ref)) == 12

    proc = subprocess.Popen(_cmd(inp, out), start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 4):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = out.read_bytes()
    n_before = len(_records(out)) if written.endswith(b"\n") else len(written.splitlines()) - 1
    assert 4 <= n_before < 12, "the kill should land mid-run"
    assert _no_new_servers(before), "kill -9 left a llama-server behind"

    subprocess.run(_cmd(inp, out), check=True, timeout=600)
    assert out.read_bytes().startswith(written[: written.rfind(b"\n") + 1])  # unchanged prefix
    got, want = _records(out), _records(ref)
    assert [r["id"] for r in got] == [f"p{i:02d}" for i in range(12)]
    assert got == want  # ids, order, conversations, finish reasons, everything
    assert all(r["finish_reason"] in ("stop", "length") for r in got)
    assert _no_new_servers(before)
