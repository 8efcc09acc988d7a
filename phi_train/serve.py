"""Serve a phi_train checkpoint behind an OpenAI-compatible HTTP API (so our own model can be a teacher).

python launch/serve.py checkpoint=DIR [host=127.0.0.1 port=8000 max_batch=16 batch_wait_ms=10]   (`ServeConfig`)

The HTTP stack is FastAPI (Starlette) on uvicorn; request bodies are validated by pydantic models that mirror
OpenAI's. Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /v1/models/{id},
GET /health (counters: requests, batches, generate calls, largest batch, errors, cancelled). Any OpenAI client works
(`openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")`); the key is not checked, so bind to
127.0.0.1 (the default) unless the network is trusted.

OpenAI semantics kept (every error is `{"error": {"message", "type", "param", "code"}}`, never HTML):
  * an unknown `model` is 404 `model_not_found`; a missing or malformed field, an unknown field, a body that is not
    UTF-8 or not JSON, NaN / Infinity / a number that overflows (1e400) are 400 naming the parameter;
  * parameters the server cannot honour are refused, never ignored: `logprobs`, `top_logprobs`, `suffix`, non-zero
    penalties, a non-empty `logit_bias`, `best_of` other than `n`; `echo` and `n` (up to `max_choices` choices per
    request) are supported;
  * `finish_reason` is "length" when max_tokens or the model's context ended the choice, "stop" for EOS or a stop
    string;
  * a fault while generating is 500 `server_error` (a bug of ours, not the client's);
  * bodies larger than `max_request_mb` are 413; a body that does not arrive within `read_timeout_s` (a
    Content-Length larger than what is sent, a stalled chunked upload) is 408; chunked bodies are read as any other.

Seeds: each choice samples from its own generator. With `seed` in the request, choice k uses `row_seed(seed, k)`
(reproducible: the same request gives the same choices, whatever else shares the batch); without one, a fresh random
seed per request, as OpenAI does, so a prompt sent three times gets three samples.

Batching: every request goes to one queue; one worker thread takes the first waiting request, waits up to
batch_wait_ms for more (up to max_batch), groups them by sampling parameters (max_tokens, temperature, top_p, stop;
not seed, which is per row) and makes one `phi_train.generate.generate` call per group. Greedy output is what
`generate()` returns in-process.

Abandoned requests: a client that hangs up (streaming or not) has its choices cancelled: still queued, they are
skipped; generating, they stop at their next token, so dropped requests do not delay the next ones.

Chat template (plain text, what a base model continues naturally): each message becomes "<Role>: <content>\\n\\n"
with Role one of System, User, Assistant, then "Assistant:" is appended; "\\nUser:" and "\\nSystem:" are added to the
stop strings so the model does not write the next turn itself.

`stream: true` sends server-sent events as the tokens are generated (generate()'s `on_text`): content chunks whose
concatenation is exactly the non-streamed text (text that could still turn into a stop string, or an unfinished
UTF-8 character, waits for the next token), then one chunk per choice with finish_reason, then, with
`stream_options: {"include_usage": true}`, a chunk with no choices and the usage, then `data: [DONE]`. A request that
fails after the headers went out gets an `{"error": ...}` event instead.
Usage: prompt_tokens counts each prompt once, as the model saw it (its last tokens, when it exceeds the context
budget); completion_tokens counts the tokens of the returned texts (after stop strings are cut).

The same exported model (launch/export.py writes a transformers `PhiForCausalLM`) is servable by vLLM:
`vllm serve EXPORT_DIR --served-model-name phi-train` (the export holds the tokenizer); the synth jobs talk to either.
"""

from __future__ import annotations

import asyncio
import json
import math
import queue
import secrets
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

# fastapi reads the endpoints' annotations (`request: Request`) by name: these imports must be module-level
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from omegaconf import MISSING
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException

from phi_train.cli import hydra_command
from phi_train.errors import PhiTrainError

CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = ("\nUser:", "\nSystem:")


class RequestError(PhiTrainError):
    """A request the server answers with an OpenAI-shaped error (status, message naming `param`), or a bad setting."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def payload(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


# --- request models (OpenAI's fields; unknown fields are refused, not ignored) ---------------------------------------

Number = StrictFloat | StrictInt  # JSON 1 and 1.0 are both numbers; "1" and true are not


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    n: StrictInt = Field(1, ge=1)
    stream: StrictBool | None = False
    stream_options: dict[str, StrictBool] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Number] | None = None
    user: StrictStr | None = None
    """Accepted (OpenAI's end-user id for abuse monitoring); it changes nothing here."""


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictStr]
    echo: StrictBool | None = False
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None


