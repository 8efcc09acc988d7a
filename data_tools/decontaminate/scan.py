"""Decontaminate a training set against a benchmark and prune it at several thresholds: phi-1 §5 as a study.

    python -m data_tools.decontaminate --config-name demo [key=value ...]

phi-1 §5 first looked for 13-gram overlap between CodeExercises and HumanEval (4 hits, all false positives), then
flagged pairs by L2 distance between code-model embeddings together with an AST match rate tau, and retrained on
CodeExercises pruned at tau = 0.95 / 0.9 / 0.85 / 0.8 (42.5K to 354K of ~880K exercises removed). Here:

  pass 1 (stream the training set once; O(total tokens)):
    - n-gram overlap: every item's normalised-token n-grams are looked up in an inverted index of the benchmark's
      n-grams (the benchmark is the small side, so nothing is all-pairs);
    - each item is split into functions ("units"); each unit's skeleton shingles are looked up in the benchmark's
      skeleton index, and the best `candidates.max_per_problem` units per problem by containment are candidates.
  embeddings: every unit is embedded (the pluggable embedder of data_tools.codetextbook.embed); scikit-learn NearestNeighbors
    gives the `embedding.top_k` nearest units of each problem by L2: more candidates.
  exact scoring on candidates only (<= problems x (max_per_problem + top_k) pairs): AST match rate (APTED tree edit
    distance on identifier/literal-normalised trees) and the Cosmopedia difflib ratio.
  pass 2: the training set again, written once per tau without the items whose best AST match is >= tau.

Outputs in `output_dir`: nearest.jsonl (per problem, its nearest training items under each measure), flagged.jsonl
(per flagged item, its scores), pruned_tau<tau>.jsonl.zst, stats.json, report.md, report.html, removed_vs_tau.png.
Counts reconcile: per tau, in == kept + removed, and removed == the items scored >= tau in pass 1.
"""

from __future__ import annotations

import bisect
import heapq
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from tqdm import tqdm

from data_tools.decontaminate.config import CONF_DIR, SCHEMA, DecontaminateConfig, DecontaminateConfigError, to_yaml
from data_tools.decontaminate.inputs import BenchItem, load_benchmark, read_training
from data_tools.decontaminate.measures import (
    Node,
    ast_match,
    code_tokens,
    difflib_ratio,
    ngrams,
    normalized_tree,
    size_bound,
    skeleton,
    split_units,
    tree_size,
)
from data_tools.decontaminate.records import PairScore, ScanResult
from data_tools.sources import SourceError
from phi_train.cli import hydra_command
from phi_train.errors import ReconcileError

# --- pass 1: n-grams and candidates -------------------------------------------------------------------------------


def _index(sets: list[set[int]]) -> dict[int, list[int]]:
    index: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(sets):
        for g in s:
            index[g].append(i)
    return index


def scan(cfg: DecontaminateConfig, bench: list[BenchItem], dropped: Counter) -> ScanResult:
    res = ScanResult(skeleton_top=[[] for _ in bench])
    gram_index, skel_index = _index([b.grams for b in bench]), _index([b.skel for b in bench])
    n, sn = cfg.ngram.n, cfg.candidates.skeleton_n
    cap, floor = cfg.candidates.max_per_problem, cfg.candidates.min_containment
    bar = tqdm(read_training(cfg, dropped), desc="scan", unit="item", disable=not cfg.progress, mininterval=1)
    for item_idx, (item_id, text, _) in enumerate(bar):
        res.item_ids.append(item_id)
        toks, tokenized = code_tokens(text)
        res.counts["untokenizable"] += not tokenized
        shared: Counter = Counter()
        for g in ngrams([t.text for t in toks], n):
            for p in gram_index.get(g, ()):
                shared[p] += 1
        for p, c in shared.items():
            res.ngram_hits[p][item_idx] = c
        units, parsed = split_units(text)
        res.counts["unparsable"] += not parsed
        rows = [t.row for t in toks]
        for u in units:
            if tokenized and u.name != "<module>":
                utoks = toks[bisect.bisect_left(rows, u.first_row) : bisect.bisect_right(rows, u.last_row)]
            else:
                utoks = toks
            unit_idx = len(res.unit_text)
            res.unit_item.append(item_idx)
            res.unit_name.append(u.name)
            res.unit_text.append(u.text)
            hits: Counter = Counter()
            for g in ngrams(skeleton(utoks), sn):
                for p in skel_index.get(g, ()):
                    hits[p] += 1
            for p, c in hits.items():
                containment = c / len(bench[p].skel)
                if containment < floor:
                    continue
                heap = res.skeleton_top[p]
                if len(heap) < cap:
                    heapq.heappush(heap, (containment, unit_idx))
                elif containment > heap[0][0]:
                    heapq.heapreplace(heap, (containment, unit_idx))
    res.counts["items"] = len(res.item_ids)
    res.counts["units"] = len(res.unit_text)
    return res


