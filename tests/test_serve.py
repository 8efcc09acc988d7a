"""launch/serve.py on a real (random, tiny) checkpoint, over real HTTP on 127.0.0.1, with the official openai client.

Checks: completions and chat completions with usage, /v1/models and /health, greedy output equal to in-process
`generate()`, concurrent requests batched (fewer batches than requests), SSE streaming token by token (pieces add up
to the non-streamed text), one-line errors for bad requests and for a bad checkpoint.
"""

from __future__ import annotations

import json
import os
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
    s = ServeProcess(checkpoint, "max_batch=8", "batch_wait_ms=150")
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
