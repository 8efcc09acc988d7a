"""Decontaminate a training set against a benchmark and prune it at several thresholds: phi-1 §5 as a study.

    python -m data_tools.decontaminate --config-name demo [key=value ...] [planted=<labels.jsonl>]

phi-1 §5 first looked for 13-gram overlap between CodeExercises and HumanEval (4 hits, all false positives), then
flagged pairs by L2 distance between code-model embeddings together with an AST match rate tau, and retrained on
CodeExercises pruned at tau = 0.95 / 0.9 / 0.85 / 0.8 (42.5K to 354K of ~880K exercises removed). Here:

  pass 1 (stream the training set once; O(total tokens)):
    - n-gram overlap: every item's normalised-token n-grams are looked up in an inverted index of the benchmark's
      n-grams (the benchmark is the small side, so nothing is all-pairs);
    - each item is split into units at every depth (measures.split_units); each unit's canonical tree gives shingles
      whose MinHash is queried in a MinHashLSH of the benchmark's: the best `candidates.max_per_problem` units per
      problem by exact Jaccard are candidates, and so is every function named like a problem's entry point.
  embeddings: every unit is embedded (data_tools.codetextbook.embed); scikit-learn NearestNeighbors gives the
    `embedding.top_k` nearest units of each problem by L2: more candidates.
  exact scoring on candidates only: AST match rate (APTED on canonical trees), the Cosmopedia difflib ratio, and the
    behavioural measure (data_tools.decontaminate.behaviour: the candidate run against the problem's tests).
  pass 2: the training set again, written once per tau without the items whose best AST match is >= tau or that
    passed a problem's tests; pruning and reconciliation go by record id (in == kept + removed, id by id).

Outputs in `output_dir`: nearest.jsonl, flagged.jsonl, pruned_tau<tau>.jsonl.zst, stats.json, report.md,
report.html (borderline pairs side by side), removed_vs_tau.png, and with `planted=` the recall per copy kind.
"""

from __future__ import annotations

import hashlib
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

