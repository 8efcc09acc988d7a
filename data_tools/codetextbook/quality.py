"""How good is the filter? An honest measure on files the classifier never saw (phi-1 §2.1).

    python -m data_tools.codetextbook.quality --config-name demo [key=value ...]    # after the pipeline has run

`classifier.json`'s held-out figures come from a split of the annotation sample, and the forest is then refitted on
all of it. This command instead:

1. takes `quality.held_out` files of `work/dedup` outside the annotation sample (the next ones in the same hash
   order, so a uniform sample disjoint from the training files), has the run's annotator label them (cached: the
   teacher is paid once), and scores them with the trained forest: accuracy at the filter's cut and ROC-AUC against
   the constant predictor, Spearman against the annotator's 0-10 score. With a teacher annotator the same numbers
   measure agreement between teacher and forest, and the offline rubric is reported as a competing predictor of
   the teacher's labels;
2. refits, on the same annotations, a forest per embedder in `quality.embedders` and (with `quality.regressor`) a
   random-forest regressor on the 0-10 score, and evaluates each on the same held-out files;
3. for each named corpus in `quality.sources` (e.g. educational, generated, ordinary code of this machine) reports
   the fraction dropped by the clean rules, the fraction kept end to end, and for each pair the probability that a
   file of the first outranks one of the second (AUC; a clean-dropped file scores below every kept one).

Writes `work_dir/quality.json` and prints a table.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sys
from pathlib import Path
from typing import Any

import joblib
import numpy as np

from data_tools.codetextbook.config import CONF_DIR, SCHEMA, CodeTextbookConfig, QualitySourceConfig
from phi_train.cli import hydra_command
from phi_train.errors import PhiTrainError


class QualityError(PhiTrainError):
    """The run to evaluate is not there (no annotations or classifier) or held out too few files."""


def _auc(y: np.ndarray, s: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if len(set(y.tolist())) == 2 else None


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def _read_jsonl_zst(folder: Path) -> list[dict]:
    import io

    import orjson
    import zstandard

    out = []
    for f in sorted(folder.glob("*.jsonl.zst")):
        with f.open("rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as r:
            out += [orjson.loads(line) for line in io.BufferedReader(r) if line.strip()]
    return out


def held_out_files(work_dir: str, n: int) -> tuple[list[dict], list[dict]]:
    """(annotations, the next `n` deduplicated files in sample order that were not annotated)."""
    from data_tools.codetextbook.annotate import sample_key, sha256

    w = Path(work_dir)
    ann_path = w / "annotations.jsonl"
    if not ann_path.is_file() or not (w / "classifier.joblib").is_file():
        raise QualityError(f"{work_dir} has no annotations.jsonl / classifier.joblib: run the pipeline first")
    anns = [json.loads(line) for line in ann_path.read_text().splitlines() if line.strip()]
    seen = {a["sha256"] for a in anns}
    pool = [r for r in _read_jsonl_zst(w / "dedup") if sha256(r["text"]) not in seen]
    pool.sort(key=lambda r: sample_key(r["id"], r["text"]))
    if len(pool) < 10:
        raise QualityError(
            f"only {len(pool)} deduplicated files of {work_dir} are outside the annotation sample; lower "
            "annotate.sample_size or add inputs"
        )
    return anns, pool[:n]


def _binary_metrics(y: np.ndarray, score: np.ndarray, cut: float, truth_score: np.ndarray) -> dict[str, Any]:
    return {
        "accuracy": float(np.mean((score >= cut).astype(int) == y)),
        "roc_auc": _auc(y, score),
        "spearman_vs_annotator": _spearman(score, truth_score),
        "kept_fraction": float(np.mean(score >= cut)),
    }


def source_files(src: QualitySourceConfig, max_bytes: int, seen: set[str]) -> list[tuple[str, str | None, str]]:
    """(relative path, drop reason of the reader or None, text) of up to `limit` files, in content-hash order,
    leaving out any file whose text the forest was trained on (`seen`: sha256 of the annotated texts)."""
    from data_tools.codetextbook.annotate import sample_key, sha256
    from data_tools.codetextbook.readers import decode_source
    from data_tools.sources import read_regular_file

    root = Path(src.path)
    if not root.is_dir():
        raise QualityError(f"quality.sources[{src.name}].path={src.path!r} is not a directory")
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if not any(fnmatch.fnmatch(rel, p) for p in src.include) or any(
                fnmatch.fnmatch(rel, p) for p in src.exclude
            ):
                continue
            raw, reason = read_regular_file(Path(dirpath) / name, max_bytes)
            text = ""
            if raw is not None:
                text, reason = decode_source(raw)
            if text and sha256(text) in seen:
                continue
            rows.append((rel, reason, text))
    rows.sort(key=lambda r: sample_key(r[0], r[2]))
    return rows[: src.limit]


def evaluate_quality(cfg: CodeTextbookConfig) -> dict[str, Any]:
    from datatrove.data import Document
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    from data_tools.codetextbook.annotate import AnnotationCache, RubricAnnotator, annotate_cached, sha256
    from data_tools.codetextbook.clean import drop_reason
    from data_tools.codetextbook.embed import embed_batched, make_embedder
    from data_tools.codetextbook.pipeline import build_annotator, clean_limits

    w, q, cls = Path(cfg.work_dir), cfg.quality, cfg.classifier
    anns, held = held_out_files(cfg.work_dir, q.held_out)
    annotator = build_annotator(cfg.annotate, str(w / "cache"), cfg.progress)
    labels = annotate_cached(annotator, [r["text"] for r in held], AnnotationCache(w / "cache" / "annotations.sqlite"))
    rated = [(r, a.score) for r, a in zip(held, labels, strict=True) if a.score is not None]
    held_texts = [r["text"] for r, _ in rated]
    truth = np.array([s for _, s in rated], dtype=float)
    y = (truth >= cfg.annotate.label_threshold).astype(int)
    train_texts = [a["text"] for a in anns]
    y_train = np.array([a["label"] for a in anns], dtype=int)
    s_train = np.array([a["score"] for a in anns], dtype=float)
    majority = int(np.bincount(y_train, minlength=2).argmax())
    report_json = json.loads((w / "classifier.json").read_text())
    cut = cfg.filter.threshold if cfg.filter.threshold is not None else float(report_json["keep_threshold"])
    report: dict[str, Any] = {
        "annotator": annotator.id,
        "n_train": len(anns),
        "n_held_out": len(rated),
        "held_out_unrated": len(held) - len(rated),
        "held_out_positive_rate": float(y.mean()) if len(y) else None,
        "constant_predictor": {"predicts": majority, "accuracy": float(np.mean(y == majority)), "roc_auc": 0.5},
        "cut": cut,
    }
    if annotator.id != RubricAnnotator.id:
        rubric = np.array([a.score for a in RubricAnnotator().annotate_many(held_texts)], dtype=float)
        report["rubric_as_predictor"] = _binary_metrics(y, rubric, cfg.annotate.label_threshold, truth)

    seen = {a["sha256"] for a in anns}
    srcs = [(s, source_files(s, cfg.clean.max_bytes, seen)) for s in q.sources]
    limits = clean_limits(cfg)
    src_clean = []
    for _, rows in srcs:
        reasons = []
        for rel, reason, text in rows:
            doc = Document(text=text, id=rel, metadata={"path": rel} | ({"drop_reason": reason} if reason else {}))
            reasons.append(drop_reason(doc, **limits))
        src_clean.append(reasons)

    def source_report(name: str, score_fn, cut_value: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        scores = {}
        for (s, rows), reasons in zip(srcs, src_clean, strict=True):
            survivors = [text for (_, _, text), r in zip(rows, reasons, strict=True) if r is None]
            sc = np.full(len(rows), -1.0)
            if survivors:
                sc[[i for i, r in enumerate(reasons) if r is None]] = score_fn(survivors)
            scores[s.name] = sc
            dropped: dict[str, int] = {}
            for r in reasons:
                if r:
                    dropped[r] = dropped.get(r, 0) + 1
            out[s.name] = {
                "files": len(rows),
                "clean_dropped_fraction": float(np.mean([r is not None for r in reasons])) if rows else None,
                "kept_fraction": float(np.mean(sc >= cut_value)) if rows else None,
                "clean_drops": dict(sorted(dropped.items(), key=lambda kv: -kv[1])),
            }
        names = list(scores)
        pairs = {}
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                sa, sb = scores[a], scores[b]
                if len(sa) and len(sb):
                    yy = np.r_[np.ones(len(sa)), np.zeros(len(sb))]
                    pairs[f"{a} > {b}"] = _auc(yy, np.r_[sa, sb])
        return {"per_source": out, "ranking_auc": pairs} if names else {}

    forest = joblib.load(w / "classifier.joblib")
    emb_cache: dict[str, Any] = {}

    def embedder(kind: str):
        if kind not in emb_cache:
            emb_cache[kind] = make_embedder(kind, cls.batch_size, cls.embedder_checkpoint)
        return emb_cache[kind]

    vectors: dict[tuple[str, str], np.ndarray] = {}

    def embed(kind: str, texts: list[str]) -> np.ndarray:
        # Each text is embedded once per embedder, however many models are scored on it (MiniLM on CPU is slow).
        keys = [(kind, sha256(t)) for t in texts]
        todo = list(dict.fromkeys(k for k in keys if k not in vectors))
        if todo:
            by_key = {k: t for k, t in zip(keys, texts, strict=True)}
            x = embed_batched(
                embedder(kind), [by_key[k] for k in todo], batch=cls.batch_size * 4, progress=cfg.progress
            )
            vectors.update(zip(todo, x, strict=True))
        return np.stack([vectors[k] for k in keys]) if keys else np.zeros((0, 1), dtype=np.float32)

    x_held = embed(cls.embedder, held_texts)
    p = forest.predict_proba(x_held)[:, 1]
    report["pipeline_forest"] = {"embedder": cls.embedder} | _binary_metrics(y, p, cut, truth)
    report["pipeline_forest"] |= source_report(
        "pipeline", lambda t: forest.predict_proba(embed(cls.embedder, t))[:, 1], cut
    )
    report["models"] = {}
    for kind in q.embedders:
        x_tr, x_te = embed(kind, train_texts), embed(kind, held_texts)
        rf = RandomForestClassifier(
            n_estimators=cls.n_estimators, random_state=cls.seed, n_jobs=1, class_weight="balanced"
        ).fit(x_tr, y_train)
        report["models"][f"classifier/{kind}"] = _binary_metrics(y, rf.predict_proba(x_te)[:, 1], 0.5, truth)
        report["models"][f"classifier/{kind}"] |= source_report(
            kind, lambda t, rf=rf, kind=kind: rf.predict_proba(embed(kind, t))[:, 1], 0.5
        )
        if q.regressor:
            reg = RandomForestRegressor(n_estimators=cls.n_estimators, random_state=cls.seed, n_jobs=1)
            reg.fit(x_tr, s_train)
            thr = cfg.annotate.label_threshold
            report["models"][f"regressor/{kind}"] = _binary_metrics(y, reg.predict(x_te), thr, truth)
            report["models"][f"regressor/{kind}"] |= source_report(
                kind, lambda t, reg=reg, kind=kind: reg.predict(embed(kind, t)), thr
            )
    ranked = sorted(
        ((k, v["roc_auc"]) for k, v in report["models"].items() if v["roc_auc"] is not None), key=lambda kv: -kv[1]
    )
    report["best_on_held_out_auc"] = ranked[0][0] if ranked else None
    tmp = w / "quality.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(w / "quality.json")
    return report


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def print_quality(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    c = r["constant_predictor"]
    t = Table(
        title=f"Filter quality on {r['n_held_out']} held-out files ({r['annotator']} labels, "
        f"{_fmt(r['held_out_positive_rate'])} positive); constant predictor acc {_fmt(c['accuracy'])}, AUC 0.5"
    )
    for col in ("model", "acc", "AUC", "Spearman", "kept"):
        t.add_column(col, justify="left" if col == "model" else "right")
    rows = [("pipeline forest (" + r["pipeline_forest"]["embedder"] + ")", r["pipeline_forest"])]
    if "rubric_as_predictor" in r:
        rows.append(("rubric (offline)", r["rubric_as_predictor"]))
    rows += list(r["models"].items())
    for name, m in rows:
        t.add_row(
            name, _fmt(m["accuracy"]), _fmt(m["roc_auc"]), _fmt(m["spearman_vs_annotator"]), _fmt(m["kept_fraction"])
        )
    console = Console(stderr=True)
    console.print(t)
    for name, m in rows:
        if m.get("per_source"):
            kept = ", ".join(f"{s} {_fmt(v['kept_fraction'])}" for s, v in m["per_source"].items())
            auc = ", ".join(f"{k} {_fmt(v)}" for k, v in m["ranking_auc"].items())
            console.print(f"{name}: kept {kept}; ranking AUC {auc}")


@hydra_command(CodeTextbookConfig, "demo", CONF_DIR, schema_name=SCHEMA)
def main(cfg: CodeTextbookConfig) -> None:
    print_quality(evaluate_quality(cfg))


if __name__ == "__main__":
    sys.exit(main())
