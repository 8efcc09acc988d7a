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

from datatrove.pipeline.base import PipelineStep

from data_tools.codetextbook.config import CONF_DIR, SCHEMA, AnnotateConfig, CodeTextbookConfig, InputConfig, to_yaml
from phi_train.cli import hydra_command
from phi_train.errors import ReconcileError


def make_readers(inputs: list[InputConfig], max_bytes: int, progress: bool, work_dir: str | None = None) -> list:
    """One reader per input; with `work_dir` each reads its partition of the run's frozen input list."""
    from data_tools.codetextbook.inputs import list_path
    from data_tools.codetextbook.readers import (
        PythonFilesReader,
        StackJsonlReader,
        StackOverflowReader,
        StackParquetReader,
    )

    readers = []
    for i, inp in enumerate(inputs):
        common = {"limit": inp.limit, "file_progress": progress}
        if inp.kind == "python_files":
            reader = PythonFilesReader(inp.path, exclude=inp.exclude, max_bytes=max_bytes, **common)
        elif inp.kind == "stack_jsonl":
            reader = StackJsonlReader(inp.path, glob_pattern=None, **common)
        elif inp.kind == "stack_parquet":
            reader = StackParquetReader(inp.path, **common)
        else:
            reader = StackOverflowReader(inp.path, **common)
        reader.setup_frozen(list_path(work_dir, i) if work_dir else None, i)
        readers.append(reader)
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


def clean_limits(cfg: CodeTextbookConfig) -> dict[str, Any]:
    """`clean.drop_reason`'s keyword arguments from the config."""
    c = cfg.clean
    return {
        "max_bytes": c.max_bytes,
        "max_line_length": c.max_line_length,
        "max_mean_line_length": c.max_mean_line_length,
        "max_literal_fraction": c.max_literal_fraction,
        "generated_markers": list(c.generated_markers),
        "marker_lines": c.marker_lines,
        "generated_paths": list(c.generated_paths),
    }


def stage_pipelines(cfg: CodeTextbookConfig) -> dict[str, tuple[list, int]]:
    """stage -> (datatrove pipeline, tasks)."""
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from data_tools.codetextbook.annotate import AnnotateSample
    from data_tools.codetextbook.classify import ScoreFilter, TrainClassifier, output_record
    from data_tools.codetextbook.clean import CodeCleaner
    from data_tools.codetextbook.dedup import SHARD_KEY, Deduplicator, InputOrderReader

    w, c, p = Path(cfg.work_dir), cfg.clean, cfg.progress
    n = cfg.executor.tasks
    cls = cfg.classifier

    def inter(folder: str) -> JsonlReader:
        return JsonlReader(str(w / folder), glob_pattern="*.jsonl.zst", compression="zstd")

    limits = clean_limits(cfg)
    d = cfg.dedup
    return {
        "clean": (
            [
                *make_readers(cfg.inputs, c.max_bytes, p, str(w)),
                CodeCleaner(progress=p, **limits),
                JsonlWriter(str(w / "clean"), output_filename="${rank}.jsonl.zst", compression="zstd"),
            ],
            n,
        ),
        "dedup": (
            [
                InputOrderReader(str(w / "clean")),
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
    return summarize_dirs(cfg.work_dir, cfg.output_dir)


def summary_ready(work_dir: str) -> bool:
    """Whether clean, dedup and filter have all finished (each leaves one stats file per task, then `stats.json`)."""
    return all((Path(work_dir) / "logs" / stage / "stats.json").is_file() for stage in ("clean", "dedup", "filter"))


def stage_throughput(work_dir: str) -> dict[str, float]:
    """Documents in per second of step time, summed over tasks (so per core): datatrove's `time_stats` of the
    clean, dedup and filter steps (reading and writing excluded: they are I/O and overlap on a cluster)."""
    first = {"clean": "corpus_in", "dedup": "dedup_in", "filter": "filter_in"}
    out = {}
    for stage, label in first.items():
        path = Path(work_dir) / "logs" / stage / "stats.json"
        if not path.is_file():
            continue
        steps = json.loads(path.read_text())
        seconds = sum(
            (st.get("time_stats") or {}).get("total", 0.0)
            for st in steps
            if "READER" not in st["name"] and "WRITER" not in st["name"]
        )
        n = sum(
            int(v["total"] if isinstance(v, dict) else v)
            for st in steps
            for k, v in st.get("stats", {}).items()
            if k == label
        )
        if seconds > 0:
            out[stage] = round(n / seconds, 1)
    return out


def summarize_dirs(work_dir: str, output_dir: str) -> dict[str, Any]:
    s = {stage: stage_counts(work_dir, stage)[0] for stage in ("clean", "dedup", "annotate", "filter")}
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
            raise ReconcileError(f"{name}: {left} documents in but {right} kept + dropped (work_dir={work_dir})")
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
        "output_dir": output_dir,
    }
    summary["throughput_files_per_core_s"] = stage_throughput(work_dir)
    manifest = Path(work_dir) / "inputs" / "manifest.json"
    if manifest.is_file():
        summary["frozen_input_files"] = sum(m["files"] for m in json.loads(manifest.read_text())["inputs"])
    clf = Path(work_dir) / "classifier.json"
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


class WriteSummary(PipelineStep):
    """The last job of a Slurm or Ray run: the same reconciled summary as a local run, written by the cluster."""

    name = "🧾 Summary"
    type = "🧾 - SUMMARY"

    def __init__(self, work_dir: str, output_dir: str) -> None:
        super().__init__()
        self.work_dir, self.output_dir = work_dir, output_dir

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        write_summary(self.work_dir, self.output_dir)
        return
        yield


def write_summary(work_dir: str, output_dir: str) -> dict[str, Any]:
    summary = summarize_dirs(work_dir, output_dir)
    tmp = Path(work_dir) / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(Path(work_dir) / "summary.json")
    return summary


def run_pipeline(cfg: CodeTextbookConfig) -> dict[str, Any] | None:
    """Runs the selected stages; returns the summary once clean, dedup and filter have all finished (a local run, or
    `stages=[]` after a cluster run), else None. Slurm and Ray runs end with a summary job of their own."""
    from data_tools.codetextbook.inputs import freeze_inputs

    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if "clean" in cfg.stages:
        # Before any task starts: every task of this run and of every resumed run reads this one list.
        freeze_inputs(cfg.inputs, cfg.work_dir, cfg.inputs_changed)
    (work / "config.yaml").write_text(to_yaml(cfg))
    pipelines = stage_pipelines(cfg)
    previous = None
    for stage in (s for s in pipelines if s in cfg.stages):
        pipeline, tasks = pipelines[stage]
        executor = make_executor(cfg, stage, pipeline, tasks, depends=previous)
        if cfg.executor.kind == "local":
            executor.run()
        previous = executor
    if cfg.executor.kind != "local" and previous is not None:
        final = make_executor(cfg, "summary", [WriteSummary(cfg.work_dir, cfg.output_dir)], 1, depends=previous)
        final.run()  # Slurm: submits the chain of dependent jobs and returns; Ray: runs it to the end
        if cfg.executor.kind == "slurm":
            return None
    if not summary_ready(cfg.work_dir):
        return None
    summary = write_summary(cfg.work_dir, cfg.output_dir)
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
