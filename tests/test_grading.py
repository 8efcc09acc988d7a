"""Teacher-graded unconventional problems (phi_train/grading.py) against a real `/v1/chat/completions` server on
127.0.0.1, in process and through `launch/evaluate.py` as a subprocess.

The server's behaviour is keyed by a `GRADE:<case>` marker that the test problems carry in their solutions: a score,
a malformed reply once or always, HTTP 500 / 429 once, 500 always. Checks: strict parsing, malformed replies re-asked
with the reason then counted as ungraded, HTTP failures retried by the client, counts reconcile, the reply cache makes
a rerun free, the shipped problem set is sound, and a canary API key is in no file written and no output printed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from fakes import ChatHandler, FakeChatServer

from phi_train.benchmarks import BenchmarkError, Problem, check_program
from phi_train.grading import (
    DEFAULT_TEMPLATE,
    REPAIR_MESSAGE,
    GradingError,
    RubricProblem,
    grade,
    load_unconventional,
    parse_score,
    render,
)
from phi_train.sandbox import Limits, run_programs

CANARY = "sk-canary-grader-5d1e9b7c3a"
KEY_ENV = "PHI_TEST_GRADER_KEY"
REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch" / "evaluate.py"


class FakeGrader(FakeChatServer):
    """`/v1/chat/completions` answering per `GRADE:<case>` marker in the first user message (default: SCORE: 8)."""

    marker = r"GRADE:(\S+)"
    marker_message = 0
    model = "fake-grader"
    usage = (300, 20)

    def respond(self, h: ChatHandler, case: str, nth: int, body: dict) -> None:
        if case.startswith("score-"):
            h.ok(f"Meets the rubric on most points.\n\nSCORE: {case[6:]}\n")
        elif case == "malformed-once":  # the first ask is malformed; the repair (3 messages) is fine
            h.ok("I would give it 7/10." if len(body["messages"]) == 1 else "Corrected.\nSCORE: 6")
        elif case == "malformed-always":
            h.ok("Good work.\nscore: 7/10")
        elif case == "500-once" and nth == 1:
            h.send(500, b'{"error": {"message": "boom"}}')
        elif case == "429-once" and nth == 1:
            h.send(429, b'{"error": {"message": "slow down"}}', headers={"Retry-After": "0.05"})
        elif case == "500-always":
            h.send(500, b'{"error": {"message": "boom"}}')
        elif case in ("500-once", "429-once"):
            h.ok("Fine.\nSCORE: 4")
        else:
            h.ok("Correct and clear.\nSCORE: 8")


@pytest.fixture()
def server():
    with FakeGrader() as s:
        yield s


# Problems of our own, one per server case; three without a test (graded only, no pass@k).
CASES = ["score-7", "malformed-once", "malformed-always", "500-once", "429-once", "500-always", "score-0", "score-10"]
UNTESTED = {"score-0", "score-10", "500-always"}


def case_rows() -> list[dict]:
    rows = []
    for i, case in enumerate(CASES):
        row = {
            "task_id": f"T/{i}",
            "prompt": f'def add_{i}(a: int, b: int) -> int:\n    """Add two numbers {{like this}}."""\n',
            "entry_point": f"add_{i}",
            "canonical_solution": f"    return a + b  # GRADE:{case}\n",
            "rubric": "- 8: returns the sum\n- 2: no needless code",
        }
        if case not in UNTESTED:
            row["test"] = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
        rows.append(row)
    return rows


@pytest.fixture()
def case_file(tmp_path) -> Path:
    path = tmp_path / "cases.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in case_rows()))
    return path


def run_launch(*overrides: str, cwd: Path, key: str | None = CANARY) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB") and k != KEY_ENV}
    env |= {"WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"} | ({KEY_ENV: key} if key else {})
    return subprocess.run(
        [sys.executable, str(LAUNCH), "eval=unconventional", *overrides],
        cwd=cwd,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def grader_overrides(server: FakeGrader) -> list[str]:
    return [
        f"eval.grader.base_url={server.url}",
        "eval.grader.model=fake-grader",
        f"eval.grader.api_key_env={KEY_ENV}",
        "eval.grader.backoff_base_s=0.01",
        "eval.grader.backoff_max_s=0.05",
        "eval.grader.timeout_s=5",
        "eval.grader.requests_per_minute=60000",
    ]


def assert_no_canary(root: Path, printed: str) -> int:
    assert CANARY not in printed
    n = 0
    for f in root.rglob("*"):
        if f.is_file():
            assert CANARY.encode() not in f.read_bytes(), f"API key leaked into {f}"
            n += 1
    return n


# --- strict parsing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, score, reason",
    [
        ("Correct and idiomatic.\nSCORE: 7", 7, None),
        ("SCORE: 0", 0, None),
        ("SCORE: 10\n\n  ", 10, None),  # trailing blank lines are not text
        ("Reasoning.\n  SCORE:9  ", 9, None),  # blanks around the line and after the colon
        ("Score breakdown:\n- correctness 4/4\nCorrectness score: 3/4\nSCORE: 8", 8, None),  # sub-scores are not claims
        ("SCORE: 11", None, "score_out_of_range"),
        ("SCORE: 100", None, "score_out_of_range"),
        ("score: 7/10", None, "bad_score_format"),
        ("Score: 7", None, "bad_score_format"),  # the keyword is upper case
        ("SCORE: 7/10", None, "bad_score_format"),
        ("SCORE: 7.5", None, "bad_score_format"),
        ("SCORE: -1", None, "bad_score_format"),
        ("SCORE: 07", None, "bad_score_format"),
        ("**SCORE: 7**", None, "bad_score_format"),
        ("SCORE: seven", None, "bad_score_format"),
        ("SCORE: 5\nSCORE: 6", None, "multiple_score_lines"),
        ("SCORE: 6\nSCORE: 6", None, "multiple_score_lines"),  # even when they agree
        ("**Score**: 6\nSCORE: 7", None, "multiple_score_lines"),
        ("Final score: 6\nSCORE: 7", None, "multiple_score_lines"),
        ("SCORE: 7\nHope this helps!", None, "score_not_last_line"),
        ("I'd give it 7/10.", None, "no_score_line"),
        ("SCORE 7", None, "no_score_line"),
        ("", None, "empty_reply"),
        ("  \n\n", None, "empty_reply"),
        (None, None, "empty_reply"),
    ],
)
def test_parse_score_is_strict(reply, score, reason):
    parsed = parse_score(reply)
    assert (parsed.score, parsed.reason) == (score, reason)


def test_parse_score_keeps_the_rationale():
    assert parse_score("Line one.\nLine two.\nSCORE: 3").rationale == "Line one.\nLine two."


def test_render_substitutes_once_and_checks_placeholders():
    p = RubricProblem(
        Problem(task_id="x", prompt="def f():\n", test="", kind="humaneval", entry_point="f"),
        rubric="- 10: returns {rubric}",
    )
    text = render(DEFAULT_TEMPLATE, p, "    return {'a': '{prompt}'}\n")
    assert "- 10: returns {rubric}" in text  # a value is never substituted again
    assert "def f():\n    return {'a': '{prompt}'}" in text
    assert text.rstrip().endswith("with nothing after it.")
    with pytest.raises(GradingError, match=r"unknown placeholder \{code\}; valid: \{prompt\}") as e:
        grade([p], {"x": ["    pass\n"]}, client=None, template="{rubric} {code}")
    assert "\n" not in str(e.value)
    with pytest.raises(GradingError, match=r"must contain \{rubric\} and \{solution\}"):
        grade([p], {"x": ["    pass\n"]}, client=None, template="Grade {solution}")


# --- problem files ----------------------------------------------------------------------------------------------


def test_shipped_problem_set_is_sound():
    """12 original problems: fields present, ids unique, rubrics allocate exactly 10 points, canonical solutions pass
    their tests in the sandbox and a do-nothing completion fails every one (the tests discriminate)."""
    problems = load_unconventional()
    assert len(problems) == 12 and len({p.task_id for p in problems}) == 12
    for g in problems:
        p = g.problem
        assert p.prompt.rstrip().endswith('"""') and f"def {p.entry_point}(" in p.prompt
        assert p.reference.startswith("    ") and g.executable and "def check(candidate)" in p.test
        points = [int(m) for m in re.findall(r"^- (\d+):", g.rubric, re.MULTILINE)]
        assert sum(points) == 10, (p.task_id, points)
    programs = [check_program(g.problem, g.problem.reference) for g in problems]
    programs += [check_program(g.problem, "    return None\n") for g in problems]
    verdicts = [r.verdict for r in run_programs(programs, Limits(timeout_s=10), workers=2)]
    assert verdicts[:12] == ["passed"] * 12, [(g.task_id, v) for g, v in zip(problems, verdicts)]
    assert "passed" not in verdicts[12:]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.pop("rubric"), r"cases.jsonl:2: missing field 'rubric'"),
        (lambda r: r.update(rubric="  "), r"cases.jsonl:2: field 'rubric' is empty"),
        (lambda r: r.update(task_id="T/0"), r"cases.jsonl:2: duplicate task_id 'T/0'"),
        (lambda r: r.update(test=["assert 1"]), r"cases.jsonl:2: field 'test' must be str, got list"),
        (lambda r: r.pop("entry_point"), r"cases.jsonl:2: missing field 'entry_point'"),
    ],
)
def test_bad_problem_file_names_file_line_and_field(tmp_path, edit, message):
    rows = case_rows()[:2]
    edit(rows[1])
    path = tmp_path / "cases.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises((GradingError, BenchmarkError), match=message) as e:
        load_unconventional(path)
    assert "\n" not in str(e.value)


