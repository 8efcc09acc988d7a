"""Step 3: rate a sample of files for educational value (phi-1 §2.1).

phi-1 had GPT-4 rate ~100k files for "educational value for a student whose goal is to learn basic coding concepts"
and learned that rating for the rest. Two annotators share one interface:
- `TeacherAnnotator`: the same question to an LLM behind any OpenAI-compatible endpoint (`teacher.py`);
- `RubricAnnotator`: an offline heuristic rubric, so the whole pipeline runs without network.
Annotations are cached in sqlite by (sha256 of the text, annotator id): a rerun never pays twice.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from tqdm import tqdm

from data_tools.codetextbook.clean import literal_fraction
from phi_train.teacher import TeacherClient

RATING_RE = re.compile(
    r"^\s*(?:score|rating|educational value)?\s*[:=]?\s*(\d{1,2})(?:\s*/\s*10)?\s*\.?\s*$", re.IGNORECASE
)


@dataclass
class Annotation:
    score: float | None
    """0-10, higher is more educational; None when the annotator gave no rating (then `reason` says why)."""
    reason: str | None = None


class Annotator(Protocol):
    id: str
    """Distinguishes caches: a different rubric version or teacher model is a different annotator."""

    def annotate_many(self, texts: list[str]) -> list[Annotation]: ...


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


GENERIC_NAMES = {"foo", "bar", "baz", "tmp", "temp", "data", "obj", "var", "val", "res", "ret", "x1", "x2"}


class RubricAnnotator:
    """An offline stand-in for the teacher, scoring what phi-1's rating prompt rewards (0-10, additive):

    - explanation (4): docstrings on functions/classes and the module, and comments, in proportion;
    - meaningful names (2): identifiers that are words, not single letters or foo/tmp;
    - self-contained functions (2): code organised into functions/classes of moderate length that use few imports;
    - not boilerplate (2): penalised when mostly literals (data dumps), mostly assignments at module level
      (configuration) or when the file is tiny.
    It is a heuristic, documented so its biases are visible; swap in `TeacherAnnotator` for the paper's setting.
    """

    id = "rubric-v1"

    def score(self, text: str) -> float:
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError, RecursionError):
            return 0.0
        lines = [ln for ln in text.splitlines() if ln.strip()]
        n_lines = max(1, len(lines))
        defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        documented = sum(1 for d in defs if ast.get_docstring(d))
        doc_cov = documented / len(defs) if defs else 0.0
        comment_ratio = sum(1 for ln in lines if ln.lstrip().startswith("#")) / n_lines
        explanation = 2.5 * doc_cov + 1.0 * min(1.0, comment_ratio / 0.1) + 0.5 * bool(ast.get_docstring(tree))

        names = [n.id for n in ast.walk(tree) if isinstance(n, ast.Name)]
        names += [a.arg for a in ast.walk(tree) if isinstance(a, ast.arg) and a.arg not in ("self", "cls")]
        good = sum(1 for n in names if len(n.strip("_")) >= 3 and n.lower() not in GENERIC_NAMES)
        naming = 2.0 * (good / len(names)) if names else 0.0

        funcs = [d for d in defs if not isinstance(d, ast.ClassDef)]
        lengths = [(d.end_lineno or d.lineno) - d.lineno + 1 for d in funcs]
        moderate = sum(1 for n in lengths if 3 <= n <= 60) / len(lengths) if lengths else 0.0
        imports = sum(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree))
        structure = 1.5 * moderate + 0.5 * (imports <= max(3, len(funcs)))

        module_assigns = sum(isinstance(n, (ast.Assign, ast.AnnAssign)) for n in tree.body)
        config_like = module_assigns / max(1, len(tree.body))
        boilerplate = 2.0
        boilerplate -= 2.0 * min(1.0, literal_fraction(tree, text.encode("utf-8", "surrogatepass")) / 0.5)
        boilerplate -= 1.0 * (config_like > 0.6)
        boilerplate -= 1.0 * (n_lines < 10)
        return round(max(0.0, min(10.0, explanation + naming + structure + max(0.0, boilerplate))), 2)

    def annotate_many(self, texts: list[str]) -> list[Annotation]:
        return [Annotation(self.score(t)) for t in texts]


def parse_rating(reply: str, max_score: int = 10) -> float | None:
    """Strict: the whole reply must be one integer 0..max_score (optionally `score: 7`, `7/10`); anything else is None."""
    m = RATING_RE.match(reply or "")
    if not m:
        return None
    value = int(m.group(1))
    return float(value) if 0 <= value <= max_score else None


class TeacherAnnotator:
    """phi-1's GPT-4 annotation through `TeacherClient`. A reply that is not a rating is asked again with another
    `seed` (a new request, so the cache does not hand back the same reply), then dropped as `not_a_rating`."""

    def __init__(
        self,
        client: TeacherClient,
        prompt_template: str,
        max_prompt_chars: int = 6000,
        parse_retries: int = 2,
        temperature: float = 0.0,
        max_tokens: int = 8,
    ) -> None:
        self.client = client
        self.prompt_template = prompt_template
        self.max_prompt_chars = max_prompt_chars
        self.parse_retries = parse_retries
        self.sampling = {"temperature": temperature, "max_tokens": max_tokens}
        tmpl = sha256(prompt_template)[:8]
        self.id = f"teacher:{client.model}:{tmpl}"

    def annotate_many(self, texts: list[str]) -> list[Annotation]:
        prompts = [self.prompt_template.replace("{code}", t[: self.max_prompt_chars]) for t in texts]
        out: list[Annotation | None] = [None] * len(texts)
        todo = list(range(len(texts)))
        for attempt in range(self.parse_retries + 1):
            sampling = self.sampling | ({"seed": attempt} if attempt else {})
            replies = self.client.complete_many_sync([prompts[i] for i in todo], **sampling)
            retry = []
            for i, reply in zip(todo, replies, strict=True):
                if reply.text is None:
                    out[i] = Annotation(None, reply.error_reason or "request_failed")
                elif (score := parse_rating(reply.text)) is not None:
                    out[i] = Annotation(score)
                else:
                    out[i] = Annotation(None, "not_a_rating")
                    retry.append(i)
            todo = retry
            if not todo:
                break
        return [a if a is not None else Annotation(None, "not_a_rating") for a in out]


class AnnotationCache:
    """sqlite (sha256, annotator) -> score/reason. Transport failures are not cached (they may pass); ratings and
    `not_a_rating` are."""

    PERMANENT: ClassVar[frozenset] = frozenset({None, "not_a_rating"})

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS annotations (sha256 TEXT, annotator TEXT, score REAL, reason TEXT,"
            " PRIMARY KEY (sha256, annotator))"
        )

    def get(self, digest: str, annotator: str) -> Annotation | None:
        row = self.db.execute(
            "SELECT score, reason FROM annotations WHERE sha256 = ? AND annotator = ?", (digest, annotator)
        ).fetchone()
        return Annotation(row[0], row[1]) if row else None

    def put(self, digest: str, annotator: str, ann: Annotation) -> None:
        if ann.reason in self.PERMANENT:
            self.db.execute(
                "INSERT OR REPLACE INTO annotations VALUES (?, ?, ?, ?)", (digest, annotator, ann.score, ann.reason)
            )

    def commit(self) -> None:
        self.db.commit()


def annotate_cached(
    annotator: Annotator, texts: list[str], cache: AnnotationCache, batch: int = 64
) -> list[Annotation]:
    digests = [sha256(t) for t in texts]
    out: list[Annotation | None] = [cache.get(d, annotator.id) for d in digests]
    todo = [i for i, a in enumerate(out) if a is None]
    for start in tqdm(range(0, len(todo), batch), desc=f"annotate[{annotator.id}]", unit="batch", disable=not todo):
        idx = todo[start : start + batch]
        for i, ann in zip(idx, annotator.annotate_many([texts[i] for i in idx]), strict=True):
            out[i] = ann
            cache.put(digests[i], annotator.id, ann)
        cache.commit()  # per batch: a killed run keeps what it paid for
    return [a for a in out if a is not None]


def sample_key(doc_id: str, text: str, seed: int = 0) -> str:
    """A document's place in the sample order: a hash, so the sample is uniform and independent of input order."""
    return hashlib.sha256(f"{seed}:{sha256(text)}".encode()).hexdigest()


