"""The similarity measures of phi-1 §5 between a benchmark problem and a piece of training code, as pure functions.

What each sees (and what it cannot):

- `code_tokens` / 13-grams: Python `tokenize` tokens, comments and layout dropped, identifiers and literals kept.
  Sees verbatim and reformatted copies; blind to renaming (every renamed identifier breaks 13 grams).
- `split_units`: every function and class at every depth (module level, methods, nested in functions, in `if` /
  `else` / `try` / `except` / `with` / loop bodies) and windows of consecutive module-level statements, each scored
  on its own: a copy inside a long file, a branch or another function is a unit of its own.
- `canonical_tree`: the AST with what copying changes forgotten: docstrings and other bare strings, comments,
  annotations (`x: T = v` is `x = v`), layout, names (by role, not by order of appearance: every parameter is `P`,
  every other local binding `V`, functions/classes defined inside `F`, other free names `G`; builtins, imported
  modules, attributes and keyword names kept, since the copier did not choose them), literal spellings (strings by
  type, numbers/booleans/None by value). Statement-level restructurings map to common forms: `for` / `while` are one
  `Loop` (and `i = a; while i < b: ...; i += 1` is `for i in range(a, b)`), a comprehension assigned or returned is
  the loop that appends, `.append` / `.add` / `yield` are one `Emit`, `if c: return a else: return b` (or the
  `if`-return-fallthrough form) and `x = a if c else b` / `if c: x = a else: x = b` are one conditional expression.
  It cannot see through a different algorithm, a helper extracted out of part of a body, or data-flow rewrites.
- `ast_match`: phi-1's "AST match rate", 1 - tree_edit_distance / max(node counts) with APTED (unit costs) on the
  canonical trees. A renamed, docstring-free, type-hinted, reformatted or nested copy scores exactly 1.0.
  `sequence_match` is the cheaper alternative: difflib ratio of the preorder labels.
- `tree_features`: parent>child and grandparent>parent>child label paths of the canonical tree, the shingles
  MinHash/LSH candidates are drawn from (order-free, so restructured copies keep most of them).
- `difflib_ratio`: Cosmopedia's check, SequenceMatcher ratio over the normalised token lists.
"""

from __future__ import annotations

import ast
import builtins
import difflib
import io
import keyword
import sys
import textwrap
import tokenize
from dataclasses import dataclass

from data_tools.codetextbook.dedup import code_tokens as regex_tokens

_SKIP = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
_SKIP |= {tokenize.ENCODING}
BUILTINS = frozenset(dir(builtins))
_PARSE_ERRORS = (SyntaxError, ValueError, RecursionError, MemoryError)


@dataclass(frozen=True)
class Token:
    kind: str
    """name | keyword | literal | op."""
    text: str
    row: int
    """1-based line of the token's start (so a unit's tokens are a slice by line range)."""


def code_tokens(code: str) -> tuple[list[Token], bool]:
    """(tokens, tokenized): `tokenize`-based; on code it cannot tokenize, the regex tokens of
    data_tools.codetextbook.dedup (all with row 0) and False, so broken code is still compared, and counted."""
    out: list[Token] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type in _SKIP:
                continue
            if tok.type == tokenize.NAME:
                kind = "keyword" if keyword.iskeyword(tok.string) else "name"
            elif tok.type in (tokenize.NUMBER, tokenize.STRING):
                kind = "literal"
            else:
                kind = "op"
            out.append(Token(kind, tok.string, tok.start[0]))
        return out, True
    except (tokenize.TokenError, SyntaxError):
        return [Token("op", t, 0) for t in regex_tokens(code)], False


def ngrams(words: list[str], n: int) -> set[int]:
    """Hashes of the distinct n-grams (a text shorter than n is one gram, so tiny snippets still match exactly)."""
    if not words:
        return set()
    if len(words) < n:
        return {hash(tuple(words))}
    return {hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)}


# --- units ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """A scorable piece of a training item."""

    name: str
    """The def/class name, `<window a-b>` (module-level statements on lines a..b) or `<module>`."""
    kind: str
    """function | method (first parameter self/cls) | class | window | module."""
    text: str
    """Source that parses on its own (dedented; `ast.unparse` of the node where dedenting cannot make it parse)."""
    first_row: int
    last_row: int
    parent: str
    """Qualified name of the enclosing def/class ('' at module level): siblings share it."""
    arity: tuple[int, int] | None = None
    """(required, most) positional parameters of a function (most = 99 with *args); None for the other kinds."""


