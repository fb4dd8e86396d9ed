"""A tiny deterministic OpenAI-compatible chat server for tests (stdlib only).

Answers are a pure function of the request (messages, seed, max_tokens), so a resumed run can be
compared byte for byte with an uninterrupted one, and multi-turn histories can be checked: see
`answer_words`. One word counts as one completion token; `max_tokens` cuts the answer and gives
`finish_reason: "length"`.

Behaviour is steered by markers in the *last user message*:
  `[[status:503]]`    always answer HTTP 503 (any code);
  `[[status:500:2]]`  answer 500 to the first 2 requests with these messages, then normally;
  `[[hang]]`          do not answer for `state.hang_seconds` (a timeout for the client);
  `[[length]]`        answer with `finish_reason: "length"`;
  `[[empty]]`         answer 200 with `content: ""` (`[[null]]`: `content: null`);
  `[[empty:2]]`       answer empty to the first 2 requests with these messages, then normally;
`crash()` makes the server die mid-run (no answer on open connections, new ones refused).
and by `state`: `delay` (seconds per request), `status_by_text` (substring of the last user
message -> HTTP status, changeable between runs), `model`, `models_status` (HTTP status of
GET /v1/models). The server records every chat request body and the maximum number of chat
requests it had in flight at once.

Run it alone with `python tests/fake_openai_server.py --port 8080 [--delay 0.1]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MARK_STATUS = re.compile(r"\[\[status:(\d{3})(?::(\d+))?\]\]")
MARK_EMPTY = re.compile(r"\[\[(empty|null)(?::(\d+))?\]\]")


def last_user(messages: list[dict]) -> str:
    """Content of the last user message ('' if none)."""
    for msg in reversed(messages):
        if msg.get("role") == "user":
            return str(msg.get("content", ""))
    return ""


def answer_words(messages: list[dict], seed: Any) -> list[str]:
    """The full (uncut) answer as words: digest of the whole history, seed, then the question."""
    history = json.dumps([[m.get("role"), m.get("content")] for m in messages])
    digest = hashlib.sha256(history.encode("utf-8")).hexdigest()[:10]
    n_user = sum(1 for m in messages if m.get("role") == "user")
    return [f"answer{n_user}", f"h{digest}", f"s{seed}", *last_user(messages).split()[:6]]


def answer_for(
    messages: list[dict], seed: Any = None, max_tokens: int | None = None
) -> tuple[str, str]:
    """(content, finish_reason) the server gives for these messages."""
    words = answer_words(messages, seed)
    finish = "length" if "[[length]]" in last_user(messages) else "stop"
    if max_tokens is not None and len(words) > max_tokens:
        words, finish = words[:max_tokens], "length"
    return " ".join(words), finish


@dataclass
class FakeState:
    """Configuration and observations of one fake server (shared with the handler threads)."""

    model: str = "fake-model"
    delay: float = 0.0
    hang_seconds: float = 30.0
    models_status: int = 200
    status_by_text: dict[str, int] = field(default_factory=dict)
    requests: list[dict] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    seen: dict[str, int] = field(default_factory=dict)
    dead: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms stalls
    state: FakeState  # set on the per-server subclass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _send(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client went away (timeout, kill -9): nothing to do
            pass

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        st = self.state
        if self.path == "/v1/models":
            models = {"object": "list", "data": [{"id": st.model, "object": "model"}]}
            self._send(st.models_status, models)
        elif self.path == "/health":
            self._send(200, {"status": "ok"})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.path != "/v1/chat/completions":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        st = self.state
        if st.dead:  # crashed: drop the connection without an answer
            self.close_connection = True
            return
        with st.lock:
            st.requests.append(body)
            st.in_flight += 1
            st.max_in_flight = max(st.max_in_flight, st.in_flight)
        try:
            status, obj = self._chat(body)
        finally:
            with st.lock:
                st.in_flight -= 1
        self._send(status, obj)

    def _forced_status(self, messages: list[dict]) -> int | None:
        """HTTP status forced by a marker or by `status_by_text`, if any."""
        st = self.state
        text = last_user(messages)
        for needle, status in st.status_by_text.items():
            if needle in text:
                return status
        mark = MARK_STATUS.search(text)
        if mark is None:
            return None
        if mark.group(2) is None:
            return int(mark.group(1))
        return int(mark.group(1)) if self._nth("status", messages) <= int(mark.group(2)) else None

    def _nth(self, kind: str, messages: list[dict]) -> int:
        """How many requests with these messages asked for a `kind` marker so far (this one too)."""
        st = self.state
        key = kind + json.dumps(messages, sort_keys=True)
        with st.lock:
            st.seen[key] = st.seen.get(key, 0) + 1
            return st.seen[key]

    def _empty_content(self, messages: list[dict]) -> tuple[bool, str | None]:
        """(answer empty?, which empty content: "" or None) forced by `[[empty]]`/`[[null]]`."""
        mark = MARK_EMPTY.search(last_user(messages))
        if mark is None:
            return False, None
        content = "" if mark.group(1) == "empty" else None
        if mark.group(2) is None:
            return True, content
        return self._nth("empty", messages) <= int(mark.group(2)), content

    def _chat(self, body: dict) -> tuple[int, dict]:
        st = self.state
        messages = body.get("messages") or []
        if st.delay:
            st.stop.wait(st.delay)
        if "[[hang]]" in last_user(messages):
            st.stop.wait(st.hang_seconds)
        status = self._forced_status(messages)
        if status is not None:
            return status, {"error": {"code": status, "message": f"forced status {status}"}}
        content, finish = answer_for(messages, body.get("seed"), body.get("max_tokens"))
        empty, empty_content = self._empty_content(messages)
        if empty:
            content = empty_content
        return 200, {
            "id": f"chatcmpl-{time.monotonic_ns()}",
            "object": "chat.completion",
            "model": body.get("model", st.model),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": 1, "completion_tokens": len((content or "").split()),
                      "total_tokens": 1 + len((content or "").split())},
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many clients connect at once in the tests


class FakeOpenAIServer:
    """Start with `with FakeOpenAIServer() as srv:`; `srv.url` is its base URL."""

    def __init__(self, port: int = 0, **state: Any) -> None:
        self.state = FakeState(**state)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = _Server(("127.0.0.1", port), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> FakeOpenAIServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.state.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def crash(self) -> None:
        """Die mid-run: open connections get no answer, new ones are refused."""
        self.state.dead = True
        self.stop()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def refused_url() -> str:
    """A loopback URL with nothing listening (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--model", default="fake-model")
    args = parser.parse_args()
    server = FakeOpenAIServer(args.port, delay=args.delay, model=args.model)
    print(f"fake OpenAI server at {server.url}", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        server.httpd.server_close()


if __name__ == "__main__":
    main()
