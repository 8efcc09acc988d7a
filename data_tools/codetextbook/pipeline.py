"""CodeTextbook part 1: the filtered code-language data set of phi-1 §2.1, as datatrove pipelines.

    python -m data_tools.codetextbook --config-name demo [key=value ...]    # summary_only=true: summary of a done run

Stages (each a datatrove executor with its own logging dir and completion markers, so a killed run resumes):
  clean     readers -> CodeCleaner -> work/clean/*.jsonl.zst                     (executor.tasks tasks)
  dedup     work/clean -> Deduplicator -> work/dedup/<shard>.jsonl.zst            (1 task: global LSH index)
  annotate  work/dedup -> AnnotateSample -> work/annotations.jsonl                 (1 task, cached by sha256)
  train     annotations -> TrainClassifier -> work/classifier.{joblib,json}       (1 task)
  filter    work/dedup -> ScoreFilter -> output_dir/<rank>.jsonl.zst              (executor.tasks tasks)
then a summary (in, kept, dropped per reason, bytes/tokens kept) printed and saved as work/summary.json, with
`in == kept + sum(dropped)` checked.
"""

from __future__ import annotations

import functools
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from data_tools.codetextbook.config import CONF_DIR, SCHEMA, AnnotateConfig, CodeTextbookConfig, InputConfig, to_yaml
from phi_train.cli import hydra_command
from phi_train.errors import ReconcileError


def make_readers(inputs: list[InputConfig], max_bytes: int, progress: bool) -> list:
    from data_tools.codetextbook.readers import (
        PythonFilesReader,
        StackJsonlReader,
        StackOverflowReader,
        StackParquetReader,
    )

    readers = []
    for inp in inputs:
        common = {"limit": inp.limit, "file_progress": progress}
        if inp.kind == "python_files":
            readers.append(PythonFilesReader(inp.path, exclude=inp.exclude, max_bytes=max_bytes, **common))
        elif inp.kind == "stack_jsonl":
            readers.append(StackJsonlReader(inp.path, glob_pattern=None, **common))
        elif inp.kind == "stack_parquet":
            readers.append(StackParquetReader(inp.path, **common))
        else:
            readers.append(StackOverflowReader(inp.path, **common))
    return readers


def build_annotator(cfg: AnnotateConfig, cache_dir: str, progress: bool):
    """Factory run inside the annotate task: the teacher client (and the key it reads) never lives in the step."""
    from data_tools.codetextbook.annotate import RubricAnnotator, TeacherAnnotator
    from phi_train.teacher import TeacherClient

    if cfg.annotator == "rubric":
        return RubricAnnotator()
    t = cfg.teacher
    client = TeacherClient.from_config(t, cache_dir, progress)
    return TeacherAnnotator(
        client, cfg.prompt_template, cfg.max_prompt_chars, cfg.parse_retries, t.temperature, t.max_tokens
    )


