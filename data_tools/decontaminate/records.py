"""The scan's result records, shared by the scan (which fills them) and the report (which reads them)."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field


@dataclass
class ScanResult:
    item_ids: list[str] = field(default_factory=list)
    item_hash: dict[str, bytes] = field(default_factory=dict)
    """id -> digest of its text in pass 1: pass 2 prunes and reconciles by id and checks the text did not change."""
    item_imports: list[list[str]] = field(default_factory=list)
    unit_item: list[int] = field(default_factory=list)
    unit_name: list[str] = field(default_factory=list)
    unit_kind: list[str] = field(default_factory=list)
    unit_parent: list[str] = field(default_factory=list)
    unit_arity: list[tuple[int, int] | None] = field(default_factory=list)
    unit_text: list[str] = field(default_factory=list)
    ngram_hits: dict[int, dict[int, int]] = field(default_factory=lambda: defaultdict(dict))
    """problem -> item -> distinct shared n-grams."""
    lsh_top: list[list[tuple[float, int]]] = field(default_factory=list)
    """Per problem, a min-heap of (Jaccard of canonical-tree shingles, unit) of its best MinHash/LSH candidates."""
    lsh_ties: list[list[int]] = field(default_factory=list)
    """Per problem, units with Jaccard 1.0 that did not fit in the full heap (scan.TIE_CAP bounds them)."""
    name_hits: list[list[int]] = field(default_factory=list)
    """Per problem, the function units named like its entry point."""
    counts: Counter = field(default_factory=Counter)


@dataclass
class PairScore:
    problem: int
    unit: int
    sources: dict[str, float]
    ast: float | None = None
    ast_bound: float | None = None
    difflib: float | None = None
    behaviour: str | None = None
    """The sandbox verdict of the unit against the problem's tests (None: not run, e.g. arity incompatible)."""

    @property
    def passed(self) -> bool:
        return self.behaviour == "passed"
