"""`make demo`: the whole phi-1 pipeline, small, on this machine, with nothing downloaded.

1. CodeTextbook (phi-1 §2.1) from real Python code already here (the standard library): clean, deduplicate, rate a
   sample with the offline rubric annotator, learn a random forest on MiniLM embeddings, keep the textbook-like files.
2. A code-safe SentencePiece tokenizer trained on it; webdataset token shards.
3. phi1_tiny pretrained on 2 CPU ranks under the real `deepspeed` launcher (ZeRO-2). The first run is SIGKILLed once
   a checkpoint is committed, as a preemption would; the same command then resumes it to the end.
4. CodeExercises mined offline from that corpus (signature + docstring -> body, kept only when their recorded asserts
   pass in the sandbox), sharded with loss masks; phi-1's fine-tune stage on them from the pretrain checkpoint.
5. HumanEval pass@1 of the result (greedy; near zero for a model this small — reported honestly) and a sample.

    python launch/demo.py            # (= make demo) one line per stage with a progress bar; each stage's output in runs/demo/logs/
    python launch/demo.py --verbose  # every stage's own output on the console as well

Each stage is skipped when its output exists, so a second `make demo` only re-runs what is missing (`make clean`
starts over). The sizes below are chosen so the whole run takes under six minutes on two cores with or without
AVX-512 while the loss still falls visibly; docs/benchmarks.md has the measurements.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "demo"
RUN = ROOT / "runs" / "demo"
FT = ROOT / "runs" / "demo-finetune"
LOGS = RUN / "logs"
EVAL = FT / "eval-humaneval"
PY = sys.executable
DEEPSPEED = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2"]

# ---------------------------------------------------------------- sizes
# Where the time goes on 2 cores (docs/benchmarks.md): MiniLM embeddings in the CodeTextbook stage, the pretraining
# steps, and each `deepspeed` launch's start-up. Pretraining sees ~10x fewer tokens than the corpus holds, so the
# corpus is cut at the source and the step count is what the loss curve needs to flatten (conf/train/demo.yaml).
# MiniLM (the CodeTextbook default) costs ~80 ms a file on two AVX2 cores, a minute of the budget here; the demo's
# random forest learns on hashed code tokens instead (`classifier.embedder=minilm` puts it back).
CODETEXTBOOK_OVERRIDES = ["inputs.0.limit=250", "executor.tasks=2", "executor.workers=2", "annotate.sample_size=200",
                          "classifier.embedder=hashing"]  # fmt: skip
VOCAB_SIZE = 4096  # the LM head and softmax are a third of phi1_tiny's step at 8192; 4096 still codes Python well
SEQ_LEN = 256
EXERCISE_OVERRIDES = ["exercises.sandbox_workers=2"]
EVAL_OVERRIDES = ["eval.max_new_tokens=64", "eval.batch_size=32"]


# ---------------------------------------------------------------- the data_tools command lines, in one place
def tokenizer_cmd(corpus: Path, out: Path) -> list[str]:
    return [PY, "-m", "data_tools.tokenizer", f"input=[{corpus}]", f"out={out}", f"vocab_size={VOCAB_SIZE}"]


def shard_cmd(inputs: Path, tokenizer: Path, out: Path, shard_sequences: int, *extra: str) -> list[str]:
    return [PY, "-m", "data_tools.shard", f"input=[{inputs}]", f"tokenizer={tokenizer}", f"out={out}",
            f"seq_len={SEQ_LEN}", f"shard_sequences={shard_sequences}", "workers=2", *extra]  # fmt: skip


def exercise_shard_extra() -> list[str]:
    return ["val_fraction=0.1", "prompt_field=prompt", "text_field=completion"]


# ---------------------------------------------------------------- running a stage
def rel(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


class StageFailed(Exception):
    pass


@dataclass
class Stage:
    name: str
    cmd: list[str]
    done: Path | None = None
    """The stage is skipped when this exists."""
    figure: Callable[[], str] = lambda: ""
    """The key figure, read from the stage's outputs once it is done."""
    progress: Callable[[], tuple[int, int | None]] | None = None
    """(completed, total) for the bar; None: parse the last `n/total` a tqdm bar wrote into the log."""
    kill_when: Callable[[], bool] | None = None
    """When it turns true, the stage's process group is SIGKILLed (a preemption); that exit counts as success."""
    log_name: str = ""

    @property
    def log(self) -> Path:
        return LOGS / f"{self.log_name or re.sub(r'[^a-z0-9]+', '-', self.name.lower()).strip('-')}.log"