_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _arity(f: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[int, int]:
    a = f.args
    pos = len(a.posonlyargs) + len(a.args)
    required = pos - len(a.defaults)
    return required, 99 if a.vararg else pos


def _source(lines: list[str], node: ast.AST, first: int, last: int) -> str:
    text = textwrap.dedent("".join(lines[first - 1 : last]))
    try:
        ast.parse(text)
        return text
    except _PARSE_ERRORS:  # e.g. a multi-line string less indented than its def: unparse keeps the meaning
        return ast.unparse(node) + "\n"


def _walk_defs(body: list[ast.stmt], parent: str, in_class: bool, out: list[tuple[ast.AST, str, bool]]) -> None:
    """Every def/class under `body` at any depth, with its parent's qualified name and whether that parent is a class
    body, in source order."""
    for node in body:
        if isinstance(node, _DEFS):
            out.append((node, parent, in_class))
            qual = f"{parent}.{node.name}" if parent else node.name
            _walk_defs(node.body, qual, isinstance(node, ast.ClassDef), out)
            continue
        for fld in ("body", "orelse", "finalbody", "handlers", "cases"):
            for child in getattr(node, fld, None) or []:
                if isinstance(child, (ast.excepthandler, getattr(ast, "match_case", ast.excepthandler))):
                    _walk_defs(child.body, parent, in_class, out)
                elif isinstance(child, ast.stmt):
                    _walk_defs([child], parent, in_class, out)


def parse(text: str) -> ast.Module | None:
    try:
        return ast.parse(text)
    except _PARSE_ERRORS:
        return None


def split_units(text: str, window: int = 8, stride: int = 4) -> tuple[list[Unit], bool]:
    """(units, parsed): every def/class at every depth, plus windows of `window` consecutive module-level statements
    other than defs, classes and imports (every `stride`), so top-level script code is scored too. An item that does
    not parse, or has neither, is one `<module>` unit."""
    tree = parse(text)
    if tree is None:
        return [Unit("<module>", "module", text, 1, text.count("\n") + 1, "")], False
    return [u for u, _ in units_of_tree(tree, text, window, stride)], True


def units_of_tree(tree: ast.Module, text: str, window: int = 8, stride: int = 4) -> list[tuple[Unit, ast.AST | None]]:
    """`split_units` of an already parsed item, each unit with its AST node (None for windows and `<module>`)."""
    whole: list[tuple[Unit, ast.AST | None]] = [(Unit("<module>", "module", text, 1, text.count("\n") + 1, ""), None)]
    lines = text.splitlines(keepends=True)
    found: list[tuple[ast.AST, str, bool]] = []
    try:
        _walk_defs(tree.body, "", False, found)
    except RecursionError:
        return whole
    units: list[tuple[Unit, ast.AST | None]] = []
    for node, parent, in_class in found:
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        last = node.end_lineno or node.lineno
        if isinstance(node, ast.ClassDef):
            kind, arity = "class", None
        else:
            params = [a.arg for a in node.args.posonlyargs + node.args.args]
            method = in_class and bool(params) and params[0] in ("self", "cls")
            kind, arity = ("method", None) if method else ("function", _arity(node))
        try:
            src = _source(lines, node, first, last)
        except RecursionError:
            continue
        units.append((Unit(node.name, kind, src, first, last, parent, arity), node))
    loose = [
        s
        for s in tree.body
        if not isinstance(s, (*_DEFS, ast.Import, ast.ImportFrom))
        and not any(isinstance(n, _DEFS) for n in ast.walk(s))
    ]
    if len(loose) >= 2:
        for start in range(0, max(len(loose) - window, 0) + 1, stride):
            chunk = loose[start : start + window]
            first, last = chunk[0].lineno, chunk[-1].end_lineno or chunk[-1].lineno
            try:
                src = "".join(ast.unparse(s) + "\n" for s in chunk)
            except RecursionError:
                continue
            units.append((Unit(f"<window {first}-{last}>", "window", src, first, last, ""), None))
    return units or whole


def primary_function(code: str, entry_point: str = "", hint: str = "") -> str:
    """The benchmark's function under test: `entry_point` (HumanEval), else the function named in `hint` (MBPP's first
    assert), else the last module-level function; the whole code when there is none or it does not parse."""
    units, parsed = split_units(code)
    funcs = [u for u in units if u.kind in ("function", "method") and not u.parent]
    if not parsed or not funcs:
        return code
    for u in funcs:
        if u.name == entry_point:
            return u.text
    for u in funcs:
        if hint and f"{u.name}(" in hint:
            return u.text
    return funcs[-1].text


# --- canonical trees ------------------------------------------------------------------------------------------------


class Node:
    __slots__ = ("name", "children")

    def __init__(self, name: str, children: list[Node] | None = None) -> None:
        self.name, self.children = name, children or []


_COMPS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_EMPTY = {ast.ListComp: "List", ast.SetComp: "Set", ast.DictComp: "Dict", ast.GeneratorExp: "List"}
_EMIT_METHODS = {"append", "add"}


def _is_docstring(s: ast.stmt) -> bool:
    return isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str)


