"""LLM-graded "unconventional" problems: the problem format, the strict score parser, and the grader.

phi-1 (§4, Table 2 of "Textbooks Are All You Need") checks that its HumanEval score is not memorisation by writing 50
new problems "unlikely to appear in any training set" and having GPT-4 grade each solution against a rubric, since
unit tests alone say nothing about partially right or badly written code. This module does the same with any
OpenAI-compatible teacher (`data_tools.teacher.TeacherClient`: limits, HTTP retries, disk cache, key from the
environment only).

Problem file (JSONL, one object per line): `task_id`, `prompt` (HumanEval style: signature + docstring), `entry_point`,
`rubric` (what a good solution does and how the 10 points are allocated), optional `canonical_solution` (needed by
`eval.reference=true`) and optional `test` (a HumanEval `check(candidate)` function: when present, the completion is
also executed in the sandbox and pass@k is reported beside the grade).

The teacher's reply is parsed strictly (`parse_score`): its last line must be `SCORE: <0..10>`. A malformed reply is
asked again, with the bad reply and what was wrong with it in the conversation, up to `parse_retries` times; after that
the sample is counted as `ungraded` with the reason. graded + ungraded == samples, always.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from phi_train.benchmarks import HUMANEVAL_STOPS, Problem, _field, _read_jsonl, check_completions
from phi_train.errors import PhiTrainError
from phi_train.teacher import TeacherConfig

SCORE_MAX = 10
PLACEHOLDERS = ("prompt", "solution", "completion", "rubric", "entry_point")
"""What a template may contain: the problem, prompt + completion, the completion alone, the rubric, the function."""

DEFAULT_TEMPLATE = """\
You are grading a student's solution to a Python programming problem.

## Problem
```python
{prompt}
```

## Rubric (10 points in all)
{rubric}

## Student's solution
```python
{solution}
```

Grade the solution against the rubric. Judge correctness by reading the code carefully (it has not been run for
you), then award the points the rubric allocates. Explain your reasoning in a few sentences, then end your reply
with exactly one line of the form

SCORE: <integer from 0 to 10>

