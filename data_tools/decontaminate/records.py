"""The scan's result records, shared by the scan (which fills them) and the report (which reads them)."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field


@dataclass
class ScanResult:
    item_ids: list[str] = field(default_factory=list)
    unit_item: list[int] = field(default_factory=list)
    unit_name: list[str] = field(default_factory=list)
    unit_text: list[str] = field(default_factory=list)
    ngram_hits: dict[int, dict[int, int]] = field(default_factory=lambda: defaultdict(dict))
    """problem -> item -> distinct shared n-grams."""
    skeleton_top: list[list[tuple[float, int]]] = field(default_factory=list)
    """Per problem, a min-heap of (containment, unit) of its best skeleton candidates."""
    counts: Counter = field(default_factory=Counter)


@dataclass
class PairScore:
    problem: int
    unit: int
    sources: dict[str, float]
    ast: float | None = None
    ast_bound: float | None = None
    difflib: float | None = None