def stage_pipelines(cfg: CodeTextbookConfig) -> dict[str, tuple[list, int]]:
    """stage -> (datatrove pipeline, tasks)."""
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from data_tools.codetextbook.annotate import AnnotateSample
    from data_tools.codetextbook.classify import ScoreFilter, TrainClassifier, output_record
    from data_tools.codetextbook.clean import CodeCleaner
    from data_tools.codetextbook.dedup import SHARD_KEY, Deduplicator

    w, c, p = Path(cfg.work_dir), cfg.clean, cfg.progress
    n = cfg.executor.tasks
    cls = cfg.classifier

    def inter(folder: str) -> JsonlReader:
        return JsonlReader(str(w / folder), glob_pattern="*.jsonl.zst", compression="zstd")

    limits = {
        "max_bytes": c.max_bytes,
        "max_line_length": c.max_line_length,
        "max_mean_line_length": c.max_mean_line_length,
        "max_literal_fraction": c.max_literal_fraction,
        "generated_markers": [m.lower() for m in c.generated_markers],
        "marker_lines": c.marker_lines,
        "generated_paths": list(c.generated_paths),
    }
    d = cfg.dedup
    return {
        "clean": (
            [
                *make_readers(cfg.inputs, c.max_bytes, p),
                CodeCleaner(progress=p, **limits),
                JsonlWriter(str(w / "clean"), output_filename="${rank}.jsonl.zst", compression="zstd"),
            ],
            n,
        ),
        "dedup": (
            [
                inter("clean"),
                Deduplicator(d.threshold, d.num_perm, d.shingle_size, d.seed, d.shards or n, progress=p),
                JsonlWriter(str(w / "dedup"), output_filename="${" + SHARD_KEY + "}.jsonl.zst", compression="zstd"),
            ],
            1,
        ),
        "annotate": (
            [
                inter("dedup"),
                AnnotateSample(
                    functools.partial(build_annotator, cfg.annotate, str(w / "cache"), p),
                    out_path=str(w / "annotations.jsonl"),
                    cache_path=str(w / "cache" / "annotations.sqlite"),
                    sample_size=cfg.annotate.sample_size,
                    label_threshold=cfg.annotate.label_threshold,
                ),
            ],
            1,
        ),
        "train": (
            [
                TrainClassifier(
                    str(w / "annotations.jsonl"),
                    str(w),
                    cls.embedder,
                    cls.batch_size,
                    cls.embedder_checkpoint,
                    cls.n_estimators,
                    cls.test_fraction,
                    cls.seed,
                    cfg.filter.top_fraction,
                    progress=p,
                )
            ],
            1,
        ),
        "filter": (
            [
                inter("dedup"),
                ScoreFilter(str(w), cls.embedder, cls.batch_size, cls.embedder_checkpoint, cfg.filter.threshold, p),
                JsonlWriter(
                    cfg.output_dir, output_filename="${rank}.jsonl.zst", compression="zstd", adapter=output_record
                ),
            ],
            n,
        ),
    }


def make_executor(cfg: CodeTextbookConfig, stage: str, pipeline: list, tasks: int, depends=None):
    """The same pipeline on datatrove's local, Slurm or Ray executor (`executor.kind`)."""
    e = cfg.executor
    logging_dir = str(Path(cfg.work_dir) / "logs" / stage)
    if e.kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(e.workers, tasks), logging_dir=logging_dir)
    if e.kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        return SlurmPipelineExecutor(
            pipeline,
            tasks=tasks,
            time=e.slurm_time,
            partition=e.slurm_partition,
            cpus_per_task=e.cpus_per_task,
            mem_per_cpu_gb=e.mem_per_cpu_gb,
            logging_dir=logging_dir,
            job_name=f"codetextbook-{stage}",
            venv_path=str(Path(sys.prefix) / "bin" / "activate"),
            depends=depends,
        )
    from datatrove.executor.ray import RayPipelineExecutor

    return RayPipelineExecutor(
        pipeline,
        tasks=tasks,
        workers=e.workers,
        logging_dir=logging_dir,
        depends=depends,
        cpus_per_task=e.cpus_per_task,
        mem_per_cpu_gb=e.mem_per_cpu_gb,
    )


def stage_counts(work_dir: str, stage: str) -> tuple[Counter, int]:
    """Sum of every numeric stat of a stage over its completed tasks' `stats/*.json`; and the number of such tasks."""
    totals: Counter = Counter()
    files = sorted((Path(work_dir) / "logs" / stage / "stats").glob("*.json"))
    for f in files:
        for step in json.loads(f.read_text()):
            for label, value in step.get("stats", {}).items():
                totals[label] += value["total"] if isinstance(value, dict) else value
    return totals, len(files)


