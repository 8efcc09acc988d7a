"""A loopback OpenAI-compatible `/v1/chat/completions` server for the tests that talk to a teacher or a grader.

A real HTTP server on 127.0.0.1 (not a mock) so the real client code runs: the openai SDK, its retries, timeouts,
rate limits and the reply cache. A subclass picks its reply per *case*, a marker (`CASE:<name>` by default) that the
test puts in the prompt, so one server can fail on purpose (429, 500, slow, malformed) for some prompts and answer
others. Every request is recorded (case, Authorization header, seed, the whole body), with per-case counts and the
peak number of requests in flight.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ChatHandler(BaseHTTPRequestHandler):
    """One request: parse it, record it on the owning `FakeChatServer`, let that server's `respond` answer."""

    def log_message(self, *args: Any) -> None:  # keep pytest's output clean
        pass

    def do_POST(self) -> None:
        fake: FakeChatServer = self.server.fake  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        case = fake.case_of(body)
        with fake.lock:
            fake.requests.append({"case": case, "auth": self.headers["Authorization"], "seed": body.get("seed")} | body)
            fake.seen[case] += 1
            nth = fake.seen[case]
            fake.in_flight += 1
            fake.peak = max(fake.peak, fake.in_flight)
        try:
            fake.respond(self, case, nth, body)
        finally:
            with fake.lock:
                fake.in_flight -= 1

    def send(self, code: int, payload: bytes, ctype: str = "application/json", headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)

    def ok(self, text: str) -> None:
        """A well-formed chat completion whose one choice says `text`, with the server's fixed token usage."""
        fake: FakeChatServer = self.server.fake  # type: ignore[attr-defined]
        prompt, completion = fake.usage
        reply = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": fake.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }
        self.send(200, json.dumps(reply).encode())


class FakeChatServer:
    """Subclass and override `respond`; the class attributes say where the case marker is and what `ok` reports."""

    marker = r"CASE:(\S+)"
    marker_message = -1
    """Index into `messages` of the message searched for the marker."""
    default_case = "default"
    model = "fake"
    usage = (100, 2)
    """(prompt_tokens, completion_tokens) of every reply: fixed, so tests can check the cost arithmetic."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.seen: Counter = Counter()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), ChatHandler)
        self.server.fake = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def case_of(self, body: dict) -> str:
        m = re.search(self.marker, body["messages"][self.marker_message]["content"])
        return m.group(1) if m else self.default_case

    def respond(self, h: ChatHandler, case: str, nth: int, body: dict) -> None:
        """Answer through `h.ok(text)` or `h.send(code, payload, ...)`; `nth` counts this case's requests from 1."""
        raise NotImplementedError

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeChatServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
