"""CodeExercises (phi-1 §2.2): (signature + docstring -> body) exercises with asserts, validated in the sandbox.

    python -m data_tools.synth.exercises --config-name demo                           # from the teacher LLM
    python -m data_tools.synth.exercises --config-name demo exercises.source=mine \\
        'exercises.mine.inputs=[data/demo/codetextbook]'                          # offline, from real code

phi-1 fine-tunes on ~180M tokens of GPT-3.5-written exercises, each "a docstring of a function that needs to be
completed" (§2.2), made diverse by constraining the function names. Two sources, one output format:

* teacher: the prompt fixes the function name (`<verb>_<noun>`), topic, difficulty and a constraint word, and asks
  for exactly two fenced blocks: the function, then asserts. The reply is parsed strictly (any deviation is a counted
  drop: malformed_reply, syntax_error, extra_code, wrong_name, no_docstring, empty_body, bad_tests, no_tests,
  non_stdlib_import).
* mine: top-level functions with a docstring from real code (JSONL(.zst) with `text`, e.g. the CodeTextbook output,
  or directories of .py files) that are self-contained (every free name is a builtin or a module-level *stdlib*
  import, which is copied into the prompt), undecorated, with a body of min..max lines. Their tests are made by
  running the function in the sandbox on simple probe inputs (ints, strings, lists; by arity) and recording the calls
  that return a literal-representable, deterministic value; a function needs `min_tests` such calls with at least two
  distinct results (a constant function teaches nothing) or it is dropped as `no_tests`.

Tests must be able to fail. Statically, an assert that is always true is dropped as `vacuous_assert` (a tuple
`assert (f(x) == 3, "msg")`, a lambda, a non-empty literal or f-string, a generator, `... or True`), and a solution
or test with a reward-hack pattern (frame / gc / trace introspection, builtins writes, `__import__` overrides,
ctypes, sys.modules surgery: `phi_train.verdict.hack_flags`) as `introspection`. Every candidate is then
near-deduplicated (MinHash on prompt + body) and judged by the evaluation's forge-proof path: the sandbox runs only
the prompt and the body, and the asserts run in the trusted checker against a proxy that passes plain literals
(`phi_train.verdict`), so a body cannot reach the verdict through frames or an always-equal object. Only `passed` is
kept, the other verdicts are counted drops (sandbox_failed, sandbox_error, sandbox_timeout, sandbox_killed). Last, a
**mutation check**: the kept exercise's asserts are run again with the body replaced by `return None` and by
`raise NotImplementedError`; if either still passes, the tests do not test the body and it is dropped as
`vacuous_tests`. Output: `output_dir/<teacher|mined>.jsonl.zst`, records with
`prompt` (imports + signature + docstring), `completion` (the body), `tests` (assert strings), `entry_point`, `id`,
`text` (prompt + completion, for `data_tools.shard`) and provenance. Counts: in == kept + sum(dropped per reason).
"""

from __future__ import annotations

import ast
import builtins
import json
import math
import random
import secrets
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_tools.codetextbook.dedup import NearDedupIndex
from data_tools.synth.common import (
    CONF_DIR,
    GENERATIONS,
    SCHEMA,
    GenerationStore,
    Item,
    SynthConfig,
    SynthConfigError,
    check_drops,
    draw_items,
    exit_status,
    make_client,
    pick_words,
    print_summary,
    prompt_space,
    read_topics_file,
    run_generation,
    teacher_sampling,
    to_yaml,
    write_jsonl,
)
from data_tools.synth.diversity import diversity_report, log_to_wandb, report_rows
from data_tools.synth.textbooks import code_blocks
from phi_train.cli import hydra_command

BUILTINS = frozenset(dir(builtins))
MUTANTS = ("return None", "raise NotImplementedError")
"""Bodies that a meaningful test suite must reject (the mutation check)."""
VERDICT_DROP = {
    "failed": "sandbox_failed",
    "error": "sandbox_error",
    "timeout": "sandbox_timeout",
    "killed": "sandbox_killed",
}