def summarize(cfg: CodeTextbookConfig) -> dict[str, Any]:
    """Counts from datatrove's stats of every stage, reconciled stage by stage and end to end."""
    s = {stage: stage_counts(cfg.work_dir, stage)[0] for stage in ("clean", "dedup", "annotate", "filter")}
    drops: Counter = Counter()
    for stage in ("clean", "dedup", "filter"):
        for label, v in s[stage].items():
            if label.startswith("drop:"):
                drops[label[5:]] += int(v)

    def stage_drops(stage: str) -> int:
        return sum(int(v) for k, v in s[stage].items() if k.startswith("drop:"))

    checks = [
        ("clean", s["clean"]["corpus_in"], s["clean"]["corpus_kept"] + stage_drops("clean")),
        ("dedup input", s["dedup"]["dedup_in"], s["clean"]["corpus_kept"]),
        ("dedup", s["dedup"]["dedup_in"], s["dedup"]["dedup_kept"] + stage_drops("dedup")),
        ("filter input", s["filter"]["filter_in"], s["dedup"]["dedup_kept"]),
        ("filter", s["filter"]["filter_in"], s["filter"]["final_kept"] + stage_drops("filter")),
    ]
    for name, left, right in checks:
        if left != right:
            raise ReconcileError(f"{name}: {left} documents in but {right} kept + dropped (work_dir={cfg.work_dir})")
    total_in, kept = int(s["clean"]["corpus_in"]), int(s["filter"]["final_kept"])
    if total_in != kept + sum(drops.values()):
        raise ReconcileError(f"end to end: in={total_in} != kept={kept} + dropped={sum(drops.values())}")
    summary = {
        "in": total_in,
        "kept": kept,
        "dropped": dict(sorted(drops.items(), key=lambda kv: -kv[1])),
        "kept_bytes": int(s["filter"]["kept_bytes"]),
        "kept_tokens_approx": int(s["filter"]["kept_tokens"]),
        "annotation": {k: int(v) for k, v in s["annotate"].items() if k.startswith("annotat")},
        "output_dir": cfg.output_dir,
    }
    clf = Path(cfg.work_dir) / "classifier.json"
    if clf.is_file():
        summary["classifier"] = json.loads(clf.read_text())
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="CodeTextbook filtered code (phi-1 §2.1)")
    t.add_column("count", justify="left")
    t.add_column("files", justify="right")
    t.add_row("in", f"{summary['in']:,}")
    t.add_row("kept", f"{summary['kept']:,}", style="bold green")
    for reason, n in summary["dropped"].items():
        t.add_row(f"dropped: {reason}", f"{n:,}")
    t.add_row("kept bytes", f"{summary['kept_bytes']:,}")
    t.add_row("kept tokens (approx.)", f"{summary['kept_tokens_approx']:,}")
    if c := summary.get("classifier"):
        t.add_row(
            "classifier held-out acc / AUC",
            f"{c['accuracy']:.3f} / {c['roc_auc']:.3f} (constant: {c['baseline_constant']['accuracy']:.3f} / 0.5)",
        )
    Console(stderr=True).print(t)


def run_pipeline(cfg: CodeTextbookConfig) -> dict[str, Any] | None:
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(to_yaml(cfg))
    pipelines = stage_pipelines(cfg)
    previous = None
    for stage in (s for s in pipelines if s in cfg.stages):
        pipeline, tasks = pipelines[stage]
        executor = make_executor(cfg, stage, pipeline, tasks, depends=previous)
        if cfg.executor.kind == "local":
            executor.run()
        previous = executor
    if cfg.executor.kind != "local":
        previous.run()  # launches the chain of dependent jobs; the summary is for `stages=[]` once they are done
        return None
    summary = summarize(cfg) if set(cfg.stages) >= {"clean", "dedup", "filter"} else None
    if summary is not None:
        (work / "summary.json").write_text(json.dumps(summary, indent=2))
        print_summary(summary)
    return summary


@hydra_command(CodeTextbookConfig, "demo", CONF_DIR, schema_name=SCHEMA)
def main(cfg: CodeTextbookConfig) -> None:
    if cfg.summary_only:
        print_summary(summarize(cfg))
    else:
        run_pipeline(cfg)


if __name__ == "__main__":
    sys.exit(main())
