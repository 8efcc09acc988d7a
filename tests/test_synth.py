"""Synthetic textbooks and CodeExercises end to end, against real HTTP servers on 127.0.0.1.

Two teachers: a fault-injecting server of this file (429, 500, slow past the client timeout, dropped connection,
non-JSON, empty choices; otherwise canned well-formed textbook / exercise replies, some deliberately bad), and
`launch/serve.py` serving a random tiny checkpoint (gibberish: every item must be a counted drop). Checks: counts
reconcile, a SIGKILLed generation subprocess + rerun leaves no duplicates and nothing missing, a rerun pays nothing
(records, then the teacher cache), the sandbox keeps correct exercises and drops wrong and hostile ones, and the
offline miner makes sandbox-validated exercises from real stdlib code.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path

import pytest
import zstandard
from fakes import ChatHandler, FakeChatServer

from data_tools.synth import exercises, textbooks
from data_tools.synth.common import GENERATIONS, load_config
from data_tools.synth.exercises import Exercise, parse_exercise_reply, validate
from phi_train.sandbox import run_programs

ROOT = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])
KEY_ENV = "PHI_TEST_SYNTH_KEY"
VOCAB = (
    "array loop index value count string number list sum order value pair word table graph node tree path search "
    "sort merge split join filter map reduce stack queue heap key hash set bit byte char line file field record"
).split()


def fake_textbook(seed: str) -> str:
    """A distinct, well-formed textbook section: prose + a code block that parses (content seeded by `seed`)."""
    rng = random.Random(seed)
    prose = " ".join(rng.choice(VOCAB) for _ in range(120))
    name = "_".join(rng.choice(VOCAB) for _ in range(2))
    consts = [rng.randint(0, 999) for _ in range(6)]
    code = f"def {name}(values):\n    total = {consts[0]}\n"
    code += "".join(f"    total += values[{i}] * {c}\n" for i, c in enumerate(consts[1:]))
    code += "    return total\n"
    return f"## {name}\n\n{prose}\n\n```python\n{code}```\n\nIn summary, {' '.join(rng.sample(VOCAB, 12))}.\n"


EXERCISES = {
    "ex-ok": ('    """Return the sum of the squares of xs."""\n    return sum(x * x for x in xs)\n',
              ["assert solve_task([1, 2]) == 5", "assert solve_task([]) == 0"]),
    "ex-ok2": ('    """Return xs reversed, as a list."""\n    out = []\n    for x in xs:\n        out.insert(0, x)\n'
               "    return out\n", ["assert solve_task([1, 2, 3]) == [3, 2, 1]"]),
    "ex-429": ('    """Return the largest element of xs, or None when xs is empty."""\n    best = None\n'
               "    for x in xs:\n        if best is None or x > best:\n            best = x\n    return best\n",
               ["assert solve_task([3, 9, 2]) == 9", "assert solve_task([]) is None"]),
    "ex-wrong": ('    """Return the number of even elements of xs."""\n    return len(xs)\n',
                 ["assert solve_task([1, 2, 4]) == 2"]),
    "ex-loop": ('    """Return xs sorted."""\n    while True:\n        pass\n', ["assert solve_task([2, 1]) == [1, 2]"]),
    # the tests pass for `return None` too: the mutation check drops it as vacuous_tests
    "ex-vacuous": ('    """Return the largest element of xs, or None when xs is empty."""\n    return max(xs) if xs else None\n',
                   ["assert solve_task([]) is None"]),
    # an assert on a tuple is always true: vacuous_assert, before any sandbox run
    "ex-tuple": ('    """Return the sum of xs."""\n    return 0\n', ['assert (solve_task([1, 2]) == 3, "sum")']),
    # a body that walks the frames to the harness's report function: introspection
    "ex-frame": ('    """Return the sum of xs."""\n    import sys\n    f = sys._getframe()\n    while f is not None:\n'
                 "        if '_report' in f.f_globals:\n            f.f_globals['_report']('passed')\n"
                 "        f = f.f_back\n    return 0\n", ["assert solve_task([1, 2]) == 3"]),
    "ex-hostile": ('    """Return the length of xs."""\n    import subprocess\n'
                   "    subprocess.run(['touch', MARKER])\n    open(MARKER, 'w').write('pwned')\n    return len(xs)\n",
                   ["assert solve_task([1]) == 1"]),
}  # fmt: skip


def fake_exercise(case: str, marker: str) -> str:
    if case == "ex-malformed":
        return "Here is the function:\n```python\ndef solve_task(xs):\n    return xs\n```\n"
    if case == "ex-wrongname":
        return '```python\ndef other(xs):\n    """Doc."""\n    return xs\n```\n```python\nassert other(1) == 1\n```\n'
    body, tests = EXERCISES[case]
    body = body.replace("MARKER", repr(marker))
    return f"Sure!\n```python\ndef solve_task(xs):\n{body}```\n\n```python\n" + "\n".join(tests) + "\n```\n"


class FaultyTeacher(FakeChatServer):
    """Fails on purpose, keyed by `CASE=<name>` in the prompt (on a case's first request only, except `500-always`),
    and otherwise answers with a canned reply for that case. `hostile_marker`: the file a hostile exercise tries to
    create (the sandbox must stop it); `delay_s` slows every reply (so a SIGKILL lands mid-run)."""

    marker = r"CASE=(\S+)"
    model = "fake"
    usage = (50, 200)

    def __init__(self, hostile_marker: str, delay_s: float = 0.0) -> None:
        super().__init__()
        self.hostile_marker, self.delay_s = hostile_marker, delay_s

    def respond(self, h: ChatHandler, case: str, nth: int, body: dict) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)
        prompt = body["messages"][-1]["content"]
        first = nth == 1
        if case == "500-always" or (first and case.startswith("500")):
            h.send(500, b'{"error": {"message": "boom"}}')
        elif first and case.endswith("429"):
            h.send(429, b'{"error": {"message": "slow down"}}', headers={"Retry-After": "0.01"})
        elif first and case == "slow":
            time.sleep(1.5)  # past the client's 1 s timeout: it has hung up by now
            with contextlib.suppress(OSError):
                h.send(200, b"{}")
        elif first and case == "disconnect":
            h.close_connection = True
            h.connection.shutdown(2)  # no status line at all
        elif first and case == "garbage":
            h.send(200, b"<html>not json at all")
        elif first and case == "empty-choice":
            usage = {"prompt_tokens": 50, "completion_tokens": 200, "total_tokens": 250}
            reply = {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "fake",
                "choices": [],
                "usage": usage,
            }
            h.send(200, json.dumps(reply).encode())
        elif case.startswith("ex-"):
            h.ok(fake_exercise(case, self.hostile_marker))
        elif case == "syntax":
            h.ok(fake_textbook(case).replace("    return total", "    return total +"))
        elif case == "nocode":
            h.ok(re.sub(r"```python.*?```", "", fake_textbook(case), flags=re.DOTALL))
        elif case == "short":
            h.ok("```python\nx = 1\n```")
        else:
            h.ok(fake_textbook({"dup": "ok-1", "many": prompt}.get(case, case)))


TEXTBOOK_CASES = ["ok-1", "ok-2", "429", "500", "500-always", "slow", "disconnect", "garbage", "empty-choice",
                  "syntax", "nocode", "short", "dup"]  # fmt: skip
EXERCISE_CASES = ["ex-ok", "ex-ok2", "ex-429", "ex-wrong", "ex-loop", "ex-hostile", "ex-malformed", "ex-wrongname",
                  "ex-vacuous", "ex-tuple", "ex-frame", "500-always"]  # fmt: skip


def write_config(path: Path, url: str, work: Path, **extra: str) -> Path:
    """A synth config for tests: one item per case (the seed lists leave exactly one draw per case)."""
    path.write_text(
        f"""
# no defaults list: only these prompts and seeds (starting from base would merge its prompts in)
teacher: {{base_url: '{url}', model: fake-teacher, api_key_env: {KEY_ENV}, timeout_s: 1.0, max_retries: 3,
  backoff_base_s: 0.01, backoff_max_s: 0.05, max_concurrency: 4, requests_per_minute: 60000, max_tokens: 400}}
progress: false
chunk_size: {extra.get("chunk_size", 64)}
textbooks:
  count: {extra.get("tb_count", len(TEXTBOOK_CASES))}
  templates: {{t: "Write about {{subtopic}} for {{audience}} ({{style}}) {{words}}. CASE={{subtopic}}"}}
  topics: {{cases: {extra.get("tb_cases", json.dumps(TEXTBOOK_CASES))}}}
  audiences: [students]
  styles: [plain]
  words: {extra.get("tb_words", "[]")}
  words_per_prompt: {1 if "tb_words" in extra else 0}
  min_chars: 200
  work_dir: {work / "tb_work"}
  output_dir: {work / "tb_out"}
exercises:
  count: {len(EXERCISE_CASES)}
  templates: {{e: "Exercise CASE={{topic}} ({{difficulty}}): write `{{name}}`. {{words}}"}}
  topics: {json.dumps(EXERCISE_CASES)}
  difficulties: [easy]
  verbs: [solve]
  nouns: [task]
  words: []
  words_per_prompt: 0
  sandbox_timeout_s: 2.0
  work_dir: {work / "ex_work"}
  output_dir: {work / "ex_out"}
"""
    )
    return path


def read_zst(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8").read()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture()
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-synth")


def test_textbooks_against_a_faulty_teacher(tmp_path, key):
    teacher = FaultyTeacher(hostile_marker=str(tmp_path / "unused"))
    try:
        cfg = load_config(str(write_config(tmp_path / "c.yaml", teacher.url, tmp_path)))
        s = textbooks.run(cfg)
        g = s["generation"]
        assert g["requested"] == len(TEXTBOOK_CASES) == g["generated"] + sum(g["failed"].values())
        assert g["failed"] == {"http_500": 1}  # only the permanent failure; every transient one was retried
        assert s["generated"] == s["kept"] + sum(s["dropped"].values())
        assert s["dropped"] == {"code_syntax_error": 1, "no_code": 1, "too_short": 1, "exact_duplicate": 1}
        # every request carried its item's own seed
        seeds = [r["seed"] for r in teacher.requests]
        assert None not in seeds and len(set(seeds)) == len(TEXTBOOK_CASES)
        d = json.loads((tmp_path / "tb_work" / "diversity.json").read_text())
        assert {k: d["replies"][k] for k in ("texts", "exact_duplicates", "near_duplicates", "exact_duplicate_rate")} \
            == {"texts": 12, "exact_duplicates": 1, "near_duplicates": 0, "exact_duplicate_rate": 1 / 12}  # fmt: skip
        assert 0 < d["replies"]["cluster_entropy"] <= 1 and 0 < d["replies"]["distinct_2"] <= 1
        assert d["kept"] == 8 and d["topics_requested"]["subtopic"]["dup"] == 1 and d["dropped"] == s["dropped"]
        assert 0 < d["distinct_1"] < d["distinct_2"] <= d["distinct_3"] <= 1 and d["clusters"] == 4
        out = read_zst(tmp_path / "tb_out" / textbooks.OUTPUT_FILE)
        assert len(out) == s["kept"] == 8 and len({r["id"] for r in out}) == 8
        for r in out:
            assert (
                r["teacher_model"] == "fake-teacher" and r["template"] == "t" and r["seeds"]["audience"] == "students"
            )
            assert "```python" in r["text"]
        kept = {r["seeds"]["subtopic"] for r in out}
        assert len(kept & {"ok-1", "dup"}) == 1  # one of the two identical replies, whichever came first
        assert kept - {"ok-1", "dup"} == {"ok-2", "429", "500", "slow", "disconnect", "garbage", "empty-choice"}
        assert s["teacher"]["retries"] >= 7 and s["teacher"]["errors"] == {"http_500": 1}

        # A rerun asks only for what failed: the permanent 500 (1 + max_retries attempts), nothing else.
        before = len(teacher.requests)
        s2 = textbooks.run(cfg)
        assert len(teacher.requests) - before == 4 and s2["generation"]["reused"] == len(TEXTBOOK_CASES) - 1
        assert read_zst(tmp_path / "tb_out" / textbooks.OUTPUT_FILE) == out
        # With the records gone, the teacher's disk cache still answers everything that once succeeded.
        (tmp_path / "tb_work" / GENERATIONS).unlink()
        before = len(teacher.requests)
        s3 = textbooks.run(cfg)
        assert len(teacher.requests) - before == 4 and s3["teacher"]["cached"] == len(TEXTBOOK_CASES) - 1
        assert s3["kept"] == 8
    finally:
        teacher.close()


def test_sigkill_then_rerun_has_no_duplicates_and_pays_nothing_twice(tmp_path):
    """The generation subprocess is SIGKILLed mid-run; the rerun completes the set without duplicates, and a third run
    sends no request at all."""
    teacher = FaultyTeacher(hostile_marker=str(tmp_path / "unused"), delay_s=0.15)
    words = [f"w{i}" for i in range(24)]
    cfg = write_config(tmp_path / "c.yaml", teacher.url, tmp_path, chunk_size="2", tb_count="24",
                       tb_cases='["many"]', tb_words=json.dumps(words))  # fmt: skip
    cmd = [sys.executable, "-m", "data_tools.synth.textbooks", "--config-name", str(cfg)]
    env = os.environ | {KEY_ENV: "sk-test-synth", "OMP_NUM_THREADS": "1"}
    gen = tmp_path / "tb_work" / GENERATIONS
    try:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not gen.exists() or gen.read_text().count("\n") < 6):
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        assert p.returncode == -signal.SIGKILL
        done_before = gen.read_text().count("\n")
        assert 6 <= done_before < 24
        with open(gen, "a") as f:  # as if the kill had cut a line in half
            f.write('{"id": "torn-li')
        requests_before = len(teacher.requests)
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        ids = [json.loads(line)["id"] for line in gen.read_text().splitlines()]
        assert len(ids) == len(set(ids)) == 24
        # The rerun sent only the missing items (those in flight at the kill were cached or re-sent once).
        assert len(teacher.requests) - requests_before <= 24 - done_before + 4
        summary = json.loads((tmp_path / "tb_work" / "summary.json").read_text())
        assert summary["generation"]["requested"] == 24 == summary["generated"] == summary["kept"]
        out = read_zst(tmp_path / "tb_out" / textbooks.OUTPUT_FILE)
        assert len(out) == len({r["id"] for r in out}) == 24
        before = len(teacher.requests)
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and len(teacher.requests) == before
    finally:
        teacher.close()


def test_exercises_against_a_faulty_teacher_are_sandbox_validated(tmp_path, key):
    marker = tmp_path / "HOSTILE_WAS_HERE"
    teacher = FaultyTeacher(hostile_marker=str(marker))
    try:
        cfg = load_config(str(write_config(tmp_path / "c.yaml", teacher.url, tmp_path)))
        s = exercises.run(cfg)
    finally:
        teacher.close()
    g = s["generation"]
    assert g["requested"] == len(EXERCISE_CASES) and g["failed"] == {"http_500": 1}
    assert s["in"] == g["generated"] == s["kept"] + sum(s["dropped"].values())
    assert s["dropped"] == {
        "malformed_reply": 1,
        "wrong_name": 1,
        "sandbox_failed": 1,
        "sandbox_timeout": 1,
        "sandbox_error": 1,
        "vacuous_tests": 1,
        "vacuous_assert": 1,
        "introspection": 1,
    }
    assert s["sandbox_verdicts"] == {"passed": 4, "failed": 1, "timeout": 1, "error": 1}
    d = json.loads((tmp_path / "ex_work" / "diversity-teacher.json").read_text())
    assert d == s["diversity"] and d["kept"] == 3 and d["dropped"] == s["dropped"]
    assert d["replies"]["texts"] == g["generated"] and d["prompt_space"] == len(EXERCISE_CASES)
    assert not marker.exists()  # the hostile body ran only inside the sandbox
    out = read_zst(tmp_path / "ex_out" / "teacher.jsonl.zst")
    assert len(out) == 3
    for r in out:
        assert r["prompt"].startswith("def solve_task(xs):\n") and r["prompt"].rstrip().endswith('"""')
        assert r["completion"].startswith("    ") and "return" in r["completion"]
        assert r["tests"] and all(t.startswith("assert solve_task(") for t in r["tests"])
        assert r["entry_point"] == "solve_task" and r["teacher_model"] == "fake-teacher" and r["text"]
    # The records are complete programs that pass, outside the pipeline too (through the same sandbox).
    progs = [r["prompt"] + r["completion"] + "\n" + "\n".join(r["tests"]) for r in out]
    assert all(res.passed for res in run_programs(progs))


def test_parse_exercise_reply_is_strict():
    good = fake_exercise("ex-ok", "m")
    ex, reason = parse_exercise_reply(good, "solve_task", max_tests=8)
    assert reason is None and ex.tests == EXERCISES["ex-ok"][1]
    assert ex.prompt == 'def solve_task(xs):\n    """Return the sum of the squares of xs."""\n'
    cases = {
        "no blocks at all": "malformed_reply",
        "```python\nimport numpy\ndef solve_task(x):\n    '''d'''\n    return x\n```\n```python\nassert solve_task(1) == 1\n```": "non_stdlib_import",
        "```python\ndef solve_task(x):\n    return x\n```\n```python\nassert solve_task(1) == 1\n```": "no_docstring",
        "```python\ndef solve_task(x):\n    '''d'''\n```\n```python\nassert solve_task(1) == 1\n```": "empty_body",
        "```python\ndef solve_task(x):\n    '''d'''\n    return x\nprint(1)\n```\n```python\nassert solve_task(1)\n```": "extra_code",
        "```python\ndef solve_task(x):\n    '''d'''\n    return x\n```\n```python\nprint(solve_task(1))\n```": "bad_tests",
        "```python\ndef solve_task(x:\n```\n```python\nassert 1\n```": "syntax_error",
    }  # fmt: skip
    for reply, want in cases.items():
        assert parse_exercise_reply(reply, "solve_task", 8) == (None, want), reply
    ex, _ = parse_exercise_reply(
        "```python\nimport math\n\ndef solve_task(x):\n    '''Root.'''\n    return math.sqrt(x)\n```\n"
        "```python\nassert solve_task(4) == 2\n```",
        "solve_task",
        8,
    )
    assert ex.prompt.startswith("import math\n\ndef solve_task(x):") and ex.completion == "    return math.sqrt(x)\n"


def test_validator_keeps_correct_and_drops_wrong_and_hostile(tmp_path):
    marker = tmp_path / "escaped"
    head = 'def f(n):\n    """Return n + 1."""\n'
    cands = [
        ("ok", Exercise(head, "    return n + 1\n", ["assert f(1) == 2"], "f")),
        ("wrong", Exercise(head, "    return n\n", ["assert f(1) == 2"], "f")),
        ("exit", Exercise(head, "    raise SystemExit(0)\n", ["assert f(1) == 2"], "f")),  # faking success
        ("fork", Exercise(head, "    import os\n    os.fork()\n    return n + 1\n", ["assert f(1) == 2"], "f")),
        ("write", Exercise(head, f"    open({str(marker)!r}, 'w').write('x')\n    return n + 1\n", ["assert f(1) == 2"], "f")),
        ("net", Exercise(head, "    import socket\n    socket.create_connection(('127.0.0.1', 80))\n    return n + 1\n",
                         ["assert f(1) == 2"], "f")),
        ("spin", Exercise(head, "    while n:\n        pass\n", ["assert f(1) == 2"], "f")),
    ]  # fmt: skip
    kept, dropped, verdicts = validate(cands, timeout_s=2.0, workers=2, progress=False)
    assert [c for c, _ in kept] == ["ok"]
    assert dropped == Counter({"sandbox_error": 4, "sandbox_failed": 1, "sandbox_timeout": 1})
    assert sum(verdicts.values()) == len(cands) and not marker.exists()


def test_miner_makes_sandbox_validated_exercises_from_stdlib(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("bisect.py", "calendar.py", "colorsys.py", "textwrap.py", "fnmatch.py", "string.py"):
        (src / name).write_text((STDLIB / name).read_text())
    (src / "handmade.py").write_text(
        "import os\nimport numpy as np\nLIMIT = 3\n\n"
        'def clamp(x):\n    """Clamp x to LIMIT."""\n    y = min(x, LIMIT)\n    return y\n\n'
        'def norm(x):\n    """Numpy norm."""\n    v = np.asarray(x)\n    return float(v @ v)\n\n'
        'def nodoc(x):\n    y = x\n    return y\n\n'
        'def wipe(p):\n    """Remove p and report."""\n    os.remove(p)\n    return True\n\n'
        'def double_all(xs):\n    """Return every element of xs doubled."""\n    out = [x * 2 for x in xs]\n    return out\n'
    )  # fmt: skip
    cfg = load_config(
        "demo",
        [
            "exercises.source=mine",
            f"exercises.mine.inputs=[{src}]",
            f"exercises.work_dir={tmp_path / 'w'}",
            f"exercises.output_dir={tmp_path / 'o'}",
            "progress=false",
        ],
    )
    s = exercises.run(cfg)
    assert s["in"] == s["kept"] + sum(s["dropped"].values()) and s["documents"] == 7
    assert s["kept"] >= 5 and s["dropped"]["not_self_contained"] >= 2 and s["dropped"]["no_docstring"] >= 1
    assert s["dropped"]["no_tests"] >= 1  # wipe(): every probe raises, so no test can be made
    out = read_zst(tmp_path / "o" / "mined.jsonl.zst")
    names = {r["function"] for r in out}
    assert "double_all" in names and not names & {"clamp", "norm", "nodoc", "wipe"}
    for r in out:
        assert r["source"] == "mined" and r["document"] and len(r["tests"]) >= 2
        assert r["prompt"].rstrip().endswith(('"""', "'''")) and r["completion"].strip()
    dbl = next(r for r in out if r["function"] == "double_all")
    assert "assert double_all([1, 2, 3]) == [2, 4, 6]" in dbl["tests"]
    progs = [r["prompt"] + r["completion"] + "\n" + "\n".join(r["tests"]) for r in out]
    assert all(res.passed for res in run_programs(progs))
    broken = [r["prompt"] + "    return None\n\n" + "\n".join(r["tests"]) for r in out]  # the tests do test the body
    assert sum(res.passed for res in run_programs(broken)) == 0


def test_generators_complete_against_our_own_served_model(tmp_path, key):
    """Gibberish teacher: the pipelines complete and every item is a counted drop (or, rarely, kept)."""
    from test_serve import ServeProcess, write_tiny_checkpoint

    served = ServeProcess(write_tiny_checkpoint(tmp_path / "ckpt"), "batch_wait_ms=20")
    try:
        overrides = [
            f"teacher.base_url={served.url}",
            "teacher.model=phi-train",
            f"teacher.api_key_env={KEY_ENV}",
            "teacher.max_tokens=48",
            "teacher.timeout_s=60",
            "textbooks.count=4",
            "exercises.count=3",
            f"textbooks.work_dir={tmp_path / 'tw'}",
            f"textbooks.output_dir={tmp_path / 'to'}",
            f"exercises.work_dir={tmp_path / 'ew'}",
            f"exercises.output_dir={tmp_path / 'eo'}",
            "progress=false",
        ]
        cfg = load_config("demo", overrides)
        t = textbooks.run(cfg)
        e = exercises.run(cfg)
        health = served.get("/health")
    finally:
        served.close()
    assert t["generation"] == {"requested": 4, "generated": 4, "reused": 0, "failed": {}}
    assert t["generated"] == t["kept"] + sum(t["dropped"].values()) == 4
    assert t["teacher"]["completion_tokens"] > 0
    assert e["generation"]["generated"] == 3 == e["kept"] + sum(e["dropped"].values())
    assert e["dropped"].get("malformed_reply", 0) >= 2
    assert health["requests"] == 7 and health["batches"] <= 7
    # distinct items, distinct samples (each request carried its item's seed; the server seeds rows separately)
    replies = [json.loads(line)["reply"] for line in (tmp_path / "tw" / GENERATIONS).read_text().splitlines()]
    assert len(replies) == 4 and len(set(replies)) == 4
    d = json.loads((tmp_path / "tw" / "diversity.json").read_text())
    assert d["replies"]["texts"] == 4 and d["replies"]["exact_duplicates"] == 0 and d["prompt_space"] > 10**6


def test_diversity_seeds_are_reproducible_and_user_topics_replace_the_defaults(tmp_path):
    topics = tmp_path / "topics.txt"
    topics.write_text("# my curriculum\nbit tricks\ntail recursion\n")
    over = [f"exercises.topics_file={topics}", "exercises.count=12"]
    a, b = exercises.build_items(load_config("demo", over)), exercises.build_items(load_config("demo", over))
    assert [i.id for i in a] == [i.id for i in b] and len({i.id for i in a}) == 12
    assert {i.seeds["topic"] for i in a} == {"bit tricks", "tail recursion"}
    assert all(f"`{i.seeds['name']}`" in i.prompt for i in a)
    more = exercises.build_items(load_config("demo", [*over, "exercises.count=20"]))
    assert [i.id for i in more[:12]] == [i.id for i in a]  # raising count keeps the first items (and their cache)
    other = exercises.build_items(load_config("demo", [*over, "exercises.seed=1"]))
    assert {i.id for i in other} != {i.id for i in a}
    tb = textbooks.build_items(load_config("demo", ["textbooks.count=30"]))
    assert len({(i.seeds["topic"], i.seeds["subtopic"]) for i in tb}) >= 15 and len({i.template for i in tb}) == 2
    with pytest.raises(ValueError, match="textbooks.topics_file='/nope.yaml' does not exist"):
        textbooks.build_items(load_config("demo", ["textbooks.topics_file=/nope.yaml"]))


def test_a_job_with_failed_items_exits_1_with_the_count_and_the_command(tmp_path, key, capsys):
    teacher = FaultyTeacher(hostile_marker=str(tmp_path / "unused"))
    try:
        cfg = write_config(tmp_path / "c.yaml", teacher.url, tmp_path, tb_count="3",
                           tb_cases='["500-always", "ok-1", "ok-2"]')  # fmt: skip
        assert textbooks.main(["--config-name", str(cfg)]) == 1
        err = capsys.readouterr().err
        assert "2 failed" not in err and "1 of 3 items still failed" in err and "http_500: 1" in err
        assert f"python -m data_tools.synth.textbooks --config-name {cfg}" in err and "allow_partial=true" in err
        assert len(read_zst(tmp_path / "tb_out" / textbooks.OUTPUT_FILE)) == 2  # the partial set is written anyway
        # a config file without a defaults list takes overrides of its own keys only: the setting goes in the file
        cfg.write_text(cfg.read_text() + "allow_partial: true\n")
        assert textbooks.main(["--config-name", str(cfg)]) == 0
        assert "accepted (allow_partial=true)" in capsys.readouterr().err
        cfg_ex = write_config(tmp_path / "e.yaml", teacher.url, tmp_path)
        assert exercises.main(["--config-name", str(cfg_ex)]) == 1
        assert "1 of 12 items still failed" in capsys.readouterr().err
    finally:
        teacher.close()


def test_always_true_asserts_and_introspection_are_rejected_statically():
    from data_tools.synth.exercises import static_reason

    head = 'def f(x):\n    """Return x + 1."""\n'
    vacuous = ['assert (f(1) == 2, "msg")', "assert (lambda: f(1) == 2)", "assert 'f(1) == 2'", "assert 1",
               "assert [f(1)]", "assert {f(1): 2}", "assert (f(i) for i in [1])", "assert f(1) == 2 or True",
               'assert f"{f(1)} == 2"', "assert (y := (f(1), 2))", "if True:\n    assert (f(1), 2)"]  # fmt: skip
    for test in vacuous:
        assert static_reason(Exercise(head, "    return x + 1\n", [test], "f")) == "vacuous_assert", test
    meaningful = ["assert f(1) == 2", "assert not f(-1)", "assert f(1) and True", "assert []", "assert f(1) or f(2)"]
    for test in meaningful:
        assert static_reason(Exercise(head, "    return x + 1\n", [test], "f")) is None, test
    hacks = ["    import inspect\n    return inspect.currentframe().f_back.f_locals['x']\n",
             "    import gc\n    return len(gc.get_objects())\n", "    __builtins__['len'] = 1\n    return x\n",
             "    import sys\n    return sys._getframe(1).f_globals\n"]  # fmt: skip
    for body in hacks:
        assert static_reason(Exercise(head, body, ["assert f(1) == 2"], "f")) == "introspection", body
    assert static_reason(Exercise(head, "    return x\n", ["import sys\nassert sys.modules and f(1)"], "f"))


def test_mutation_check_drops_tests_that_pass_without_the_body(tmp_path):
    head = 'def f(xs):\n    """Return the first element of xs, or None when empty."""\n'
    body = "    return xs[0] if xs else None\n"
    cands = [
        ("pins", Exercise(head, body, ["assert f([3, 4]) == 3", "assert f([]) is None"], "f")),
        ("none-only", Exercise(head, body, ["assert f([]) is None"], "f")),
        ("raises-ok", Exercise(head, body, ["try:\n    f([1])\nexcept Exception:\n    pass", "assert f([]) is None"], "f")),
        ("never-called", Exercise(head, body, ["assert [f(x) for x in []] == []"], "f")),
    ]  # fmt: skip
    kept, dropped, verdicts = validate(cands, timeout_s=5.0, workers=2, progress=False)
    assert [c for c, _ in kept] == ["pins"] and dropped == Counter({"vacuous_tests": 3})
    assert verdicts == {"passed": 4}


def test_diversity_report_measures_duplicates_ngrams_clusters_and_logs_to_wandb(tmp_path, monkeypatch):
    from data_tools.codetextbook.config import DedupConfig
    from data_tools.synth.diversity import cluster_entropy, distinct_n, diversity_report, log_to_wandb
    from phi_train.config import WandbConfig

    a = fake_textbook("alpha")
    near = a.replace("In summary", "To sum up")  # one changed phrase: a near-duplicate, not an exact one
    others = [fake_textbook(f"other-{i}") for i in range(6)]
    replies = [a, a, near, *others]
    seeds = [{"topic": "t1" if i % 3 else "t2", "subtopic": f"s{i}"} for i in range(len(replies))]
    rep = diversity_report(replies, [a, *others], seeds, seeds[:1] + seeds[3:], Counter({"exact_duplicate": 1,
                           "near_duplicate": 1}), DedupConfig(), clusters=3)  # fmt: skip
    assert rep["replies"]["exact_duplicates"] == 1 and rep["replies"]["near_duplicates"] == 1
    assert rep["replies"]["texts"] == 9 and rep["kept"] == 7 and rep["clusters"] == 3
    assert rep["topics_requested"]["topic"] == {"t1": 6, "t2": 3} and sum(rep["topics_kept"]["topic"].values()) == 7
    assert distinct_n(["a b a b", "c"]) == {"distinct_1": 3 / 5, "distinct_2": 2 / 3, "distinct_3": 1.0}
    assert distinct_n([""]) == {"distinct_1": None, "distinct_2": None, "distinct_3": None}
    two_groups = ["sort the list with merge sort"] * 4 + ["parse the json file lines"] * 4
    assert cluster_entropy(two_groups, 2)["cluster_entropy"] == pytest.approx(1.0)
    lopsided = cluster_entropy(["sort the list"] * 7 + ["parse json"], 2)
    assert lopsided["cluster_sizes"] == [7, 1] and 0 < lopsided["cluster_entropy"] < 0.6
    assert cluster_entropy(["x", "y", "z"], 8)["cluster_entropy"] is None  # too few texts to cluster
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_to_wandb(rep, "textbooks", WandbConfig(mode="offline", project="phi-train-synth-test"), {"count": 9})
    runs = list((tmp_path / "wandb").glob("offline-run-*/*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