@dataclass
class Exercise:
    prompt: str
    """Imports + signature + docstring: what the model is given."""
    completion: str
    """The body: what the model learns to write (the fine-tune loss covers only this part)."""
    tests: list[str]
    entry_point: str
    provenance: dict[str, Any] = field(default_factory=dict)

    def program(self) -> str:
        return self.prompt + self.completion + "\n\n" + "\n".join(self.tests) + "\n"


# --- splitting a function into prompt and body ------------------------------------------------------------------------


def split_function(source: str, fn: ast.FunctionDef, header: str = "") -> tuple[Exercise | None, str | None]:
    """(Exercise without tests, None) or (None, drop reason): prompt = header + lines up to the docstring's end."""
    doc = fn.body[0] if fn.body else None
    if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
        return None, "no_docstring"
    if not doc.value.value.strip():
        return None, "no_docstring"
    if len(fn.body) < 2:
        return None, "empty_body"
    if fn.body[1].lineno <= doc.end_lineno:  # `"""doc"""; return x` on one line cannot be split into lines
        return None, "inline_body"
    lines = source.splitlines(keepends=True)
    start = (fn.decorator_list[0].lineno if fn.decorator_list else fn.lineno) - 1
    prompt = "".join(lines[start : doc.end_lineno])
    completion = "".join(lines[doc.end_lineno : fn.end_lineno])
    indent = len(lines[fn.lineno - 1]) - len(lines[fn.lineno - 1].lstrip())
    if indent:
        return None, "not_top_level"
    if not prompt.endswith("\n"):
        prompt += "\n"
    if not completion.endswith("\n"):
        completion += "\n"
    return Exercise(header + prompt, completion, [], fn.name), None


def is_stdlib(module: str | None, level: int = 0) -> bool:
    return level == 0 and module is not None and module.split(".")[0] in sys.stdlib_module_names


def import_ok(node: ast.Import | ast.ImportFrom) -> bool:
    if isinstance(node, ast.Import):
        return all(is_stdlib(a.name) for a in node.names)
    return is_stdlib(node.module, node.level)


def imports_inside(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def free_names(fn: ast.FunctionDef) -> set[str]:
    """Names the function reads that nothing inside it binds (approximate scoping: any binding anywhere counts)."""
    bound = {fn.name}
    loaded = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            bound.add(node.name)
    return loaded - bound - BUILTINS


# --- static checks: tests that cannot fail, bodies that reach for the verdict ---------------------------------------


def always_true(node: ast.expr) -> bool:
    """An assert condition that holds whatever the function returns (so the assert tests nothing)."""
    if isinstance(node, ast.Constant):
        return bool(node.value)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return bool(node.elts)
    if isinstance(node, ast.Dict):
        return bool(node.keys)
    if isinstance(node, (ast.Lambda, ast.GeneratorExp)):
        return True
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.Constant) and v.value for v in node.values)
    if isinstance(node, ast.BoolOp):
        parts = [always_true(v) for v in node.values]
        return any(parts) if isinstance(node.op, ast.Or) else all(parts)
    if isinstance(node, ast.NamedExpr):
        return always_true(node.value)
    return False


def static_reason(ex: Exercise) -> str | None:
    """`vacuous_assert` or `introspection` (module docstring), else None."""
    from phi_train.verdict import hack_flags

    for test in ex.tests:
        try:
            tree = ast.parse(test)
        except (SyntaxError, ValueError):
            return "bad_tests"
        if any(isinstance(n, ast.Assert) and always_true(n.test) for n in ast.walk(tree)):
            return "vacuous_assert"
    if hack_flags(ex.prompt + ex.completion) or hack_flags("\n".join(ex.tests)):
        return "introspection"
    return None


def static_checks(candidates: list[tuple[str, Exercise]]) -> tuple[list[tuple[str, Exercise]], Counter]:
    out, dropped = [], Counter()
    for cid, ex in candidates:
        reason = static_reason(ex)
        if reason:
            dropped[reason] += 1
        else:
            out.append((cid, ex))
    return out, dropped


# --- teacher exercises ------------------------------------------------------------------------------------------------


