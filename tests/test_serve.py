"""launch/serve.py on a real (random, tiny) checkpoint, over real HTTP on 127.0.0.1, with the official openai client
and raw sockets for what no client would send.

Checks: completions and chat completions with usage, /v1/models and /health, greedy output equal to in-process
`generate()`, concurrent requests batched (fewer batches than requests), SSE streaming token by token (pieces add up
to the non-streamed text), OpenAI's semantics (404 model_not_found, models.retrieve, n > 1, echo, seeds random by
default and reproducible when given, refused parameters named, finish_reason "length" when the context cut the
reply), malformed HTTP (bad UTF-8, NaN, 1e400, chunked bodies, short bodies, oversize bodies, other methods) answered
with OpenAI-shaped JSON, generation faults as 500, abandoned requests cancelled, one-line errors for a bad checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import sysconfig
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import openai
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def write_tiny_checkpoint(root: Path, seed: int = 0) -> Path:
    """Tokenizer trained on a few stdlib files + a random 2-layer PhiModel, saved as the trainer's final checkpoint."""

    from data_tools.tokenizer import train_tokenizer
    from phi_train.checkpoint import save_inference
    from phi_train.config import model_config
    from phi_train.model import PhiModel
    from phi_train.tokenizer import Tokenizer

    texts = [(STDLIB / f).read_text() for f in ("textwrap.py", "bisect.py", "heapq.py", "colorsys.py")]
    tok_path = train_tokenizer(texts, root / "tokenizer", vocab_size=400, num_threads=1)
    tok = Tokenizer(tok_path)
    cfg = model_config(preset="phi1_tiny", n_layer=2, d_model=128, n_head=2, d_mlp=512, max_seq_len=128)
    torch.manual_seed(seed)
    model = PhiModel(cfg, vocab_size=tok.vocab_size).eval()
    return save_inference(root / "checkpoints", model, tok_path, step=1)


class ServeProcess:
    """`launch/serve.py` as a subprocess on a free port; `url` is its /v1 base."""

    def __init__(self, checkpoint: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "launch/serve.py", f"checkpoint={checkpoint}", "port=0", *extra],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line.startswith("serving"):
            self.proc.kill()
            raise RuntimeError(f"serve.py did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.url = line.split(" on ")[-1].strip()
        self.root = self.url.removesuffix("/v1")

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.root + path, timeout=30) as r:
            return json.loads(r.read())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def served(checkpoint):
    s = ServeProcess(checkpoint, "max_batch=8", "batch_wait_ms=150", "read_timeout_s=1", "max_request_mb=0.05")
    yield s
    s.close()


@pytest.fixture(scope="module")
def local_model(checkpoint):
    from phi_train.generate import load_for_inference

    torch.set_num_threads(1)
    return load_for_inference(str(checkpoint))


PROMPTS = ["def add(a, b):\n", "import heapq\n\n", "class Box:\n    def", "x = [1, 2, 3]\nfor i in", "# sort\n"]


def test_completions_chat_models_and_greedy_equals_generate(served, local_model):
    from phi_train.generate import generate

    model, tok = local_model
    client = openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["phi-train"]

    r = client.completions.create(model="phi-train", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    [expected] = generate(model, tok, [PROMPTS[0]], max_new_tokens=12, temperature=0.0)
    assert r.choices[0].text == expected and len(expected) > 0
    assert r.usage.prompt_tokens == len(tok.encode(PROMPTS[0]))
    assert r.usage.completion_tokens == len(tok.encode(expected)) > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")

    # A stop string is honoured like generate()'s.
    r = client.completions.create(model="phi-train", prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=["e"])
    [expected] = generate(model, tok, [PROMPTS[1]], max_new_tokens=24, temperature=0.0, stop=["e"])
    assert r.choices[0].text == expected and "e" not in expected

    # Chat: the documented plain-text template, the chat stop strings, greedy.
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]
    c = client.chat.completions.create(model="phi-train", messages=messages, max_tokens=16, temperature=0)
    rendered = "System: You write Python.\n\nUser: Sort a list.\n\nAssistant:"
    [expected] = generate(model, tok, [rendered], max_new_tokens=16, temperature=0.0, stop=["\nUser:", "\nSystem:"])
    assert c.choices[0].message.role == "assistant" and c.choices[0].message.content == expected.strip()
    assert c.usage.prompt_tokens == len(tok.encode(rendered))

    # Sampled requests with a seed are reproducible (same batch composition: one request alone).
    a = client.completions.create(model="phi-train", prompt=PROMPTS[2], max_tokens=10, temperature=1.0, seed=7)
    b = client.completions.create(model="phi-train", prompt=PROMPTS[2], max_tokens=10, temperature=1.0, seed=7)
    assert a.choices[0].text == b.choices[0].text