def _refuse_unsupported(req: _Request) -> None:
    """Parameters that would change the answer but that this server cannot honour: a 400 naming them."""
    unsupported = [
        ("logprobs", getattr(req, "logprobs", None) not in (None, False)),
        ("top_logprobs", getattr(req, "top_logprobs", None) is not None),
        ("suffix", getattr(req, "suffix", None) is not None),
        ("presence_penalty", bool(req.presence_penalty)),
        ("frequency_penalty", bool(req.frequency_penalty)),
        ("logit_bias", bool(req.logit_bias)),
        ("best_of", getattr(req, "best_of", None) not in (None, req.n)),
    ]
    for name, given in unsupported:
        if given:
            raise RequestError(f"'{name}' is not supported by this server; remove it", param=name,
                               code="unsupported_parameter")  # fmt: skip


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "list[", "constrained-"))]
    # a union reports one error per member; the member names (str, list[str]) are not the client's business
    param = ".".join(x for x in loc if x not in ("str", "int", "float", "bool", "list", "dict", "TextPart"))
    param = param or None
    if err["type"] == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if err["type"] == "missing":
        return f"'{param}' is a required property", param
    return f"Invalid value for '{param}': {err['msg']} (got {err.get('input')!r:.80})", param


def parse_body(raw: bytes, schema: type[_Request]) -> _Request:
    """The validated request, or RequestError: strict UTF-8, strict JSON (no NaN/Infinity), finite numbers."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"the request body is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise RequestError("the request body is empty; send a JSON object")

    def refuse(name: str):
        raise RequestError(f"the request body is not JSON: {name} is not a JSON number")

    try:
        obj = json.loads(text, parse_constant=refuse)
    except json.JSONDecodeError as exc:
        raise RequestError(f"the request body is not JSON: {exc}") from None
    except RecursionError:
        raise RequestError("the request body is nested too deeply") from None
    if not isinstance(obj, dict):
        raise RequestError("the request body must be a JSON object")
    for key, value in obj.items():  # 1e400 parses to inf: a number out of range, named before pydantic sees it
        if isinstance(value, float) and not math.isfinite(value):
            raise RequestError(f"Invalid value for '{key}': {value} is out of range", param=key)
    try:
        req = schema.model_validate(obj)
    except ValidationError as exc:
        msg, param = _validation_message(exc)
        raise RequestError(msg, param=param) from None
    _refuse_unsupported(req)
    return req


def render_chat(messages: list[Message]) -> str:
    """The plain-text chat template (module docstring); "developer" is OpenAI's newer name for "system"."""
    parts = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        parts.append(f"{CHAT_ROLES['system' if m.role == 'developer' else m.role]}: {content}\n\n")
    return "".join(parts) + "Assistant:"


# --- the batcher ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """What must be equal for requests to share one generate() call (the seed is per row)."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]