class AnnotateSample(PipelineStep):
    """Single task: picks `sample_size` files by hash order, annotates them, writes `annotations.jsonl`.

    The annotator is built inside `run` from a factory, so no client (and no key) is ever an attribute of the step
    that datatrove serialises into its executor.json."""

    name = "🏷 Annotate sample"
    type = "🏷 - ANNOTATE"

    def __init__(
        self, make_annotator, out_path: str, cache_path: str, sample_size: int, label_threshold: float, seed: int = 0
    ):
        super().__init__()
        self.make_annotator = make_annotator
        self.out_path, self.cache_path = out_path, cache_path
        self.sample_size, self.label_threshold, self.seed = sample_size, label_threshold, seed

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if world_size != 1:
            raise ValueError(f"the annotate stage needs one task, got world_size={world_size}")
        pool = sorted(((sample_key(d.id, d.text, self.seed), d) for d in (data or [])), key=lambda kv: kv[0])
        sample = [d for _, d in pool[: self.sample_size]]
        annotator = self.make_annotator()
        anns = annotate_cached(annotator, [d.text for d in sample], AnnotationCache(self.cache_path))
        Path(self.out_path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(self.out_path + ".tmp")
        with tmp.open("w") as f:
            for d, a in zip(sample, anns, strict=True):
                self.stat_update("annotation_in")
                if a.score is None:
                    self.stat_update(f"annotation_drop:{a.reason}")
                    continue
                self.stat_update("annotated")
                label = int(a.score >= self.label_threshold)
                rec = {"id": d.id, "sha256": sha256(d.text), "score": a.score, "label": label, "text": d.text}
                f.write(json.dumps(rec | {"annotator": annotator.id}) + "\n")
        tmp.replace(self.out_path)  # atomic: a killed run never leaves half a file behind
        if hasattr(annotator, "client"):
            stats_path = Path(self.out_path).with_name("teacher_stats.json")
            stats_path.write_text(json.dumps(annotator.client.stats.as_dict(), indent=2))
        return
        yield
