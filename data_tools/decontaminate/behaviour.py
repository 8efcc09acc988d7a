"""The behavioural measure: a training function that passes a benchmark problem's own tests is a copy of it, however
it is written (restructured, renamed, a different algorithm). New to decontamination; phi-1 §5 only compares text.

Each (problem, candidate function) pair of the candidate step becomes one program run in `phi_train.sandbox`:

    from __future__ import annotations          (annotations are never evaluated: a copy's `List[int]` needs no import)
    <the item's imports, each guarded>           (a copy uses math, itertools, ... as its module imported them)
    <the item's other functions, each exec'd and guarded, then the candidate last> (an extracted helper is there)
    <the problem's test code>                    (HumanEval's `check`)
    check(<candidate>)

It passes only if every assert of the test passed (the sandbox's nonce protocol: an early exit is not a pass). Only
functions whose positional arity admits the entry point's are run (methods taking self/cls and classes never are), so
the cost is at most one sandboxed program per candidate pair, bounded by the candidate step. What it cannot see: a copy
that needs module state the program does not rebuild (globals, a class around a method), a copy with a bug, and MBPP
problems (their tests call the function by its name; only HumanEval-format `check(candidate)` tests are run).
"""

from __future__ import annotations

import ast
import bisect
import json
from typing import TYPE_CHECKING

from phi_train.sandbox import Limits, run_programs

if TYPE_CHECKING:
    from data_tools.decontaminate.records import ScanResult
    from phi_train.benchmarks import Problem

PRELUDE = "from __future__ import annotations\n"


def arity_ok(unit_arity: tuple[int, int] | None, n: int | None) -> bool:
    return unit_arity is not None and n is not None and unit_arity[0] <= n <= unit_arity[1]


def imports_of(tree: ast.Module) -> list[str]:
    """Every import statement of an item, at any depth (a copy nested in a function keeps its imports there)."""
    try:
        return [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    except RecursionError:
        return []


MAX_CONTEXT_CHARS = 200_000
"""The other functions of a huge item are cut here: a helper of the candidate is usually next to it."""


def context_defs(res: ScanResult, unit: int) -> list[str]:
    """The item's other functions at module level or beside the candidate (an extracted helper), nearest first."""
    item = res.unit_item[unit]
    lo, hi = bisect.bisect_left(res.unit_item, item), bisect.bisect_right(res.unit_item, item)
    same = [
        u
        for u in range(lo, hi)
        if u != unit and res.unit_kind[u] in ("function", "class") and res.unit_parent[u] in ("", res.unit_parent[unit])
    ]
    same.sort(key=lambda u: abs(u - unit))
    out, total = [], 0
    for u in same:
        total += len(res.unit_text[u])
        if total > MAX_CONTEXT_CHARS:
            break
        out.append(res.unit_text[u])
    return out[::-1]


def program(problem: Problem, res: ScanResult, unit: int) -> str:
    """The sandboxed program of one (problem, candidate unit) pair: see the module docstring."""
    head = [line for line in problem.prompt.splitlines() if line.startswith(("import ", "from "))]
    imports = json.dumps([*res.item_imports[res.unit_item[unit]], *head])
    defs = json.dumps(context_defs(res, unit))
    return (
        PRELUDE
        + "import __future__ as _f\n"
        + f"for _s in {imports}:\n    try:\n        exec(_s, globals())\n    except BaseException:\n        pass\n"
        + f"for _s in {defs}:\n"
        + "    try:\n        exec(compile(_s, '<def>', 'exec', _f.annotations.compiler_flag, True), globals())\n"
        + "    except BaseException:\n        pass\n"
        + f"exec(compile({json.dumps(res.unit_text[unit])}, '<candidate>', 'exec', _f.annotations.compiler_flag, "
        + "True), globals())\n"
        + f"_candidate = globals()[{res.unit_name[unit]!r}]\n"
        + problem.test
        + "\ncheck(_candidate)\n"
    )


def run_pairs(programs: list[str], timeout_s: float, memory_mb: int, workers: int | None) -> list[str]:
    """The sandbox verdict of each program (passed | failed | error | timeout | killed)."""
    limits = Limits(timeout_s=timeout_s, cpu_s=max(1, int(timeout_s + 0.999)), memory_mb=memory_mb)
    return [r.verdict for r in run_programs(programs, limits, workers=workers)]
