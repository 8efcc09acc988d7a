"""Throughput of each CodeTextbook stage in files per second per core, on the config's inputs.

    python -m data_tools.codetextbook.bench --config-name demo "inputs=[{kind: python_files, path: DIR, limit: 3000}]"

Process CPU time (not wall time), one thread, so the figure is per core and does not depend on what else the
machine runs; the 35M-file projection divides by the number of cores, assuming the stage parallelises (clean and
filter do; the in-memory dedup is one task, see docs/codetextbook.md). Stages: read (stat + read + decode), clean
(`drop_reason`), dedup (`NearDedupIndex.add`), score with each embedder (embed + forest on rubric labels). Only
`python_files` inputs; `limit` caps the files read (-1: all).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from data_tools.codetextbook.config import CONF_DIR, SCHEMA, CodeTextbookConfig
from phi_train.cli import hydra_command

STACK_FILES = 35_000_000
CORES = 64
SCORE_FILES = 300
"""Files scored per embedder: MiniLM on CPU is slow, and a few hundred files give a stable rate."""


def _rate(n: int, seconds: float) -> float:
    return n / max(seconds, 1e-9)


def run_bench(cfg: CodeTextbookConfig) -> dict:
    from datatrove.data import Document
    from sklearn.ensemble import RandomForestClassifier

    from data_tools.codetextbook.annotate import RubricAnnotator
    from data_tools.codetextbook.clean import drop_reason
    from data_tools.codetextbook.dedup import NearDedupIndex
    from data_tools.codetextbook.embed import make_embedder
    from data_tools.codetextbook.inputs import list_input
    from data_tools.codetextbook.pipeline import clean_limits
    from data_tools.codetextbook.readers import decode_source
    from data_tools.sources import read_regular_file

    paths = []
    for inp in cfg.inputs:
        entries = [os.path.join(inp.path, e.path) for e in list_input(inp)]
        paths += entries if inp.limit < 0 else entries[: inp.limit]
    t0 = time.process_time()
    docs = []
    for p in paths:
        raw, reason = read_regular_file(p, cfg.clean.max_bytes)
        text, reason = decode_source(raw) if raw is not None else ("", reason)
        docs.append(Document(text=text, id=p, metadata={"path": p} | ({"drop_reason": reason} if reason else {})))
    t_read = time.process_time() - t0
    limits = clean_limits(cfg)
    t0 = time.process_time()
    kept = [d for d in docs if drop_reason(d, **limits) is None]
    t_clean = time.process_time() - t0
    d = cfg.dedup
    index = NearDedupIndex(d.threshold, d.num_perm, d.shingle_size, d.seed)
    t0 = time.process_time()
    unique = [doc for doc in kept if index.add(doc.id, doc.text)[0] is None]
    t_dedup = time.process_time() - t0
    texts = [doc.text for doc in unique]
    train, score = texts[: cfg.annotate.sample_size], texts[-SCORE_FILES:]
    y = (np.array([RubricAnnotator().score(t) for t in train]) >= cfg.annotate.label_threshold).astype(int)
    rates = {
        "read": _rate(len(docs), t_read),
        "clean": _rate(len(docs), t_clean),
        "dedup": _rate(len(kept), t_dedup),
    }
    for kind in ("hashing", "minilm"):
        emb = make_embedder(kind, cfg.classifier.batch_size)
        rf = RandomForestClassifier(n_estimators=cfg.classifier.n_estimators, random_state=0, n_jobs=1)
        rf.fit(emb.embed(train), y)
        t0 = time.process_time()
        rf.predict_proba(emb.embed(score))
        rates[f"score_{kind}"] = _rate(len(score), time.process_time() - t0)
    # A file passes through read + clean; a kept one also through dedup and scoring: per-file cost, weighted.
    f_kept, f_unique = len(kept) / max(1, len(docs)), len(unique) / max(1, len(docs))
    report = {
        "files": len(docs),
        "bytes": sum(len(doc.text) for doc in docs),
        "kept_after_clean": len(kept),
        "kept_after_dedup": len(unique),
        "files_per_core_s": {k: round(v, 1) for k, v in rates.items()},
    }
    for kind in ("hashing", "minilm"):
        per_file = 1 / rates["read"] + 1 / rates["clean"] + f_kept / rates["dedup"] + f_unique / rates[f"score_{kind}"]
        end_to_end = 1 / per_file
        report[f"end_to_end_{kind}_files_per_core_s"] = round(end_to_end, 1)
        report[f"hours_35M_files_64_cores_{kind}"] = round(STACK_FILES / (end_to_end * CORES) / 3600, 2)
    report["hours_35M_files_dedup_one_core"] = round(STACK_FILES * f_kept / rates["dedup"] / 3600, 1)
    return report


@hydra_command(CodeTextbookConfig, "demo", CONF_DIR, schema_name=SCHEMA)
def main(cfg: CodeTextbookConfig) -> None:
    torch_threads = os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(int(torch_threads))
    except ImportError:
        pass
    report = run_bench(cfg)
    print(json.dumps(report, indent=2))
    out = Path(cfg.work_dir) / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
