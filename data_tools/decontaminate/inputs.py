"""The two inputs of the decontamination study: benchmark problems as the code a contaminated item would copy, and
the training set read in a deterministic order (phi-1 §5)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from data_tools.decontaminate.config import DecontaminateConfig, DecontaminateConfigError
from data_tools.decontaminate.measures import (
    Node,
    canonical_tree,
    code_tokens,
    ngrams,
    primary_function,
    split_units,
    tree_features,
    tree_size,
)
from data_tools.sources import SourceError, _open_text_lines, iter_documents
from phi_train import benchmarks
from phi_train.benchmarks import Problem


@dataclass
class BenchItem:
    task_id: str
    code: str
    """prompt + canonical solution (HumanEval / custom), the reference code (MBPP): what a contaminated item copies."""
    primary: str
    """The function under test, the unit compared by AST / embeddings / MinHash."""
    grams: set[int]
    primary_words: list[str]
    features: set[str]
    """measures.tree_features of the canonical tree: the MinHash/LSH shingles."""
    tree: Node | None
    size: int
    problem: Problem
    """The benchmark problem itself: its tests drive the behavioural measure."""
    arity: int | None
    """Positional parameters of the function under test (None: no such function)."""


def benchmark_code(p: Problem) -> tuple[str, str]:
    """(whole code, primary function). HumanEval's benchmark code is prompt + canonical solution (phi-1 §5)."""
    if p.kind == "mbpp":
        code = p.reference or p.prompt
        return code, primary_function(code, hint=p.test.split("\n")[0])
    code = p.prompt + p.reference
    return code, primary_function(code, entry_point=p.entry_point)


def load_benchmark(cfg: DecontaminateConfig) -> list[BenchItem]:
    b = cfg.benchmark
    problems = benchmarks.load_benchmark(b.name, b.path)
    if b.problems:
        known = {p.task_id for p in problems}
        missing = [t for t in b.problems if t not in known]
        if missing:
            raise DecontaminateConfigError(f"benchmark.problems: {missing[0]!r} is not a task_id of {b.name}")
        problems = [p for p in problems if p.task_id in set(b.problems)]
    out = []
    for p in problems:
        code, primary = benchmark_code(p)
        words = [t.text for t in code_tokens(code)[0]]
        ptoks = code_tokens(primary)[0]
        tree = canonical_tree(primary)
        units = [u for u in split_units(primary)[0] if u.arity is not None and not u.parent]
        out.append(
            BenchItem(
                p.task_id,
                code,
                primary,
                ngrams(words, cfg.ngram.n),
                [t.text for t in ptoks],
                tree_features(tree) if tree else set(),
                tree,
                tree_size(tree) if tree else 0,
                p,
                units[0].arity[1] if units else None,
            )
        )
    return out


def read_training(cfg: DecontaminateConfig, dropped: Counter) -> Iterator[tuple[str, str, dict]]:
    """(id, text, record): JSONL records are kept whole (score, provenance) so the pruned copy has every field; other
    inputs go through data_tools.sources and become {"text", "id"}. Ids are unique: the k-th repeat of an id
    (k >= 2) becomes `id#k`, counted as `duplicate_id`, so pruning and reconciliation can go by id alone."""
    for p in cfg.train.paths:  # checked before the first item, so a typo fails at once, not after the scan
        if not Path(p).exists():
            raise SourceError(f"train.paths: {p!r} does not exist (give JSONL/JSONL.zst files or directories)")
    return _records(cfg, dropped)


JSONL_SUFFIXES = (".jsonl", ".jsonl.zst", ".ndjson")


def _jsonl_files(path: Path) -> list[Path]:
    """A JSONL file itself, or the JSONL files of a directory (sorted; e.g. data_tools.codetextbook's output_dir)."""
    if path.is_file():
        return [path] if path.name.endswith((*JSONL_SUFFIXES, ".json")) else []
    return sorted(f for f in path.rglob("*") if f.is_file() and f.name.endswith(JSONL_SUFFIXES))


def _records(cfg: DecontaminateConfig, dropped: Counter) -> Iterator[tuple[str, str, dict]]:
    seen: Counter = Counter()
    for doc_id, text, rec in _raw_records(cfg, dropped):
        seen[doc_id] += 1
        if seen[doc_id] > 1:
            dropped["duplicate_id"] += 1
            doc_id = f"{doc_id}#{seen[doc_id]}"
        yield doc_id, text, rec


def _raw_records(cfg: DecontaminateConfig, dropped: Counter) -> Iterator[tuple[str, str, dict]]:
    t, n = cfg.train, 0
    for p in t.paths:
        files = _jsonl_files(Path(p))
        if files:
            records = (rec for f in files for rec in _jsonl_records(f, t.text_field, dropped))
        else:
            records = (
                (d["id"], d["text"], {"id": d["id"], "text": d["text"]})
                for d in iter_documents([p], suffixes=tuple(t.suffixes), dropped=dropped)
            )
        for rec in records:
            if t.limit != -1 and n >= t.limit:
                return
            n += 1
            yield rec


def _jsonl_records(path: Path, text_field: str, dropped: Counter) -> Iterator[tuple[str, str, dict]]:
    """The rules of data_tools.sources (bad_json, missing_field, empty counted), keeping the whole record."""
    for lineno, raw in enumerate(_open_text_lines(path), start=1):
        if not raw.strip():
            continue
        try:
            rec = orjson.loads(raw)
        except orjson.JSONDecodeError:
            dropped["bad_json"] += 1
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
            dropped["missing_field"] += 1
            continue
        if not rec[text_field]:
            dropped["empty"] += 1
            continue
        doc_id = str(rec["id"]) if rec.get("id") is not None else f"{path.name}:{lineno}"
        yield doc_id, rec[text_field], rec