# --- grade() in process: retries, reconciling counts, cache -----------------------------------------------------


def test_grade_retries_malformed_replies_and_a_rerun_is_free(server, tmp_path, case_file, monkeypatch):
    from phi_train.teacher import TeacherClient

    monkeypatch.setenv(KEY_ENV, CANARY)
    problems = load_unconventional(case_file)
    completions = {g.task_id: [g.problem.reference] for g in problems}

    def client():
        return TeacherClient(
            server.url, "fake-grader", KEY_ENV, max_retries=2, timeout_s=5, cache_dir=tmp_path / "cache",
            backoff_base_s=0.01, backoff_max_s=0.05, requests_per_minute=60000,
        )  # fmt: skip

    c1 = client()
    records, summary = grade(problems, completions, c1, max_retries=2, sampling={"temperature": 0.0})
    got = {case: (r["score"], r["ungraded_reason"], r["attempts"]) for case, r in zip(CASES, records)}
    assert got == {
        "score-7": (7, None, 1),
        "malformed-once": (6, None, 2),
        "malformed-always": (None, "bad_score_format", 3),
        "500-once": (4, None, 1),
        "429-once": (4, None, 1),
        "500-always": (None, "teacher_http_500", 1),
        "score-0": (0, None, 1),
        "score-10": (10, None, 1),
    }
    assert summary["graded"] + summary["ungraded"] == summary["samples"] == 8
    assert summary["ungraded_reasons"] == {"bad_score_format": 1, "teacher_http_500": 1}
    assert summary["mean_score"] == pytest.approx((7 + 6 + 4 + 4 + 0 + 10) / 6)
    assert summary["mean_score_ungraded_as_zero"] == pytest.approx((7 + 6 + 4 + 4 + 0 + 10) / 8)
    assert summary["distribution"]["4"] == 2 and sum(summary["distribution"].values()) == 6
    assert summary["retried"] == 2 and records[0]["rationale"] == "Meets the rubric on most points."
    # Malformed: asked 1 + max_retries times; the client retried 500/429 once each and 500-always 1 + 2 times.
    assert server.seen == Counter(
        {"score-7": 1, "malformed-once": 2, "malformed-always": 3, "500-once": 2, "429-once": 2, "500-always": 3,
         "score-0": 1, "score-10": 1}
    )  # fmt: skip
    # A re-ask shows the teacher its bad reply and what was wrong with it.
    repair = [r["messages"] for r in server.requests if r["case"] == "malformed-once"][1]
    assert [m["role"] for m in repair] == ["user", "assistant", "user"]
    assert repair[1]["content"] == "I would give it 7/10."
    assert repair[2]["content"] == REPAIR_MESSAGE.format(why="no line starts with `SCORE:`")
    # The teacher is shown the whole function (prompt + completion, braces intact) and the rubric.
    shown = next(r["messages"][0]["content"] for r in server.requests if r["case"] == "score-7")
    assert 'def add_0(a: int, b: int) -> int:\n    """Add two numbers {like this}."""\n    return a + b' in shown
    assert "- 8: returns the sum\n- 2: no needless code" in shown
    assert {r["temperature"] for r in server.requests} == {0.0}
    assert all(r["auth"] == f"Bearer {CANARY}" for r in server.requests)

    # Rerun with a fresh client on the same cache: only the request that never got a reply goes out again.
    before = len(server.requests)
    records2, summary2 = grade(problems, completions, client(), max_retries=2, sampling={"temperature": 0.0})
    assert {r["case"] for r in server.requests[before:]} == {"500-always"}
    assert [r["score"] for r in records2] == [r["score"] for r in records]
    assert_no_canary(tmp_path, "")


