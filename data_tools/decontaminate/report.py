"""The decontamination study's human-readable outputs: nearest.jsonl records, report.md, a self-contained
report.html (code escaped, the plot embedded as a base64 PNG) and removed_vs_tau.png (phi-1 §5, Table 3's
"problems removed" column as a curve)."""

from __future__ import annotations

import base64
import bisect
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from data_tools.decontaminate.config import DecontaminateConfig
    from data_tools.decontaminate.inputs import BenchItem
    from data_tools.decontaminate.records import PairScore, ScanResult

PLOT = "removed_vs_tau.png"


def planted_table(planted: dict[str, Any]) -> str:
    """Markdown: per copy kind, found at each tau by AST / behaviour / either, and the candidate step's recall."""
    taus = list(planted["taus"])
    head = "| copy kind | n | candidate recall | " + " | ".join(f"AST / behaviour / either at {t}" for t in taus)
    rows = [head + " |", "|---|---|---|" + "---|" * len(taus)]
    for kind, r in planted["kinds"].items():
        cells = [f"{r['ast'][t]} / {r['behaviour']} / {r['either'][t]}" for t in taus]
        rows.append(f"| {kind} | {r['n']} | {r['candidates']} | " + " | ".join(cells) + " |")
    fp = planted["false_positives"]
    rows.append(
        f"| false positives (real functions) | {fp['functions']} | | "
        + " | ".join(f"{fp['ast'][t]} / {fp['behaviour']} / {fp['either'][t]}" for t in taus)
        + " |"
    )
    return "\n".join(rows)


def nearest_records(
    cfg: DecontaminateConfig,
    bench: list[BenchItem],
    res: ScanResult,
    emb: list[list[tuple]] | None,
    pairs: list[PairScore],
) -> list[dict[str, Any]]:
    """Per problem, its nearest training items under each measure (best first, `report.top_k` each)."""
    k = cfg.report.top_k
    by_problem: dict[int, list[PairScore]] = {}
    for ps in pairs:
        by_problem.setdefault(ps.problem, []).append(ps)

    def unit_ref(u: int) -> dict[str, Any]:
        return {"item_id": res.item_ids[res.unit_item[u]], "unit": res.unit_name[u]}

    out = []
    for p, b in enumerate(bench):
        hits = sorted(res.ngram_hits.get(p, {}).items(), key=lambda kv: -kv[1])[:k]
        mine = by_problem.get(p, [])
        scored = sorted((ps for ps in mine if ps.ast is not None), key=lambda ps: -ps.ast)[:k]
        diff = sorted((ps for ps in mine if ps.difflib is not None), key=lambda ps: -ps.difflib)[:k]
        lsh = sorted(res.lsh_top[p], reverse=True)[:k]
        rec: dict[str, Any] = {
            "task_id": b.task_id,
            "ngram": [
                {"item_id": res.item_ids[i], "shared": c, "fraction": round(c / max(len(b.grams), 1), 4)}
                for i, c in hits
            ],
            "minhash": [unit_ref(u) | {"jaccard": round(c, 4)} for c, u in lsh],
            "ast": [unit_ref(ps.unit) | {"match": round(ps.ast, 4)} for ps in scored],
            "behaviour": [unit_ref(ps.unit) | {"verdict": ps.behaviour} for ps in mine if ps.behaviour is not None],
            "difflib": [unit_ref(ps.unit) | {"ratio": round(ps.difflib, 4)} for ps in diff],
        }
        if emb is not None:
            rec["embedding"] = [unit_ref(u) | {"l2": round(d, 4), "cosine": round(c, 4)} for u, d, c in emb[p][:k]]
        out.append(rec)
    return out