from data_tools.decontaminate import behaviour
from data_tools.decontaminate.config import CONF_DIR, SCHEMA, DecontaminateConfig, DecontaminateConfigError, to_yaml
from data_tools.decontaminate.inputs import BenchItem, load_benchmark, read_training
from data_tools.decontaminate.measures import (
    Node,
    ast_match,
    canonical_tree,
    code_tokens,
    difflib_ratio,
    ngrams,
    parse,
    size_bound,
    tree_features,
    tree_size,
    units_of_tree,
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


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()


class _Lsh:
    """MinHashLSH (datasketch) over the benchmark's canonical-tree shingles; units query it."""

    def __init__(self, cfg: DecontaminateConfig, bench: list[BenchItem]) -> None:
        from datasketch import MinHash, MinHashLSH

        c = cfg.candidates
        self._mh, self.num_perm = MinHash, c.num_perm
        template = MinHash(num_perm=c.num_perm, seed=1)
        self.perm, self.scheme = template.permutations, template.scheme
        self.lsh = MinHashLSH(threshold=c.lsh_threshold, num_perm=c.num_perm)
        for p, b in enumerate(bench):
            if b.features:
                self.lsh.insert(p, self.minhash(b.features))

    def minhash(self, features: set[str]):
        m = self._mh(num_perm=self.num_perm, permutations=self.perm, scheme=self.scheme)
        m.update_batch([f.encode() for f in features])
        return m

    def query(self, features: set[str]) -> list[int]:
        return self.lsh.query(self.minhash(features)) if features else []


TIE_CAP = 10
"""Units whose shingles equal a problem's, kept beyond `candidates.max_per_problem`: up to this many times it."""


def scan(cfg: DecontaminateConfig, bench: list[BenchItem], dropped: Counter) -> ScanResult:
    res = ScanResult(lsh_top=[[] for _ in bench], lsh_ties=[[] for _ in bench], name_hits=[[] for _ in bench])
    gram_index = _index([b.grams for b in bench])
    lsh = _Lsh(cfg, bench)
    by_entry: dict[str, list[int]] = defaultdict(list)
    for p, b in enumerate(bench):
        if b.problem.entry_point:
            by_entry[b.problem.entry_point.lower()].append(p)
    n, cap = cfg.ngram.n, cfg.candidates.max_per_problem
    bar = tqdm(read_training(cfg, dropped), desc="scan", unit="item", disable=not cfg.progress, mininterval=1)
    for item_idx, (item_id, text, _) in enumerate(bar):
        res.item_ids.append(item_id)
        res.item_hash[item_id] = digest(text)
        toks, tokenized = code_tokens(text)
        res.counts["untokenizable"] += not tokenized
        shared: Counter = Counter()
        for g in ngrams([t.text for t in toks], n):
            for p in gram_index.get(g, ()):
                shared[p] += 1
        for p, c in shared.items():
            res.ngram_hits[p][item_idx] = c
        tree = parse(text)
        res.counts["unparsable"] += tree is None
        if tree is None:
            res.item_imports.append([])
            _add_unit(res, item_idx, "<module>", "module", "", None, text)
            continue
        res.item_imports.append(behaviour.imports_of(tree))
        for u, node in units_of_tree(tree, text, cfg.units.window, cfg.units.stride):
            unit_idx = _add_unit(res, item_idx, u.name, u.kind, u.parent, u.arity, u.text)
            if cfg.candidates.by_name and u.arity is not None:
                for p in by_entry.get(u.name.lower(), ()):
                    res.name_hits[p].append(unit_idx)
            ctree = canonical_tree(node if node is not None else u.text)
            if ctree is None:
                continue
            feats = tree_features(ctree)
            for p in lsh.query(feats):
                jac = len(feats & bench[p].features) / len(feats | bench[p].features)
                heap = res.lsh_top[p]
                if len(heap) < cap:
                    heapq.heappush(heap, (jac, unit_idx))
                elif jac > heap[0][0]:
                    heapq.heapreplace(heap, (jac, unit_idx))
                elif jac == 1.0 and len(res.lsh_ties[p]) < TIE_CAP * cap:
                    # a full heap of identical shingle sets (tiny problems: `return n ** 2`) must not push out a
                    # renamed copy that is just as identical
                    res.lsh_ties[p].append(unit_idx)
    res.counts["items"] = len(res.item_ids)
    res.counts["units"] = len(res.unit_text)
    return res


def _add_unit(res: ScanResult, item: int, name: str, kind: str, parent: str, arity, text: str) -> int:
    res.unit_item.append(item)
    res.unit_name.append(name)
    res.unit_kind.append(kind)
    res.unit_parent.append(parent)
    res.unit_arity.append(arity)
    res.unit_text.append(text)
    return len(res.unit_text) - 1


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


def candidate_pairs(res: ScanResult, emb: list[list[tuple]] | None) -> dict[tuple[int, int], PairScore]:
    pairs: dict[tuple[int, int], PairScore] = {}
    for p, heap in enumerate(res.lsh_top):
        for jac, u in heap:
            pairs[p, u] = PairScore(p, u, {"minhash": round(jac, 4)})
    for p, units in enumerate(res.lsh_ties):
        for u in units:
            pairs.setdefault((p, u), PairScore(p, u, {})).sources["minhash"] = 1.0
    for p, units in enumerate(res.name_hits):
        for u in units:
            pairs.setdefault((p, u), PairScore(p, u, {})).sources["name"] = 1.0
    for p, near in enumerate(emb or []):
        for u, l2, _ in near:
            pairs.setdefault((p, u), PairScore(p, u, {})).sources["embedding_l2"] = round(l2, 4)
    return pairs


def score_candidates(
    cfg: DecontaminateConfig, bench: list[BenchItem], res: ScanResult, emb: list[list[tuple]] | None
) -> tuple[list[PairScore], Counter]:
    pairs = candidate_pairs(res, emb)
    counts: Counter = Counter(
        candidates_minhash=sum(len(h) for h in res.lsh_top) + sum(len(t) for t in res.lsh_ties),
        candidates_name=sum(len(x) for x in res.name_hits),
        candidates_embedding=sum(len(x) for x in emb or []),
        candidate_pairs=len(pairs),
    )
    floor = cfg.ast.min_score if cfg.ast.min_score is not None else min(cfg.prune.taus)
    trees: dict[int, tuple[Node | None, int]] = {}
    for ps in tqdm(pairs.values(), desc="score", unit="pair", disable=not cfg.progress, mininterval=1):
        b = bench[ps.problem]
        if ps.unit not in trees:
            t = canonical_tree(res.unit_text[ps.unit])
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
        try:
            ps.ast = ast_match(b.tree, tree, cfg.ast.method, b.size, size, cfg.ast.small_nodes)
        except RecursionError:
            counts["ast_too_deep"] += 1
            continue
        counts["ast_scored"] += 1
    if cfg.behaviour.enabled:
        counts.update(run_behaviour(cfg, bench, res, list(pairs.values())))
    return list(pairs.values()), counts


def run_behaviour(cfg: DecontaminateConfig, bench: list[BenchItem], res: ScanResult, pairs: list[PairScore]) -> Counter:
    """Sandbox every arity-compatible function candidate against its problem's tests (HumanEval-format tests only)."""
    per_problem: dict[int, list[PairScore]] = defaultdict(list)
    for ps in pairs:
        b = bench[ps.problem]
        if b.problem.kind == "mbpp" or not b.problem.test:
            continue
        if res.unit_kind[ps.unit] == "function" and behaviour.arity_ok(res.unit_arity[ps.unit], b.arity):
            per_problem[ps.problem].append(ps)

    def rank(ps: PairScore) -> tuple:
        s = ps.sources
        return (-s.get("name", 0.0), -(ps.ast or 0.0), -s.get("minhash", 0.0), s.get("embedding_l2", 9.0))

    todo = [ps for mine in per_problem.values() for ps in sorted(mine, key=rank)[: cfg.behaviour.max_per_problem]]
    programs = [behaviour.program(bench[ps.problem].problem, res, ps.unit) for ps in todo]
    bc = cfg.behaviour
    verdicts = behaviour.run_pairs(programs, bc.timeout_s, bc.memory_mb, None if bc.workers == -1 else bc.workers)
    for ps, v in zip(todo, verdicts):
        ps.behaviour = v
    return Counter(behaviour_run=len(todo), behaviour_passed=sum(v == "passed" for v in verdicts))


# --- pass 2: pruned copies, by id -----------------------------------------------------------------------------------


def tau_name(tau: float) -> str:
    return f"pruned_tau{tau:g}.jsonl.zst"


def removed_ids(cfg: DecontaminateConfig, item_score: dict[str, tuple[float, bool]]) -> dict[float, set[str]]:
    """Per tau, the ids whose best AST match is >= tau or that passed a problem's tests."""
    return {t: {i for i, (a, passed) in item_score.items() if a >= t or passed} for t in set(cfg.prune.taus)}


def write_pruned(
    cfg: DecontaminateConfig, removed: dict[float, set[str]], pass1: dict[str, bytes]
) -> dict[str, dict[str, Any]]:
    """One JSONL.zst per tau without the removed ids. Reconciled by id: pass 2 must read exactly pass 1's ids with
    the same texts (in any order), and per tau the kept and removed ids partition them, the removed ones being
    exactly those pass 1 scored."""
    import zstandard

    out = Path(cfg.output_dir)
    taus = sorted(removed, reverse=True)
    files = {t: (out / tau_name(t)).open("wb") for t in taus}
    writers = {t: zstandard.ZstdCompressor(level=3).stream_writer(f) for t, f in files.items()}
    kept: dict[float, set[str]] = {t: set() for t in taus}
    gone: dict[float, set[str]] = {t: set() for t in taus}
    seen: set[str] = set()
    try:
        items = read_training(cfg, Counter())
        for item_id, text, rec in tqdm(items, desc="prune", unit="item", disable=not cfg.progress, total=len(pass1)):
            if pass1.get(item_id) != digest(text):
                what = "is new" if item_id not in pass1 else "changed its text"
                raise ReconcileError(f"train.paths: record id {item_id!r} {what} between pass 1 and pass 2")
            seen.add(item_id)
            line = orjson.dumps(rec) + b"\n"
            for t in taus:
                if item_id in removed[t]:
                    gone[t].add(item_id)
                else:
                    kept[t].add(item_id)
                    writers[t].write(line)
    finally:
        for w in writers.values():
            w.close()
    missing = pass1.keys() - seen
    if missing:
        raise ReconcileError(
            f"train.paths: {len(missing)} record ids of pass 1 missing in pass 2, e.g. {min(missing)!r}"
        )
    stats = {}
    for t in taus:
        if kept[t] & gone[t] or kept[t] | gone[t] != seen or gone[t] != removed[t]:
            raise ReconcileError(
                f"tau={t:g}: in={len(seen)} kept={len(kept[t])} removed={len(gone[t])} (pass 1: {len(removed[t])})"
            )
        stats[f"{t:g}"] = {"in": len(seen), "kept": len(kept[t]), "removed": len(gone[t]), "file": tau_name(t)}
    return stats


# --- the run --------------------------------------------------------------------------------------------------------


def run(cfg: DecontaminateConfig) -> dict[str, Any]:
    from data_tools.decontaminate.report import nearest_records, write_reports

    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    bench = load_benchmark(cfg)
    if cfg.planted:  # a typo in the labels path fails now, not after the scan
        from data_tools.decontaminate.planted import read_labels

        read_labels(cfg.planted)
    dropped: Counter = Counter()
    res = scan(cfg, bench, dropped)
    if not res.item_ids:
        raise SourceError(f"train.paths {cfg.train.paths}: no readable items (dropped: {dict(dropped) or 'none'})")
    t_scan = time.perf_counter()
    emb = nearest_by_embedding(cfg, bench, res.unit_text) if cfg.embedding.enabled else None
    t_embed = time.perf_counter()
    pairs, counts = score_candidates(cfg, bench, res, emb)
    t_score = time.perf_counter()

    item_score: dict[str, tuple[float, bool]] = {}
    for ps in pairs:
        item_id = res.item_ids[res.unit_item[ps.unit]]
        a, passed = item_score.get(item_id, (0.0, False))
        item_score[item_id] = (max(a, ps.ast or 0.0), passed or ps.passed)
    removed = removed_ids(cfg, item_score)
    prune_stats = write_pruned(cfg, removed, res.item_hash)
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
            "read_dropped": {k: v for k, v in dropped.items() if k != "duplicate_id"},
            "duplicate_ids_renamed": dropped["duplicate_id"],
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
        "candidates": {
            k: counts[k] for k in ("candidates_minhash", "candidates_name", "candidates_embedding", "candidate_pairs")
        },
        "ast": {
            "method": cfg.ast.method,
            "scored": counts["ast_scored"],
            "skipped_size_bound": counts["ast_skipped_size_bound"],
            "unparsable_pairs": counts["ast_unparsable_pairs"],
            "too_deep": counts["ast_too_deep"],
        },
        "behaviour": {
            "enabled": cfg.behaviour.enabled,
            "run": counts["behaviour_run"],
            "passed": counts["behaviour_passed"],
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
        "units_per_s_candidates": round(len(res.unit_text) / max(t_scan - t0, 1e-9), 1),
    }
    stats["by_measure"] = removed_by_measure(cfg, item_score)
    if cfg.planted:
        from data_tools.decontaminate.planted import planted_recall

        stats["planted"] = planted_recall(cfg, bench, res, pairs)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    write_reports(cfg, stats, bench, res, pairs)
    return stats


def removed_by_measure(cfg: DecontaminateConfig, item_score: dict[str, tuple[float, bool]]) -> dict[str, Any]:
    """Per tau, items removed by the AST match alone, by the behavioural measure alone, and by either."""
    out = {}
    for t in sorted(set(cfg.prune.taus), reverse=True):
        syn = {i for i, (a, _) in item_score.items() if a >= t}
        beh = {i for i, (_, p) in item_score.items() if p}
        out[f"{t:g}"] = {
            "ast": len(syn),
            "behaviour": len(beh),
            "either": len(syn | beh),
            "behaviour_only": len(beh - syn),
        }
    return out


def flagged_items(
    cfg: DecontaminateConfig, bench: list[BenchItem], res: ScanResult, pairs: list[PairScore]
) -> list[dict[str, Any]]:
    """Every item with an n-gram hit, an AST match >= the smallest tau, a passed test or a difflib ratio above its
    threshold."""
    low = min(cfg.prune.taus)
    rows: dict[int, dict[str, Any]] = {}

    def row(item: int) -> dict[str, Any]:
        return rows.setdefault(
            item, {"item_id": res.item_ids[item], "ast": 0.0, "ngram_hits": {}, "difflib": 0.0, "passes": []}
        )

    for p, hits in res.ngram_hits.items():
        for item, c in hits.items():
            row(item)["ngram_hits"][bench[p].task_id] = c
    for ps in pairs:
        item = res.unit_item[ps.unit]
        a, d = ps.ast or 0.0, ps.difflib or 0.0
        if a >= low or d > cfg.difflib.threshold or ps.passed or item in rows:
            r = row(item)
            if a > r["ast"]:
                r.update(ast=round(a, 4), ast_task=bench[ps.problem].task_id, ast_unit=res.unit_name[ps.unit])
            r["difflib"] = max(r["difflib"], round(d, 4))
            if ps.passed:
                r["passes"].append({"task": bench[ps.problem].task_id, "unit": res.unit_name[ps.unit]})
    for r in rows.values():
        r["removed_at_tau"] = sorted((t for t in cfg.prune.taus if r["ast"] >= t or r["passes"]), reverse=True)
    return sorted(rows.values(), key=lambda r: (-r["ast"], r["item_id"]))


@hydra_command(DecontaminateConfig, "demo", CONF_DIR, schema_name=SCHEMA)
def main(cfg: DecontaminateConfig) -> None:
    stats = run(cfg)
    line = ", ".join(f"tau {t}: -{s['removed']}" for t, s in stats["prune"].items())
    if "planted" in stats:
        line += f"; planted recall at tau {min(cfg.prune.taus):g}: {stats['planted']['summary']}"
    print(
        f"{stats['train']['items']} items, {stats['items_per_s']} items/s; {line}; report: {cfg.output_dir}/report.md"
    )


if __name__ == "__main__":
    sys.exit(main())
