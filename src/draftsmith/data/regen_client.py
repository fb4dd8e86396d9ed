"""HTTP side of `draftsmith data regenerate`: endpoints, request bodies, retries.

Everything here talks to an OpenAI-compatible chat server (llama.cpp `llama-server`, vLLM,
SGLang). The record-level logic (input order, resume, error files) lives in `regenerate.py`.

Error policy of one chat request (`chat_with_retries`):
  * retried with exponential backoff: timeouts, connection/transport errors, HTTP 5xx, the two
    4xx codes that mean "try again later" (408 Request Timeout, 429 Too Many Requests), and an
    empty answer (a chat completion whose `content` is null, empty or only whitespace: nothing to
    train on, so never a success);
  * failed at once: every other 4xx (the request itself is wrong: context too long, bad model
    name, ...) and a 2xx whose body is not a chat completion.
The backoff is `backoff * 2**(attempt-1)` capped at `backoff_max`, stretched by a jitter of up
to 10 % drawn from an RNG seeded with the record id, turn and attempt (deterministic per record).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any

import httpx

from draftsmith.utils.io import InputError

RETRYABLE_4XX = frozenset({408, 429})
RECORD_FIELDS = ("id", "conversations", "finish_reason", "completion_tokens", "sampling")
THINKING_CHOICES = ("default", "on", "off")


class EndpointUnavailable(RuntimeError):
    """An endpoint did not answer the start-up probe (refused, timed out) or has no model to use."""


class RequestFailed(Exception):
    """A chat request that failed for good (after retries, or at once for a 4xx)."""

    def __init__(self, reason: str, attempts: int, status: int | None = None,
                 turn: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts
        self.status = status
        self.turn = turn  # position of the assistant turn in the conversation, when known


class _AttemptError(Exception):
    """One failed attempt; `retryable` says whether another attempt may help."""

    def __init__(self, reason: str, retryable: bool, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.status = status


@dataclass(frozen=True)
class SamplingParams:
    """Generation parameters sent with every chat request; `None`: not sent (server default)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = 2048
    seed: int | None = None
    thinking: str = "default"

    def __post_init__(self) -> None:
        if self.thinking not in THINKING_CHOICES:
            raise ValueError(f"thinking must be one of {THINKING_CHOICES}, got {self.thinking!r}")

    def record(self) -> dict[str, Any]:
        """The `sampling` field written with every output record: exactly what was requested."""
        out: dict[str, Any] = {}
        for key in ("temperature", "top_p", "top_k", "min_p", "max_tokens", "seed"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.thinking != "default":
            out["thinking"] = self.thinking == "on"
        return out

    def body_fields(self, request_seed: int | None) -> dict[str, Any]:
        """Request-body fields; `top_k`/`min_p` are extra fields (vLLM, SGLang, llama.cpp)."""
        body = {k: v for k, v in self.record().items() if k not in ("seed", "thinking")}
        if request_seed is not None:
            body["seed"] = request_seed
        if self.thinking != "default":
            body["chat_template_kwargs"] = {"enable_thinking": self.thinking == "on"}
        return body


@dataclass(frozen=True)
class RetryPolicy:
    """How long one request may take and how often it is retried."""

    retries: int = 3
    timeout: float = 600.0
    backoff: float = 1.0
    backoff_max: float = 30.0

    def delay(self, attempt: int, key: str) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        base = min(self.backoff * (2 ** (attempt - 1)), self.backoff_max)
        jitter = random.Random(f"{key}|{attempt}").random() * 0.1
        return base * (1.0 + jitter)


@dataclass
class Endpoint:
    """One chat server: the URL as given, its `/v1` base and root, the model and its slot cap."""

    url: str
    api_base: str
    root: str
    model: str | None = None
    slots: asyncio.Semaphore | None = field(default=None, repr=False)

    @property
    def chat_url(self) -> str:
        """The chat completions URL of this endpoint."""
        return f"{self.api_base}/chat/completions"


@dataclass(frozen=True)
class TurnResult:
    """One generated assistant turn."""

    content: str
    finish_reason: str
    completion_tokens: int | None
    reasoning: str | None = None


def split_endpoint(url: str) -> tuple[str, str]:
    """Return (api_base ending in /v1, server root) for `http://h:p` or `http://h:p/v1`."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise InputError(f"endpoint {url!r}: expected an http:// or https:// URL")
    if url.endswith("/v1"):
        return url, url[: -len("/v1")]
    return f"{url}/v1", url


def derive_seed(base: int, record_id: str, position: int) -> int:
    """Per-request seed from the run seed, the record id and the turn position.

    Sending one seed with every request would replay the same random stream in every answer
    (correlated samples); deriving it keeps answers independent yet reproducible across runs,
    resumes and endpoint assignment.
    """
    text = f"{base}\x00{record_id}\x00{position}".encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=4).digest(), "big") & 0x7FFFFFFF


async def _probe_one(client: httpx.AsyncClient, ep: Endpoint, timeout: float) -> str | None:
    """Fill `ep.model` from GET /v1/models (or check /health); return why it is unusable."""
    failures = []
    for url in (f"{ep.api_base}/models", f"{ep.root}/health"):
        try:
            resp = await client.get(url, timeout=timeout)
        except httpx.TimeoutException:
            failures.append(f"GET {url}: no answer within {timeout:g} s")
            continue
        except httpx.TransportError as e:
            failures.append(f"GET {url}: {type(e).__name__}: {e}")
            continue
        if url.endswith("/models") and resp.status_code == 200:
            ids = _model_ids(resp)
            if ids and ep.model is None:
                ep.model = ids[0]
        if ep.model is not None:
            return None
        if resp.status_code < 500 or url.endswith("/health"):
            return f"answers (HTTP {resp.status_code} at {url}) but lists no model: pass --model"
        failures.append(f"GET {url}: HTTP {resp.status_code}")
    return "; ".join(failures)


def _model_ids(resp: httpx.Response) -> list[str]:
    """Model ids of a /v1/models answer (empty when it is not one)."""
    try:
        data = resp.json().get("data", [])
        return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
    except (ValueError, AttributeError):
        return []


async def probe_endpoints(
    client: httpx.AsyncClient, urls: list[str], model: str | None, timeout: float = 10.0
) -> list[Endpoint]:
    """Probe every endpoint; raise EndpointUnavailable naming each one that does not answer."""
    if not urls:
        raise EndpointUnavailable("no endpoint given")
    endpoints = []
    for url in urls:
        api_base, root = split_endpoint(url)
        endpoints.append(Endpoint(url=url, api_base=api_base, root=root, model=model))
    problems = await asyncio.gather(*(_probe_one(client, ep, timeout) for ep in endpoints))
    bad = [f"endpoint {ep.url}: {why}" for ep, why in zip(endpoints, problems) if why]
    if bad:
        raise EndpointUnavailable("; ".join(bad))
    return endpoints


def parse_chat_response(data: Any) -> TurnResult:
    """Extract the first choice of a chat completion; ValueError when it is not one."""
    try:
        choice = data["choices"][0]
        message = choice["message"]
        finish = choice["finish_reason"]
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"not a chat completion (missing {e})") from None
    content = message.get("content") or ""
    if not isinstance(content, str) or not isinstance(finish, str):
        raise ValueError("not a chat completion (content or finish_reason is not a string)")
    usage = data.get("usage") if isinstance(data, dict) else None
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    reasoning = message.get("reasoning_content")
    return TurnResult(
        content=content,
        finish_reason=finish,
        completion_tokens=tokens if isinstance(tokens, int) else None,
        reasoning=reasoning if isinstance(reasoning, str) and reasoning else None,
    )


async def post_chat(
    client: httpx.AsyncClient, ep: Endpoint, body: dict, timeout: float
) -> TurnResult:
    """One attempt; raises _AttemptError classified as retryable or not."""
    try:
        resp = await client.post(ep.chat_url, json=body, timeout=timeout)
    except httpx.TimeoutException as e:
        raise _AttemptError(f"timeout after {timeout:g} s ({type(e).__name__})", True) from None
    except httpx.TransportError as e:
        raise _AttemptError(f"connection error: {type(e).__name__}: {e}", True) from None
    if resp.status_code >= 400:
        snippet = " ".join(resp.text.split())[:200]
        retryable = resp.status_code >= 500 or resp.status_code in RETRYABLE_4XX
        raise _AttemptError(f"HTTP {resp.status_code}: {snippet}", retryable, resp.status_code)
    try:
        result = parse_chat_response(resp.json())
    except (ValueError, json.JSONDecodeError) as e:
        raise _AttemptError(f"bad response from {ep.url}: {e}", False, resp.status_code) from None
    if not result.content.strip():
        raise _AttemptError(f"empty answer (content null, empty or blank; finish_reason"
                            f" {result.finish_reason!r})", True, resp.status_code)
    return result


async def chat_with_retries(
    client: httpx.AsyncClient, ep: Endpoint, body: dict, policy: RetryPolicy, key: str
) -> tuple[TurnResult, int]:
    """Send `body` to `ep` under its slot cap, retrying per `policy`. Return (result, attempts)."""
    assert ep.slots is not None, "endpoint slots are set up by the caller"
    attempt = 0
    while True:
        attempt += 1
        async with ep.slots:
            try:
                return await post_chat(client, ep, body, policy.timeout), attempt
            except _AttemptError as e:
                error = e
        if not error.retryable or attempt > policy.retries:
            raise RequestFailed(error.reason, attempt, error.status)
        await asyncio.sleep(policy.delay(attempt, key))


# --------------------------------------------------------------------------- one conversation


@dataclass
class RunContext:
    """What every conversation needs: the HTTP client and the run's parameters."""

    client: httpx.AsyncClient
    params: SamplingParams
    policy: RetryPolicy
    prompt_cache: bool = True


def request_body(ctx: RunContext, ep: Endpoint, history: list[dict], rec_id: str, pos: int) -> dict:
    """Chat request for the assistant turn at conversation position `pos`."""
    seed = None if ctx.params.seed is None else derive_seed(ctx.params.seed, rec_id, pos)
    body: dict[str, Any] = {"messages": history, "stream": False}
    if ep.model is not None:
        body["model"] = ep.model
    body.update(ctx.params.body_fields(seed))
    if not ctx.prompt_cache:
        body["cache_prompt"] = False
    return body


def _assistant_message(result: TurnResult) -> dict:
    """The output message of one regenerated turn."""
    message = {"role": "assistant", "content": result.content}
    if result.reasoning is not None:
        message["reasoning_content"] = result.reasoning
    message["finish_reason"] = result.finish_reason
    return message


async def regenerate_conversation(ctx: RunContext, ep: Endpoint, obj: dict) -> dict:
    """Regenerate every assistant turn of a (validated) record on its regenerated history.

    A conversation ending with a user (or system) turn gets an answer for it. Returns the
    output record; raises RequestFailed (with `turn` set) when one of its requests fails.
    Later turns see the earlier answers' `content` only (a split-off `reasoning_content` is
    kept in the record but not sent back, as chat templates drop past reasoning).
    """
    rec_id = obj["id"]
    conv = list(obj["conversations"])
    if conv[-1]["role"] != "assistant":
        conv.append({"role": "assistant", "content": ""})
    messages: list[dict] = []
    tokens: int | None = 0
    for pos, msg in enumerate(conv):
        if msg["role"] != "assistant":
            messages.append(dict(msg))
            continue
        history = [{"role": m["role"], "content": m["content"]} for m in messages]
        body = request_body(ctx, ep, history, rec_id, pos)
        try:
            result, _ = await chat_with_retries(ctx.client, ep, body, ctx.policy, f"{rec_id}|{pos}")
        except RequestFailed as e:
            e.turn = pos
            raise
        messages.append(_assistant_message(result))
        if tokens is not None and result.completion_tokens is not None:
            tokens += result.completion_tokens
        else:
            tokens = None
    record: dict[str, Any] = {"id": rec_id}
    record.update({k: v for k, v in obj.items() if k not in RECORD_FIELDS})
    record.update(conversations=messages, finish_reason=messages[-1]["finish_reason"],
                  completion_tokens=tokens, sampling=ctx.params.record())
    return record