def plot_removed(stats: dict[str, Any], path: Path) -> bytes:
    """Items removed vs tau as a PNG (matplotlib, headless Agg backend); returns the PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taus = sorted(float(t) for t in stats["prune"])
    removed = [stats["prune"][f"{t:g}"]["removed"] for t in taus]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(taus, removed, marker="o")
    for t, r in zip(taus, removed):
        ax.annotate(str(r), (t, r), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel("AST match rate threshold tau")
    ax.set_ylabel("training items removed")
    ax.set_title(f"pruned from {stats['train']['items']} items ({stats['benchmark']['name']})")
    ax.invert_xaxis()  # stricter (higher) tau on the left, as phi-1 Table 3 lists them
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    data = buf.getvalue()
    path.write_bytes(data)
    return data


def _top_pairs(cfg: DecontaminateConfig, pairs: list[PairScore]) -> list[PairScore]:
    scored = [p for p in pairs if p.ast is not None]
    return sorted(scored, key=lambda p: (-p.ast, -(p.difflib or 0.0)))[: cfg.report.html_pairs]


def borderline_pairs(cfg: DecontaminateConfig, pairs: list[PairScore]) -> list[tuple[float, str, PairScore]]:
    """Per tau, the `report.borderline` scored pairs just above (removed) and just below (kept) it: where a threshold
    decides, so where a reader should look."""
    scored = sorted((p for p in pairs if p.ast is not None), key=lambda p: p.ast)
    keys = [p.ast for p in scored]
    n, out = cfg.report.borderline, []
    for t in sorted(set(cfg.prune.taus), reverse=True):
        i = bisect.bisect_left(keys, t)
        out += [(t, "above", p) for p in scored[i : i + n]]
        out += [(t, "below", p) for p in reversed(scored[max(0, i - n) : i])]
    return out


def _counts_rows(stats: dict[str, Any]) -> list[tuple[str, str]]:
    t, n, a = stats["train"], stats["ngram"], stats["ast"]
    return [
        ("training items", f"{t['items']:,} ({t['units']:,} units; {t['items_unparsable']} do not parse)"),
        ("benchmark problems", f"{stats['benchmark']['problems']} ({stats['benchmark']['name']})"),
        (f"{n['n']}-gram overlap", f"{n['pairs']} pairs, {n['items_hit']} items, {n['problems_hit']} problems"),
        ("candidate pairs", f"{stats['candidates']['candidate_pairs']:,}"),
        (
            "AST scored / skipped (size bound) / unparsable",
            f"{a['scored']} / {a['skipped_size_bound']} / {a['unparsable_pairs']}",
        ),
        (
            "behaviour: candidates run in the sandbox / passed",
            f"{stats['behaviour']['run']} / {stats['behaviour']['passed']}",
        ),
        (f"difflib ratio > {stats['difflib']['threshold']}", str(stats["difflib"]["flagged_pairs"])),
        ("throughput", f"{stats['items_per_s']} items/s ({stats['timing_s']['total']} s)"),
    ]


def write_reports(
    cfg: DecontaminateConfig, stats: dict[str, Any], bench: list[BenchItem], res: ScanResult, pairs: list[PairScore]
) -> None:
    out = Path(cfg.output_dir)
    png = plot_removed(stats, out / PLOT)
    top = _top_pairs(cfg, pairs)
    prune_rows = [(t, s["in"], s["kept"], s["removed"]) for t, s in stats["prune"].items()]

    md = ["# Decontamination report (phi-1 §5)", "", "| measure | count |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in _counts_rows(stats)]
    md += [
        "",
        "## Pruning (AST match >= tau or a passed test)",
        "",
        "| tau | in | kept | removed |",
        "|---|---|---|---|",
    ]
    md += [f"| {t} | {i} | {k} | {r} |" for t, i, k, r in prune_rows]
    md += [
        "",
        "## Removed by measure",
        "",
        "| tau | AST match | behaviour (passes the tests) | either | behaviour only |",
    ]
    md += ["|---|---|---|---|---|"]
    md += [
        f"| {t} | {m['ast']} | {m['behaviour']} | {m['either']} | {m['behaviour_only']} |"
        for t, m in stats["by_measure"].items()
    ]
    if "planted" in stats:
        md += ["", "## Planted copies: recall per kind", "", planted_table(stats["planted"])]
    md += ["", f"![items removed vs tau]({PLOT})", "", "## Top pairs", ""]
    md += ["| problem | training item | unit | AST | difflib |", "|---|---|---|---|---|"]
    for p in top:
        item = res.item_ids[res.unit_item[p.unit]]
        md.append(
            f"| {bench[p.problem].task_id} | `{item}` | {res.unit_name[p.unit]} | {p.ast:.3f} | {p.difflib or 0:.3f} |"
        )
    border = borderline_pairs(cfg, pairs)
    md += ["", "## Borderline pairs (just above / just below each tau)", ""]
    md += ["| tau | side | problem | training item | unit | AST | behaviour |", "|---|---|---|---|---|---|---|"]
    for t, side, p in border:
        item = res.item_ids[res.unit_item[p.unit]]
        md.append(
            f"| {t:g} | {side} | {bench[p.problem].task_id} | `{item}` | {res.unit_name[p.unit]} | {p.ast:.3f} "
            f"| {p.behaviour or '-'} |"
        )
    (out / "report.md").write_text("\n".join(md) + "\n")

    e = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Decontamination report</title><style>",
        "body{font-family:sans-serif;margin:2em} table{border-collapse:collapse} td,th{border:1px solid #ccc;"
        "padding:3px 8px} .pair{display:flex;gap:1em} .pair pre{flex:1;background:#f6f8fa;padding:8px;"
        "overflow:auto;font-size:12px}",
        "</style></head><body><h1>Decontamination report (phi-1 §5)</h1><table>",
    ]
    parts += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _counts_rows(stats)]
    parts.append(
        "</table><h2>Pruning (AST match >= tau or a passed test)</h2><table><tr><th>tau</th><th>in</th><th>kept</th>"
    )
    parts.append("<th>removed</th></tr>")
    parts += [f"<tr><td>{e(str(t))}</td><td>{i}</td><td>{k}</td><td>{r}</td></tr>" for t, i, k, r in prune_rows]
    b64 = base64.b64encode(png).decode()
    parts.append(f"</table><p><img alt='items removed vs tau' src='data:image/png;base64,{b64}'></p>")
    parts.append(f"<h2>Top {len(top)} pairs by AST match rate</h2>")
    for p in top:
        item = res.item_ids[res.unit_item[p.unit]]
        b = bench[p.problem]
        parts.append(
            f"<h3>{e(b.task_id)} &harr; {e(item)} ({e(res.unit_name[p.unit])}): AST {p.ast:.3f}, "
            f"difflib {p.difflib or 0:.3f}, via {e(', '.join(p.sources))}</h3>"
            f"<div class='pair'><pre>{e(b.primary)}</pre><pre>{e(res.unit_text[p.unit])}</pre></div>"
        )
    parts.append(f"<h2>Borderline pairs: the {cfg.report.borderline} just above and just below each tau</h2>")
    for t, side, p in border:
        item = res.item_ids[res.unit_item[p.unit]]
        b = bench[p.problem]
        parts.append(
            f"<h3 class='border'>tau {t:g}, {side}: {e(b.task_id)} &harr; {e(item)} ({e(res.unit_name[p.unit])}): "
            f"AST {p.ast:.3f}, behaviour {e(p.behaviour or '-')}</h3>"
            f"<div class='pair'><pre>{e(b.primary)}</pre><pre>{e(res.unit_text[p.unit])}</pre></div>"
        )
    parts.append("</body></html>")
    (out / "report.html").write_text("\n".join(parts))