@dataclass
class Job:
    """One choice: a prompt, its sampling and seed; the batcher fills text and finish (or error)."""

    prompt: str
    sampling: Sampling
    seed: int
    sink: Callable[[str | None], None] | None = None
    """Streaming: called (from the batcher thread) with each text delta, then with None once the job is done."""
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set when the client hung up: a queued job is skipped, a running one stops at its next token."""
    text: str | None = None
    finish: str = "length"
    error: str | None = None


class Batcher:
    """One worker thread: collects queued jobs for `wait_s` (up to `max_batch`), one generate() per sampling group."""

    def __init__(self, model, tokenizer, max_batch: int, wait_s: float) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.wait_s = max_batch, wait_s
        self.queue: queue.Queue[Job] = queue.Queue()
        self.lock = threading.Lock()
        self.counters = {"requests": 0, "batches": 0, "generate_calls": 0, "largest_batch": 0, "errors": 0,
                         "cancelled": 0}  # fmt: skip
        threading.Thread(target=self._loop, daemon=True, name="batcher").start()

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counters[key] += n

    def submit(self, jobs: list[Job]) -> list[Job]:
        for job in jobs:
            self.queue.put(job)
        return jobs

    def _collect(self) -> list[Job]:
        jobs = [self.queue.get()]
        deadline = time.monotonic() + self.wait_s
        while len(jobs) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                jobs.append(self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        return jobs

    @staticmethod
    def _finish(job: Job) -> None:
        if job.sink is not None:
            job.sink(None)
        job.future.set_result(None)

    def _loop(self) -> None:
        while True:
            jobs = self._collect()
            live = []
            for j in jobs:  # hung up while queued: no token is spent on it
                if j.cancelled.is_set():
                    j.finish = "cancelled"
                    self.count("cancelled")
                    self._finish(j)
                else:
                    live.append(j)
            if not live:
                continue
            groups: dict[Sampling, list[Job]] = {}
            for j in live:
                groups.setdefault(j.sampling, []).append(j)
            with self.lock:
                self.counters["batches"] += 1
                self.counters["largest_batch"] = max(self.counters["largest_batch"], len(live))
            for s, group in groups.items():
                self._run_group(s, group)

    def _run_group(self, s: Sampling, group: list[Job]) -> None:
        from phi_train.generate import generate

        def on_finish(i: int, reason: str) -> None:
            group[i].finish = reason

        try:
            texts = generate(
                self.model,
                self.tokenizer,
                [j.prompt for j in group],
                max_new_tokens=s.max_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
                stop=s.stop,
                seeds=[j.seed for j in group],
                batch_size=self.max_batch,
                on_text=self._stream_to(group) if any(j.sink for j in group) else None,
                cancelled=lambda i: group[i].cancelled.is_set(),
                on_finish=on_finish,
            )
            for j, t in zip(group, texts, strict=True):
                j.text = t
        except Exception as exc:  # noqa: BLE001 - reported to each waiting client as a 500, the worker lives on
            self.count("errors")
            for j in group:
                j.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'generation failed'}"
        self.count("generate_calls")
        self.count("cancelled", sum(j.finish == "cancelled" for j in group))
        for j in group:
            self._finish(j)

    @staticmethod
    def _stream_to(group: list[Job]):
        def on_text(index: int, delta: str) -> None:
            if group[index].sink is not None:
                group[index].sink(delta)

        return on_text


# --- the OpenAI semantics ---------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A validated request turned into jobs: choice k of prompt p is jobs[p * n + k] (OpenAI's index order)."""

    chat: bool
    prompts: list[str]
    n: int
    sampling: Sampling
    seeds: list[int]
    echo: bool
    include_usage: bool