def parse_exercise_reply(reply: str, expected_name: str, max_tests: int) -> tuple[Exercise | None, str | None]:
    """Strict parse of a teacher reply: exactly two Python blocks, (imports +) one function named as asked, asserts."""
    blocks = code_blocks(reply)
    if len(blocks) != 2:
        return None, "malformed_reply"
    solution, test_src = blocks
    try:
        tree = ast.parse(solution)
        test_tree = ast.parse(test_src)
    except (SyntaxError, ValueError):
        return None, "syntax_error"
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    others = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.Import, ast.ImportFrom))]
    if len(fns) != 1 or others:
        return None, "extra_code"
    fn = fns[0]
    if fn.name != expected_name:
        return None, "wrong_name"
    if not all(import_ok(n) for n in imports_inside(tree) + imports_inside(test_tree)):
        return None, "non_stdlib_import"
    if fn.decorator_list or tree.body.index(fn) != len(tree.body) - 1:
        return None, "extra_code"
    lines = solution.splitlines(keepends=True)
    header = "".join(lines[: fn.lineno - 1])
    ex, reason = split_function("".join(lines[fn.lineno - 1 :]), _shift(fn, fn.lineno - 1), header)
    if ex is None:
        return None, reason
    tests = []
    for stmt in test_tree.body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            continue
        calls = {n.func.id for n in ast.walk(stmt) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        if not isinstance(stmt, ast.Assert) or expected_name not in calls:
            return None, "bad_tests"
        tests.append(ast.get_source_segment(test_src, stmt) or ast.unparse(stmt))
    if not tests:
        return None, "no_tests"
    test_imports = [ast.unparse(n) for n in test_tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    ex.tests = test_imports + tests[:max_tests]
    return ex, None


def _shift(fn: ast.FunctionDef, by: int) -> ast.FunctionDef:
    """Line numbers of `fn` as if the lines before it were removed."""
    for node in ast.walk(fn):
        for attr in ("lineno", "end_lineno"):
            if getattr(node, attr, None) is not None:
                setattr(node, attr, getattr(node, attr) - by)
    return fn


def build_items(cfg: SynthConfig) -> list[Item]:
    ex = cfg.exercises
    topics = (
        read_topics_file(ex.topics_file, want_mapping=False, key="exercises.topics_file")
        if ex.topics_file
        else ex.topics
    )
    for key, values in (
        ("topics", topics),
        ("difficulties", ex.difficulties),
        ("verbs", ex.verbs),
        ("nouns", ex.nouns),
    ):
        if not values:
            raise SynthConfigError(f"exercises.{key} is empty: give at least one")

    def draw(rng: random.Random) -> dict[str, Any]:
        return {
            "topic": rng.choice(topics),
            "difficulty": rng.choice(ex.difficulties),
            "name": f"{rng.choice(ex.verbs)}_{rng.choice(ex.nouns)}",
            "words": pick_words(rng, ex.words, ex.words_per_prompt),
        }

    return draw_items(ex.count, ex.seed, ex.templates, draw, "exercises")


def exercise_prompt_space(cfg: SynthConfig) -> int:
    ex = cfg.exercises
    topics = read_topics_file(ex.topics_file, False, "exercises.topics_file") if ex.topics_file else ex.topics
    return prompt_space(
        ex.templates,
        topic=len(topics),
        difficulty=len(ex.difficulties),
        name=len(ex.verbs) * len(ex.nouns),
        words=math.comb(len(ex.words), min(ex.words_per_prompt, len(ex.words))),
    )


def teacher_candidates(cfg: SynthConfig, work: Path) -> tuple[list[tuple[str, Exercise]], Counter, dict[str, Any]]:
    """Generate (resumably), then parse every reply: (id, exercise) candidates, parse drops, stats."""
    items = build_items(cfg)
    store = GenerationStore(work / GENERATIONS)
    client = make_client(cfg.teacher, work / "cache")
    gen = run_generation(items, client, store, teacher_sampling(cfg.teacher), cfg.chunk_size, cfg.progress)
    out: list[tuple[str, Exercise]] = []
    dropped: Counter = Counter()
    for it in items:
        rec = store.records.get(it.id)
        if rec is None:
            continue
        ex, reason = parse_exercise_reply(rec["reply"], it.seeds["name"], cfg.exercises.max_tests)
        if ex is None:
            dropped[reason] += 1
            continue
        ex.provenance = {
            "source": "synthetic_exercise",
            "template": it.template,
            "seeds": it.seeds,
            "teacher_model": rec["teacher_model"],
        }
        out.append((f"exercise-{it.id}", ex))
    check_drops("exercise parsing", gen.generated, len(out), dropped)
    stats = {"generation": gen.as_dict(), "teacher": client.stats.as_dict(), "in": gen.generated}
    stats["replies"] = [store.records[it.id]["reply"].strip() for it in items if it.id in store]
    stats["item_seeds"] = [it.seeds for it in items]
    stats["prompt_space"] = exercise_prompt_space(cfg)
    return out, dropped, stats


# --- mined exercises --------------------------------------------------------------------------------------------------

_INTS = [0, 1, 2, 3, 7, -4, 10]
_STRS = ["", "a", "abc", "hello world", "Ab1 x"]
_LISTS = [[], [1, 2, 3], [3, 1, 2], [5, 5, 1, 0]]
_FLOATS = [0.5, 2.0, -1.25]


def probe_args(arity: int) -> list[tuple]:
    """Simple inputs for a function of `arity` required positional parameters: same-type rows and a few mixes."""
    if arity == 0:
        return [()]
    rows: list[tuple] = []
    for pool in (_INTS, _STRS, _LISTS, _FLOATS):
        for i in range(len(pool)):
            rows.append(tuple(pool[(i + j) % len(pool)] for j in range(arity)))
    if arity == 2:
        rows += [(s, n) for s in _STRS[1:4] for n in (0, 1, 2)] + [(lst, n) for lst in _LISTS[1:3] for n in (0, 1)]
    return rows


PROBE_RUNNER = """
import ast as _ast, json as _json, signal as _signal
class _Slow(Exception):
    pass
def _alarm(*_a):
    raise _Slow()
_signal.signal(_signal.SIGALRM, _alarm)
for _src in {probes!r}:
    try:
        _signal.setitimer(_signal.ITIMER_REAL, 0.25)
        try:
            _r1 = repr({name}(*eval(_src)))
            _r2 = repr({name}(*eval(_src)))
        finally:
            _signal.setitimer(_signal.ITIMER_REAL, 0)
        if _r1 == _r2 and len(_r1) <= 200 and repr(_ast.literal_eval(_r1)) == _r1:
            print({mark!r} + _json.dumps([_src, _r1]))
    except Exception:
        pass
"""


def required_arity(fn: ast.FunctionDef) -> int | None:
    """Required positional parameters, or None when the signature cannot be probed (*args, required kw-only)."""
    a = fn.args
    if a.vararg is not None or any(d is None for d in a.kw_defaults):
        return None
    return len(a.posonlyargs) + len(a.args) - len(a.defaults)


def mine_candidates(paths: list[str], cfg: SynthConfig) -> tuple[list[tuple[str, Exercise, int]], Counter, dict]:
    """Top-level functions of real code that pass the structural checks: (id, exercise without tests, arity)."""
    from data_tools.sources import iter_documents

    m = cfg.exercises.mine
    if not paths:
        raise SynthConfigError("exercises.mine.inputs is empty: give JSONL(.zst) files or directories of .py files")
    doc_drops: Counter = Counter()
    out: list[tuple[str, Exercise, int]] = []
    dropped: Counter = Counter()
    docs = functions = unparseable = 0
    from tqdm import tqdm

    for doc in tqdm(iter_documents(paths, dropped=doc_drops), desc="mine", unit="doc", disable=not cfg.progress):
        if m.limit >= 0 and docs >= m.limit:
            break
        docs += 1
        try:
            tree = ast.parse(doc["text"])
        except (SyntaxError, ValueError):
            unparseable += 1
            continue
        module_imports: dict[str, ast.stmt] = {}
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)) and import_ok(node):
                for a in node.names:
                    module_imports[(a.asname or a.name).split(".")[0]] = node
        for fn in tree.body:
            if not isinstance(fn, ast.FunctionDef):
                continue
            functions += 1
            reason, item = _mine_one(doc, fn, module_imports, m)
            if reason:
                dropped[reason] += 1
            else:
                out.append(item)
    stats = {"documents": docs, "documents_unparseable": unparseable, "documents_unreadable": dict(doc_drops)}
    stats["in"] = functions
    return out, dropped, stats