with nothing after it.
"""

REPAIR_MESSAGE = (
    "Your reply could not be read: {why}. Reply again: a few sentences of reasoning, then exactly one final line "
    "`SCORE: <integer from 0 to 10>` with nothing after it."
)

PARSE_REASONS = {
    "empty_reply": "the reply is empty",
    "no_score_line": "no line starts with `SCORE:`",
    "multiple_score_lines": "more than one line states a score",
    "score_not_last_line": "the SCORE line is not the last line",
    "bad_score_format": "the last line is not exactly `SCORE: <integer>`",
    "score_out_of_range": "the score is larger than 10",
}
"""Every way a reply can be malformed, with the explanation sent back to the teacher when it is asked again."""

# A line that *states* a score: it starts (after markup such as "**", "##", "- ") with "score" or "final score" then
# ":" or "=", in any case. "Score breakdown" or "Correctness score: 3/4" (rubric sub-scores) are not claims.
_SCORE_CLAIM = re.compile(r"^[\s*#_>`-]*(?:final\s+)?score[\s*_`]*[:=]", re.IGNORECASE)
# The only accepted form: upper-case SCORE, a colon, optional blanks, a non-negative integer, nothing else.
_SCORE_LINE = re.compile(r"^SCORE:[ \t]*(\d+)$")


class GradingError(PhiTrainError):
    """A bad grader setting or problem file; launch/evaluate.py prints it on one line and exits 2."""


# --- problems ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RubricProblem:
    """A problem graded by a teacher; `problem` is its HumanEval-format twin used for sampling and the sandbox."""

    problem: Problem
    rubric: str

    @property
    def task_id(self) -> str:
        return self.problem.task_id

    @property
    def executable(self) -> bool:
        """Has a `test`: pass@k is computed for it too."""
        return bool(self.problem.test)


def shipped_problems_path() -> Path:
    """The 12 example problems shipped as package data (`phi_train/problems/unconventional.jsonl`)."""
    ref = importlib.resources.files("phi_train") / "problems" / "unconventional.jsonl"
    return Path(str(ref))


def load_unconventional(path: str | Path | None = None) -> list[RubricProblem]:
    """Read a rubric problem file (None: the shipped set). Errors name file, line and field."""
    path = Path(path) if path else shipped_problems_path()
    rows = _read_jsonl(path)
    out, seen = [], set()
    for lineno, row in rows:
        task_id = str(_field(path, lineno, row, "task_id", (str, int)))
        if task_id in seen:
            raise GradingError(f"{path}:{lineno}: duplicate task_id {task_id!r}")
        seen.add(task_id)
        for key in ("canonical_solution", "test"):
            if key in row and not isinstance(row[key], str):
                raise GradingError(f"{path}:{lineno}: field {key!r} must be str, got {type(row[key]).__name__}")
        rubric = _field(path, lineno, row, "rubric")
        if not rubric.strip():
            raise GradingError(f"{path}:{lineno}: field 'rubric' is empty (say what earns each of the 10 points)")
        out.append(
            RubricProblem(
                problem=Problem(
                    task_id=task_id,
                    prompt=_field(path, lineno, row, "prompt"),
                    test=row.get("test") or "",
                    kind="humaneval",
                    entry_point=_field(path, lineno, row, "entry_point"),
                    reference=row.get("canonical_solution") or "",
                    stops=list(HUMANEVAL_STOPS),
                ),
                rubric=rubric,
            )
        )
    return out


# --- the teacher's prompt and reply ---------------------------------------------------------------------------------


def check_template(template: str, where: str = "eval.grader.template") -> None:
    """A template must show the rubric and the solution and may use only the known placeholders."""
    used = set(re.findall(r"\{([A-Za-z_]\w*)\}", template))
    unknown = sorted(used - set(PLACEHOLDERS))
    if unknown:
        valid = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
        raise GradingError(f"{where}: unknown placeholder {{{unknown[0]}}}; valid: {valid}")
    if "rubric" not in used or not used & {"solution", "completion"}:
        raise GradingError(f"{where}: must contain {{rubric}} and {{solution}} (or {{completion}})")


def render(template: str, problem: RubricProblem, completion: str) -> str:
    """Fill the placeholders in one pass over the template, so braces inside code are never substituted."""
    values = {
        "prompt": problem.problem.prompt.rstrip(),
        "solution": (problem.problem.prompt + completion).rstrip(),
        "completion": completion.rstrip(),
        "rubric": problem.rubric.strip(),
        "entry_point": problem.problem.entry_point,
    }
    return re.sub(r"\{(" + "|".join(PLACEHOLDERS) + r")\}", lambda m: values[m.group(1)], template)


@dataclass(frozen=True)
class ParsedScore:
    score: int | None
    reason: str | None = None
    """None when parsed; else a key of PARSE_REASONS."""
    rationale: str = ""
    """The reply above the SCORE line (the teacher's reasoning)."""


def parse_score(reply: str | None) -> ParsedScore:
    """Strict reading of a grading reply. The rules (docs/evaluation.md):

    - the last non-blank line, stripped of surrounding blanks, is exactly `SCORE: <n>` (upper-case SCORE, a colon,
      blanks allowed after it) with n an integer 0..10 without leading zeros — so "SCORE: 11" (out of range),
      "score: 7/10", "SCORE: 7.5", "SCORE: 07", "**SCORE: 7**" (format) are rejected;
    - it is the only line that states a score (starts with "score:"/"final score:" in any case or markup): two
      SCORE lines are ambiguous, even when they agree, and a "Score: 7" higher up is not guessed at;
    - nothing but blank lines may follow it ("SCORE: 7\\nHope this helps" is rejected).
    Anything rejected is asked again rather than guessed: a wrong guess would bias the mean silently.
    """
    lines = (reply or "").rstrip().splitlines()
    if not lines or not "".join(lines).strip():
        return ParsedScore(None, "empty_reply")
    claims = [i for i, line in enumerate(lines) if _SCORE_CLAIM.match(line)]
    if not claims:
        return ParsedScore(None, "no_score_line")
    if len(claims) > 1:
        return ParsedScore(None, "multiple_score_lines")
    if claims[0] != len(lines) - 1:
        return ParsedScore(None, "score_not_last_line")
    m = _SCORE_LINE.match(lines[-1].strip())
    if not m:
        return ParsedScore(None, "bad_score_format")
    digits = m.group(1)
    if len(digits) > 1 and digits.startswith("0"):
        return ParsedScore(None, "bad_score_format")
    if int(digits) > SCORE_MAX:
        return ParsedScore(None, "score_out_of_range")
    return ParsedScore(int(digits), None, "\n".join(lines[:-1]).strip())


# --- grading -----------------------------------------------------------------------------------------------------


class ChatClient(Protocol):
    """What `grade` needs from `data_tools.teacher.TeacherClient` (replies in order; failures carry a reason)."""

    model: str

    def complete_many_sync(self, prompts: list, **sampling: Any) -> list: ...


def grade(
    problems: list[RubricProblem],
    completions: dict[str, list[str]],
    client: ChatClient,
    *,
    template: str = DEFAULT_TEMPLATE,
    max_retries: int = 2,
    sampling: dict[str, Any] | None = None,
) -> tuple[list[dict], dict]:
    """Ask the teacher to score every completion 0..10 against its problem's rubric.

    Returns one record per (problem, sample) — score or ungraded reason, attempts, the teacher's rationale and last
    reply — and the summary (mean, distribution, ungraded reasons; graded + ungraded == samples). Requests go out in
    rounds: all first asks at once, then one round per retry for the replies that were malformed. A retry carries the
    bad reply and what was wrong with it, so it is a different request (not a cache hit) and a model that ignored the
    format is told how. HTTP failures are retried by the client; if it gives up, the sample is ungraded with
    `teacher_<reason>` and not asked again here.
    """
    check_template(template)
    if max_retries < 0:
        raise GradingError(f"eval.grader.max_retries={max_retries} must be >= 0")
    by_id = check_completions(problems, completions, GradingError)
    sampling = dict(sampling or {})

    records = [
        {"task_id": p.task_id, "sample": i, "completion": c, "score": None, "ungraded_reason": None, "attempts": 0}
        for p in problems
        for i, c in enumerate(completions[p.task_id])
    ]
    conversations = [
        [{"role": "user", "content": render(template, by_id[r["task_id"]], r["completion"])}] for r in records
    ]
    pending = list(range(len(records)))
    for attempt in range(max_retries + 1):
        if not pending:
            break
        replies = client.complete_many_sync([conversations[i] for i in pending], **sampling)
        still = []
        for i, reply in zip(pending, replies, strict=True):
            rec = records[i]
            rec["attempts"] = attempt + 1
            rec["reply"] = reply.text
            if reply.text is None:
                rec["ungraded_reason"] = f"teacher_{reply.error_reason}"
                continue
            parsed = parse_score(reply.text)
            if parsed.score is not None:
                rec |= {"score": parsed.score, "ungraded_reason": None, "rationale": parsed.rationale}
                continue
            rec["ungraded_reason"] = parsed.reason
            conversations[i] = conversations[i] + [
                {"role": "assistant", "content": reply.text},
                {"role": "user", "content": REPAIR_MESSAGE.format(why=PARSE_REASONS[parsed.reason])},
            ]
            still.append(i)
        pending = still
    for rec in records:
        rec.pop("completion")  # the evaluation records hold it once already
    return records, summarize_grades(problems, records)


def summarize_grades(problems: list[RubricProblem], records: list[dict]) -> dict:
    """Mean score over graded samples (0..10 and as phi-1's Table 2 percentage), distribution, ungraded reasons."""
    scores = [r["score"] for r in records if r["score"] is not None]
    reasons = Counter(r["ungraded_reason"] for r in records if r["score"] is None)
    per_task: dict[str, float | None] = {}
    for p in problems:
        mine = [r["score"] for r in records if r["task_id"] == p.task_id and r["score"] is not None]
        per_task[p.task_id] = float(np.mean(mine)) if mine else None
    mean = float(np.mean(scores)) if scores else None
    summary = {
        "samples": len(records),
        "graded": len(scores),
        "ungraded": sum(reasons.values()),
        "ungraded_reasons": dict(sorted(reasons.items())),
        "mean_score": mean,
        "score_pct": None if mean is None else 100 * mean / SCORE_MAX,
        # A lower bound that cannot be gamed by a teacher that fails on the hard cases: ungraded counts as 0.
        "mean_score_ungraded_as_zero": float(np.sum(scores) / len(records)) if records else None,
        "distribution": {str(s): scores.count(s) for s in range(SCORE_MAX + 1)},
        "retried": sum(1 for r in records if r["attempts"] > 1),
        "per_task": per_task,
    }
    # Counts reconcile: every sample is graded or ungraded with exactly one reason.
    assert summary["graded"] + summary["ungraded"] == summary["samples"]
    assert sum(summary["distribution"].values()) == summary["graded"]
    return summary


def markdown_grades(summary: dict, model: str) -> str:
    mean = "n/a" if summary["mean_score"] is None else f"{summary['mean_score']:.2f} / 10 ({summary['score_pct']:.1f}%)"
    lines = [
        f"### Teacher-graded score ({model})",
        "",
        "| samples | graded | ungraded | mean score | ungraded as 0 |",
        "|---:|---:|---:|---:|---:|",
        f"| {summary['samples']} | {summary['graded']} | {summary['ungraded']} | {mean} | "
        + ("n/a" if summary["mean_score_ungraded_as_zero"] is None else f"{summary['mean_score_ungraded_as_zero']:.2f}")
        + " |",
        "",
        "| " + " | ".join(summary["distribution"]) + " |",
        "|" + "---:|" * len(summary["distribution"]),
        "| " + " | ".join(str(n) for n in summary["distribution"].values()) + " |",
        "",
    ]
    if summary["ungraded_reasons"]:
        lines += ["Ungraded: " + ", ".join(f"{k} {v}" for k, v in summary["ungraded_reasons"].items()), ""]
    return "\n".join(lines)


# --- configuration -------------------------------------------------------------------------------------------------


@dataclass
class GraderConfig(TeacherConfig):
    """`eval.grader.*`: the teacher that grades `eval=unconventional` (conf/eval/unconventional.yaml), plus its prompt."""

    where: ClassVar[str] = "eval.grader"
    base_url: str | None = None
    """Required: an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 or a local vLLM server's."""
    model: str | None = None
    """Required: the grading model (phi-1 used GPT-4)."""
    timeout_s: float = 120.0
    max_tokens: int | None = 1024
    template: str = DEFAULT_TEMPLATE
    """The grading prompt; placeholders {prompt} {solution} {completion} {rubric} {entry_point}."""
    template_file: str | None = None
    """A file whose text replaces `template` (easier than a multi-line override)."""
    parse_retries: int = 2
    """Re-asks after a malformed reply (HTTP failures are the client's: `max_retries`)."""
    cache_dir: str | None = None
    """Reply cache (sqlite). None: `<out_dir>/teacher_cache`, so rerunning an evaluation costs nothing."""

    def resolved_template(self) -> str:
        if self.template_file:
            path = Path(self.template_file)
            if not path.is_file():
                raise GradingError(f"eval.grader.template_file={self.template_file!r}: no such file")
            return path.read_text(encoding="utf-8")
        return self.template

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise GradingError(msg)

        need(
            bool(self.base_url),
            "eval.grader.base_url is required for eval=unconventional (an OpenAI-compatible endpoint, "
            "e.g. https://api.openai.com/v1)",
        )
        need(bool(self.model), "eval.grader.model is required for eval=unconventional (the grading model, e.g. gpt-4)")
        need(
            bool(os.environ.get(self.api_key_env)),
            f"eval.grader.api_key_env={self.api_key_env}: environment variable {self.api_key_env} is not set; export "
            f"the key there (it is read from the environment only) or name another variable",
        )
        where = "eval.grader.template_file" if self.template_file else "eval.grader.template"
        check_template(self.resolved_template(), where)
        need(self.parse_retries >= 0, f"eval.grader.parse_retries={self.parse_retries} must be >= 0")


def make_client(cfg: GraderConfig, cache_dir: str | Path | None, progress: bool = True):
    """The project's TeacherClient for this grader (imported here: only grading needs `openai`)."""
    from phi_train.teacher import TeacherClient

    # httpx logs every request at INFO, which floods the console next to the progress bar; failures are still
    # logged (without the key) by the teacher client as warnings.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return TeacherClient.from_config(cfg, cache_dir, progress)
