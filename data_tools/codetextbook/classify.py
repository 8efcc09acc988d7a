"""Steps 4 and 5: learn the educational-value classifier, then score and filter every file (phi-1 §2.1).

phi-1 trained a random forest on embeddings of the GPT-4-annotated sample and used it to keep the "textbook-quality"
~6B of ~35B tokens. Here: `fit_classifier` (held-out accuracy and ROC-AUC against a constant predictor, saved with
joblib plus a JSON report) and `ScoreFilter`, the per-file scoring step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from data_tools.codetextbook.clean import DROP
from data_tools.codetextbook.dedup import code_tokens
from data_tools.codetextbook.embed import embed_batched, make_embedder
from phi_train.errors import PhiTrainError


class ClassifierError(PhiTrainError):
    """The annotations cannot train a classifier (too few, one class only); the message says what to change."""


def fit_classifier(
    x: np.ndarray, y: np.ndarray, n_estimators: int = 300, test_fraction: float = 0.25, seed: int = 0
) -> tuple[RandomForestClassifier, dict[str, Any], np.ndarray]:
    """Fit on a stratified split, report held-out metrics, then refit on everything. Returns (model, report, scores of
    the held-out part from the split model) — the held-out scores estimate the corpus score distribution."""
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2 or counts.min() < 2:
        raise ClassifierError(
            f"annotations have label counts {dict(zip(classes.tolist(), counts.tolist(), strict=True))}; both labels "
            "need >= 2 examples: change annotate.label_threshold or annotate.sample_size"
        )
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    rf = RandomForestClassifier(n_estimators=n_estimators, random_state=seed, n_jobs=1, class_weight="balanced")
    rf.fit(x_tr, y_tr)
    p = rf.predict_proba(x_te)[:, 1]
    majority = int(np.bincount(y_tr).argmax())
    report = {
        "n_train": len(y_tr),
        "n_test": len(y_te),
        "positive_rate": float(y.mean()),
        "accuracy": float(accuracy_score(y_te, (p >= 0.5).astype(int))),
        "roc_auc": float(roc_auc_score(y_te, p)),
        "baseline_constant": {
            "predicts": majority,
            "accuracy": float(accuracy_score(y_te, np.full_like(y_te, majority))),
            "roc_auc": 0.5,
        },
    }
    final = RandomForestClassifier(n_estimators=n_estimators, random_state=seed, n_jobs=1, class_weight="balanced")
    final.fit(x, y)
    return final, report, p


class TrainClassifier(PipelineStep):
    """Single task: embeds `annotations.jsonl`, fits the forest, writes `classifier.joblib` + `classifier.json`."""

    name = "🌲 Train classifier"
    type = "🧠 - TRAIN"

    def __init__(
        self,
        annotations: str,
        out_dir: str,
        embedder: str,
        batch_size: int,
        checkpoint: str | None,
        n_estimators: int,
        test_fraction: float,
        seed: int,
        top_fraction: float | None,
        progress: bool = True,
    ):
        super().__init__()
        self.annotations, self.out_dir = annotations, out_dir
        self.embedder, self.batch_size, self.checkpoint = embedder, batch_size, checkpoint
        self.n_estimators, self.test_fraction, self.seed = n_estimators, test_fraction, seed
        self.top_fraction, self.progress = top_fraction, progress

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        recs = [json.loads(line) for line in Path(self.annotations).read_text().splitlines() if line.strip()]
        emb = make_embedder(self.embedder, self.batch_size, self.checkpoint)
        x = embed_batched(emb, [r["text"] for r in recs], batch=self.batch_size * 4, progress=self.progress)
        y = np.array([r["label"] for r in recs], dtype=int)
        model, report, held_out = fit_classifier(x, y, self.n_estimators, self.test_fraction, self.seed)
        report |= {"embedder": emb.name, "annotations": len(recs), "annotator": recs[0]["annotator"] if recs else None}
        if self.top_fraction is not None:
            # The annotated files are a uniform hash sample of the corpus, so the (1 - f) quantile of held-out scores
            # is the cut that keeps about a fraction f of every task's files, without a global pass.
            report["keep_threshold"] = float(np.quantile(held_out, 1 - self.top_fraction))
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        joblib.dump(model, out / "classifier.joblib.tmp")
        (out / "classifier.joblib.tmp").replace(out / "classifier.joblib")
        (out / "classifier.json").write_text(json.dumps(report, indent=2))
        self.stat_update("annotations", value=len(recs))
        return
        yield


def approx_tokens(text: str) -> int:
    """Code tokens (identifiers, numbers, punctuation): a tokenizer-free size estimate, close to BPE counts on code."""
    return len(code_tokens(text))


class ScoreFilter(PipelineStep):
    """Scores every file with the trained forest; keeps those at or above the threshold, with `score` in metadata."""

    name = "🎯 Score + filter"
    type = "🔻 - FILTER"

    def __init__(
        self,
        model_dir: str,
        embedder: str,
        batch_size: int,
        checkpoint: str | None,
        threshold: float | None,
        progress: bool = True,
    ):
        super().__init__()
        self.model_dir, self.embedder, self.batch_size, self.checkpoint = model_dir, embedder, batch_size, checkpoint
        self.threshold, self.progress = threshold, progress

    def _cut(self) -> float:
        if self.threshold is not None:
            return self.threshold
        return float(json.loads((Path(self.model_dir) / "classifier.json").read_text())["keep_threshold"])

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        model = joblib.load(Path(self.model_dir) / "classifier.joblib")
        emb = make_embedder(self.embedder, self.batch_size, self.checkpoint)
        cut = self._cut()
        bar = tqdm(desc=f"score[{rank}]", unit="file", disable=not self.progress, mininterval=2)
        batch = []
        for doc in data or []:
            batch.append(doc)
            if len(batch) >= self.batch_size * 4:
                yield from self._score(batch, model, emb, cut)
                bar.update(len(batch))
                batch = []
        if batch:
            yield from self._score(batch, model, emb, cut)
            bar.update(len(batch))
        bar.close()

    def _score(self, docs, model, emb, cut: float) -> DocumentsPipeline:
        with self.track_time(unit="batch"):
            scores = model.predict_proba(emb.embed([d.text for d in docs]))[:, 1]
        for doc, s in zip(docs, scores, strict=True):
            self.stat_update("filter_in")
            if s < cut:
                self.stat_update(DROP + "low_score")
                continue
            doc.metadata["score"] = round(float(s), 4)
            self.stat_update("final_kept")
            self.stat_update("kept_bytes", value=len(doc.text.encode("utf-8", "surrogatepass")))
            self.stat_update("kept_tokens", value=approx_tokens(doc.text))
            yield doc


def output_record(self, doc) -> dict[str, Any]:
    """JsonlWriter adapter: the fields `data_tools.shard` reads (`text`) plus score and provenance."""
    m = doc.metadata
    return {
        "text": doc.text,
        "id": doc.id,
        "score": m.get("score"),
        "source": m.get("source"),
        "path": m.get("path"),
        "repo": m.get("repo"),
        "license": m.get("license"),
    }
