"""The similarity measures of phi-1 §5 between a benchmark problem and a piece of training code, as pure functions.

- `code_tokens`: Python `tokenize` tokens with comments, blank lines and indentation dropped, identifiers and
  literals kept: the text 13-grams (§5, "n-gram overlap") are taken over, so reformatting does not hide a copy.
- `skeleton`: the same tokens with identifiers -> `I` and literals -> `L` (keywords, operators, builtins kept): its
  shingles find renamed copies as candidates, which identifier-keeping n-grams miss.
- `split_units`: the functions of a training item, each scored on its own (a copied solution inside a long file).
- `normalized_tree` / `ast_match`: phi-1's "AST match rate": both codes parsed, identifiers and literals renamed to
  positional placeholders (v0, v1, ... and L0, L1, ... in order of first appearance; builtins kept), then
  1 - tree_edit_distance / max(node counts) with APTED (unit costs). A consistently renamed or reformatted copy
  scores exactly 1.0. `sequence_match` is the cheaper documented alternative: difflib ratio of the preorder labels.
- `difflib_ratio`: Cosmopedia's check, SequenceMatcher ratio over the normalised token lists.
"""

from __future__ import annotations

import ast
import builtins
import difflib
import io
import keyword
import textwrap
import tokenize
from dataclasses import dataclass

from data_tools.codetextbook.dedup import code_tokens as regex_tokens

_SKIP = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
_SKIP |= {tokenize.ENCODING}
BUILTINS = frozenset(dir(builtins))


@dataclass(frozen=True)
class Token:
    kind: str
    """name | keyword | literal | op."""
    text: str
    row: int
    """1-based line of the token's start (so a unit's tokens are a slice by line range)."""


def code_tokens(code: str) -> tuple[list[Token], bool]:
    """(tokens, tokenized): `tokenize`-based; on code it cannot tokenize, the regex tokens of data_tools.codetextbook.dedup
    (all with row 0) and False, so broken code is still compared, and counted by the caller."""
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


def skeleton(tokens: list[Token]) -> list[str]:
    """Identifiers -> I (builtins and keywords kept), literals -> L: invariant under renaming and literal edits."""
    out = []
    for t in tokens:
        if t.kind == "name":
            out.append(t.text if t.text in BUILTINS else "I")
        elif t.kind == "literal":
            out.append("L")
        else:
            out.append(t.text)
    return out


def ngrams(words: list[str], n: int) -> set[int]:
    """Hashes of the distinct n-grams (a text shorter than n is one gram, so tiny snippets still match exactly)."""
    if not words:
        return set()
    if len(words) < n:
        return {hash(tuple(words))}
    return {hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)}


@dataclass(frozen=True)
class Unit:
    """A scorable piece of a training item: one function (or the whole item when it has none or does not parse)."""

    name: str
    text: str
    first_row: int
    last_row: int


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Module-level functions and methods (classes are walked, function bodies are not: a nested helper belongs to
    its function, as a HumanEval solution's inner helper does)."""
    out, stack = [], list(getattr(tree, "body", []))
    while stack:
        node = stack.pop(0)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append(node)
        elif isinstance(node, ast.ClassDef):
            stack.extend(node.body)
        elif isinstance(node, (ast.If, ast.Try)):  # `if TYPE_CHECKING:` / `try: import` guards around definitions
            stack.extend(node.body)
    return out


def split_units(text: str) -> tuple[list[Unit], bool]:
    """(units, parsed). Each function's source lines (decorators included, dedented so methods parse alone)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return [Unit("<module>", text, 1, text.count("\n") + 1)], False
    funcs = _functions(tree)
    if not funcs:
        return [Unit("<module>", text, 1, text.count("\n") + 1)], True
    lines = text.splitlines(keepends=True)
    units = []
    for f in funcs:
        first = min([f.lineno] + [d.lineno for d in f.decorator_list])
        last = f.end_lineno or f.lineno
        units.append(Unit(f.name, textwrap.dedent("".join(lines[first - 1 : last])), first, last))
    return units, True


def primary_function(code: str, entry_point: str = "", hint: str = "") -> str:
    """The benchmark's function under test: `entry_point` (HumanEval), else the function named in `hint` (MBPP's first
    assert), else the last function; the whole code when there is none or it does not parse."""
    units, parsed = split_units(code)
    if not parsed or units[0].name == "<module>":
        return code
    for u in units:
        if u.name == entry_point:
            return u.text
    for u in units:
        if hint and f"{u.name}(" in hint:
            return u.text
    return units[-1].text


# --- AST match rate -------------------------------------------------------------------------------------------------


class Node:
    __slots__ = ("name", "children")

    def __init__(self, name: str, children: list[Node]) -> None:
        self.name, self.children = name, children


_IDENT_FIELDS = {
    ast.Name: "id",
    ast.arg: "arg",
    ast.FunctionDef: "name",
    ast.AsyncFunctionDef: "name",
    ast.ClassDef: "name",
    ast.Attribute: "attr",
    ast.keyword: "arg",
    ast.alias: "name",
    ast.ExceptHandler: "name",
}


def normalized_tree(code: str) -> Node | None:
    """The AST with identifiers/literals renamed to positional placeholders, or None if the code does not parse."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    idents: dict[str, str] = {}
    lits: dict[str, str] = {}

    def ident(name: str | None) -> str:
        if name is None:
            return ""
        if name in BUILTINS:
            return name
        return idents.setdefault(name, f"v{len(idents)}")

    def convert(node: ast.AST) -> Node:
        label = type(node).__name__
        fld = _IDENT_FIELDS.get(type(node))
        if fld is not None:
            label += ":" + ident(getattr(node, fld, None))
        elif isinstance(node, ast.Constant):
            key = f"{type(node.value).__name__}:{node.value!r}"
            label += ":" + lits.setdefault(key, f"L{len(lits)}")
        kids = [convert(c) for c in ast.iter_child_nodes(node) if not isinstance(c, ast.expr_context)]
        return Node(label, kids)

    try:
        return convert(tree)
    except RecursionError:
        return None


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


def _ted(a: Node, b: Node) -> int:
    from apted import APTED, Config

    class _Unit(Config):
        def rename(self, x: Node, y: Node) -> int:
            return 0 if x.name == y.name else 1

        def children(self, x: Node) -> list[Node]:
            return x.children

    return int(APTED(a, b, _Unit()).compute_edit_distance())


def ast_match(a: Node, b: Node, method: str = "ted", size_a: int | None = None, size_b: int | None = None) -> float:
    """phi-1's AST match rate in [0, 1]. ted: 1 - TED / max(|a|, |b|); sequence: difflib ratio of preorder labels."""
    if method == "sequence":
        return difflib.SequenceMatcher(None, preorder(a), preorder(b), autojunk=False).ratio()
    na, nb = size_a or tree_size(a), size_b or tree_size(b)
    return max(0.0, 1.0 - _ted(a, b) / max(na, nb))


def size_bound(size_a: int, size_b: int) -> float:
    """Upper bound of the TED match rate: TED >= | |a| - |b| |, so the rate <= min/max."""
    return min(size_a, size_b) / max(size_a, size_b)


def difflib_ratio(a: list[str], b: list[str]) -> float:
    """Cosmopedia's decontamination check (match ratio > 0.5 flags a pair), over normalised token lists."""
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()