# --- embeddings -----------------------------------------------------------------------------------------------------


def nearest_by_embedding(cfg: DecontaminateConfig, bench: list[BenchItem], units: list[str]) -> list[list[tuple]]:
    """Per problem, [(unit, l2, cosine)] of its `top_k` nearest units. Vectors are L2-normalised, so
    l2^2 = 2 - 2 cos and both orders agree."""
    from sklearn.neighbors import NearestNeighbors

    from data_tools.codetextbook.embed import embed_batched, make_embedder

    e = cfg.embedding
    try:
        embedder = make_embedder(e.embedder, batch_size=e.batch_size, checkpoint=e.checkpoint)
    except ValueError as exc:
        raise DecontaminateConfigError(str(exc).replace("classifier.embedder", "embedding.embedder")) from None

    def unit_norm(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    cut = [t[: e.max_chars] for t in units]
    x = unit_norm(embed_batched(embedder, cut, batch=max(e.batch_size, 256), progress=cfg.progress))
    q = unit_norm(embedder.embed([b.primary[: e.max_chars] for b in bench]))
    k = min(e.top_k, len(units))
    nn = NearestNeighbors(n_neighbors=k, metric="euclidean", algorithm="brute").fit(x)
    dist, idx = nn.kneighbors(q)
    return [[(int(i), float(d), float(1 - d * d / 2)) for d, i in zip(drow, irow)] for drow, irow in zip(dist, idx)]


# --- exact scoring on candidates ------------------------------------------------------------------------------------


def score_candidates(
    cfg: DecontaminateConfig, bench: list[BenchItem], res: ScanResult, emb: list[list[tuple]] | None
) -> tuple[list[PairScore], Counter]:
    pairs: dict[tuple[int, int], PairScore] = {}
    for p, heap in enumerate(res.skeleton_top):
        for containment, u in heap:
            pairs[p, u] = PairScore(p, u, {"skeleton": round(containment, 4)})
    for p, near in enumerate(emb or []):
        for u, l2, _ in near:
            pairs.setdefault((p, u), PairScore(p, u, {})).sources["embedding_l2"] = round(l2, 4)
    counts: Counter = Counter(
        candidates_skeleton=sum(len(h) for h in res.skeleton_top),
        candidates_embedding=sum(len(x) for x in emb or []),
        candidate_pairs=len(pairs),
    )
    floor = cfg.ast.min_score if cfg.ast.min_score is not None else min(cfg.prune.taus)
    trees: dict[int, tuple[Node | None, int]] = {}
    for ps in tqdm(pairs.values(), desc="score", unit="pair", disable=not cfg.progress, mininterval=1):
        b = bench[ps.problem]
        if ps.unit not in trees:
            t = normalized_tree(res.unit_text[ps.unit])
            trees[ps.unit] = (t, tree_size(t) if t else 0)
        tree, size = trees[ps.unit]
        if cfg.difflib.enabled:
            ps.difflib = difflib_ratio(b.primary_words, [t.text for t in code_tokens(res.unit_text[ps.unit])[0]])
        if tree is None or b.tree is None:
            counts["ast_unparsable_pairs"] += 1
            continue
        ps.ast_bound = size_bound(b.size, size)
        if cfg.ast.method == "ted" and ps.ast_bound < floor:
            counts["ast_skipped_size_bound"] += 1  # provably below every tau: no need for the exact distance
            continue
        ps.ast = ast_match(b.tree, tree, cfg.ast.method, b.size, size)
        counts["ast_scored"] += 1
    return list(pairs.values()), counts


# --- pass 2: pruned copies ------------------------------------------------------------------------------------------


def tau_name(tau: float) -> str:
    return f"pruned_tau{tau:g}.jsonl.zst"


def write_pruned(cfg: DecontaminateConfig, item_ast: dict[int, float], n_items: int) -> dict[str, dict[str, int]]:
    """One JSONL.zst per tau without the items whose best AST match rate is >= tau; counts reconciled."""
    import zstandard

    out = Path(cfg.output_dir)
    taus = sorted(set(cfg.prune.taus), reverse=True)
    files = {t: (out / tau_name(t)).open("wb") for t in taus}
    writers = {t: zstandard.ZstdCompressor(level=3).stream_writer(f) for t, f in files.items()}
    kept, removed = Counter(), Counter()
    seen = 0
    try:
        items = read_training(cfg, Counter())
        for idx, (_, _, rec) in enumerate(
            tqdm(items, desc="prune", unit="item", disable=not cfg.progress, total=n_items)
        ):
            seen += 1
            line = orjson.dumps(rec) + b"\n"
            score = item_ast.get(idx, 0.0)
            for t in taus:
                if score >= t:
                    removed[t] += 1
                else:
                    kept[t] += 1
                    writers[t].write(line)
    finally:
        for w in writers.values():
            w.close()
    stats = {}
    for t in taus:
        expected = sum(1 for s in item_ast.values() if s >= t)
        if seen != n_items or seen != kept[t] + removed[t] or removed[t] != expected:
            raise ReconcileError(
                f"tau={t:g}: in={seen} (pass 1: {n_items}) kept={kept[t]} removed={removed[t]} (pass 1: {expected})"
            )
        stats[f"{t:g}"] = {"in": seen, "kept": kept[t], "removed": removed[t], "file": tau_name(t)}
    return stats


# --- the run --------------------------------------------------------------------------------------------------------


def run(cfg: DecontaminateConfig) -> dict[str, Any]:
    from data_tools.decontaminate.report import nearest_records, write_reports

    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    bench = load_benchmark(cfg)
    dropped: Counter = Counter()
    res = scan(cfg, bench, dropped)
    if not res.item_ids:
        raise SourceError(f"train.paths {cfg.train.paths}: no readable items (dropped: {dict(dropped) or 'none'})")
    t_scan = time.perf_counter()
    emb = nearest_by_embedding(cfg, bench, res.unit_text) if cfg.embedding.enabled else None
    t_embed = time.perf_counter()
    pairs, counts = score_candidates(cfg, bench, res, emb)
    t_score = time.perf_counter()

    item_ast: dict[int, float] = {}
    for ps in pairs:
        if ps.ast is not None:
            item = res.unit_item[ps.unit]
            item_ast[item] = max(item_ast.get(item, 0.0), ps.ast)
    prune_stats = write_pruned(cfg, item_ast, len(res.item_ids))
    t_end = time.perf_counter()

    nearest = nearest_records(cfg, bench, res, emb, pairs)
    with (out / "nearest.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in nearest)
    flagged = flagged_items(cfg, bench, res, pairs)
    with (out / "flagged.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in flagged)

    items_hit = {i for hits in res.ngram_hits.values() for i in hits}
    stats = {
        "train": {
            "paths": list(cfg.train.paths),
            "items": len(res.item_ids),
            "read_dropped": dict(dropped),
            "units": len(res.unit_text),
            "items_unparsable": res.counts["unparsable"],
            "items_untokenizable": res.counts["untokenizable"],
        },
        "benchmark": {
            "name": cfg.benchmark.name,
            "problems": len(bench),
            "primary_unparsable": sum(b.tree is None for b in bench),
        },
        "ngram": {
            "n": cfg.ngram.n,
            "pairs": sum(len(h) for h in res.ngram_hits.values()),
            "items_hit": len(items_hit),
            "problems_hit": sum(1 for h in res.ngram_hits.values() if h),
        },
        "candidates": {k: counts[k] for k in ("candidates_skeleton", "candidates_embedding", "candidate_pairs")},
        "ast": {
            "method": cfg.ast.method,
            "scored": counts["ast_scored"],
            "skipped_size_bound": counts["ast_skipped_size_bound"],
            "unparsable_pairs": counts["ast_unparsable_pairs"],
        },
        "difflib": {
            "enabled": cfg.difflib.enabled,
            "threshold": cfg.difflib.threshold,
            "flagged_pairs": sum(1 for p in pairs if p.difflib is not None and p.difflib > cfg.difflib.threshold),
        },
        "embedding": {
            "enabled": cfg.embedding.enabled,
            "embedder": cfg.embedding.embedder,
            "top_k": cfg.embedding.top_k,
        },
        "prune": prune_stats,
        "timing_s": {
            "scan": round(t_scan - t0, 2),
            "embed": round(t_embed - t_scan, 2),
            "score": round(t_score - t_embed, 2),
            "prune": round(t_end - t_score, 2),
            "total": round(t_end - t0, 2),
        },
        "items_per_s": round(len(res.item_ids) / max(t_end - t0, 1e-9), 1),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    write_reports(cfg, stats, bench, res, pairs)
    return stats


def flagged_items(
    cfg: DecontaminateConfig, bench: list[BenchItem], res: ScanResult, pairs: list[PairScore]
) -> list[dict[str, Any]]:
    """Every item with an n-gram hit, an AST match >= the smallest tau or a difflib ratio above its threshold."""
    low = min(cfg.prune.taus)
    rows: dict[int, dict[str, Any]] = {}

    def row(item: int) -> dict[str, Any]:
        return rows.setdefault(item, {"item_id": res.item_ids[item], "ast": 0.0, "ngram_hits": {}, "difflib": 0.0})

    for p, hits in res.ngram_hits.items():
        for item, c in hits.items():
            row(item)["ngram_hits"][bench[p].task_id] = c
    for ps in pairs:
        item = res.unit_item[ps.unit]
        a, d = ps.ast or 0.0, ps.difflib or 0.0
        if a >= low or d > cfg.difflib.threshold or item in rows:
            r = row(item)
            if a > r["ast"]:
                r.update(ast=round(a, 4), ast_task=bench[ps.problem].task_id, ast_unit=res.unit_name[ps.unit])
            r["difflib"] = max(r["difflib"], round(d, 4))
    for r in rows.values():
        r["removed_at_tau"] = sorted((t for t in cfg.prune.taus if r["ast"] >= t), reverse=True)
    return sorted(rows.values(), key=lambda r: (-r["ast"], r["item_id"]))


@hydra_command(DecontaminateConfig, "demo", CONF_DIR, schema_name=SCHEMA)
def main(cfg: DecontaminateConfig) -> None:
    stats = run(cfg)
    line = ", ".join(f"tau {t}: -{s['removed']}" for t, s in stats["prune"].items())
    print(
        f"{stats['train']['items']} items, {stats['items_per_s']} items/s; {line}; report: {cfg.output_dir}/report.md"
    )


if __name__ == "__main__":
    sys.exit(main())
