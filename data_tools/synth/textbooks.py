"""Synthetic textbooks (phi-1 §2.2) from any OpenAI-compatible teacher.

    python -m data_tools.synth.textbooks --config-name demo [key=value ...]

phi-1's synthetic textbook set is <1B tokens of GPT-3.5-written "textbook" text interleaved with code, made diverse by
constraining topic and target audience. Here each prompt is a template with seeds drawn reproducibly from
`textbooks.seed`: topic x subtopic x audience x style x random constraint words (`data_tools.synth.draw_items`).

Steps: draw items -> ask the teacher for the missing ones (resumable, `data_tools.synth.run_generation`) ->
post-process every reply (code blocks extracted; kept only if it has code and every block parses with `ast`; long
enough) -> near-dedup (MinHash, `data_tools.codetextbook.dedup`) -> `output_dir/textbooks.jsonl.zst` with `text` (what
`python -m data_tools.shard` reads) and provenance (template, seeds, teacher model). Post-processing reads the whole
generations file each run, so its output is always complete and duplicate-free. Counts reconcile twice:
requested == generated + failed per reason; generated == kept + dropped per reason. Every run writes `work_dir/diversity.json` (exact / near-duplicate rates of
the replies, distinct-n, cluster entropy, topic histogram, drops; `data_tools.synth.diversity`) and prints its headline
numbers with the counts; a run with items still failed exits 1 (`allow_partial=true` to accept).
"""

from __future__ import annotations

import ast
import json
import math
import random
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from data_tools.codetextbook.dedup import NearDedupIndex
from data_tools.synth.common import (
    CONF_DIR,
    GENERATIONS,
    SCHEMA,
    GenerationStore,
    Item,
    SynthConfig,
    SynthConfigError,
    check_drops,
    draw_items,
    exit_status,
    make_client,
    pick_words,
    print_summary,
    prompt_space,
    read_topics_file,
    run_generation,
    teacher_sampling,
    to_yaml,
    write_jsonl,
)
from data_tools.synth.diversity import diversity_report, log_to_wandb, report_rows
from phi_train.cli import hydra_command

OUTPUT_FILE = "textbooks.jsonl.zst"