def _same_target(a: ast.expr, b: ast.expr) -> bool:
    return ast.dump(a) == ast.dump(b)


class _Canon:
    """One unit's conversion: the names it binds are collected first, so a name's label depends on its role only."""

    def __init__(self, root: ast.AST) -> None:
        self.params: set[str] = set()
        self.defs: set[str] = set()
        self.bound: set[str] = set()
        self.imported: set[str] = set()
        for n in ast.walk(root):
            if isinstance(n, ast.arg):
                self.params.add(n.arg)
            elif isinstance(n, _DEFS):
                self.defs.add(n.name)
            elif isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
                self.bound.add(n.id)
            elif isinstance(n, ast.ExceptHandler) and n.name:
                self.bound.add(n.name)
            elif isinstance(n, ast.alias):
                self.imported.add((n.asname or n.name).split(".")[0])

    def name(self, ident: str) -> str:
        if ident in self.params:
            return "P"
        if ident in self.defs:
            return "F"
        if ident in self.imported:
            return ident
        if ident in self.bound:
            return "V"
        return ident if ident in BUILTINS else "G"

    # statements -----------------------------------------------------------------------------------------------------

    def body(self, stmts: list[ast.stmt]) -> list[Node]:
        out: list[Node] = []
        i = 0
        while i < len(stmts):
            s, nxt = stmts[i], stmts[i + 1] if i + 1 < len(stmts) else None
            if _is_docstring(s):
                i += 1
                continue
            if isinstance(s, ast.If) and nxt is not None and self._if_return_fallthrough(s, nxt):
                out.append(Node("Return", [self._ifexp(s.test, s.body[0].value, nxt.value)]))
                i += 2
                continue
            if nxt is not None and isinstance(nxt, ast.While) and (loop := self._counted_while(s, nxt)) is not None:
                out.append(loop)
                i += 2
                continue
            out.extend(self.stmt(s))
            i += 1
        return out

    @staticmethod
    def _if_return_fallthrough(s: ast.If, nxt: ast.stmt) -> bool:
        return (
            not s.orelse
            and len(s.body) == 1
            and isinstance(s.body[0], ast.Return)
            and s.body[0].value is not None
            and isinstance(nxt, ast.Return)
            and nxt.value is not None
        )

    def _counted_while(self, init: ast.stmt, loop: ast.While) -> Node | None:
        """`v = a; while v < b: ...; v += 1` is `for v in range(a, b)`: the same canonical Loop."""
        if not (isinstance(init, ast.Assign) and len(init.targets) == 1 and isinstance(init.targets[0], ast.Name)):
            return None
        v = init.targets[0].id
        t = loop.test
        if not (
            isinstance(t, ast.Compare)
            and len(t.ops) == 1
            and isinstance(t.ops[0], ast.Lt)
            and isinstance(t.left, ast.Name)
            and t.left.id == v
            and loop.body
            and not loop.orelse
        ):
            return None
        last = loop.body[-1]
        if not (
            isinstance(last, ast.AugAssign)
            and isinstance(last.op, ast.Add)
            and isinstance(last.target, ast.Name)
            and last.target.id == v
            and isinstance(last.value, ast.Constant)
            and last.value.value == 1
        ):
            return None
        start = init.value
        args = [t.comparators[0]]
        if not (isinstance(start, ast.Constant) and start.value == 0):
            args = [start, *args]
        rng = ast.Call(func=ast.Name(id="range", ctx=ast.Load()), args=args, keywords=[])
        return self.loop(rng, loop.body[:-1], [])

    def loop(self, it: ast.expr, body: list[ast.stmt], orelse: list[ast.stmt]) -> Node:
        """`for i in range(len(s)): x = s[i]; ...` is `for x in s: ...`."""
        if (
            isinstance(it, ast.Call)
            and isinstance(it.func, ast.Name)
            and it.func.id == "range"
            and len(it.args) == 1
            and isinstance(it.args[0], ast.Call)
            and isinstance(it.args[0].func, ast.Name)
            and it.args[0].func.id == "len"
            and len(it.args[0].args) == 1
            and body
            and isinstance(body[0], ast.Assign)
            and len(body[0].targets) == 1
            and isinstance(body[0].value, ast.Subscript)
            and _same_target(body[0].value.value, it.args[0].args[0])
        ):
            it, body = it.args[0].args[0], body[1:]
        return Node("Loop", [self.expr(it), *self.body(body), *self.body(orelse)])

    def stmt(self, s: ast.stmt) -> list[Node]:
        if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)):
            kids = [self.arguments(s.args), *self.body(s.body), *[self.expr(d) for d in s.decorator_list]]
            return [Node("Def", kids)]
        if isinstance(s, ast.ClassDef):
            kids = [*[self.expr(b) for b in s.bases], *self.body(s.body), *[self.expr(d) for d in s.decorator_list]]
            return [Node("Class", kids)]
        if isinstance(s, ast.AnnAssign):
            return [] if s.value is None else self.stmt(ast.Assign(targets=[s.target], value=s.value))
        if isinstance(s, ast.Assign) and len(s.targets) == 1 and isinstance(s.value, _COMPS):
            # v = [e for x in it if c]  ==  v = []; for x in it: if c: v.append(e)
            empty = Node("Assign", [self.expr(s.targets[0]), Node(_EMPTY[type(s.value)])])
            return [empty, self.comprehension(s.value)]
        if isinstance(s, ast.Return) and isinstance(s.value, (ast.ListComp, ast.SetComp, ast.DictComp)):
            empty = Node("Assign", [Node("Name:V"), Node(_EMPTY[type(s.value)])])
            return [empty, self.comprehension(s.value), Node("Return", [Node("Name:V")])]
        if isinstance(s, ast.If) and len(s.body) == 1 and len(s.orelse) == 1:
            a, b = s.body[0], s.orelse[0]
            if isinstance(a, ast.Return) and isinstance(b, ast.Return) and a.value is not None and b.value is not None:
                return [Node("Return", [self._ifexp(s.test, a.value, b.value)])]
            if (
                isinstance(a, ast.Assign)
                and isinstance(b, ast.Assign)
                and len(a.targets) == len(b.targets) == 1
                and _same_target(a.targets[0], b.targets[0])
            ):
                return [Node("Assign", [self.expr(a.targets[0]), self._ifexp(s.test, a.value, b.value)])]
        if isinstance(s, ast.For | ast.AsyncFor):
            return [self.loop(s.iter, s.body, s.orelse)]
        if isinstance(s, ast.While):
            return [Node("Loop", [self.expr(s.test), *self.body(s.body), *self.body(s.orelse)])]
        if isinstance(s, ast.If):
            return [Node("If", [self.expr(s.test), *self.body(s.body), *self.body(s.orelse)])]
        if isinstance(s, ast.Expr):
            v = s.value
            if (
                isinstance(v, ast.Call)
                and isinstance(v.func, ast.Attribute)
                and v.func.attr in _EMIT_METHODS
                and len(v.args) == 1
            ):
                return [Node("Emit", [self.expr(v.args[0])])]
            if isinstance(v, ast.Yield) and v.value is not None:
                return [Node("Emit", [self.expr(v.value)])]
        return [self.generic(s)]

    def _ifexp(self, test: ast.expr, a: ast.expr, b: ast.expr) -> Node:
        return Node("IfExp", [self.expr(test), self.expr(a), self.expr(b)])

    def arguments(self, a: ast.arguments) -> Node:
        params = [*a.posonlyargs, *a.args]
        kids = [Node("arg") for _ in params]
        if a.vararg:
            kids.append(Node("vararg"))
        kids += [Node("kwarg") for _ in a.kwonlyargs]
        if a.kwarg:
            kids.append(Node("kwargs"))
        kids += [self.expr(d) for d in a.defaults] + [self.expr(d) for d in a.kw_defaults if d is not None]
        return Node("args", kids)

    def comprehension(self, c: ast.expr) -> Node:
        if isinstance(c, ast.DictComp):
            inner = Node("Emit", [self.expr(c.key), self.expr(c.value)])
        else:
            inner = Node("Emit", [self.expr(c.elt)])
        for g in reversed(c.generators):
            for cond in reversed(g.ifs):
                inner = Node("If", [self.expr(cond), inner])
            inner = Node("Loop", [self.expr(g.iter), inner])
        return inner

    # expressions ----------------------------------------------------------------------------------------------------

    def expr(self, e: ast.AST) -> Node:
        if isinstance(e, ast.Name):
            return Node("Name:" + self.name(e.id))
        if isinstance(e, ast.Constant):
            v = e.value
            if isinstance(v, str):
                return Node("Str")
            if isinstance(v, bytes):
                return Node("Bytes")
            if isinstance(v, float):
                return Node("Float")
            return Node(f"Const:{v!r}")
        if isinstance(e, ast.Attribute):
            return Node("Attr:" + e.attr, [self.expr(e.value)])
        if isinstance(e, ast.IfExp):
            return self._ifexp(e.test, e.body, e.orelse)
        if isinstance(e, _COMPS):
            return Node("Comp", [self.comprehension(e)])
        if isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and not e.args and not e.keywords:
            empty = {"list": "List", "set": "Set", "dict": "Dict"}.get(e.func.id)
            if empty and e.func.id not in self.bound and e.func.id not in self.params:
                return Node(empty)
        if isinstance(e, ast.keyword):
            return Node(f"kw:{e.arg}", [self.expr(e.value)])
        return self.generic(e)

    def generic(self, node: ast.AST) -> Node:
        label = type(node).__name__
        if isinstance(node, ast.alias):
            label += ":" + node.name
        kids: list[Node] = []
        for fld, value in ast.iter_fields(node):
            if fld in ("type_comment", "annotation", "returns", "ctx"):
                continue
            items = value if isinstance(value, list) else [value]
            for v in items:
                if isinstance(v, ast.expr_context) or not isinstance(v, ast.AST):
                    continue
                if isinstance(v, ast.stmt):
                    kids.extend(self.body([v]))
                elif isinstance(v, (ast.excepthandler, getattr(ast, "match_case", ast.excepthandler))):
                    kids.append(Node(type(v).__name__, self.body(v.body)))
                else:
                    kids.append(self.expr(v))
        return Node(label, kids)


