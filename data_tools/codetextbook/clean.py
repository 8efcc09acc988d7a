"""Step 1 of phi-1 §2.1's filtered code set: keep ordinary, parseable Python source.

phi-1 started from the Python subset of The Stack and StackOverflow (§2.1); files that are not Python, do not parse,
are binary, minified, machine-generated or mostly data teach nothing about coding, so they are removed before the
(expensive) quality classifier runs. Every drop is counted under its reason with datatrove's `stat_update`.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import re
import sys
from collections.abc import Iterable

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from tqdm import tqdm

IN, KEPT, DROP = "corpus_in", "corpus_kept", "drop:"
PYTHON_LANGS = {None, "python", "Python", "py"}


def literal_fraction(tree: ast.Module, source: bytes) -> float:
    """Fraction of the file's non-blank bytes inside literal constants, docstrings excluded (they explain code).

    An f-string counts only its literal text: up to Python 3.11 every part of a `JoinedStr` carries the span of the
    whole f-string, so measuring spans would count `f"{a}: {b} of {c}"` once per part."""
    total = sum(len(line.strip()) for line in source.splitlines())
    if total == 0:
        return 0.0
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skip.add(id(first.value))
        elif isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values if isinstance(v, ast.Constant))
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    covered = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            covered += sum(
                len(str(v.value).encode("utf-8", "surrogatepass")) for v in node.values if isinstance(v, ast.Constant)
            )
        elif isinstance(node, ast.Constant) and id(node) not in skip and node.end_lineno is not None:
            # AST offsets are in UTF-8 bytes, which is why `source` is bytes.
            begin = starts[node.lineno - 1] + node.col_offset
            end = starts[node.end_lineno - 1] + (node.end_col_offset or 0)
            covered += max(0, end - begin)
    return min(1.0, covered / total)


# Syntax this interpreter's parser rejects but a newer CPython accepts: PEP 695 type parameters and `type` aliases
# (3.12), PEP 701 f-strings reusing their quotes or nesting (3.12), PEP 758 unparenthesised `except A, B:` (3.14).
NEWER_SYNTAX_LINE = re.compile(
    r"^\s*(?:type\s+[A-Za-z_]\w*\s*(?:\[[^\]]*\]\s*)?=|(?:async\s+)?def\s+[A-Za-z_]\w*\s*\[|class\s+[A-Za-z_]\w*\s*\[|"
    r"except\*?\s+[^:()]+,[^:]*:)"
)


def newer_syntax(err: SyntaxError, lines: list[str]) -> bool:
    """Whether a SyntaxError is (very likely) a construct of a newer Python than this one, which a newer parser
    would accept; such files are counted as `newer_syntax`, not as broken code."""
    if sys.version_info >= (3, 14):
        return False
    line = lines[err.lineno - 1] if err.lineno and 0 < err.lineno <= len(lines) else (err.text or "")
    if NEWER_SYNTAX_LINE.match(line):
        return True
    return sys.version_info < (3, 12) and str(err.msg).startswith("f-string")


def _strip_comment(line: str) -> str | None:
    stripped = line.lstrip()
    return stripped.lstrip("#").strip() if stripped.startswith("#") else None


def generated_comment_header(text_lines: list[str], patterns: list[re.Pattern], marker_lines: int) -> bool:
    """A generator's notice in the comments of the first `marker_lines` lines (checked before the parse: most
    generators write a comment, and a generated file then costs no `ast.parse`)."""
    blob = "\n".join(c for c in map(_strip_comment, text_lines[:marker_lines]) if c)
    return bool(blob) and any(p.search(blob) for p in patterns)


def generated_docstring(tree: ast.Module, patterns: list[re.Pattern], marker_lines: int) -> bool:
    """A generator's notice in the module docstring's first `marker_lines` lines (OpenAPI and Swagger clients)."""
    doc = ast.get_docstring(tree, clean=True)
    if not doc:
        return False
    blob = "\n".join(ln.strip() for ln in doc.splitlines()[:marker_lines])
    return any(p.search(blob) for p in patterns)


@functools.lru_cache(maxsize=64)
def compile_markers(markers: tuple[str, ...]) -> list[re.Pattern]:
    return [re.compile(m, re.IGNORECASE | re.MULTILINE) for m in markers]


def is_trivial(tree: ast.Module) -> bool:
    """Nothing but a docstring, `pass`, or `__all__`/imports: an empty package marker, not a lesson."""
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, (ast.Pass, ast.Import, ast.ImportFrom)):
            continue
        return False
    return True


def drop_reason(
    doc: Document,
    *,
    max_bytes: int = 1_000_000,
    max_line_length: int = 1000,
    max_mean_line_length: float = 100.0,
    max_literal_fraction: float = 0.5,
    generated_markers: Iterable[str] = (r"\bdo not edit\b",),
    marker_lines: int = 20,
    generated_paths: Iterable[str] = ("*_pb2.py",),
) -> str | None:
    """Why this document must go, or None to keep it. Cheap checks first: `ast.parse` is the expensive one."""
    if reason := doc.metadata.get("drop_reason"):
        return str(reason)
    if doc.metadata.get("lang") not in PYTHON_LANGS:
        return "not_python"
    text = doc.text.removeprefix("\ufeff")  # a BOM is an encoding mark, not source (CPython drops it too)
    if not text.strip():
        return "empty"
    raw = text.encode("utf-8", errors="surrogatepass")
    if len(raw) > max_bytes:
        return "oversize"
    if "\x00" in text:
        return "binary"
    lines = text.splitlines()
    if max(map(len, lines)) > max_line_length or len(text) / max(1, len(lines)) > max_mean_line_length:
        return "minified"
    path = str(doc.metadata.get("path") or doc.id)
    markers = compile_markers(tuple(generated_markers))
    if any(fnmatch.fnmatch(path, p) for p in generated_paths) or generated_comment_header(lines, markers, marker_lines):
        return "autogenerated"
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        return "newer_syntax" if newer_syntax(e, lines) else "syntax_error"
    except (ValueError, RecursionError, MemoryError):
        return "syntax_error"
    if generated_docstring(tree, markers, marker_lines):
        return "autogenerated"
    if doc.metadata.get("kind") == "qa":
        return None if doc.metadata.get("code_blocks", 0) > 0 else "no_code"
    if is_trivial(tree):
        return "empty"
    if literal_fraction(tree, raw) > max_literal_fraction:
        return "data_dominated"
    return None


class CodeCleaner(PipelineStep):
    """Drops non-Python / unparsable / binary / non-UTF-8 / minified / generated / data / oversize / empty files, and
    counts the files the readers could not read (`unreadable`, `not_a_file`, `vanished`)."""

    name = "🧹 Clean Python"
    type = "🔻 - FILTER"

    def __init__(self, progress: bool = True, **limits) -> None:
        super().__init__()
        self.limits = limits
        self.progress = progress

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data is None:
            return
        bar = tqdm(desc=f"clean[{rank}]", unit="file", disable=not self.progress, mininterval=2)
        for doc in data:
            bar.update()
            self.stat_update(IN)
            with self.track_time():
                reason = drop_reason(doc, **self.limits)
            if reason:
                self.stat_update(DROP + reason)
                continue
            self.stat_update(KEPT)
            self.update_doc_stats(doc)
            yield doc
        bar.close()