class Server:
    def __init__(self, model, tokenizer, name: str, max_batch: int, wait_s: float, max_choices: int = 64) -> None:
        from phi_train.generate import prompt_budget

        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.batcher = Batcher(model, tokenizer, max_batch, wait_s)
        self.max_seq_len = model.cfg.max_seq_len
        self.prompt_budget = prompt_budget
        self.max_choices = max_choices
        self.created = int(time.time())

    def check_model(self, name: str) -> None:
        if name != self.name:
            raise RequestError(f"The model '{name}' does not exist; this server serves '{self.name}'", status=404,
                               param="model", code="model_not_found")  # fmt: skip

    def prepare(self, req: _Request) -> Prepared:
        from phi_train.generate import row_seed

        self.check_model(req.model)
        chat = isinstance(req, ChatRequest)
        if chat:
            prompts, extra_stop = [render_chat(req.messages)], CHAT_STOP
            max_tokens = req.max_completion_tokens or req.max_tokens or self.max_seq_len // 2
        else:
            prompts, extra_stop = [req.prompt] if isinstance(req.prompt, str) else req.prompt, ()
            if not prompts:
                raise RequestError("'prompt' must be a string or a non-empty list of strings", param="prompt")
            max_tokens = req.max_tokens or 16  # OpenAI's completions default
        if max_tokens > self.max_seq_len:
            raise RequestError(f"'max_tokens'={max_tokens} exceeds the model's context of {self.max_seq_len} tokens",
                               param="max_tokens")  # fmt: skip
        if len(prompts) * req.n > self.max_choices:
            raise RequestError(f"{len(prompts)} prompts x n={req.n} choices exceeds this server's limit of "
                               f"{self.max_choices} choices per request", param="n")  # fmt: skip
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise RequestError("'stop' must be a string or a list of at most 4 strings", param="stop")
        temperature = 1.0 if req.temperature is None else float(req.temperature)
        top_p = 1.0 if req.top_p is None else float(req.top_p)
        sampling = Sampling(max_tokens, temperature, top_p, tuple(stop) + extra_stop)
        # no seed: a fresh one per request (OpenAI's behaviour); a seed: its choices are reproducible streams
        base = secrets.randbits(63) if req.seed is None else req.seed & ((1 << 63) - 1)
        seeds = [row_seed(base, k) for k in range(len(prompts) * req.n)]
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return Prepared(chat, prompts, req.n, sampling, seeds, bool(getattr(req, "echo", False)), include_usage)

    def submit(self, p: Prepared, sinks: list | None = None) -> list[Job]:
        jobs = [
            Job(prompt, p.sampling, p.seeds[i * p.n + k], sink=sinks[i * p.n + k] if sinks else None)
            for i, prompt in enumerate(p.prompts)
            for k in range(p.n)
        ]
        self.batcher.count("requests")
        return self.batcher.submit(jobs)

    def usage(self, p: Prepared, jobs: list[Job]) -> dict[str, int]:
        budget = self.prompt_budget(self.max_seq_len, p.sampling.max_tokens)
        prompt = sum(min(len(self.tokenizer.encode(x)) or 1, budget) for x in p.prompts)
        completion = sum(len(self.tokenizer.encode(j.text)) if j.text else 0 for j in jobs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def reply(self, p: Prepared, jobs: list[Job]) -> dict:
        """The non-streamed body of finished jobs (RequestError 500 when generation failed)."""
        failed = next((j.error for j in jobs if j.error), None)
        if failed:
            raise RequestError(f"generation failed: {failed}", status=500, kind="server_error")
        choices = []
        for i, j in enumerate(jobs):
            if p.chat:
                msg = {"role": "assistant", "content": (j.text or "").strip()}
                choices.append({"index": i, "message": msg, "logprobs": None, "finish_reason": j.finish})
            else:
                text = (p.prompts[i // p.n] if p.echo else "") + (j.text or "")
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": j.finish})
        obj, prefix = ("chat.completion", "chatcmpl") if p.chat else ("text_completion", "cmpl")
        return self._envelope(obj, prefix, choices) | {"usage": self.usage(p, jobs)}

    async def stream(self, p: Prepared) -> AsyncIterator[str]:
        """Submit now; yield the SSE lines as the batcher produces text. Closing the iterator (the client hung up)
        cancels the request's jobs."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()
        count = len(p.prompts) * p.n
        sinks = [lambda d, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, d)) for i in range(count)]
        jobs = self.submit(p, sinks)
        return self._sse(p, jobs, events)

    async def _sse(self, p: Prepared, jobs: list[Job], events: asyncio.Queue) -> AsyncIterator[str]:
        obj, prefix = ("chat.completion.chunk", "chatcmpl") if p.chat else ("text_completion", "cmpl")
        base = self._envelope(obj, prefix, [])

        def chunk(index: int, text: str | None, finish: str | None = None, first: bool = False) -> str:
            if p.chat:
                delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps(base | {'choices': [choice]})}\n\n"

        try:
            raw = [""] * len(jobs)  # what generate streamed so far, per choice
            sent = [""] * len(jobs)  # what went out (chat: stripped, as the non-streamed content is)
            for i in range(len(jobs)):
                if p.chat:
                    yield chunk(i, "", first=True)
                elif p.echo:
                    yield chunk(i, p.prompts[i // p.n])
            open_jobs = set(range(len(jobs)))
            while open_jobs:
                i, delta = await events.get()
                if delta is None:
                    open_jobs.discard(i)
                    continue
                raw[i] += delta
                # chat content is text.strip(): leading whitespace never goes out, trailing waits for what follows
                visible = raw[i].strip() if p.chat else raw[i]
                if len(visible) > len(sent[i]) and visible.startswith(sent[i]):
                    yield chunk(i, visible[len(sent[i]) :])
                    sent[i] = visible
            failed = next((j.error for j in jobs if j.error), None)
            if failed:
                err = RequestError(f"generation failed: {failed}", status=500, kind="server_error")
                yield f"data: {json.dumps(err.payload())}\n\n"
                return
            for i, j in enumerate(jobs):
                text = (j.text or "").strip() if p.chat else j.text or ""
                if text != sent[i] and text.startswith(sent[i]):
                    yield chunk(i, text[len(sent[i]) :])
                yield chunk(i, None if p.chat else "", j.finish)
            if p.include_usage:  # OpenAI's stream_options.include_usage: one more chunk, no choices, the usage
                yield f"data: {json.dumps(base | {'choices': [], 'usage': self.usage(p, jobs)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when closed early (the client hung up): stop generating for it
            for j in jobs:
                j.cancelled.set()

    def _envelope(self, obj: str, prefix: str, choices: list) -> dict:
        return {
            "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
            "object": obj,
            "created": int(time.time()),
            "model": self.name,
            "choices": choices,
        }

    def health(self) -> dict:
        with self.batcher.lock:
            return {"status": "ok", "model": self.name, **self.batcher.counters}

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "phi-train"}


# --- HTTP ------------------------------------------------------------------------------------------------------------


async def read_body(request, limit_bytes: int, timeout_s: float) -> bytes:
    """The whole body (chunked or not), at most `limit_bytes` (else 413), within `timeout_s` (else 408)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit_bytes:
        raise RequestError(f"the request body is {declared} bytes; the limit is {limit_bytes}", status=413)
    parts: list[bytes] = []
    size = 0

    async def gather() -> None:
        nonlocal size
        async for part in request.stream():
            size += len(part)
            if size > limit_bytes:
                raise RequestError(f"the request body exceeds the limit of {limit_bytes} bytes", status=413)
            parts.append(part)

    try:
        await asyncio.wait_for(gather(), timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(f"the request body did not arrive within {timeout_s:g} s", status=408) from None
    return b"".join(parts)


async def _until_disconnect(request) -> None:
    """Returns when the client hangs up (the body is read already, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def make_app(server: Server, max_request_bytes: int = 4 << 20, read_timeout_s: float = 10.0):
    """The FastAPI app over `server`; every error, routing ones included, is OpenAI-shaped JSON."""
    app = FastAPI(title="phi-train", docs_url=None, redoc_url=None, openapi_url=None)

    def error(exc: RequestError) -> JSONResponse:
        headers = {"Connection": "close"} if exc.status in (408, 413) else None  # the rest of the body is not read
        return JSONResponse(exc.payload(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestError)
    async def on_request_error(_request: Request, exc: RequestError) -> JSONResponse:
        return error(exc)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        msg = f"no route {request.method} {request.url.path}; try POST /v1/completions, POST /v1/chat/completions, " \
              "GET /v1/models, GET /health" if exc.status_code in (404, 405) else str(exc.detail)  # fmt: skip
        return error(RequestError(msg, status=exc.status_code))

    @app.exception_handler(Exception)
    async def on_fault(_request: Request, exc: Exception) -> JSONResponse:
        server.batcher.count("errors")
        return error(RequestError(f"internal error: {type(exc).__name__}", status=500, kind="server_error"))

    async def complete(request: Request, schema: type[_Request]):
        raw = await read_body(request, max_request_bytes, read_timeout_s)
        req = parse_body(raw, schema)
        p = server.prepare(req)
        if req.stream:
            return StreamingResponse(await server.stream(p), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        jobs = server.submit(p)
        done = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs)))
        gone = asyncio.ensure_future(_until_disconnect(request))
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not done.done():  # the client hung up: its choices stop at their next token (or never start)
            for j in jobs:
                j.cancelled.set()
            await done
            return JSONResponse({"error": {"message": "client closed the request", "type": "cancelled"}}, 499)
        gone.cancel()
        return JSONResponse(server.reply(p, jobs))

    @app.post("/v1/completions")
    @app.post("/completions")
    async def completions(request: Request):
        return await complete(request, CompletionRequest)

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat(request: Request):
        return await complete(request, ChatRequest)

    @app.get("/v1/models")
    @app.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    @app.get("/models/{model_id:path}")
    async def retrieve(model_id: str) -> dict:
        server.check_model(model_id)
        return server.model_card()

    @app.get("/health")
    @app.get("/metrics")
    async def health() -> dict:
        return server.health()

    return app


def load_test(url: str, model: str, concurrency: int = 64, requests: int = 256, max_tokens: int = 32,
              prompts: tuple[str, ...] = ("def ", "import ", "class ", "for i in ")) -> dict:  # fmt: skip
    """Requests/s, completion tokens/s and p50/p95 latency of `requests` sampled completions sent `concurrency` at a
    time through the official async openai client (what docs/benchmarks.md quotes)."""
    import openai

    async def go() -> dict:
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        sem = asyncio.Semaphore(concurrency)
        latencies: list[float] = []
        tokens = 0

        async def one(i: int) -> None:
            nonlocal tokens
            async with sem:
                t = time.perf_counter()
                r = await client.completions.create(model=model, prompt=prompts[i % len(prompts)],
                                                    max_tokens=max_tokens, temperature=0.8)  # fmt: skip
                latencies.append(time.perf_counter() - t)
                tokens += r.usage.completion_tokens

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - t0
        await client.close()
        lat = sorted(latencies)
        return {
            "concurrency": concurrency,
            "requests": requests,
            "requests_per_s": requests / wall,
            "completion_tokens_per_s": tokens / wall,
            "p50_s": lat[len(lat) // 2],
            "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
        }

    return asyncio.run(go())


DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class ServeConfig:
    """`launch/serve.py` (defaults <- `key=value` overrides)."""

    checkpoint: str = MISSING
    """Checkpoint dir (or tag dir), or an exported transformers dir."""
    tag: str | None = None
    """Checkpoint tag (null: latest)."""
    host: str = "127.0.0.1"
    port: int = 8000
    """0: any free port (printed on the first line)."""
    max_batch: int = 16
    """Most requests per generate() call."""
    batch_wait_ms: float = 10.0
    """How long the first request waits for company."""
    max_choices: int = 64
    """Most choices (prompts x n) in one request."""
    max_request_mb: float = 4.0
    """Larger request bodies are refused (413)."""
    read_timeout_s: float = 10.0
    """A request body must arrive within this (408), so a stalled client cannot hold a connection."""
    model_name: str | None = None
    """Name in replies and /v1/models (null: phi-train)."""
    device: str = "auto"
    """auto (cuda when available, else cpu) | cpu | cuda | cuda:N."""
    dtype: str | None = None
    """fp32 | bf16 | fp16; null: bf16 on CUDA, else fp32."""
    attention: str = "auto"
    """auto | flash | sdpa: the attention kernel (phi_train.generate.load_for_inference)."""

    def __post_init__(self) -> None:
        for ok, msg in (
            (self.max_batch >= 1, f"max_batch={self.max_batch} must be >= 1"),
            (self.batch_wait_ms >= 0, f"batch_wait_ms={self.batch_wait_ms} must be >= 0"),
            (self.max_choices >= 1, f"max_choices={self.max_choices} must be >= 1"),
            (self.max_request_mb > 0, f"max_request_mb={self.max_request_mb} must be > 0"),
            (self.read_timeout_s > 0, f"read_timeout_s={self.read_timeout_s} must be > 0"),
            (0 <= self.port < 65536, f"port={self.port} must be in 0..65535"),
            (self.dtype is None or self.dtype in DTYPES, f"dtype={self.dtype!r} is not one of fp32, bf16, fp16"),
            (
                self.attention in ("auto", "flash", "sdpa"),
                f"attention={self.attention!r} is not one of auto, flash, sdpa",
            ),
        ):
            if not ok:
                raise RequestError(msg)


@hydra_command(ServeConfig, "serve")
def main(args: ServeConfig) -> int:
    import torch
    import uvicorn

    from phi_train.generate import load_for_inference

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    name = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    try:
        model, tok = load_for_inference(
            args.checkpoint, device=device, dtype=dtype, tag=args.tag, attention=args.attention
        )
    except (ValueError, OSError, KeyError) as exc:  # ConfigError / TokenizerError / InteropError, unreadable files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"error: cannot load checkpoint {args.checkpoint!r}: {msg}", file=sys.stderr)
        return 2
    server = Server(model, tok, args.model_name or "phi-train", args.max_batch, args.batch_wait_ms / 1000,
                    args.max_choices)  # fmt: skip
    app = make_app(server, int(args.max_request_mb * (1 << 20)), args.read_timeout_s)
    try:  # our own socket: port=0 gets a free port that we can print before uvicorn starts
        sock = socket.create_server((args.host, args.port), reuse_port=False)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=30,
                            timeout_graceful_shutdown=1)  # fmt: skip
    print(f"serving {args.checkpoint} as {server.name!r} on http://{host}:{port}/v1", flush=True)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
