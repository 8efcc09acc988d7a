"""A planted set: benchmark solutions copied the ways people copy them, inside real modules, and the recall of a
decontamination run on it, per copy kind (the `planted=` key of the scan).

    python -m data_tools.decontaminate.planted out=data/planted [n_problems=40] [seed=0] [hosts=[...]]
    python -m data_tools.decontaminate --config-name demo "train.paths=[<stdlib files>,data/planted/planted.jsonl]" \\
        planted=data/planted/labels.jsonl

Copy kinds (each of `n_problems` random HumanEval problems, prompt + canonical solution, appended to or wrapped in a
real module of this interpreter's standard library):
  exact         verbatim at module level
  nested        verbatim inside `else:` / `except ImportError:` / `with` / another function / a class body (in turn)
  renamed       every name the code binds renamed, docstrings and comments removed
  typed         annotations added to every parameter, return and first local assignment, then reformatted (arguments
                one per line, 2-space indent, blank lines)
  restructured  docstring-free; every applicable rewrite of for<->while, loop<->comprehension, if/else<->ternary;
                a helper extracted when none applies (and always recorded in `rewrites`)
  different     a different algorithm for the same task, written by hand for a few problems (DIFFERENT)
Restructured and different copies are kept only if they still pass the problem's tests in the sandbox (`verify`):
a rewrite that changed the meaning is not a copy. MBPP ships no offline copy here, so the set is HumanEval's.
"""

from __future__ import annotations

import ast
import copy
import io
import json
import random
import sysconfig
import textwrap
import tokenize
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi_train.benchmarks import Problem, load_humaneval
from phi_train.errors import PhiTrainError

if TYPE_CHECKING:
    from data_tools.decontaminate.config import DecontaminateConfig
    from data_tools.decontaminate.inputs import BenchItem
    from data_tools.decontaminate.records import PairScore, ScanResult

KINDS = ("exact", "nested", "renamed", "typed", "restructured", "different")
PLACEMENTS = ("else", "except_import", "with", "function", "class")

# A different algorithm for the same task (function name and signature kept, no docstring): what neither n-grams nor
# an AST measure can see, and the behavioural measure must.
DIFFERENT = {
    "HumanEval/0": """def has_close_elements(numbers, threshold):
    ordered = sorted(numbers)
    return any(b - a < threshold for a, b in zip(ordered, ordered[1:]))
""",
    "HumanEval/2": """def truncate_number(number):
    return number - int(number)
""",
    "HumanEval/4": """def mean_absolute_deviation(numbers):
    import statistics
    centre = statistics.fmean(numbers)
    return statistics.fmean(abs(x - centre) for x in numbers)
""",
    "HumanEval/8": """def sum_product(numbers):
    import functools, operator
    return sum(numbers), functools.reduce(operator.mul, numbers, 1)
""",
    "HumanEval/13": """def greatest_common_divisor(a, b):
    import math
    return math.gcd(a, b)
""",
    "HumanEval/23": """def strlen(string):
    count = 0
    for _ in string:
        count += 1
    return count
""",
    "HumanEval/34": """def unique(l):
    return sorted({*l})
""",
    "HumanEval/35": """def max_element(l):
    best = l[0]
    for x in l[1:]:
        if x > best:
            best = x
    return best
""",
    "HumanEval/48": """def is_palindrome(text):
    i, j = 0, len(text) - 1
    while i < j:
        if text[i] != text[j]:
            return False
        i, j = i + 1, j - 1
    return True
""",
    "HumanEval/55": """def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
""",
}


class PlantedError(PhiTrainError):
    """Bad arguments to the planted-set generator, or labels that do not match the training set."""