@dataclass
class Row:
    name: str
    wall_s: float | None
    cpu_s: float | None
    figure: str
    skipped: bool = False


@dataclass
class Demo:
    verbose: bool = False
    rows: list[Row] = field(default_factory=list)
    env: dict = field(default_factory=dict)

    def run(self, stage: Stage) -> None:
        if stage.done is not None and stage.done.exists():
            self.rows.append(Row(stage.name, None, None, stage.figure(), skipped=True))
            print(f"  - {stage.name:<34} {'done':>8}  ({rel(stage.done)} exists)", flush=True)
            return
        stage.log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            cpu = run_logged(stage, self.env, self.verbose)
        except StageFailed:
            print(f"  ✗ {stage.name:<34} {fmt_s(time.perf_counter() - t0):>8}", flush=True)
            if not self.verbose:  # with --verbose the output is on the console already
                print(f"--- last lines of {rel(stage.log)} ---\n{log_tail(stage.log)}\n---", file=sys.stderr)
            raise
        row = Row(stage.name, time.perf_counter() - t0, cpu, stage.figure())
        self.rows.append(row)
        print(f"  ✓ {stage.name:<34} {fmt_s(row.wall_s):>8}  {row.figure}", flush=True)


def tqdm_progress(log: Path) -> tuple[int, int | None]:
    """The last `n/total` a tqdm bar wrote into the log (tqdm redraws with carriage returns, so it is the tail)."""
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, log.stat().st_size - 4096))
            tail = fh.read().decode("utf-8", "replace")
    except OSError:
        return 0, None
    hits = re.findall(r"(\d+)/(\d+) \[", tail)
    return (int(hits[-1][0]), int(hits[-1][1])) if hits else (0, None)


