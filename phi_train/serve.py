"""Serve a phi_train checkpoint behind an OpenAI-compatible HTTP API (so our own model can be a teacher).

python launch/serve.py checkpoint=DIR [host=127.0.0.1 port=8000 max_batch=16 batch_wait_ms=10]   (`ServeConfig`)

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health (counters: requests, batches,
generate calls). Any OpenAI client works (`openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")`);
the key is not checked, so bind to 127.0.0.1 (the default) unless the network is trusted.

Batching: every request goes to one queue; one worker thread takes the first waiting request, waits up to
batch_wait_ms for more (up to max_batch), groups them by sampling parameters (max_tokens, temperature, top_p,
stop, seed) and makes one `phi_train.generate.generate` call per group. Greedy output is what `generate()` returns
in-process; with temperature > 0 a request's sample depends on its row in the batch (generate seeds row i with
seed + i), so sampled replies are reproducible only for the same batch composition.

Chat template (plain text, what a base model continues naturally): each message becomes "<Role>: <content>\\n\\n"
with Role one of System, User, Assistant, then "Assistant:" is appended; "\\nUser:" and "\\nSystem:" are added to the
stop strings so the model does not write the next turn itself.

`stream: true` sends server-sent events as the tokens are generated (generate()'s `on_text`): content chunks whose
concatenation is exactly the non-streamed text (text that could still turn into a stop string, or an unfinished
UTF-8 character, waits for the next token), then one chunk per choice with finish_reason,
then, with `stream_options: {"include_usage": true}`, a chunk with no choices and the usage, then `data: [DONE]`. A
request that fails after the headers went out gets an `{"error": ...}` event instead; a client that hangs up mid-stream
has its generation stopped at the next token.
Usage: prompt_tokens counts the prompt's tokens as the model saw them (its last tokens, when it exceeds the context
budget); completion_tokens counts the tokens of the returned text (after stop strings are cut).
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from omegaconf import MISSING

from phi_train.cli import hydra_command
from phi_train.errors import PhiTrainError

CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = ("\nUser:", "\nSystem:")


class RequestError(PhiTrainError):
    """A bad request body (answered with HTTP 400 and this one-line message) or a bad server setting."""


def render_chat(messages: Any) -> str:
    """The plain-text chat template (module docstring)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects")
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # [{type: text, text: ...}] content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string")
        parts.append(f"{CHAT_ROLES[m['role']]}: {content}\n\n")
    return "".join(parts) + "Assistant:"


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int


def parse_sampling(body: dict, default_max_tokens: int, extra_stop: tuple[str, ...] = ()) -> Sampling:
    def num(key: str, default: float, kind=float) -> Any:
        v = body.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v):
            raise RequestError(f"'{key}' must be a {'integer' if kind is int else 'number'}, got {v!r}")
        return kind(v)

    max_tokens = num("max_completion_tokens", 0, int) or num("max_tokens", default_max_tokens, int)
    if max_tokens < 1:
        raise RequestError(f"'max_tokens' must be >= 1, got {max_tokens}")
    temperature, top_p = num("temperature", 1.0), num("top_p", 1.0)
    if not 0 <= temperature <= 2:
        raise RequestError(f"'temperature' must be in [0, 2], got {temperature}")
    if not 0 < top_p <= 1:
        raise RequestError(f"'top_p' must be in (0, 1], got {top_p}")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise RequestError("'stop' must be a string or a list of at most 4 strings")
    if body.get("n", 1) != 1:
        raise RequestError("'n' must be 1 (one choice per request; send several requests instead)")
    return Sampling(max_tokens, temperature, top_p, tuple(stop) + extra_stop, num("seed", 0, int))