def canonical_tree(code: str | ast.AST) -> Node | None:
    """The canonical tree of a unit (source or an already parsed node), or None if it does not parse."""
    try:
        root = ast.parse(code) if isinstance(code, str) else code
        c = _Canon(root)
        body = root.body if isinstance(root, ast.Module) else [root]
        return Node("Module", c.body(body))
    except (*_PARSE_ERRORS, AttributeError):
        return None


normalized_tree = canonical_tree


def tree_size(node: Node) -> int:
    n, stack = 0, [node]
    while stack:
        x = stack.pop()
        n += 1
        stack.extend(x.children)
    return n


def preorder(node: Node) -> list[str]:
    out, stack = [], [node]
    while stack:
        x = stack.pop()
        out.append(x.name)
        stack.extend(reversed(x.children))
    return out


def tree_features(node: Node) -> set[str]:
    """Label paths parent>child and grandparent>parent>child (plus each leaf label): the MinHash shingles."""
    out: set[str] = set()
    stack: list[tuple[Node, str, str]] = [(node, "", "")]
    while stack:
        x, p, gp = stack.pop()
        out.add(f"{p}>{x.name}")
        if p:
            out.add(f"{gp}>{p}>{x.name}")
        stack.extend((c, x.name, p) for c in x.children)
    return out