# --- launch/evaluate.py end to end ------------------------------------------------------------------------------


def test_launch_grades_with_retries_and_never_writes_the_key(server, tmp_path, case_file):
    out = tmp_path / "out"
    r = run_launch(
        f"eval.path={case_file}", "eval.reference=true", f"eval.out_dir={out}", "eval.wandb=offline",
        "eval.grader.parse_retries=1", *grader_overrides(server), cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    g = summary["grading"]
    assert (summary["problems"], summary["samples"], summary["executable_problems"]) == (8, 8, 5)
    assert summary["pass@k"] == {"pass@1": 1.0} and summary["verdicts"]["passed"] == 5
    assert (g["graded"], g["ungraded"], g["samples"]) == (6, 2, 8)
    assert g["ungraded_reasons"] == {"bad_score_format": 1, "teacher_http_500": 1}
    assert g["mean_score"] == pytest.approx(31 / 6) and g["grader_model"] == "fake-grader"
    assert server.seen["malformed-always"] == 2 and server.seen["malformed-once"] == 2  # max_retries=1
    assert server.seen["500-once"] == 2 and server.seen["429-once"] == 2 and server.seen["500-always"] == 5
    assert summary["teacher"]["errors"] == {"http_500": 1} and summary["teacher"]["retries"] >= 6
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(s["task_id"], s["verdict"], s["score"]) for s in samples[:3]] == [
        ("T/0", "passed", 7), ("T/1", "passed", 6), ("T/2", "passed", None)
    ]  # fmt: skip
    assert samples[6]["verdict"] is None and samples[6]["score"] == 0  # graded, but has no test to run
    md = (out / "summary.md").read_text()
    assert "| 5 | 5 | 5 | 100.00% |" in md and "| 8 | 6 | 2 | 5.17 / 10 (51.7%) | 3.88 |" in md
    assert json.loads((out / "config.json").read_text())["grader"]["api_key_env"] == KEY_ENV
    assert list((out / "wandb").glob("offline-run-*")), "summary not logged to wandb (offline)"
    assert all(req["auth"] == f"Bearer {CANARY}" for req in server.requests)  # the key went over the wire only
    assert assert_no_canary(tmp_path, r.stdout + r.stderr) > 5


