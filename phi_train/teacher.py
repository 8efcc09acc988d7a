"""The project's one client for OpenAI-compatible chat endpoints (teacher LLMs).

phi-1 used GPT-4 to rate code (§2.1) and GPT-3.5 to write textbooks and exercises (§2.2); every such call in this
project goes through `TeacherClient`: bounded concurrency, a request-rate limit, retries with exponential backoff
and jitter on 429 / 5xx / timeouts / connection errors / unparseable bodies, token and cost accounting, and a disk
cache keyed by a hash of the request so that a rerun never pays twice.

The API key is read from the environment variable *named* in config when the client is built, handed to the
`openai` package and stored nowhere else: it is not an attribute of this object, not part of the cache key, and
never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import sqlite3
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import openai
from tqdm import tqdm

from phi_train.errors import PhiTrainError

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


class TeacherConfigError(PhiTrainError):
    """A misconfigured teacher (missing key variable, bad limits); printed on one line."""


@dataclass
class TeacherConfig:
    """The one teacher config: `annotate.teacher` (codetextbook), `teacher` (synth) and, with its template fields,
    `eval.grader` (grading). Field names are `TeacherClient`'s constructor arguments."""

    where: ClassVar[str] = "teacher"
    """The config path that error messages name."""
    base_url: str | None = "https://api.openai.com/v1"
    """Any OpenAI-compatible endpoint: OpenAI, vLLM, TGI, llama.cpp, or `launch/serve.py`'s http://host:8000/v1."""
    model: str | None = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the key; the key itself is never in config, logs or outputs."""
    max_concurrency: int = 8
    requests_per_minute: float = 500.0
    max_retries: int = 4
    """HTTP retries (429 / 5xx / timeouts / connection errors), with exponential backoff and jitter."""
    timeout_s: float = 60.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 30.0
    price_prompt_per_1k: float = 0.0
    price_completion_per_1k: float = 0.0
    temperature: float = 0.0
    max_tokens: int | None = 8
    """Sent as max_tokens; null sends none (servers that only take max_completion_tokens)."""

    def __post_init__(self) -> None:
        w = self.where
        for ok, msg in (
            (self.max_concurrency >= 1, f"{w}.max_concurrency={self.max_concurrency} must be >= 1"),
            (self.requests_per_minute > 0, f"{w}.requests_per_minute={self.requests_per_minute} must be > 0"),
            (self.max_retries >= 0, f"{w}.max_retries={self.max_retries} must be >= 0"),
            (self.timeout_s > 0, f"{w}.timeout_s={self.timeout_s} must be > 0"),
            (self.temperature >= 0, f"{w}.temperature={self.temperature} must be >= 0"),
            (self.max_tokens is None or self.max_tokens >= 1, f"{w}.max_tokens={self.max_tokens} must be >= 1 or null"),
        ):
            if not ok:
                raise TeacherConfigError(msg)

    def sampling(self) -> dict[str, Any]:
        """The request's sampling fields: temperature, and max_tokens unless it is null."""
        out: dict[str, Any] = {"temperature": self.temperature}
        if self.max_tokens is not None:
            out["max_tokens"] = self.max_tokens
        return out


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Reply:
    text: str | None
    error_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    cached: bool = False


@dataclass
class TeacherStats:
    requests: int = 0
    """Calls to complete_many items."""
    http_requests: int = 0
    """Requests actually sent (retries included)."""
    retries: int = 0
    cached: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"errors": dict(self.errors)}


class _RateLimiter:
    """Spaces request starts at least 60/rpm seconds apart (a smooth limit: bursts are what trigger 429s)."""

    def __init__(self, requests_per_minute: float) -> None:
        self.interval = 60.0 / requests_per_minute
        self.next_at = 0.0
        self.lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self.lock:
            now = time.monotonic()
            delay = self.next_at - now
            self.next_at = max(now, self.next_at) + self.interval
        if delay > 0:
            await asyncio.sleep(delay)