def _mine_one(doc: dict, fn: ast.FunctionDef, module_imports: dict[str, ast.stmt], m) -> tuple[str | None, Any]:
    if fn.decorator_list:
        return "decorated", None
    if fn.name.startswith("__"):
        return "dunder", None
    arity = required_arity(fn)
    if arity is None or arity > m.max_args:
        return "unsupported_signature", None
    if not all(import_ok(n) for n in imports_inside(fn)):
        return "non_stdlib_import", None
    free = free_names(fn)
    if free - set(module_imports):
        return "not_self_contained", None
    needed = []
    for name in sorted(free):
        stmt = module_imports[name]
        if isinstance(stmt, ast.Import):
            alias = next(a for a in stmt.names if (a.asname or a.name).split(".")[0] == name)
            src = f"import {alias.name}" + (f" as {alias.asname}" if alias.asname else "")
        else:
            alias = next(a for a in stmt.names if (a.asname or a.name) == name)
            src = f"from {stmt.module} import {alias.name}" + (f" as {alias.asname}" if alias.asname else "")
        if src not in needed:
            needed.append(src)
    header = "".join(line + "\n" for line in needed) + ("\n" if needed else "")
    ex, reason = split_function(doc["text"], fn, header)
    if ex is None:
        return reason, None
    body_lines = [ln for ln in ex.completion.splitlines() if ln.strip()]
    if len(body_lines) < m.min_body_lines:
        return "body_too_short", None
    if len(body_lines) > m.max_body_lines:
        return "body_too_long", None
    ex.provenance = {"source": "mined", "document": doc["id"], "function": fn.name, "line": fn.lineno}
    return None, (f"mined-{_short_hash(doc['id'] + ':' + fn.name + ':' + ex.prompt + ex.completion)}", ex, arity)


