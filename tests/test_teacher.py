"""TeacherClient / TeacherAnnotator against a real HTTP server on 127.0.0.1 speaking `/v1/chat/completions`.

The server misbehaves on purpose, keyed by a marker in the prompt: 429 once, 500 always, slow once (client timeout),
non-JSON garbage, a reply that is not a rating. Checks: retries, counts reconcile, cache makes reruns free, rate and
concurrency limits hold, and a canary API key never appears in logs or in any file written.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from fakes import ChatHandler, FakeChatServer

from data_tools.codetextbook.annotate import AnnotationCache, TeacherAnnotator, annotate_cached, parse_rating
from phi_train.teacher import TeacherClient, TeacherConfigError

CANARY = "sk-canary-7f3a9c1e5b2d4f60a8e1"
KEY_ENV = "PHI_TEST_TEACHER_KEY"
REPO = Path(__file__).resolve().parent.parent


class FakeTeacher(FakeChatServer):
    """Behaviour per `CASE:<name>` marker in the prompt (default `ok-7`); `FakeChatServer` records the requests."""

    default_case = "ok-7"

    def respond(self, h: ChatHandler, case: str, nth: int, body: dict) -> None:
        if case == "429-once" and nth == 1:
            h.send(429, b'{"error": {"message": "slow down"}}', headers={"Retry-After": "0.05"})
        elif case == "500":
            h.send(500, b'{"error": {"message": "boom"}}')
        elif case == "slow-once":
            if nth == 1:
                time.sleep(1.5)  # past the client's 0.5 s timeout: it must retry
            h.ok("9")
        elif case == "garbage":
            h.send(200, b"<html>this is not json", ctype="application/json")
        elif case == "not-a-rating":
            h.ok("This code is quite educational, I would say.")
        elif case.startswith("ok-"):
            time.sleep(0.05)
            h.ok(case[3:])
        else:
            h.ok("5")


@pytest.fixture()
def server():
    with FakeTeacher() as s:
        yield s


@pytest.fixture()
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, CANARY)
    return CANARY


def make_client(server: FakeTeacher, cache_dir: Path, **kw) -> TeacherClient:
    args = {
        "base_url": server.url,
        "model": "fake-teacher",
        "api_key_env": KEY_ENV,
        "max_concurrency": 4,
        "requests_per_minute": 6000,
        "max_retries": 2,
        "timeout_s": 0.5,
        "cache_dir": cache_dir,
        "backoff_base_s": 0.02,
        "backoff_max_s": 0.2,
        "price_prompt_per_1k": 0.01,
        "price_completion_per_1k": 0.03,
    }
    return TeacherClient(**(args | kw))


def assert_no_canary(root: Path, logs: str) -> int:
    assert CANARY not in logs
    n = 0
    for f in root.rglob("*"):
        if f.is_file():
            assert CANARY.encode() not in f.read_bytes(), f"API key leaked into {f}"
            n += 1
    return n


CASES = ["429-once", "500", "slow-once", "garbage", "not-a-rating", "ok-3", "ok-8", "ok-10"]


def test_teacher_annotator_failures_retries_cache_and_key_hygiene(server, key, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # openai/httpx debug logs included: the key must not be in any of them
    texts = [f"def f():\n    return {i}  # CASE:{c}\n" for i, c in enumerate(CASES)]
    client = make_client(server, tmp_path / "cache")
    annotator = TeacherAnnotator(client, "Rate this.\n{code}\nReply with the integer only.", parse_retries=2)
    cache = AnnotationCache(tmp_path / "cache" / "annotations.sqlite")
    anns = annotate_cached(annotator, texts, cache)
    got = {c: (a.score, a.reason) for c, a in zip(CASES, anns, strict=True)}
    assert got == {
        "429-once": (5.0, None),
        "500": (None, "http_500"),
        "slow-once": (9.0, None),
        "garbage": (None, "bad_response"),
        "not-a-rating": (None, "not_a_rating"),
        "ok-3": (3.0, None),
        "ok-8": (8.0, None),
        "ok-10": (10.0, None),
    }
    # Counts reconcile: every input is a rating or a drop with its reason.
    reasons = Counter(a.reason for a in anns if a.score is None)
    assert sum(a.score is not None for a in anns) + sum(reasons.values()) == len(texts)
    # Retries: 500 and garbage tried 1 + max_retries times; 429 and slow retried once; not-a-rating asked with 3 seeds.
    assert server.seen["500"] == 3 and server.seen["garbage"] == 3
    assert server.seen["429-once"] == 2 and server.seen["slow-once"] == 2
    assert server.seen["not-a-rating"] == 3
    assert {r["seed"] for r in server.requests if r["case"] == "not-a-rating"} == {None, 1, 2}
    st = client.stats
    assert st.errors == Counter({"http_500": 1, "bad_response": 1})
    assert st.ok == 8  # 429, slow, 3 ok-N answered once each + not-a-rating answered 3 times
    assert st.prompt_tokens == 100 * st.ok and st.completion_tokens == 2 * st.ok
    assert st.cost_usd == pytest.approx(st.ok * (100 * 0.01 + 2 * 0.03) / 1000)
    # The key was really sent, and only over the wire.
    assert all(r["auth"] == f"Bearer {key}" for r in server.requests)

    # Rerun with a fresh client: ratings and not-a-rating come from the cache; only transient failures are retried.
    before = len(server.requests)
    client2 = make_client(server, tmp_path / "cache")
    anns2 = annotate_cached(TeacherAnnotator(client2, annotator.prompt_template, parse_retries=2), texts, cache)
    assert [a.score for a in anns2] == [a.score for a in anns]
    assert {r["case"] for r in server.requests[before:]} == {"500", "garbage"}
    # ...and a rerun over the items that succeeded makes zero HTTP requests, even with the annotation cache gone.
    (tmp_path / "cache" / "annotations.sqlite").unlink()
    before = len(server.requests)
    good = [t for t, a in zip(texts, anns, strict=True) if a.reason in (None, "not_a_rating")]
    client3 = make_client(server, tmp_path / "cache")
    fresh_cache = AnnotationCache(tmp_path / "cache2" / "annotations.sqlite")
    annotate_cached(TeacherAnnotator(client3, annotator.prompt_template, parse_retries=2), good, fresh_cache)
    assert len(server.requests) == before and client3.stats.http_requests == 0 and client3.stats.cached > 0

    files = assert_no_canary(tmp_path, caplog.text + repr(client) + repr(client.__dict__))
    assert files >= 2
    rows = (
        sqlite3.connect(tmp_path / "cache" / "teacher_cache.sqlite").execute("select count(*) from replies").fetchone()
    )
    assert rows[0] == 8


def test_rate_and_concurrency_limits(server, key, tmp_path):
    client = make_client(server, None, max_concurrency=3, requests_per_minute=600)  # one start per 0.1 s
    t0 = time.monotonic()
    replies = client.complete_many_sync([f"CASE:ok-{i % 10}" for i in range(12)])
    elapsed = time.monotonic() - t0
    assert [r.text for r in replies] == [str(i % 10) for i in range(12)]  # order kept
    assert elapsed >= 11 * 0.1 * 0.95
    assert server.peak <= 3
    assert all(not r.cached and r.usage.prompt_tokens == 100 for r in replies)


def test_missing_key_is_a_one_line_error(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(TeacherConfigError, match=KEY_ENV) as e:
        make_client(server, None)
    assert "\n" not in str(e.value)


def test_parse_rating_is_strict():
    assert parse_rating("7") == 7.0 and parse_rating(" score: 10 ") == 10.0 and parse_rating("3/10") == 3.0
    for bad in ["", "11", "seven", "7 because it has docstrings", "-1", "7.5", None]:
        assert parse_rating(bad) is None


def test_pipeline_with_teacher_never_writes_the_key(server, tmp_path):
    """The whole pipeline with `annotator: teacher`: the key is in the environment only, and after the run it is in
    none of the files written (config dump, executor.json, datatrove logs, caches, annotations, outputs)."""
    src = tmp_path / "src"
    src.mkdir()
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = [
        "textwrap.py",
        "bisect.py",
        "heapq.py",
        "shlex.py",
        "fnmatch.py",
        "colorsys.py",
        "queue.py",
        "sched.py",
        "graphlib.py",
        "keyword.py",
        "glob.py",
        "token.py",
        "stat.py",
        "numbers.py",
        "operator.py",
        "abc.py",
        "this.py",
        "getopt.py",
        "cmd.py",
        "code.py",
        "filecmp.py",
        "netrc.py",
        "nturl2path.py",
        "opcode.py",
    ]
    for i, n in enumerate(names):  # a rating per file, alternating high and low, so both labels exist
        (src / n).write_text((stdlib / n).read_text() + f"\n# CASE:ok-{9 if i % 2 else 2}\n")
    cfg = tmp_path / "teacher.yaml"
    cfg.write_text(
        f"inputs: [{{kind: python_files, path: {src}}}]\n"
        f"output_dir: {tmp_path / 'out'}\nwork_dir: {tmp_path / 'work'}\nprogress: false\n"
        "executor: {tasks: 2, workers: 1}\n"
        f"annotate: {{annotator: teacher, sample_size: 24, teacher: {{base_url: '{server.url}', model: fake,"
        f" api_key_env: {KEY_ENV}, timeout_s: 5, requests_per_minute: 6000}}}}\n"
        "classifier: {embedder: hashing, n_estimators: 50, test_fraction: 0.34}\n"
    )
    env = os.environ | {KEY_ENV: CANARY, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "data_tools.codetextbook", "--config-name", str(cfg)],
        cwd=REPO,
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(server.requests) >= 20 and all(r["auth"] == f"Bearer {CANARY}" for r in server.requests)
    summary = json.loads((tmp_path / "work" / "summary.json").read_text())
    assert summary["in"] == summary["kept"] + sum(summary["dropped"].values())
    stats = json.loads((tmp_path / "work" / "teacher_stats.json").read_text())
    assert stats["ok"] >= 20 and stats["prompt_tokens"] == 100 * stats["ok"]
    n = assert_no_canary(tmp_path, p.stdout + p.stderr)
    assert n > 10


def test_per_prompt_seeds_are_sent_and_keyed_in_the_cache(server, key, tmp_path):
    """The synth jobs send one seed per item: each request carries its own, and two prompts that differ only in seed
    are two cache entries (a rerun with the same seeds is free, a new seed is a new request)."""
    client = make_client(server, tmp_path / "cache")
    replies = client.complete_many_sync(["CASE:ok-1", "CASE:ok-1", "CASE:ok-2"], [11, 12, 13])
    assert [r.text for r in replies] == ["1", "1", "2"]
    assert sorted(r["seed"] for r in server.requests) == [11, 12, 13]
    again = make_client(server, tmp_path / "cache").complete_many_sync(["CASE:ok-1", "CASE:ok-1"], [11, 14])
    assert [r.cached for r in again] == [True, False] and len(server.requests) == 4
    with pytest.raises(TeacherConfigError, match="2 seeds for 3 prompts"):
        client.complete_many_sync(["a", "b", "c"], [1, 2])