# --- copy kinds -----------------------------------------------------------------------------------------------------


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            v = body[0].value
            if isinstance(v, ast.Constant) and isinstance(v.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def renamed(code: str) -> str:
    """Every name the code binds (functions, parameters, variables) consistently renamed; docstrings, comments gone."""
    tree = _strip_docstrings(ast.parse(code))
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
    mapping = {name: f"q{i}_{name[::-1]}" for i, name in enumerate(sorted(bound))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in mapping:
            node.id = mapping[node.id]
        elif isinstance(node, ast.arg) and node.arg in mapping:
            node.arg = mapping[node.arg]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in mapping:
            node.name = mapping[node.name]
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            node.names = [mapping.get(n, n) for n in node.names]
    return ast.unparse(tree) + "\n"


def _offsets(code: str) -> list[int]:
    starts, pos = [0], 0
    for line in code.splitlines(keepends=True):
        pos += len(line)
        starts.append(pos)
    return starts


def _apply(code: str, edits: list[tuple[int, int, str]]) -> str:
    for start, end, new in sorted(edits, reverse=True):
        code = code[:start] + new + code[end:]
    return code


def reformatted(code: str) -> str:
    """Black-like layout changes: arguments split one per line, 2-space indentation, extra blank lines."""
    offs, edits, depth = _offsets(code), [], 0
    toks = list(tokenize.generate_tokens(io.StringIO(code).readline))
    for tok, nxt in zip(toks, toks[1:]):
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif tok.string == "," and depth > 0 and nxt.start[0] == tok.end[0] and nxt.string not in ")]}":
            pos = offs[tok.end[0] - 1] + tok.end[1]
            edits.append((pos, offs[nxt.start[0] - 1] + nxt.start[1], "\n" + " " * 12))
    code = _apply(code, edits)
    in_string = set()
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type == tokenize.STRING and tok.end[0] > tok.start[0]:
            in_string.update(range(tok.start[0] + 1, tok.end[0] + 1))
    out = []
    for row, line in enumerate(code.splitlines(), 1):
        if row not in in_string:
            stripped = line.lstrip(" ")
            line = " " * ((len(line) - len(stripped)) // 2) + stripped
        out.append(line)
        if line.rstrip().endswith(":") and row not in in_string:
            out.append("")
    return "\n".join(out) + "\n"


def typed(code: str) -> str:
    """Annotations on every parameter and return lacking one and on each function's first assignment of each local
    name (`x: object = ...`), then `reformatted`. Docstrings stay."""
    tree = ast.parse(code)
    for f in ast.walk(tree):
        if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for a in [*f.args.posonlyargs, *f.args.args, *f.args.kwonlyargs]:
            a.annotation = a.annotation or ast.Name(id="object", ctx=ast.Load())
        f.returns = f.returns or ast.Name(id="object", ctx=ast.Load())
        declared = {n for s in ast.walk(f) if isinstance(s, (ast.Global, ast.Nonlocal)) for n in s.names}
        seen: set[str] = set()
        new_body = []
        for s in f.body:  # top-level statements of the function only: an annotation inside a loop is legal but odd
            if (
                isinstance(s, ast.Assign)
                and len(s.targets) == 1
                and isinstance(s.targets[0], ast.Name)
                and s.targets[0].id not in seen | declared
            ):
                seen.add(s.targets[0].id)
                s = ast.AnnAssign(
                    target=s.targets[0], annotation=ast.Name(id="object", ctx=ast.Load()), value=s.value, simple=1
                )
            new_body.append(s)
        f.body = new_body
    return reformatted(ast.unparse(ast.fix_missing_locations(tree)) + "\n")


class _Restructure(ast.NodeTransformer):
    """Meaning-preserving rewrites of statement lists; `applied` counts each kind used."""

    def __init__(self) -> None:
        self.applied: Counter = Counter()
        self.tmp = 0

    def _stmts(self, stmts: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        i = 0
        while i < len(stmts):
            s = self.visit(stmts[i])
            nxt = stmts[i + 1] if i + 1 < len(stmts) else None
            if nxt is not None and (comp := self._to_comprehension(s, nxt)) is not None:
                out.append(comp)
                self.applied["loop->comprehension"] += 1
                i += 2
                continue
            if (
                isinstance(s, ast.If)
                and len(s.body) == 1
                and not s.orelse
                and isinstance(s.body[0], ast.Return)
                and s.body[0].value is not None
                and isinstance(nxt, ast.Return)
                and nxt.value is not None
            ):
                out.append(ast.Return(ast.IfExp(s.test, s.body[0].value, nxt.value)))
                self.applied["if->ternary"] += 1
                i += 2
                continue
            out.extend(s if isinstance(s, list) else [s])
            i += 1
        return out

    def generic_visit(self, node: ast.AST) -> ast.AST:
        for fld in ("body", "orelse", "finalbody"):
            v = getattr(node, fld, None)
            if isinstance(v, list) and v and isinstance(v[0], ast.stmt):
                setattr(node, fld, self._stmts(v))
        for h in getattr(node, "handlers", []) or []:
            h.body = self._stmts(h.body)
        return node

    @staticmethod
    def _to_comprehension(init: ast.stmt, loop: ast.stmt) -> ast.stmt | None:
        if not (
            isinstance(init, ast.Assign)
            and len(init.targets) == 1
            and isinstance(init.targets[0], ast.Name)
            and isinstance(init.value, ast.List)
            and not init.value.elts
            and isinstance(loop, ast.For)
            and not loop.orelse
            and len(loop.body) == 1
        ):
            return None
        v, body, ifs = init.targets[0].id, loop.body[0], []
        if isinstance(body, ast.If) and not body.orelse and len(body.body) == 1:
            ifs, body = [body.test], body.body[0]
        if not (
            isinstance(body, ast.Expr)
            and isinstance(body.value, ast.Call)
            and isinstance(body.value.func, ast.Attribute)
            and body.value.func.attr == "append"
            and isinstance(body.value.func.value, ast.Name)
            and body.value.func.value.id == v
            and len(body.value.args) == 1
        ):
            return None
        gen = ast.comprehension(target=loop.target, iter=loop.iter, ifs=ifs, is_async=0)
        return ast.Assign(targets=[ast.Name(id=v, ctx=ast.Store())], value=ast.ListComp(body.value.args[0], [gen]))

    def visit_Return(self, node: ast.Return):
        v = node.value
        if isinstance(v, ast.IfExp):
            self.applied["ternary->if"] += 1
            return ast.If(v.test, [ast.Return(v.body)], [ast.Return(v.orelse)])
        if isinstance(v, ast.ListComp) and len(v.generators) == 1:
            self.applied["comprehension->loop"] += 1
            self.tmp += 1
            name = f"_acc{self.tmp}"
            g = v.generators[0]
            append = ast.Expr(
                ast.Call(ast.Attribute(ast.Name(id=name, ctx=ast.Load()), "append", ast.Load()), [v.elt], [])
            )
            inner: ast.stmt = append
            for cond in reversed(g.ifs):
                inner = ast.If(cond, [inner], [])
            return [
                ast.Assign(targets=[ast.Name(id=name, ctx=ast.Store())], value=ast.List(elts=[], ctx=ast.Load())),
                ast.For(target=g.target, iter=g.iter, body=[inner], orelse=[]),
                ast.Return(ast.Name(id=name, ctx=ast.Load())),
            ]
        return node

    def visit_If(self, node: ast.If):
        self.generic_visit(node)
        if (
            len(node.body) == 1
            and len(node.orelse) == 1
            and isinstance(node.body[0], ast.Return)
            and isinstance(node.orelse[0], ast.Return)
            and node.body[0].value is not None
            and node.orelse[0].value is not None
        ):
            self.applied["if->ternary"] += 1
            return ast.Return(ast.IfExp(node.test, node.body[0].value, node.orelse[0].value))
        return node

    def visit_For(self, node: ast.For):
        self.generic_visit(node)
        it = node.iter
        if (
            isinstance(node.target, ast.Name)
            and not node.orelse
            and isinstance(it, ast.Call)
            and isinstance(it.func, ast.Name)
            and it.func.id == "range"
            and 1 <= len(it.args) <= 2
            and not it.keywords
            and not any(isinstance(n, ast.Continue) for n in ast.walk(node))
        ):
            self.applied["for->while"] += 1
            v = node.target.id
            start, stop = (ast.Constant(0), it.args[0]) if len(it.args) == 1 else it.args
            inc = ast.AugAssign(ast.Name(id=v, ctx=ast.Store()), ast.Add(), ast.Constant(1))
            test = ast.Compare(ast.Name(id=v, ctx=ast.Load()), [ast.Lt()], [stop])
            return [
                ast.Assign(targets=[ast.Name(id=v, ctx=ast.Store())], value=start),
                ast.While(test, node.body + [inc], []),
            ]
        if (
            isinstance(node.target, ast.Name)
            and isinstance(it, ast.Name)
            and not node.orelse
            and not any(isinstance(n, ast.Continue) for n in ast.walk(node))
        ):
            # for x in xs: ...  ->  i = 0; while i < len(xs): x = xs[i]; ...; i += 1
            self.applied["for->while (indexed)"] += 1
            self.tmp += 1
            i = f"_k{self.tmp}"
            get = ast.Assign(
                targets=[ast.Name(id=node.target.id, ctx=ast.Store())],
                value=ast.Subscript(ast.Name(id=it.id, ctx=ast.Load()), ast.Name(id=i, ctx=ast.Load()), ast.Load()),
            )
            inc = ast.AugAssign(ast.Name(id=i, ctx=ast.Store()), ast.Add(), ast.Constant(1))
            size = ast.Call(ast.Name(id="len", ctx=ast.Load()), [ast.Name(id=it.id, ctx=ast.Load())], [])
            test = ast.Compare(ast.Name(id=i, ctx=ast.Load()), [ast.Lt()], [size])
            init = ast.Assign(targets=[ast.Name(id=i, ctx=ast.Store())], value=ast.Constant(0))
            return [init, ast.While(test, [get, *node.body, inc], [])]
        return node


def restructured(code: str, entry_point: str) -> tuple[str, list[str]]:
    """(code, rewrites applied): docstring-free, every applicable rewrite; a helper extracted when none applied."""
    tree = _strip_docstrings(ast.parse(code))
    r = _Restructure()
    tree.body = r._stmts(tree.body)
    rewrites = sorted(r.applied)
    if not rewrites:
        for i, f in enumerate(tree.body):
            if isinstance(f, ast.FunctionDef) and f.name == entry_point:
                helper = copy.deepcopy(f)
                helper.name = f"_{entry_point}_impl"
                params = [a.arg for a in f.args.posonlyargs + f.args.args]
                call = ast.Call(
                    ast.Name(id=helper.name, ctx=ast.Load()), [ast.Name(id=p, ctx=ast.Load()) for p in params], []
                )
                f.body = [ast.Return(call)]
                tree.body[i : i + 1] = [helper, f]
                rewrites = ["helper extracted"]
                break
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n", rewrites


def nested(code: str, placement: str, entry_point: str) -> str:
    """The code verbatim (indented) inside a block of the given placement."""
    body = textwrap.indent(code, "    ")
    if placement == "else":
        return f"import sys\nif sys.version_info < (3,):\n    pass\nelse:\n{body}"
    if placement == "except_import":
        return f"try:\n    from _vendored_speedups import {entry_point}\nexcept ImportError:\n{body}"
    if placement == "with":
        return f"import contextlib\nwith contextlib.suppress(Exception):\n{body}"
    if placement == "function":
        return f"def _load_vendored():\n{body}    return {entry_point}\n"
    if placement == "class":
        return f"class _Vendored:\n{body}"
    raise PlantedError(f"placement={placement!r} is not one of {', '.join(PLACEMENTS)}")


# --- the set --------------------------------------------------------------------------------------------------------


def _passes(problems: list[Problem], codes: list[str]) -> list[bool]:
    from phi_train.sandbox import Limits, run_programs

    progs = [f"{c}\n{p.test}\ncheck({p.entry_point})\n" for p, c in zip(problems, codes)]
    return [r.passed for r in run_programs(progs, Limits(timeout_s=10, cpu_s=10))]


def planted_set(
    hosts: list[str], n_problems: int = 40, seed: int = 0, verify: bool = True
) -> tuple[list[dict], Counter]:
    """(items, dropped): planted items {"id", "text", "task", "kind", ...}, each in a host module (round robin), and
    the copies dropped because they did not parse or no longer passed the tests."""
    if not hosts:
        raise PlantedError("hosts is empty: give real Python modules to plant the copies in")
    problems = {p.task_id: p for p in load_humaneval()}
    if not 1 <= n_problems <= len(problems):
        raise PlantedError(f"n_problems={n_problems} must be in 1..{len(problems)}")
    tasks = sorted(random.Random(seed).sample(sorted(problems), n_problems), key=lambda t: int(t.split("/")[1]))
    copies: list[dict] = []
    for i, task in enumerate(tasks):
        p = problems[task]
        code = p.prompt + p.reference
        place = PLACEMENTS[i % len(PLACEMENTS)]
        rest, rewrites = restructured(code, p.entry_point)
        copies += [
            {"task": task, "kind": "exact", "code": code},
            {"task": task, "kind": "nested", "placement": place, "code": nested(code, place, p.entry_point)},
            {"task": task, "kind": "renamed", "code": renamed(code)},
            {"task": task, "kind": "typed", "code": typed(code)},
            {"task": task, "kind": "restructured", "rewrites": rewrites, "code": rest},
        ]
    copies += [{"task": t, "kind": "different", "code": c} for t, c in DIFFERENT.items()]
    dropped: Counter = Counter()
    keep = []
    for c in copies:
        try:
            ast.parse(c["code"])
            keep.append(c)
        except SyntaxError:
            dropped[f"{c['kind']}_unparsable"] += 1
    if verify:
        check = [c for c in keep if c["kind"] in ("restructured", "different")]
        ok = _passes([problems[c["task"]] for c in check], [c["code"] for c in check])
        bad = {id(c) for c, good in zip(check, ok) if not good}
        for c in keep:
            if id(c) in bad:
                dropped[f"{c['kind']}_fails_tests"] += 1
        keep = [c for c in keep if id(c) not in bad]
    items = []
    for j, c in enumerate(keep):
        host = hosts[j % len(hosts)]
        text = host.rstrip("\n") + "\n\n\n" + c.pop("code")
        try:
            ast.parse(text)
        except SyntaxError:
            dropped[f"{c['kind']}_host_unparsable"] += 1
            continue
        tag = c.get("placement", "")
        items.append({"id": f"planted/{c['kind']}{'-' + tag if tag else ''}/{c['task']}", "text": text, **c})
    return items, dropped


def stdlib_hosts(n: int = 20, seed: int = 0) -> list[str]:
    """`n` ordinary modules of this interpreter's standard library (2-20 KB, parse), the hosts of the copies."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if 2_000 <= p.stat().st_size <= 20_000)
    out = []
    for p in random.Random(seed).sample(files, min(len(files), 4 * n)):
        try:
            text = p.read_text(encoding="utf-8")
            ast.parse(text)
        except (SyntaxError, UnicodeDecodeError):
            continue
        out.append(text)
        if len(out) == n:
            break
    return out


def real_functions(n: int, seed: int = 0) -> list[dict]:
    """Up to `n` real functions ({"id", "text"}, one per item) of this interpreter's stdlib and site-packages, in a
    seeded random order: the negatives and the throughput corpus (docs/benchmarks.md)."""
    roots = {Path(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib", "platlib")}
    files = sorted({f for r in roots if r.is_dir() for f in r.rglob("*.py")})
    random.Random(seed).shuffle(files)
    from data_tools.decontaminate.measures import split_units

    out: list[dict] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) > 500_000:
            continue
        units, parsed = split_units(text)
        for u in units if parsed else []:
            if u.kind in ("function", "method") and not u.parent.count("."):
                out.append({"id": f"{f}:{u.first_row}", "text": u.text})
                if len(out) >= n:
                    return out
    return out


# --- recall of a run ------------------------------------------------------------------------------------------------


def read_labels(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise PlantedError(
            f"planted={path!r} does not exist (give the labels.jsonl of data_tools.decontaminate.planted)"
        )
    rows = []
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            raise PlantedError(f"{path}:{lineno}: not JSON") from None
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in ("id", "task", "kind")):
            raise PlantedError(f"{path}:{lineno}: needs string fields id, task, kind")
        rows.append(r)
    return rows


def planted_recall(
    cfg: DecontaminateConfig, bench: list[BenchItem], res: ScanResult, pairs: list[PairScore]
) -> dict[str, Any]:
    """Per copy kind: planted items whose copy (any unit of the item) was a candidate of its own problem, and found by
    the AST match >= tau, by the behavioural measure, or by either; false positives among the functions of the other
    (real) items: a function unit with AST >= tau or a passed test against any problem."""
    labels = read_labels(cfg.planted)
    taus = [f"{t:g}" for t in sorted(set(cfg.prune.taus), reverse=True)]
    item_of = {i: n for n, i in enumerate(res.item_ids)}
    task_of = {b.task_id: p for p, b in enumerate(bench)}
    by_item: dict[tuple[int, int], list[PairScore]] = {}
    for ps in pairs:
        by_item.setdefault((res.unit_item[ps.unit], ps.problem), []).append(ps)
    kinds: dict[str, dict[str, Any]] = {}
    planted_items = set()
    for r in labels:
        if r["id"] not in item_of:
            raise PlantedError(f"planted: id {r['id']!r} is not a record id of train.paths")
        if r["task"] not in task_of:
            raise PlantedError(f"planted: task {r['task']!r} of {r['id']!r} is not a problem of the benchmark")
        item = item_of[r["id"]]
        planted_items.add(item)
        mine = by_item.get((item, task_of[r["task"]]), [])
        best = max((ps.ast or 0.0 for ps in mine), default=0.0)
        passed = any(ps.passed for ps in mine)
        k = kinds.setdefault(
            r["kind"], {"n": 0, "candidates": 0, "ast": Counter(), "behaviour": 0, "either": Counter(), "missed": []}
        )
        k["n"] += 1
        k["candidates"] += bool(mine)
        k["behaviour"] += passed
        for t in taus:
            k["ast"][t] += best >= float(t)
            k["either"][t] += best >= float(t) or passed
        if not (best >= float(taus[-1]) or passed):
            k["missed"].append({"id": r["id"], "best_ast": round(best, 4), "candidate": bool(mine)})
    real_units = [
        u
        for u, item in enumerate(res.unit_item)
        if item not in planted_items and res.unit_kind[u] in ("function", "method")
    ]
    real = set(real_units)
    fp_ast: dict[str, set[int]] = {t: set() for t in taus}
    fp_beh: set[int] = set()
    examples = []
    for ps in pairs:
        if ps.unit not in real:
            continue
        if ps.passed:
            fp_beh.add(ps.unit)
        for t in taus:
            if (ps.ast or 0.0) >= float(t):
                fp_ast[t].add(ps.unit)
        if ps.passed or (ps.ast or 0.0) >= float(taus[-1]):
            examples.append(
                {"item_id": res.item_ids[res.unit_item[ps.unit]], "unit": res.unit_name[ps.unit],
                 "task": bench[ps.problem].task_id, "ast": round(ps.ast or 0.0, 4), "behaviour": ps.behaviour}
            )  # fmt: skip
    n = max(len(real_units), 1)
    fp = {
        "functions": len(real_units),
        "ast": {t: len(fp_ast[t]) for t in taus},
        "behaviour": len(fp_beh),
        "either": {t: len(fp_ast[t] | fp_beh) for t in taus},
        "rate": {t: round(len(fp_ast[t] | fp_beh) / n, 5) for t in taus},
        "examples": examples[:20],
    }
    for k in kinds.values():
        k["ast"], k["either"] = dict(k["ast"]), dict(k["either"])
    low = taus[-1]
    summary = ", ".join(f"{kind} {k['either'][low]}/{k['n']}" for kind, k in kinds.items())
    summary += f"; false positives {fp['either'][low]}/{fp['functions']} functions"
    return {"taus": taus, "kinds": kinds, "false_positives": fp, "summary": summary}


# --- command --------------------------------------------------------------------------------------------------------


@dataclass
class PlantedConfig:
    """`python -m data_tools.decontaminate.planted` (defaults <- `key=value` overrides)."""

    out: str = "data/planted"
    """Writes planted.jsonl (the items) and labels.jsonl ({"id", "task", "kind"}: the scan's `planted=`)."""
    n_problems: int = 40
    seed: int = 0
    n_hosts: int = 20
    """Standard-library modules the copies are planted in (used when `hosts` is empty)."""
    hosts: list[str] = field(default_factory=list)
    """Python files to plant in instead."""
    verify: bool = True
    real: int = 0
    """Also write real.jsonl: this many real functions of stdlib + site-packages, one per item (`real_functions`)."""


def write_planted(cfg: PlantedConfig) -> dict[str, Any]:
    if cfg.hosts:
        missing = [h for h in cfg.hosts if not Path(h).is_file()]
        if missing:
            raise PlantedError(f"hosts: {missing[0]!r} is not a file")
        hosts = [Path(h).read_text(encoding="utf-8", errors="replace") for h in cfg.hosts]
    else:
        hosts = stdlib_hosts(cfg.n_hosts, cfg.seed)
    items, dropped = planted_set(hosts, cfg.n_problems, cfg.seed, cfg.verify)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "planted.jsonl").open("w") as f:
        f.writelines(json.dumps({"id": r["id"], "text": r["text"]}) + "\n" for r in items)
    with (out / "labels.jsonl").open("w") as f:
        f.writelines(json.dumps({k: v for k, v in r.items() if k != "text"}) + "\n" for r in items)
    report = {"items": len(items), "kinds": dict(Counter(r["kind"] for r in items)), "dropped": dict(dropped)}
    if cfg.real:
        real = real_functions(cfg.real, cfg.seed)
        with (out / "real.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in real)
        report["real_functions"] = len(real)
    return report


def main(argv: list[str] | None = None) -> int:
    from phi_train.cli import hydra_command

    @hydra_command(PlantedConfig, "planted")
    def _main(cfg: PlantedConfig) -> None:
        print(json.dumps(write_planted(cfg)))

    return _main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