def _ted(a: Node, b: Node) -> int:
    from apted import APTED, Config

    class _Unit(Config):
        def rename(self, x: Node, y: Node) -> int:
            return 0 if x.name == y.name else 1

        def children(self, x: Node) -> list[Node]:
            return x.children

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))  # APTED recurses once per tree level
    try:
        return int(APTED(a, b, _Unit()).compute_edit_distance())
    finally:
        sys.setrecursionlimit(limit)


def ast_match(
    a: Node, b: Node, method: str = "ted", size_a: int | None = None, size_b: int | None = None, small: int = 0
) -> float:
    """phi-1's AST match rate in [0, 1]. ted: 1 - TED / max(|a|, |b|); sequence: difflib ratio of preorder labels.

    `small`: in trees of fewer nodes each difference weighs small / max(|a|, |b|) times more, so one edit in an
    8-node one-liner (`return len(x)` vs `return self._d.keys()`) is not "87% the same"; identical trees still
    score 1.0, so a renamed copy of a tiny solution is found."""
    if method == "sequence":
        return difflib.SequenceMatcher(None, preorder(a), preorder(b), autojunk=False).ratio()
    na, nb = size_a or tree_size(a), size_b or tree_size(b)
    big = max(na, nb)
    return max(0.0, 1.0 - _ted(a, b) * max(1.0, small / big) / big)


def size_bound(size_a: int, size_b: int) -> float:
    """Upper bound of the TED match rate: TED >= | |a| - |b| |, so the rate <= min/max."""
    return min(size_a, size_b) / max(size_a, size_b)


def difflib_ratio(a: list[str], b: list[str]) -> float:
    """Cosmopedia's decontamination check (match ratio > 0.5 flags a pair), over normalised token lists."""
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()