def tree_cpu_seconds(proc, seen: dict[int, float]) -> float:
    """User + system CPU seconds of a process and all its descendants, accumulated in `seen` (pid -> last reading)
    so processes that already exited (or were SIGKILLed, whose time no wait() reports) still count."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        procs = []
    for p in procs:
        try:
            t = p.cpu_times()
            seen[p.pid] = max(seen.get(p.pid, 0.0), t.user + t.system)
        except psutil.Error:
            pass
    return sum(seen.values())


def log_tail(log: Path, lines: int = 25) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    # a tqdm line is many redraws joined by \r: keep each line's last state
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])


def run_logged(stage: Stage, env: dict, verbose: bool) -> float:
    """Run one stage with its output in its log (and on the console with --verbose), a progress line on the console
    otherwise; return its CPU seconds. A non-zero exit (other than the SIGKILL it sent itself) raises StageFailed."""
    seen: dict[int, float] = {}
    killed = False
    with open(stage.log, "wb") as log:
        log.write(f"$ {' '.join(stage.cmd)}\n".encode())
        log.flush()
        out = subprocess.PIPE if verbose else log
        proc = subprocess.Popen(stage.cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        tee = None
        if verbose:
            print(f"== {stage.name}: {' '.join(stage.cmd)}", flush=True)
            tee = threading.Thread(target=copy_stream, args=(proc.stdout, log), daemon=True)
            tee.start()
        try:
            with progress_line(stage, verbose) as update:
                while proc.poll() is None:
                    tree_cpu_seconds(proc, seen)
                    update()
                    if stage.kill_when is not None and not killed and stage.kill_when():
                        time.sleep(2)  # into the next interval: the kill lands mid-step, not on a clean boundary
                        tree_cpu_seconds(proc, seen)
                        os.killpg(proc.pid, signal.SIGKILL)
                        killed = True
                    time.sleep(0.5)
                update()
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            if tee is not None:
                tee.join()
    rc = proc.wait()
    if rc != 0 and not (killed and rc == -signal.SIGKILL):
        raise StageFailed(f"stage {stage.name!r} failed (exit {rc}); its full output: {stage.log}")
    return sum(seen.values())


def copy_stream(src, log) -> None:
    for chunk in iter(lambda: src.read1(65536), b""):
        log.write(chunk)
        log.flush()
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()


class progress_line:
    """A live progress line while a stage runs (name, bar, n/total, elapsed); Demo.run prints its result line after."""

    def __init__(self, stage: Stage, verbose: bool):
        self.stage, self.verbose = stage, verbose

    def __enter__(self) -> Callable[[], None]:
        if self.verbose:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("  {task.description:<34}"), BarColumn(bar_width=30), MofNCompleteColumn(),
            TimeElapsedColumn(), refresh_per_second=4, transient=True,
        )  # fmt: skip
        self.task = self.bar.add_task(self.stage.name, total=None)
        self.bar.start()
        return self.update

    def update(self) -> None:
        n, total = self.stage.progress() if self.stage.progress else tqdm_progress(self.stage.log)
        self.bar.update(self.task, completed=n, total=total)

    def __exit__(self, *_) -> None:
        if not self.verbose:
            self.bar.stop()


# ---------------------------------------------------------------- reading the outputs
def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def train_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train_progress(run: Path, conf: str) -> Callable[[], tuple[int, int | None]]:
    total = train_conf(conf)["max_steps"]

    def probe() -> tuple[int, int | None]:
        path = run / "metrics.jsonl"
        if not path.exists():
            return 0, total
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - 512))
            lines = fh.read().decode(errors="replace").splitlines()
        for line in reversed(lines):
            try:
                return json.loads(line)["step"], total
            except (ValueError, KeyError):
                continue
        return 0, total

    return probe


def train_conf(name: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "train" / f"{name}.yaml"))


def codetextbook_progress() -> tuple[int, int | None]:
    """datatrove writes one completion marker per finished task: clean 2 + dedup 1 + annotate 1 + train 1 + filter 2."""
    logs = DATA / "codetextbook_work" / "logs"
    return sum(1 for _ in logs.glob("*/completions/*")) if logs.exists() else 0, 7


def fmt_tokens(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def figure_codetextbook() -> str:
    s = read_json(DATA / "codetextbook_work" / "summary.json")
    c = s.get("classifier", {})
    auc = f", classifier AUC {c['roc_auc']:.2f} ({c.get('embedder', '?')})" if "roc_auc" in c else ""
    return f"kept {s['kept']} of {s['in']} files, ~{fmt_tokens(s['kept_tokens_approx'])} tokens{auc}"


def figure_quality() -> str:
    q = read_json(DATA / "codetextbook_work" / "quality.json")
    f, c = q["pipeline_forest"], q["constant_predictor"]
    return (f"held-out {q['n_held_out']} files: forest acc {f['accuracy']:.2f} (constant {c['accuracy']:.2f}), "
            f"AUC {f['roc_auc']:.2f}")  # fmt: skip


def figure_tokenizer() -> str:
    return f"vocab {VOCAB_SIZE}"


def figure_shards(path: Path, unit: str = "tokens") -> Callable[[], str]:
    def figure() -> str:
        m = read_json(path / "manifest.json")
        tr, va = m["splits"]["train"], m["splits"].get("val", {"tokens": 0, "sequences": 0})
        n_shards = len(tr["shards"]) + len(m["splits"].get("val", {}).get("shards", []))
        if unit == "sequences":
            return f"{tr['sequences']} train / {va['sequences']} val sequences of {m['seq_len']}"
        return f"{fmt_tokens(tr['tokens'])} train / {fmt_tokens(va['tokens'])} val tokens in {n_shards} shards"

    return figure


def figure_preempted() -> str:
    latest = RUN / "checkpoints" / "latest"
    if not latest.exists():
        return ""
    return f"SIGKILLed after committing checkpoint {int(re.sub(r'[^0-9]', '', latest.read_text()))}"


def figure_train(run: Path) -> Callable[[], str]:
    def figure() -> str:
        s = read_json(run / "summary.json")
        m = train_metrics(run)
        last = s.get("last") or {}
        out = f"steps {s['start_step']}->{s['steps']}" if s.get("resumed") else f"{s['steps']} steps"
        if m:
            out += f", loss {m[0]['loss']:.2f} -> {m[-1]['loss']:.2f}"
        if "val_loss" in last:
            out += f", held-out {last['val_loss']:.2f}"
        return out

    return figure


def figure_exercises() -> str:
    s = read_json(DATA / "exercises_work" / "summary-mined.json")
    return f"kept {s['kept']} of {s['in']} functions (asserts pass)"


def figure_eval() -> str:
    s = read_json(EVAL / "summary.json")
    p1 = s["pass@k"].get("pass@1", 0.0)
    return f"pass@1 {100 * p1:.1f}% ({s['solved']}/{s['problems']} solved)"


# ---------------------------------------------------------------- the report
def loss_plot(points: list[tuple[int, float]], width: int = 60, height: int = 8, mark: int | None = None) -> list[str]:
    """A filled plot of loss against step: each column is the mean loss of its steps, drawn in eighths of a row."""
    if not points:
        return []
    width = min(width, len(points))
    cols = [points[len(points) * i // width : len(points) * (i + 1) // width] for i in range(width)]
    means = [sum(loss for _, loss in c) / len(c) for c in cols]
    lo, hi = min(means), max(means)
    levels = [1 + round((v - lo) / ((hi - lo) or 1.0) * (height * 8 - 1)) for v in means]
    lines = []
    for r in range(height):
        base = (height - 1 - r) * 8
        label = f"{hi:6.2f} ┤" if r == 0 else f"{lo:6.2f} ┤" if r == height - 1 else "       │"
        lines.append(label + "".join(" ▁▂▃▄▅▆▇█"[max(0, min(8, lv - base))] for lv in levels))
    lines.append("       └" + "─" * width)
    first, last = str(points[0][0]), str(points[-1][0])
    axis = [" "] * width
    axis[: len(first)] = first
    axis[width - len(last) :] = last
    if mark is not None:
        at = next((i for i, c in enumerate(cols) if c[-1][0] >= mark), None)
        note = f"^ resumed at {mark}"
        if at is not None and len(first) < at and at + len(note) < width - len(last):
            axis[at : at + len(note)] = note
    lines.append("   step " + "".join(axis))
    return lines


def window_mean(points: list[tuple[int, float]], where: float, n: int = 10) -> str:
    """The mean loss of n consecutive steps around a fraction of the run: one step's loss is too noisy to quote."""
    start = min(max(0, round(where * len(points)) - n // 2), max(0, len(points) - n))
    window = points[start : start + n]
    return f"steps {window[0][0]}-{window[-1][0]} {sum(loss for _, loss in window) / len(window):.2f}"


def machine() -> str:
    model = "unknown CPU"
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    isa = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    cap_s = f", capped by ONEDNN_MAX_CPU_ISA={cap}" if cap else ""
    return f"{model}, {os.cpu_count()} cores, {isa}{cap_s}"


def fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f} s" if s < 90 else f"{int(s // 60)} min {s % 60:02.0f} s"


def report(demo: Demo, wall: float, load: tuple[float, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="phi-train demo", caption=f"{machine()}; load average {load[0]:.2f} at start, {load[1]:.2f} "
                  "at the end", title_justify="left", caption_justify="left")  # fmt: skip
    table.add_column("stage")
    table.add_column("wall", justify="right")
    table.add_column("CPU", justify="right")
    table.add_column("result")
    for r in demo.rows:
        table.add_row(r.name, "done before" if r.skipped else fmt_s(r.wall_s), fmt_s(r.cpu_s), r.figure)
    ran = [r for r in demo.rows if not r.skipped]
    table.add_row("total", fmt_s(wall), fmt_s(sum(r.cpu_s or 0 for r in ran)), "", style="bold")
    console.print(table)

    pre = read_json(RUN / "summary.json")
    metrics = train_metrics(RUN)
    resumed_at = pre["start_step"] if pre.get("resumed") else None
    points = [(m["step"], m["loss"]) for m in metrics]
    if points:
        console.print(
            f"\npretraining loss, phi1_tiny ({pre['params'] / 1e6:.1f}M parameters, {fmt_tokens(pre['tokens_seen'])}"
            f" tokens; a uniform guess over the vocabulary scores {math.log(VOCAB_SIZE):.2f}): "
            + ", ".join(window_mean(points, where) for where in (0.0, 0.5, 1.0)),
            highlight=False,
        )
        console.print("\n".join(loss_plot(points, mark=resumed_at)), highlight=False)
    ft = read_json(FT / "summary.json")
    if ft.get("sample"):
        console.print("\nsample from the fine-tuned model (greedy):", highlight=False)
        console.print(ft["sample_prompt"] + ft["sample"], highlight=False, markup=False)
    console.print(f"\nlogs: {rel(LOGS)}/   runs: {rel(RUN)}, {rel(FT)}",
                  highlight=False)  # fmt: skip


# ---------------------------------------------------------------- the pipeline
def stages() -> list[Stage]:
    corpus, tokenizer = DATA / "codetextbook", DATA / "tokenizer" / "tokenizer.model"
    exercises = DATA / "exercises"
    pretrain = [*DEEPSPEED, "launch/train.py", "+model=phi1_tiny", "data=demo", "train=demo", f"hydra.run.dir={RUN}"]
    latest = RUN / "checkpoints" / "latest"
    return [
        Stage(
            "CodeTextbook filter",
            [PY, "-m", "data_tools.codetextbook", "--config-name", "demo", *CODETEXTBOOK_OVERRIDES],
            DATA / "codetextbook_work" / "summary.json",
            figure_codetextbook,
            codetextbook_progress,
            log_name="codetextbook",
        ),  # fmt: skip
        Stage(
            "filter quality (held-out files)",
            # files the forest never saw, labelled by the same annotator: is the filter better than a constant?
            [
                PY,
                "-m",
                "data_tools.codetextbook.quality",
                "--config-name",
                "demo",
                *CODETEXTBOOK_OVERRIDES,
                "quality.embedders=[hashing]",
                "quality.held_out=100",
            ],
            DATA / "codetextbook_work" / "quality.json",
            figure_quality,
            log_name="quality",
        ),  # fmt: skip
        Stage("tokenizer", tokenizer_cmd(corpus, tokenizer.parent), tokenizer, figure_tokenizer),
        Stage(
            "shards",
            shard_cmd(corpus, tokenizer, DATA / "shards", 256),
            DATA / "shards" / "manifest.json",
            figure_shards(DATA / "shards"),
        ),  # fmt: skip
        Stage(
            "pretrain until SIGKILL",
            pretrain,
            latest,
            figure_preempted,
            train_progress(RUN, "demo"),
            kill_when=latest.exists,
            log_name="pretrain-killed",
        ),  # fmt: skip
        Stage(
            "pretrain resumed (same command)",
            pretrain,
            RUN / "summary.json",
            figure_train(RUN),
            train_progress(RUN, "demo"),
            log_name="pretrain-resumed",
        ),  # fmt: skip
        Stage(
            "CodeExercises mined + sandboxed",
            [
                PY,
                "-m",
                "data_tools.synth.exercises",
                "--config-name",
                "demo",
                "exercises.source=mine",
                f"exercises.mine.inputs=[{corpus}]",
                f"exercises.output_dir={exercises}",
                f"exercises.work_dir={DATA / 'exercises_work'}",
                *EXERCISE_OVERRIDES,
            ],
            exercises / "mined.jsonl.zst",
            figure_exercises,
            log_name="exercises",
        ),  # fmt: skip
        Stage(
            "exercise shards (completion loss)",
            shard_cmd(exercises, tokenizer, DATA / "exercise_shards", 16, *exercise_shard_extra()),
            DATA / "exercise_shards" / "manifest.json",
            figure_shards(DATA / "exercise_shards", "sequences"),
            log_name="exercise-shards",
        ),  # fmt: skip
        Stage(
            "fine-tune on exercises",
            [
                *DEEPSPEED,
                "launch/train.py",
                "+model=phi1_tiny",
                "train=finetune_demo",
                f"data.path={DATA / 'exercise_shards'}",
                f"train.init_from={RUN / 'checkpoints'}",
                f"hydra.run.dir={FT}",
            ],
            FT / "summary.json",
            figure_train(FT),
            train_progress(FT, "finetune_demo"),
            log_name="finetune",
        ),  # fmt: skip
        Stage(
            "HumanEval pass@1 (greedy)",
            [
                PY,
                "launch/evaluate.py",
                "eval=humaneval",
                f"eval.checkpoint={FT / 'checkpoints'}",
                f"eval.out_dir={EVAL}",
                *EVAL_OVERRIDES,
            ],
            EVAL / "summary.json",
            figure_eval,
            log_name="humaneval",
        ),  # fmt: skip
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", action="store_true", help="every stage's own output on the console too")
    args = parser.parse_args(argv)
    # Third-party chatter (DeepSpeed's FutureWarnings, wandb's banner, datatrove's per-file lines) lands in the logs.
    env = os.environ | {"DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
    demo = Demo(verbose=args.verbose, env=env)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    print(f"phi-train demo on {machine()}; each stage's output goes to {rel(LOGS)}/", flush=True)
    try:
        for stage in stages():
            demo.run(stage)
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report(demo, time.perf_counter() - t0, (load0, os.getloadavg()[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