@dataclass
class Job:
    prompt: str
    sampling: Sampling
    sink: Callable[[str | None], None] | None = None
    """Streaming: called with each text delta, then with None once the job is done (text or error set)."""
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set when a streaming client hung up: generation of this job stops at its next token."""
    text: str | None = None
    error: str | None = None


class Batcher:
    """One worker thread: collects queued jobs for `wait_s` (up to `max_batch`), one generate() per sampling group."""

    def __init__(self, model, tokenizer, max_batch: int, wait_s: float) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.wait_s = max_batch, wait_s
        self.queue: queue.Queue[Job] = queue.Queue()
        self.lock = threading.Lock()
        self.counters = {"requests": 0, "batches": 0, "generate_calls": 0, "largest_batch": 0, "errors": 0}
        threading.Thread(target=self._loop, daemon=True, name="batcher").start()

    def submit(self, prompt: str, sampling: Sampling, sink: Callable[[str | None], None] | None = None) -> Job:
        job = Job(prompt, sampling, sink)
        with self.lock:
            self.counters["requests"] += 1
        self.queue.put(job)
        return job

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

    def _loop(self) -> None:
        from phi_train.generate import generate

        while True:
            jobs = self._collect()
            groups: dict[Sampling, list[Job]] = {}
            for j in jobs:
                groups.setdefault(j.sampling, []).append(j)
            with self.lock:
                self.counters["batches"] += 1
                self.counters["largest_batch"] = max(self.counters["largest_batch"], len(jobs))
            for s, group in groups.items():
                try:
                    texts = generate(
                        self.model,
                        self.tokenizer,
                        [j.prompt for j in group],
                        max_new_tokens=s.max_tokens,
                        temperature=s.temperature,
                        top_p=s.top_p,
                        stop=s.stop,
                        seed=s.seed,
                        batch_size=self.max_batch,
                        on_text=self._stream_to(group) if any(j.sink for j in group) else None,
                        cancelled=lambda i, group=group: group[i].cancelled.is_set(),
                    )
                    for j, t in zip(group, texts, strict=True):
                        j.text = t
                except Exception as exc:  # noqa: BLE001 - reported to each waiting client, the worker lives on
                    with self.lock:
                        self.counters["errors"] += 1
                    for j in group:
                        j.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                with self.lock:
                    self.counters["generate_calls"] += 1
                for j in group:
                    j.done.set()
                    if j.sink is not None:
                        j.sink(None)

    @staticmethod
    def _stream_to(group: list[Job]):
        def on_text(index: int, delta: str) -> None:
            if group[index].sink is not None:
                group[index].sink(delta)

        return on_text


class Server:
    def __init__(self, model, tokenizer, name: str, max_batch: int, wait_s: float) -> None:
        from phi_train.generate import prompt_budget

        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.batcher = Batcher(model, tokenizer, max_batch, wait_s)
        self.max_seq_len = model.cfg.max_seq_len
        self.prompt_budget = prompt_budget
        self.created = int(time.time())

    def usage(self, prompt: str, text: str, max_tokens: int) -> dict[str, int]:
        p = min(len(self.tokenizer.encode(prompt)) or 1, self.prompt_budget(self.max_seq_len, max_tokens))
        c = len(self.tokenizer.encode(text)) if text else 0
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def result(self, job: Job) -> tuple[str, dict, str]:
        """(text, usage, finish_reason) of a finished job."""
        usage = self.usage(job.prompt, job.text or "", job.sampling.max_tokens)
        finish = "length" if usage["completion_tokens"] >= job.sampling.max_tokens else "stop"
        return job.text or "", usage, finish

    def run(self, prompts: list[str], s: Sampling) -> list[tuple[str, dict, str]]:
        """(text, usage, finish_reason) per prompt; blocks until the batcher has done them."""
        jobs = [self.batcher.submit(p, s) for p in prompts]
        out = []
        for j in jobs:
            j.done.wait()
            if j.error is not None:
                raise RequestError(j.error)
            out.append(self.result(j))
        return out

    def parse(self, kind: str, body: dict) -> tuple[list[str], Sampling]:
        """The prompts and sampling of a completions or chat request (RequestError when malformed)."""
        if kind == "chat":
            prompt = render_chat(body.get("messages"))
            return [prompt], parse_sampling(body, default_max_tokens=self.max_seq_len // 2, extra_stop=CHAT_STOP)
        prompt = body.get("prompt", "")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError("'prompt' must be a string or a non-empty list of strings")
        return prompts, parse_sampling(body, default_max_tokens=16)

    def completions(self, body: dict) -> tuple[dict, Sampling]:
        prompts, s = self.parse("completions", body)
        results = self.run(prompts, s)
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f} for i, (t, _, f) in enumerate(results)]
        usage = {k: sum(u[k] for _, u, _ in results) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        return self._envelope("text_completion", "cmpl", choices, usage), s

    def chat(self, body: dict) -> tuple[dict, Sampling]:
        prompts, s = self.parse("chat", body)
        [(text, usage, finish)] = self.run(prompts, s)
        choice = {"index": 0, "message": {"role": "assistant", "content": text.strip()}, "finish_reason": finish}
        return self._envelope("chat.completion", "chatcmpl", [choice], usage), s

    def stream(self, kind: str, body: dict) -> Iterator[dict]:
        """Validate and submit now (a bad request fails before any header is sent); the returned iterator yields the
        OpenAI chunk objects as the batcher produces text."""
        prompts, s = self.parse(kind, body)
        events: queue.Queue[tuple[int, str | None]] = queue.Queue()
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        jobs = [self.batcher.submit(p, s, sink=lambda d, i=i: events.put((i, d))) for i, p in enumerate(prompts)]
        return self._chunks(jobs, events, kind == "chat", include_usage)

    def _chunks(self, jobs: list[Job], events: queue.Queue, chat: bool, include_usage: bool) -> Iterator[dict]:
        base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.name,
        }

        def chunk(index: int, text: str | None, finish: str | None = None, first: bool = False) -> dict:
            if chat:
                delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
                return base | {"choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
            return base | {"choices": [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}]}

        try:
            if chat:
                yield chunk(0, "", first=True)
            raw = [""] * len(jobs)  # what generate streamed so far, per choice
            sent = [""] * len(jobs)  # what went out (chat: stripped, as the non-streamed content is)
            open_jobs = set(range(len(jobs)))
            while open_jobs:
                i, delta = events.get()
                if delta is None:
                    open_jobs.discard(i)
                    continue
                raw[i] += delta
                # chat content is text.strip(): leading whitespace never goes out, trailing waits for what follows
                visible = raw[i].strip() if chat else raw[i]
                if len(visible) > len(sent[i]) and visible.startswith(sent[i]):
                    yield chunk(i, visible[len(sent[i]) :])
                    sent[i] = visible
            usage_total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            for i, j in enumerate(jobs):
                if j.error is not None:
                    yield {"error": {"message": j.error, "type": "server_error", "code": 500}}
                    return
                text, usage, finish = self.result(j)
                text = text.strip() if chat else text
                if text != sent[i] and text.startswith(sent[i]):
                    yield chunk(i, text[len(sent[i]) :])
                usage_total = {k: usage_total[k] + usage[k] for k in usage_total}
                yield chunk(i, None if chat else "", finish)
            if include_usage:  # OpenAI's stream_options.include_usage: one more chunk, no choices, the request's usage
                yield base | {"choices": [], "usage": usage_total}
        finally:  # also when closed early (the client hung up): stop generating for it
            for j in jobs:
                j.cancelled.set()

    def _envelope(self, obj: str, prefix: str, choices: list, usage: dict) -> dict:
        return {
            "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
            "object": obj,
            "created": int(time.time()),
            "model": self.name,
            "choices": choices,
            "usage": usage,
        }

    def health(self) -> dict:
        with self.batcher.lock:
            return {"status": "ok", "model": self.name, **self.batcher.counters}

    def models(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": self.name, "object": "model", "created": self.created, "owned_by": "phi-train"}],
        }


def make_handler(server: Server):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # one line per request would drown the console at teacher rates
            pass

        def send_json(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def error(self, code: int, msg: str, kind: str = "invalid_request_error") -> None:
            self.send_json(code, {"error": {"message": msg, "type": kind, "code": code}})

        def do_GET(self) -> None:
            path = self.path.split("?")[0].rstrip("/")
            if path in ("/health", "/metrics"):
                self.send_json(200, server.health())
            elif path in ("/v1/models", "/models"):
                self.send_json(200, server.models())
            else:
                self.error(404, f"no route GET {path}; try /health, /v1/models")

        def do_POST(self) -> None:
            path = self.path.split("?")[0].rstrip("/")
            routes = {"/v1/completions": server.completions, "/v1/chat/completions": server.chat}
            routes |= {"/completions": server.completions, "/chat/completions": server.chat}
            try:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
            except (ValueError, OSError):
                self.error(400, "could not read the request body")
                return
            if path not in routes:
                self.error(404, f"no route POST {path}; try /v1/completions, /v1/chat/completions")
                return
            try:
                body = json.loads(raw or b"{}")
                if not isinstance(body, dict):
                    raise RequestError("the request body must be a JSON object")
                if body.get("stream"):
                    chunks = server.stream("chat" if "chat" in path else "completions", body)
                else:
                    reply, _ = routes[path](body)
            except json.JSONDecodeError as exc:
                self.error(400, f"the request body is not JSON: {exc}")
                return
            except RequestError as exc:
                self.error(400, str(exc))
                return
            if body.get("stream"):
                self.send_stream(chunks)
            else:
                self.send_json(200, reply)

        def send_stream(self, chunks: Iterator[dict]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for event in chunks:  # each chunk goes out as soon as the batcher has it
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                chunks.close()  # the client went away: its jobs stop at their next token
            self.close_connection = True

    return Handler


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
    server = Server(model, tok, args.model_name or "phi-train", args.max_batch, args.batch_wait_ms / 1000)
    try:
        httpd = ThreadingHTTPServer((args.host, args.port), make_handler(server))
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    httpd.daemon_threads = True
    host, port = httpd.server_address[:2]
    print(f"serving {args.checkpoint} as {server.name!r} on http://{host}:{port}/v1", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
