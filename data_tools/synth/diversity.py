"""The diversity report every synth job writes (`work_dir/diversity*.json`), prints and, when enabled, logs to wandb.

phi-1 §2.2's point is that synthetic data is only worth training on when it is diverse; this measures it instead of
hoping. Over the teacher's replies (before any drop):

* `exact_duplicate_rate`, `near_duplicate_rate`: replies that repeat an earlier one exactly (normalised content hash)
  or nearly (MinHash Jaccard >= dedup.threshold, the same index the jobs drop them with);
* `distinct_n`: distinct word n-grams / all n-grams, n = 1..3, over the kept texts (Li et al. 2016's distinct-n; 1.0
  means no n-gram repeats anywhere); `replies.distinct_n` the same over every reply (informative when a weak teacher
  gets everything dropped);
* `cluster_entropy`: TF-IDF embeddings of the kept texts (and, under `replies`, of every reply) clustered with
  k-means (k = min(`clusters`, texts // 2)); the entropy of the cluster sizes divided by log k, so 1.0 is an even
  spread over k clusters and 0 one single cluster;
* `topics`: items per seed value (topic, and subtopic / difficulty where the item has them), requested and kept;
* `dropped`: per reason, as the job counted them.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

from data_tools.codetextbook.dedup import NearDedupIndex

WORD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|[^\sA-Za-z0-9_]")


def duplicate_rates(texts: list[str], threshold: float, num_perm: int, shingle_size: int, seed: int) -> dict[str, Any]:
    index = NearDedupIndex(threshold, num_perm, shingle_size, seed)
    reasons = Counter(index.add(str(i), t)[0] for i, t in enumerate(texts))
    n = max(len(texts), 1)
    return {
        "texts": len(texts),
        "exact_duplicates": reasons["exact_duplicate"],
        "near_duplicates": reasons["near_duplicate"],
        "exact_duplicate_rate": reasons["exact_duplicate"] / n,
        "near_duplicate_rate": reasons["near_duplicate"] / n,
    }


def distinct_n(texts: list[str], orders: tuple[int, ...] = (1, 2, 3)) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    tokens = [WORD_RE.findall(t.lower()) for t in texts]
    for n in orders:
        grams = [tuple(toks[i : i + n]) for toks in tokens for i in range(len(toks) - n + 1)]
        out[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else None
    return out


def cluster_entropy(texts: list[str], clusters: int, seed: int = 0) -> dict[str, Any]:
    """Normalised entropy of k-means cluster sizes over TF-IDF vectors (None with fewer than 4 texts)."""
    k = min(clusters, len(texts) // 2)
    if k < 2:
        return {"clusters": k, "cluster_entropy": None, "cluster_sizes": []}
    from sklearn.cluster import KMeans
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:
        vectors = TfidfVectorizer(token_pattern=WORD_RE.pattern, lowercase=True, sublinear_tf=True).fit_transform(texts)
    except ValueError:  # no token at all in any text
        return {"clusters": k, "cluster_entropy": 0.0, "cluster_sizes": [len(texts)]}
    labels = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(vectors)
    sizes = sorted(Counter(labels.tolist()).values(), reverse=True)
    h = -sum(s / len(texts) * math.log(s / len(texts)) for s in sizes)
    return {"clusters": k, "cluster_entropy": h / math.log(k), "cluster_sizes": sizes}


def topic_histogram(seeds: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, dict[str, int]]:
    return {k: dict(Counter(str(s[k]) for s in seeds if k in s).most_common()) for k in keys}


def diversity_report(
    replies: list[str],
    kept_texts: list[str],
    requested_seeds: list[dict[str, Any]],
    kept_seeds: list[dict[str, Any]],
    dropped: Counter,
    dedup,
    clusters: int = 8,
    topic_keys: tuple[str, ...] = ("topic", "subtopic", "difficulty", "audience", "style"),
) -> dict[str, Any]:
    """The report (module docstring); `dedup` is the job's DedupConfig, so the rates match what the job drops."""
    return {
        "replies": duplicate_rates(replies, dedup.threshold, dedup.num_perm, dedup.shingle_size, dedup.seed)
        | distinct_n(replies)
        | {"cluster_entropy": cluster_entropy(replies, clusters)["cluster_entropy"]},
        "kept": len(kept_texts),
        **distinct_n(kept_texts),
        **cluster_entropy(kept_texts, clusters),
        "topics_requested": topic_histogram(requested_seeds, topic_keys),
        "topics_kept": topic_histogram(kept_seeds, topic_keys),
        "dropped": dict(dropped.most_common()),
    }


def report_rows(report: dict[str, Any]) -> list[tuple[str, Any]]:
    """The report's headline numbers as (label, value) rows for the job's summary table."""

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    r = report["replies"]
    rows: list[tuple[str, Any]] = [
        ("diversity: exact duplicate rate", fmt(r["exact_duplicate_rate"])),
        ("diversity: near duplicate rate", fmt(r["near_duplicate_rate"])),
        ("diversity: distinct-1/2/3, replies", "/".join(fmt(r[f"distinct_{n}"]) for n in (1, 2, 3))),
        ("diversity: distinct-1/2/3, kept", "/".join(fmt(report[f"distinct_{n}"]) for n in (1, 2, 3))),
        ("diversity: cluster entropy, replies", fmt(r["cluster_entropy"])),
        (f"diversity: cluster entropy, kept (k={report['clusters']})", fmt(report["cluster_entropy"])),
    ]
    topics = report["topics_kept"].get("topic", {})
    if topics:
        rows.append(("diversity: topics kept", f"{len(topics)} of {len(report['topics_requested'].get('topic', {}))}"))
    return rows


def flat_metrics(report: dict[str, Any], prefix: str) -> dict[str, float]:
    """Scalars of the report for wandb (`prefix/name`)."""
    out = {f"{prefix}/replies/{k}": v for k, v in report["replies"].items() if v is not None}
    for k in ("kept", "distinct_1", "distinct_2", "distinct_3", "clusters", "cluster_entropy"):
        if report.get(k) is not None:
            out[f"{prefix}/{k}"] = report[k]
    out |= {f"{prefix}/dropped/{k}": v for k, v in report["dropped"].items()}
    return out


def log_to_wandb(report: dict[str, Any], prefix: str, w, config: dict[str, Any]) -> None:
    """One wandb run per job invocation with the report's scalars and the topic histogram as a table."""
    if w.mode == "disabled":
        return
    import wandb

    run = wandb.init(project=w.project, entity=w.entity, group=w.group, tags=list(w.tags), mode=w.mode,
                     job_type=prefix, config=config, reinit=True)  # fmt: skip
    try:
        run.log(flat_metrics(report, prefix))
        rows = [[k, v, report["topics_kept"].get("topic", {}).get(k, 0)]
                for k, v in report["topics_requested"].get("topic", {}).items()]  # fmt: skip
        run.log({f"{prefix}/topics": wandb.Table(columns=["topic", "requested", "kept"], data=rows)})
    finally:
        run.finish()