def code_blocks(text: str) -> list[str]:
    """The Python code of every fenced block (blocks tagged with another language are not Python: skipped)."""
    out = []
    for m in re.finditer(r"^```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        if m.group(1).lower() in ("", "python", "python3", "py"):
            out.append(m.group(2))
    return out


def check_textbook(reply: str, min_chars: int) -> str | None:
    """None if the reply is a usable textbook section, else the drop reason."""
    text = reply.strip()
    if len(text) < min_chars:
        return "too_short"
    blocks = code_blocks(text)
    if not blocks:
        return "no_code"
    for block in blocks:
        try:
            ast.parse(block)
        except (SyntaxError, ValueError):  # ValueError: NUL bytes in source
            return "code_syntax_error"
    return None


def build_items(cfg: SynthConfig) -> list[Item]:
    tb = cfg.textbooks
    topics = (
        read_topics_file(tb.topics_file, want_mapping=True, key="textbooks.topics_file")
        if tb.topics_file
        else tb.topics
    )
    for key, values in (("topics", topics), ("audiences", tb.audiences), ("styles", tb.styles)):
        if not values:
            raise SynthConfigError(f"textbooks.{key} is empty: give at least one (or textbooks.topics_file)")
    names = sorted(topics)

    def draw(rng: random.Random) -> dict[str, Any]:
        topic = rng.choice(names)
        return {
            "topic": topic,
            "subtopic": rng.choice(topics[topic]),
            "audience": rng.choice(tb.audiences),
            "style": rng.choice(tb.styles),
            "words": pick_words(rng, tb.words, tb.words_per_prompt),
        }

    return draw_items(tb.count, tb.seed, tb.templates, draw, "textbooks")


def textbook_prompt_space(cfg: SynthConfig) -> int:
    tb = cfg.textbooks
    topics = read_topics_file(tb.topics_file, True, "textbooks.topics_file") if tb.topics_file else tb.topics
    return prompt_space(
        tb.templates,
        subtopic=sum(len(v) for v in topics.values()),
        audience=len(tb.audiences),
        style=len(tb.styles),
        words=math.comb(len(tb.words), min(tb.words_per_prompt, len(tb.words))),
    )


def postprocess(
    items: list[Item], store: GenerationStore, cfg: SynthConfig
) -> tuple[list[dict[str, Any]], Counter, int]:
    """(output records, dropped per reason, generated): quality checks then near-dedup, in item order."""
    d = cfg.dedup
    index = NearDedupIndex(d.threshold, d.num_perm, d.shingle_size, d.seed)
    out: list[dict[str, Any]] = []
    dropped: Counter = Counter()
    generated = 0
    for it in items:
        rec = store.records.get(it.id)
        if rec is None:
            continue
        generated += 1
        reason = check_textbook(rec["reply"], cfg.textbooks.min_chars)
        if reason is None:
            reason, _ = index.add(it.id, rec["reply"].strip())
        if reason:
            dropped[reason] += 1
            continue
        out.append(
            {
                "text": rec["reply"].strip(),
                "id": f"textbook-{it.id}",
                "source": "synthetic_textbook",
                "template": it.template,
                "seeds": it.seeds,
                "teacher_model": rec["teacher_model"],
            }
        )
    check_drops("textbook post-processing", generated, len(out), dropped)
    return out, dropped, generated


def run(cfg: SynthConfig) -> dict[str, Any]:
    tb = cfg.textbooks
    work = Path(tb.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(to_yaml(cfg))
    items = build_items(cfg)
    store = GenerationStore(work / GENERATIONS)
    client = make_client(cfg.teacher, work / "cache")
    gen = run_generation(items, client, store, teacher_sampling(cfg.teacher), cfg.chunk_size, cfg.progress)
    records, dropped, generated = postprocess(items, store, cfg)
    assert generated == gen.generated
    write_jsonl(Path(tb.output_dir) / OUTPUT_FILE, records)
    replies = [store.records[it.id]["reply"].strip() for it in items if it.id in store]
    report = diversity_report(
        replies, [r["text"] for r in records], [it.seeds for it in items], [r["seeds"] for r in records], dropped,
        cfg.dedup, cfg.report.clusters,
    ) | {"prompt_space": textbook_prompt_space(cfg)}  # fmt: skip
    (work / "diversity.json").write_text(json.dumps(report, indent=2))
    log_to_wandb(report, "textbooks", cfg.report.wandb, {"count": tb.count, "teacher": cfg.teacher.model})
    summary = {
        "generation": gen.as_dict(),
        "generated": generated,
        "kept": len(records),
        "dropped": dict(dropped.most_common()),
        "kept_chars": sum(len(r["text"]) for r in records),
        "teacher": client.stats.as_dict(),
        "output": str(Path(tb.output_dir) / OUTPUT_FILE),
        "diversity": report,
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    rows: list[tuple[str, Any]] = [("requested", gen.requested), ("generated", generated)]
    rows += [(f"teacher failed: {k}", v) for k, v in gen.failed.items()]
    rows += [("kept", len(records))] + [(f"dropped: {k}", v) for k, v in dropped.most_common()]
    rows += [
        ("teacher HTTP requests", client.stats.http_requests),
        ("teacher cost (USD)", f"{client.stats.cost_usd:.4f}"),
        ("prompt space (distinct prompts)", report["prompt_space"]),
    ]
    rows += report_rows(report)
    print_summary("Synthetic textbooks (phi-1 §2.2)", rows)
    return summary


@hydra_command(SynthConfig, "demo", CONF_DIR, schema_name=SCHEMA)
def main(cfg: SynthConfig) -> int:
    return exit_status(run(cfg), cfg, "data_tools.synth.textbooks")


if __name__ == "__main__":
    sys.exit(main())