class _ReplyCache:
    """sqlite: request hash -> reply text + usage. Only successful replies are stored (errors may be transient)."""

    def __init__(self, cache_dir: str | Path | None) -> None:
        self.db = None
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(Path(cache_dir) / "teacher_cache.sqlite")
            self.db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, text TEXT, usage TEXT)")
            self.db.commit()

    def get(self, key: str) -> Reply | None:
        if self.db is None:
            return None
        row = self.db.execute("SELECT text, usage FROM replies WHERE key = ?", (key,)).fetchone()
        return Reply(text=row[0], usage=Usage(**json.loads(row[1])), cached=True) if row else None

    def put(self, key: str, reply: Reply) -> None:
        if self.db is not None:
            self.db.execute(
                "INSERT OR REPLACE INTO replies VALUES (?, ?, ?)", (key, reply.text, json.dumps(asdict(reply.usage)))
            )
            self.db.commit()


def request_key(model: str, messages: Messages, sampling: dict[str, Any]) -> str:
    """What determines a reply: endpoint model, messages, sampling. Not the key, not the URL's credentials."""
    blob = json.dumps({"model": model, "messages": messages, "sampling": sampling}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _error_reason(exc: Exception) -> tuple[str, bool, float | None]:
    """(reason, retryable, server-suggested delay)."""
    if isinstance(exc, openai.RateLimitError):
        after = exc.response.headers.get("retry-after") if exc.response is not None else None
        try:
            return "rate_limited", True, float(after) if after else None
        except ValueError:
            return "rate_limited", True, None
    if isinstance(exc, openai.APITimeoutError):
        return "timeout", True, None
    if isinstance(exc, openai.APIConnectionError):
        return "connection_error", True, None
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        return f"http_{code}", code >= 500 or code in (408, 409), None
    if isinstance(exc, (openai.APIResponseValidationError, json.JSONDecodeError, ValueError, KeyError, TypeError)):
        return "bad_response", True, None
    return f"error_{type(exc).__name__}", False, None


class TeacherClient:
    """Async client for `/chat/completions` of any OpenAI-compatible server (OpenAI, vLLM, TGI, llama.cpp...)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 8,
        requests_per_minute: float = 500.0,
        max_retries: int = 4,
        timeout_s: float = 60.0,
        cache_dir: str | Path | None = None,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 30.0,
        price_prompt_per_1k: float = 0.0,
        price_completion_per_1k: float = 0.0,
        progress: bool = False,
    ) -> None:
        if not os.environ.get(api_key_env):
            raise TeacherConfigError(
                f"teacher: environment variable {api_key_env} is not set; export it (the key is read from the "
                f"environment only) or set teacher.api_key_env to the variable that holds it"
            )
        if max_concurrency < 1 or requests_per_minute <= 0 or max_retries < 0 or timeout_s <= 0:
            raise TeacherConfigError(
                f"teacher: max_concurrency={max_concurrency} (>=1), requests_per_minute={requests_per_minute} (>0), "
                f"max_retries={max_retries} (>=0), timeout_s={timeout_s} (>0) out of range"
            )
        self.base_url, self.model, self.api_key_env = base_url, model, api_key_env
        self.max_concurrency, self.requests_per_minute = max_concurrency, requests_per_minute
        self.max_retries, self.timeout_s = max_retries, timeout_s
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.price_prompt_per_1k, self.price_completion_per_1k = price_prompt_per_1k, price_completion_per_1k
        self.progress = progress
        self.cache = _ReplyCache(cache_dir)
        self.stats = TeacherStats()

    @classmethod
    def from_config(cls, t, cache_dir: str | Path | None, progress: bool = False, **overrides) -> TeacherClient:
        """A client from a `TeacherConfig` (or the grader's, which extends it); `overrides` replace its fields."""
        import inspect

        names = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "cache_dir", "progress")]
        kwargs = {n: getattr(t, n) for n in names if hasattr(t, n)}
        return cls(**{**kwargs, **overrides}, cache_dir=cache_dir, progress=progress)

    def __repr__(self) -> str:
        return f"TeacherClient(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def _make_openai(self) -> openai.AsyncOpenAI:
        # Retries are ours (with accounting and jitter), so the library's own are off.
        return openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=os.environ[self.api_key_env],
            max_retries=0,
            timeout=self.timeout_s,
        )

    def _backoff(self, attempt: int, suggested: float | None) -> float:
        base = min(self.backoff_max_s, self.backoff_base_s * 2**attempt)
        delay = base * (0.5 + random.random())  # jitter: retries of many workers do not arrive together
        return min(self.backoff_max_s, max(delay, suggested or 0.0))

    async def _one(
        self,
        api: openai.AsyncOpenAI,
        sem: asyncio.Semaphore,
        limiter: _RateLimiter,
        messages: Messages,
        sampling: dict[str, Any],
    ) -> Reply:
        key = request_key(self.model, messages, sampling)
        if (hit := self.cache.get(key)) is not None:
            self.stats.cached += 1
            return hit
        reason = "unknown"
        async with sem:
            for attempt in range(self.max_retries + 1):
                await limiter.wait()
                self.stats.http_requests += 1
                try:
                    resp = await api.chat.completions.create(model=self.model, messages=messages, **sampling)
                    if isinstance(resp, str) or not getattr(resp, "choices", None):
                        raise ValueError("reply has no choices")
                    text = resp.choices[0].message.content
                    if text is None:
                        raise ValueError("reply has no content")
                    u = resp.usage
                    usage = Usage(u.prompt_tokens or 0, u.completion_tokens or 0) if u else Usage()
                    reply = Reply(text=text, usage=usage)
                    self._account(usage)
                    self.cache.put(key, reply)
                    return reply
                except Exception as exc:  # noqa: BLE001 - classified below; unknown errors are not retried
                    reason, retryable, suggested = _error_reason(exc)
                    log.warning("teacher request failed (%s, attempt %d): %s", reason, attempt + 1, str(exc)[:200])
                    if not retryable or attempt == self.max_retries:
                        break
                    self.stats.retries += 1
                    await asyncio.sleep(self._backoff(attempt, suggested))
        self.stats.errors[reason] += 1
        return Reply(text=None, error_reason=reason)

    def _account(self, usage: Usage) -> None:
        self.stats.ok += 1
        self.stats.prompt_tokens += usage.prompt_tokens
        self.stats.completion_tokens += usage.completion_tokens
        self.stats.cost_usd += (
            usage.prompt_tokens * self.price_prompt_per_1k + usage.completion_tokens * self.price_completion_per_1k
        ) / 1000

    async def complete_many(
        self, prompts: list[Messages | str], seeds: list[int] | None = None, **sampling: Any
    ) -> list[Reply]:
        """One reply per prompt (a string is a single user message), in order; failures are `Reply(None, reason)`.

        `seeds`: one `seed` per request (the synth jobs derive it from the item id), so prompts that share sampling
        settings are still sampled independently and reproducibly; it is part of the cache key like any sampling field.
        """
        messages = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
        if seeds is not None and len(seeds) != len(messages):
            raise TeacherConfigError(f"teacher: {len(seeds)} seeds for {len(messages)} prompts (give one per prompt)")
        per_request = [sampling if seeds is None else sampling | {"seed": s} for s in (seeds or [None] * len(messages))]
        self.stats.requests += len(messages)
        sem, limiter = asyncio.Semaphore(self.max_concurrency), _RateLimiter(self.requests_per_minute)
        api = self._make_openai()
        bar = tqdm(total=len(messages), desc="teacher", unit="req", disable=not self.progress)

        async def run(m: Messages, sampling: dict[str, Any]) -> Reply:
            r = await self._one(api, sem, limiter, m, sampling)
            bar.update()
            return r

        try:
            return list(await asyncio.gather(*(run(m, s) for m, s in zip(messages, per_request, strict=True))))
        finally:
            bar.close()
            await api.close()

    def complete_many_sync(
        self, prompts: list[Messages | str], seeds: list[int] | None = None, **sampling: Any
    ) -> list[Reply]:
        """`complete_many` for synchronous code (not from inside a running event loop)."""
        return asyncio.run(self.complete_many(prompts, seeds, **sampling))