def test_launch_shipped_set_reference_and_cached_rerun(server, tmp_path):
    out = tmp_path / "ref"
    args = ["eval.reference=true", f"eval.out_dir={out}", "eval.wandb=disabled", *grader_overrides(server)]
    r = run_launch(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pass@k"] == {"pass@1": 1.0} and summary["solved"] == 12
    assert summary["grading"]["distribution"]["8"] == 12 and summary["grading"]["score_pct"] == 80.0
    assert summary["teacher"]["http_requests"] == 12 and len(server.requests) == 12
    # The teacher saw each problem's rubric and the full solution (prompt + canonical body).
    shown = {q["messages"][0]["content"] for q in server.requests}
    for g in load_unconventional():
        assert sum(g.rubric in t and (g.problem.prompt + g.problem.reference).rstrip() in t for t in shown) == 1
    r2 = run_launch(*args, cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    again = json.loads((out / "summary.json").read_text())
    assert again["teacher"]["http_requests"] == 0 and again["teacher"]["cached"] == 12
    assert again["grading"]["mean_score"] == 8.0 and len(server.requests) == 12
    assert_no_canary(tmp_path, r.stdout + r.stderr + r2.stdout + r2.stderr)


@pytest.mark.parametrize(
    "overrides, key, message",
    [
        ([], CANARY, "eval.grader.base_url is required for eval=unconventional"),
        (["eval.grader.base_url=http://127.0.0.1:9/v1"], CANARY, "eval.grader.model is required"),
        (["eval.grader.base_url=http://127.0.0.1:9/v1", "eval.grader.model=m", f"eval.grader.api_key_env={KEY_ENV}"],
         None, f"environment variable {KEY_ENV} is not set"),
        (["eval.grader.base_url=http://127.0.0.1:9/v1", "eval.grader.model=m", f"eval.grader.api_key_env={KEY_ENV}",
          "eval.grader.template_file=/nonexistent/t.txt"], CANARY, "eval.grader.template_file='/nonexistent/t.txt'"),
        (["eval.grader.base_url=http://127.0.0.1:9/v1", "eval.grader.model=m", f"eval.grader.api_key_env={KEY_ENV}",
          "eval.grader.parse_retries=-1"], CANARY, "eval.grader.parse_retries=-1 must be >= 0"),
        (["eval.grader.max_retries=-1"], CANARY, "eval.grader.max_retries=-1 must be >= 0"),
    ],
)  # fmt: skip
def test_launch_bad_grader_settings_are_one_line_exit_2(tmp_path, overrides, key, message):
    r = run_launch("eval.reference=true", "eval.wandb=disabled", *overrides, cwd=tmp_path, key=key)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr[-2000:]


def test_launch_grades_a_checkpoints_completions(server, tmp_path):
    """The model path: a tiny random model exported with its tokenizer samples completions; each is executed and graded."""
    import torch

    from data_tools.tokenizer import train_tokenizer
    from phi_train.config import model_config
    from phi_train.interop import export_hf
    from phi_train.model import PhiModel
    from phi_train.tokenizer import Tokenizer

    problems = load_unconventional()[:2]
    texts = [g.problem.prompt + g.problem.reference for g in load_unconventional()] * 20
    tok = train_tokenizer(texts, tmp_path / "tok", vocab_size=400, num_threads=1)
    cfg = model_config(
        preset="phi1_tiny", n_layer=1, d_model=64, n_head=2, d_mlp=128, vocab_size=Tokenizer(tok).vocab_size,
        max_seq_len=2048,
    )  # fmt: skip
    torch.manual_seed(0)
    ckpt = export_hf(PhiModel(cfg).state_dict(), cfg, tok, tmp_path / "tiny")
    out = tmp_path / "out"
    r = run_launch(
        f"eval.checkpoint={ckpt}", "eval.limit=2", "eval.max_new_tokens=8", f"eval.out_dir={out}",
        "eval.wandb=disabled", *grader_overrides(server), cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["source"] == str(ckpt) and summary["problems"] == 2
    assert summary["pass@k"] == {"pass@1": 0.0}  # 8 random tokens solve nothing
    assert summary["grading"]["graded"] == 2 and len(server.requests) == 2
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for s, g in zip(samples, problems):
        assert s["task_id"] == g.task_id and s["verdict"] in ("failed", "error") and s["score"] == 8
        shown = next(q["messages"][0]["content"] for q in server.requests if g.rubric in q["messages"][0]["content"])
        assert s["completion"].strip() and (g.problem.prompt + s["completion"]).rstrip() in shown  # its own completion