def test_concurrent_requests_are_batched_and_equal_generate(served, local_model):
    from phi_train.generate import generate

    model, tok = local_model
    client = openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0, timeout=60)
    before = served.get("/health")
    prompts = PROMPTS * 2 + ["def f(x):\n    return"]  # 11 requests, max-batch 8, 150 ms window

    def ask(p: str) -> str:
        return client.completions.create(model="phi-train", prompt=p, max_tokens=8, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(ask, prompts))
    after = served.get("/health")
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == len(prompts)
    assert batches < requests, f"{requests} requests in {batches} batches: not batched"
    assert after["largest_batch"] >= 2
    expected = [generate(model, tok, [p], max_new_tokens=8, temperature=0.0)[0] for p in prompts]
    assert got == expected


def test_streaming_and_bad_requests(served):
    client = openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0, timeout=60)
    full = client.chat.completions.create(
        model="phi-train", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
    )
    stream = client.chat.completions.create(
        model="phi-train", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens

    # completions, two prompts at once: per-choice pieces arrive token by token and add up to the non-streamed text
    prompts = ["def add(a, b):\n", "import heapq\n\n"]
    plain = client.completions.create(model="phi-train", prompt=prompts, max_tokens=24, temperature=0)
    pieces: dict[int, list[str]] = {0: [], 1: []}
    finish: dict[int, str] = {}
    for c in client.completions.create(model="phi-train", prompt=prompts, max_tokens=24, temperature=0, stream=True):
        for ch in c.choices:
            if ch.text:
                pieces[ch.index].append(ch.text)
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    for choice in plain.choices:
        assert "".join(pieces[choice.index]) == choice.text
        assert finish[choice.index] == choice.finish_reason
    assert max(len(p) for p in pieces.values()) > 3  # streamed while generating, not one chunk at the end

    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="phi-train", prompt="x", temperature=5)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="phi-train", messages=[{"role": "robot", "content": "x"}])
    req = urllib.request.Request(served.root + "/v1/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and "not JSON" in json.loads(e.value.read())["error"]["message"]
    health = served.get("/health")
    assert health["status"] == "ok" and health["errors"] == 0


def test_bad_checkpoint_is_a_one_line_error(tmp_path):
    p = subprocess.run(
        [sys.executable, "launch/serve.py", f"checkpoint={tmp_path / 'nope'}", "port=0"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0] and lines[0].startswith("error: cannot load checkpoint")
    assert "Traceback" not in p.stderr


def test_health_counts_while_busy(served):
    """/health answers while a generation runs (its HTTP thread never waits on the model) and counts what it saw:
    the in-flight request is counted on arrival, its generate call and batch once it is done, and no error."""
    client = openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0, timeout=60)
    before = served.get("/health")
    stream = client.completions.create(model="phi-train", prompt="def", max_tokens=40, temperature=0, stream=True)
    first = next(iter(stream))  # the generation has started: its first token is out
    during = served.get("/health")
    rest = list(stream)
    after = served.get("/health")
    assert first.choices and rest and rest[-1].choices[0].finish_reason is not None
    assert during["status"] == "ok" and during["requests"] == before["requests"] + 1
    assert after["requests"] == during["requests"] and after["generate_calls"] == before["generate_calls"] + 1
    assert after["batches"] == before["batches"] + 1 and after["errors"] == before["errors"]


def raw_http(served: ServeProcess, request: bytes, timeout: float = 30) -> tuple[int, dict | str]:
    """Send bytes as they are on a fresh connection; (status, JSON body or text) of the reply."""
    host, port = served.root.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = [int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")]
            if length and len(body) >= length[0]:
                break
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode("utf-8", "replace")


def post(path: str, body: bytes, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
    if "Transfer-Encoding" not in extra and "Content-Length" not in extra:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"Connection: close\r\n\r\n" + body


def assert_openai_error(status: int, body, want_status: int, *words: str) -> None:
    assert status == want_status, (status, body)
    assert isinstance(body, dict) and set(body["error"]) >= {"message", "type", "param", "code"}, body
    for w in words:
        assert w in body["error"]["message"] or w == body["error"]["param"], (w, body)


def test_malformed_http_gets_openai_shaped_answers(served):
    ok = json.dumps({"model": "phi-train", "prompt": "def add(a, b):\n", "max_tokens": 6, "temperature": 0}).encode()
    status, plain = raw_http(served, post("/v1/completions", ok))
    assert status == 200 and plain["choices"][0]["text"]
    # a chunked body is read whole, not answered as an empty prompt
    chunked = (
        b"".join(b"%x\r\n%s\r\n" % (len(ok[i : i + 7]), ok[i : i + 7]) for i in range(0, len(ok), 7)) + b"0\r\n\r\n"
    )
    status, body = raw_http(served, post("/v1/completions", chunked, "Transfer-Encoding: chunked\r\n"))
    assert status == 200 and body["choices"][0]["text"] == plain["choices"][0]["text"]
    assert body["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]

    cases = [
        (b'{"model": "phi-train", "prompt": "\xff\xfe"}', 400, "UTF-8"),
        (b'{"model": "phi-train", "prompt": "x", "max_tokens": 1e400}', 400, "max_tokens"),
        (b'{"model": "phi-train", "prompt": "x", "max_tokens": NaN}', 400, "NaN"),
        (b'{"model": "phi-train", "prompt": "x", "temperature": Infinity}', 400, "Infinity"),
        (b'{"model": "phi-train", "prompt": "x", "max_tokens": 6.5}', 400, "max_tokens"),
        (b'{"model": "phi-train", "prompt": "x", "stream": "no"}', 400, "stream"),
        (b'{"model": "phi-train", "prompt": "x", "n": 0}', 400, "n"),
        (b'{"model": "phi-train", "prompt": "x", "max_tokens": 100000}', 400, "max_tokens"),
        (b'{"model": "phi-train", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
        (b'{"model": "phi-train"}', 400, "prompt"),
        (b'{"prompt": "x"}', 400, "model"),
        (b"", 400, "empty"),
        (b"[1, 2]", 400, "object"),
        (b'{"model": "phi-train", "prompt": [1, 2]}', 400, "prompt"),
        (b'{"model": "phi-train", "prompt": "x", "tools": []}', 400, "tools"),
        (b"[" * 5000 + b"]" * 5000, 400, "nested"),
        (b'{"model": "gpt-5", "prompt": "x"}', 404, "gpt-5"),
    ]
    for body, want, word in cases:
        assert_openai_error(*raw_http(served, post("/v1/completions", body)), want, word)
    status, body = raw_http(served, post("/v1/chat/completions", b'{"model": "phi-train", "messages": []}'))
    assert_openai_error(status, body, 400, "messages")
    # a body larger than max_request_mb=0.05 (declared or not), and one that never arrives in full (read_timeout_s=1)
    big = json.dumps({"model": "phi-train", "prompt": "x" * 60_000}).encode()
    assert_openai_error(*raw_http(served, post("/v1/completions", big)), 413, "limit")
    huge_chunk = b"%x\r\n%s\r\n0\r\n\r\n" % (len(big), big)
    assert_openai_error(*raw_http(served, post("/v1/completions", huge_chunk, "Transfer-Encoding: chunked\r\n")), 413)
    short = post("/v1/completions", ok[:10], f"Content-Length: {len(ok)}\r\n")
    assert_openai_error(*raw_http(served, short), 408, "did not arrive")
    for method in ("PUT", "DELETE", "PATCH"):
        req = f"{method} /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        assert_openai_error(*raw_http(served, req.encode()), 405, method)
    assert_openai_error(*raw_http(served, b"GET /v2/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), 404)
    assert served.get("/health")["status"] == "ok"  # and the server is still up


def test_openai_semantics_with_the_official_client(served):
    client = openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0, timeout=60)
    assert client.models.retrieve("phi-train").id == "phi-train"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert e.value.code == "model_not_found" and "gpt-4" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}], max_tokens=2)

    # no seed: every request draws a fresh one, so the same prompt three times is three samples
    kw = {"model": "phi-train", "prompt": "def", "max_tokens": 12, "temperature": 1.0}
    texts = [client.completions.create(**kw).choices[0].text for _ in range(3)]
    assert len(set(texts)) == 3, texts
    # n choices are n different samples; with a seed they are reproducible, alone or batched with other requests
    r = client.completions.create(**kw, n=4, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and len({c.text for c in r.choices}) == 4
    one = client.completions.create(**kw | {"max_tokens": 1})
    assert r.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once, whatever n
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client.completions.create, **kw, n=4, seed=5)] + [
            pool.submit(client.completions.create, **kw, seed=s) for s in (1, 2, 3)
        ]
        again = futures[0].result()
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    two = client.completions.create(**kw | {"prompt": ["def", "import"]}, n=2, seed=5)
    assert len(two.choices) == 4 and [c.text for c in two.choices[:2]] == [c.text for c in r.choices[:2]]
    chat = client.chat.completions.create(model="phi-train", messages=[{"role": "user", "content": "hi"}], n=3,
                                          max_tokens=10, temperature=1.0, seed=9)  # fmt: skip
    assert len(chat.choices) == 3 and len({c.message.content for c in chat.choices}) >= 2

    # echo is honoured; what the server cannot honour is refused by name, never silently ignored
    e1 = client.completions.create(model="phi-train", prompt="def f(", max_tokens=4, temperature=0, echo=True)
    e0 = client.completions.create(model="phi-train", prompt="def f(", max_tokens=4, temperature=0)
    assert e1.choices[0].text == "def f(" + e0.choices[0].text
    refused = [
        ({"logprobs": 2}, "logprobs"),
        ({"best_of": 3}, "best_of"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -1.0}, "frequency_penalty"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"suffix": "}"}, "suffix"),
        ({"extra_body": {"mirostat": 1}}, "mirostat"),
    ]
    for extra, name in refused:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="phi-train", prompt="x", max_tokens=2, **extra)
        assert name in e.value.message and e.value.body["param"] == name, e.value.body
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model="phi-train", messages=[{"role": "user", "content": "x"}], logprobs=True)

    # finish_reason: "length" for max_tokens and when the context (max_seq_len 128) ended the reply before it
    r = client.completions.create(model="phi-train", prompt="def", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length"
    long = "x = [1, 2, 3]\n" * 40
    r = client.completions.create(model="phi-train", prompt=long, max_tokens=100, temperature=0)
    assert r.usage.prompt_tokens == 64 and r.choices[0].finish_reason == "length", r
    assert r.usage.completion_tokens < 100


def test_generation_faults_are_5xx_and_abandoned_requests_are_cancelled(local_model):
    """The app in-process (uvicorn on a thread, real HTTP): a fault in the model is a 500 server_error, and clients
    that hang up have their requests cancelled instead of generating for nobody."""
    import threading
    import time

    import uvicorn

    from phi_train.serve import Server, make_app

    model, tok = local_model
    server = Server(model, tok, "phi-train", max_batch=4, wait_s=0.01)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(make_app(server), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        forward = model.forward

        def broken(*a, **kw):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        model.forward = broken
        try:
            with pytest.raises(openai.InternalServerError) as e:
                client.completions.create(model="phi-train", prompt="x", max_tokens=4)
            assert e.value.body["type"] == "server_error" and "illegal memory access" in e.value.body["message"]
            stream = client.completions.create(model="phi-train", prompt="x", max_tokens=4, stream=True)
            with pytest.raises(openai.APIError, match="illegal memory access"):
                list(stream)
        finally:
            model.forward = forward
        assert server.health()["errors"] == 2

        # three clients send long requests and hang up; their jobs are cancelled, not generated to the end
        body = json.dumps({"model": "phi-train", "prompt": "def", "max_tokens": 120, "temperature": 0}).encode()
        socks = []
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(post("/v1/completions", body))
            socks.append(s)
        while server.health()["requests"] < 5:
            time.sleep(0.01)
        for s in socks:
            s.close()
        r = client.completions.create(model="phi-train", prompt="def", max_tokens=4, temperature=0)
        assert r.choices[0].text
        deadline = time.monotonic() + 60
        while server.health()["cancelled"] < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.health()["cancelled"] == 3
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