def _short_hash(s: str) -> str:
    import hashlib

    return hashlib.sha256(s.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def choose_tests(name: str, calls: list[tuple[str, str]], max_tests: int) -> tuple[list[str], set[str]]:
    """Up to max_tests asserts from (args repr, result repr) calls: first calls with new argument types *and* new
    results (they pin the behaviour down best), then new results, then any; in probe order (deterministic)."""
    parsed = [(ast.literal_eval(src), rep) for src, rep in calls]
    chosen: list[int] = []
    types_seen: set[tuple[str, ...]] = set()
    results_seen: set[str] = set()
    for rule in ("types_and_result", "result", "any"):
        for i, (args, rep) in enumerate(parsed):
            types = tuple(type(a).__name__ for a in args)
            if len(chosen) >= max_tests or i in chosen:
                continue
            if rule == "types_and_result" and (types in types_seen or rep in results_seen):
                continue
            if rule == "result" and rep in results_seen:
                continue
            chosen.append(i)
            types_seen.add(types)
            results_seen.add(rep)
    tests = []
    for i in sorted(chosen):
        args, rep = parsed[i]
        tests.append(f"assert {name}({', '.join(repr(a) for a in args)}) == {rep}")
    return tests, results_seen


def make_tests(
    candidates: list[tuple[str, Exercise, int]], cfg: SynthConfig
) -> tuple[list[tuple[str, Exercise]], Counter]:
    """Run each mined function on probe inputs in the sandbox; keep calls with deterministic literal results as asserts."""
    from phi_train.sandbox import Limits, run_programs

    m = cfg.exercises.mine
    mark = "@@probe-" + secrets.token_hex(8) + "@@"
    programs = []
    for _, ex, arity in candidates:
        probes = [repr(args) for args in probe_args(arity)]
        programs.append(ex.prompt + ex.completion + PROBE_RUNNER.format(probes=probes, name=ex.entry_point, mark=mark))
    limits = Limits(timeout_s=max(10.0, cfg.exercises.sandbox_timeout_s), output_chars=100_000)
    results = run_programs(programs, limits, workers=cfg.exercises.sandbox_workers, progress=cfg.progress)
    out: list[tuple[str, Exercise]] = []
    dropped: Counter = Counter()
    for (cid, ex, _), res in zip(candidates, results, strict=True):
        calls = []
        for line in res.stdout.splitlines():
            if line.startswith(mark):
                try:
                    src, rep = json.loads(line[len(mark) :])
                except ValueError:
                    continue
                calls.append((src, rep))
        tests, results_seen = choose_tests(ex.entry_point, calls, m.max_tests)
        if len(tests) < m.min_tests or len(results_seen) < 2:
            dropped["no_tests"] += 1
            continue
        ex.tests = tests
        out.append((cid, ex))
    return out, dropped


# --- the shared tail: dedup, sandbox validation, output ---------------------------------------------------------------


def dedup(candidates: list[tuple[str, Exercise]], cfg: SynthConfig) -> tuple[list[tuple[str, Exercise]], Counter]:
    d = cfg.dedup
    index = NearDedupIndex(d.threshold, d.num_perm, d.shingle_size, d.seed)
    out, dropped = [], Counter()
    for cid, ex in candidates:
        reason, _ = index.add(cid, ex.prompt + ex.completion)
        if reason:
            dropped[reason] += 1
        else:
            out.append((cid, ex))
    return out, dropped


def as_problem(cid: str, ex: Exercise):
    """The exercise as an MBPP-kind benchmark problem, for the evaluation's trusted checker (phi_train.verdict)."""
    from phi_train.benchmarks import Problem

    return Problem(
        task_id=cid, prompt=ex.prompt, test="\n".join(ex.tests) + "\n", kind="mbpp", entry_point=ex.entry_point
    )


def body_indent(completion: str) -> str:
    first = next((ln for ln in completion.splitlines() if ln.strip()), "    ")
    return first[: len(first) - len(first.lstrip())] or "    "


def judge(pairs: list[tuple[str, Exercise, str]], limits, workers: int, progress: bool):
    """Sandbox verdicts of (id, exercise, body) through the checker: the body runs sandboxed, the asserts outside."""
    from phi_train.sandbox import run_programs
    from phi_train.verdict import make_checker, served_program

    problems = [as_problem(cid, ex) for cid, ex, _ in pairs]
    checkers = []
    for p in problems:
        try:
            checkers.append(make_checker(p))
        except SyntaxError:  # asserts that parse alone but not together cannot judge anything

            def broken(_chan, msg=f"tests of {p.task_id} do not parse"):
                return "error", msg

            checkers.append(broken)
    codes = [served_program(p, body) for p, (_, _, body) in zip(problems, pairs, strict=True)]
    return run_programs(codes, limits, workers=workers, progress=progress, checkers=checkers)


def validate(
    candidates: list[tuple[str, Exercise]], timeout_s: float, workers: int, progress: bool
) -> tuple[list[tuple[str, Exercise]], Counter, Counter]:
    """Judge every exercise against its asserts, then the mutation check: (kept, drops, verdict counts)."""
    from phi_train.sandbox import Limits

    limits = Limits(timeout_s=timeout_s, cpu_s=max(1, int(timeout_s)))
    results = judge([(cid, ex, ex.completion) for cid, ex in candidates], limits, workers, progress)
    verdicts = Counter(r.verdict for r in results)
    passed = [c for c, r in zip(candidates, results, strict=True) if r.passed]
    dropped = Counter(VERDICT_DROP[r.verdict] for r in results if not r.passed)
    mutants = [(cid, ex, body_indent(ex.completion) + m + "\n") for cid, ex in passed for m in MUTANTS]
    survived = judge(mutants, limits, workers, progress) if mutants else []
    vacuous = {cid for (cid, _, _), r in zip(mutants, survived, strict=True) if r.passed}
    kept = [c for c in passed if c[0] not in vacuous]
    if vacuous:
        dropped["vacuous_tests"] += len(passed) - len(kept)
    return kept, dropped, verdicts


def to_record(cid: str, ex: Exercise) -> dict[str, Any]:
    return {
        "id": cid,
        "prompt": ex.prompt,
        "completion": ex.completion,
        "tests": ex.tests,
        "entry_point": ex.entry_point,
        "text": ex.prompt + ex.completion,
        **ex.provenance,
    }


def run(cfg: SynthConfig) -> dict[str, Any]:
    ex_cfg = cfg.exercises
    work = Path(ex_cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    (work / f"config-{ex_cfg.source}.yaml").write_text(to_yaml(cfg))
    dropped: Counter = Counter()
    if ex_cfg.source == "teacher":
        candidates, dropped, stats = teacher_candidates(cfg, work)
    else:
        mined, dropped, stats = mine_candidates(list(ex_cfg.mine.inputs), cfg)
        candidates, test_drops = make_tests(mined, cfg)
        dropped += test_drops
        stats |= {"replies": [ex.prompt + ex.completion for _, ex in candidates], "item_seeds": []}
        stats["prompt_space"] = None
    candidates, static_drops = static_checks(candidates)
    dropped += static_drops
    candidates, dedup_drops = dedup(candidates, cfg)
    dropped += dedup_drops
    kept, sandbox_drops, verdicts = validate(candidates, ex_cfg.sandbox_timeout_s, ex_cfg.sandbox_workers, cfg.progress)
    dropped += sandbox_drops
    check_drops(f"exercises ({ex_cfg.source})", stats["in"], len(kept), dropped)
    name = "teacher" if ex_cfg.source == "teacher" else "mined"
    out_path = Path(ex_cfg.output_dir) / f"{name}.jsonl.zst"
    write_jsonl(out_path, (to_record(cid, ex) for cid, ex in kept))
    replies, item_seeds = stats.pop("replies"), stats.pop("item_seeds")
    report = diversity_report(
        replies, [ex.prompt + ex.completion for _, ex in kept], item_seeds,
        [ex.provenance.get("seeds", {}) for _, ex in kept], dropped, cfg.dedup, cfg.report.clusters,
    ) | {"prompt_space": stats.pop("prompt_space")}  # fmt: skip
    (work / f"diversity-{name}.json").write_text(json.dumps(report, indent=2))
    log_to_wandb(report, f"exercises-{name}", cfg.report.wandb, {"count": ex_cfg.count, "source": ex_cfg.source})
    summary = stats | {
        "source": ex_cfg.source,
        "kept": len(kept),
        "dropped": dict(dropped.most_common()),
        "sandbox_verdicts": dict(verdicts),
        "output": str(out_path),
        "diversity": report,
    }
    (work / f"summary-{name}.json").write_text(json.dumps(summary, indent=2))
    rows: list[tuple[str, Any]] = []
    if "generation" in stats:
        g = stats["generation"]
        rows += [("requested", g["requested"])] + [(f"teacher failed: {k}", v) for k, v in g["failed"].items()]
        rows += [("generated (in)", g["generated"])]
    else:
        rows += [("documents", stats["documents"]), ("functions (in)", stats["in"])]
    rows += [("kept", len(kept))] + [(f"dropped: {k}", v) for k, v in dropped.most_common()]
    if report["prompt_space"]:
        rows.append(("prompt space (distinct prompts)", report["prompt_space"]))
    rows += report_rows(report)
    print_summary(f"CodeExercises ({ex_cfg.source}, phi-1 §2.2)", rows)
    return summary


@hydra_command(SynthConfig, "demo", CONF_DIR, schema_name=SCHEMA)
def main(cfg: SynthConfig) -> int:
    return exit_status(run(cfg), cfg, "data_tools.synth.exercises")


if __name__ == "__main__":
    sys.exit(main())
