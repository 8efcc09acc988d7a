"""`make demo`: the whole phi-1 pipeline, small, on this machine, with nothing downloaded.

1. CodeTextbook (phi-1 §2.1) from real Python code already here (the standard library): clean, deduplicate, rate a
   sample with the offline rubric annotator, learn a random forest on MiniLM embeddings, keep the textbook-like files.
2. A code-safe SentencePiece tokenizer trained on it; webdataset token shards.
3. phi1_tiny pretrained on 2 CPU ranks under the real `deepspeed` launcher (ZeRO-2). The first run is SIGKILLed once
   a checkpoint is committed, as a preemption would; the same command then resumes it to the end.
4. CodeExercises mined offline from that corpus (signature + docstring -> body, kept only when their recorded asserts
   pass in the sandbox), sharded with loss masks; phi-1's fine-tune stage on them from the pretrain checkpoint.
5. HumanEval pass@1 of the result (greedy; near zero for a model this small — reported honestly) and a sample.

Each stage is skipped when its output exists, so a second `make demo` only re-runs what is missing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "demo"
RUN = ROOT / "runs" / "demo"
FT = ROOT / "runs" / "demo-finetune"
PY = sys.executable
BIN = Path(sys.executable).parent
TRAIN_ARGS = ["launch/train.py", "+model=phi1_tiny", "data=demo", "train=demo", f"hydra.run.dir={RUN}"]
timings: list[tuple[str, float]] = []


def stage(name: str, cmd: list[str], done: Path | None = None, **kw) -> None:
    if done is not None and done.exists():
        print(f"== {name}: already done ({done.relative_to(ROOT)})", flush=True)
        return
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, **kw)
    timings.append((name, time.time() - t0))


def train_with_preemption() -> None:
    """Start training, SIGKILL it after the first committed checkpoint, start it again: it resumes."""
    latest = RUN / "checkpoints" / "latest"
    if (RUN / "summary.json").exists():
        print("== pretrain: already done", flush=True)
        return
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", *TRAIN_ARGS]
    if not latest.exists():
        print(f"== pretrain (will be preempted): {' '.join(cmd)}", flush=True)
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
        while proc.poll() is None and not latest.exists():
            time.sleep(1)
        if proc.poll() is None:
            time.sleep(3)  # let it get into the next interval: the kill lands mid-step
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            print(f"== preempted: SIGKILL after checkpoint {latest.read_text().strip()}", flush=True)
        timings.append(("pretrain (until SIGKILL)", time.time() - t0))
    stage("pretrain (same command: resumes)", cmd)


def main() -> None:
    os.environ.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    t_start = time.time()
    corpus, tokenizer = DATA / "codetextbook", DATA / "tokenizer" / "tokenizer.model"
    exercises = DATA / "exercises"
    stage("CodeTextbook (filter real code)", [PY, "-m", "data_tools.codetextbook", "--config-name", "demo"],
          done=DATA / "codetextbook_work" / "summary.json")  # fmt: skip
    stage("tokenizer", [PY, "-m", "data_tools.tokenizer", "--input", str(corpus), "--out", str(tokenizer.parent),
                        "--vocab-size", "8192"], done=tokenizer)  # fmt: skip
    stage("shards", [PY, "-m", "data_tools.shard", "--input", str(corpus), "--tokenizer", str(tokenizer),
                     "--out", str(DATA / "shards"), "--seq-len", "256", "--shard-sequences", "256", "--workers", "2"],
          done=DATA / "shards" / "manifest.json")  # fmt: skip
    train_with_preemption()
    stage("CodeExercises (mined offline, sandbox-validated)",
          [PY, "-m", "data_tools.synth.exercises", "--config-name", "demo", "exercises.source=mine",
           f"exercises.mine.inputs=[{corpus}]", f"exercises.output_dir={exercises}",
           f"exercises.work_dir={DATA / 'exercises_work'}"],
          done=exercises / "mined.jsonl.zst")  # fmt: skip
    stage("exercise shards (loss on completions)",
          [PY, "-m", "data_tools.shard", "--input", str(exercises), "--tokenizer", str(tokenizer),
           "--out", str(DATA / "exercise_shards"), "--seq-len", "256", "--shard-sequences", "16",
           "--val-fraction", "0.1", "--prompt-field", "prompt", "--text-field", "completion", "--workers", "2"],
          done=DATA / "exercise_shards" / "manifest.json")  # fmt: skip
    stage("fine-tune (phi-1 stage 2)",
          [str(BIN / "deepspeed"), "--num_gpus", "2", "launch/train.py", "+model=phi1_tiny", "train=finetune_demo",
           f"data.path={DATA / 'exercise_shards'}", f"train.init_from={RUN / 'checkpoints'}", f"hydra.run.dir={FT}"],
          done=FT / "summary.json")  # fmt: skip
    eval_dir = FT / "eval-humaneval"
    stage("HumanEval pass@1 (greedy)",
          [PY, "launch/evaluate.py", "eval=humaneval", f"eval.checkpoint={FT / 'checkpoints'}",
           "eval.max_new_tokens=128", f"eval.out_dir={eval_dir}"],
          done=eval_dir / "summary.json")  # fmt: skip
    report(t_start, eval_dir)


def report(t_start: float, eval_dir: Path) -> None:
    metrics = [json.loads(line) for line in (RUN / "metrics.jsonl").read_text().splitlines()]
    pre = json.loads((RUN / "summary.json").read_text())
    ft = json.loads((FT / "summary.json").read_text())
    evals = json.loads((eval_dir / "summary.json").read_text())
    print("\n================ phi-train demo ================")
    for name, seconds in timings:
        print(f"{name:<48} {seconds:7.1f} s")
    print(f"{'total (this invocation)':<48} {time.time() - t_start:7.1f} s")
    print(
        f"model: phi1_tiny, {pre['params']:,} parameters | pretrain: {pre['steps']} steps, {pre['tokens_seen']:,} tokens"
    )
    first, last_rec = metrics[0], metrics[-1]
    print(f"pretrain loss: step {first['step']} {first['loss']:.3f} -> step {last_rec['step']} {last_rec['loss']:.3f}")
    last = pre.get("last") or {}
    if "val_loss" in last:
        print(f"held-out CodeTextbook loss {last['val_loss']:.3f} (perplexity {last['val_ppl']:.1f})")
    ft_last = ft.get("last") or {}
    if "val_loss" in ft_last:
        print(f"fine-tune: {ft['steps']} steps; held-out exercise completion loss {ft_last['val_loss']:.3f}")
    p1 = evals["pass@k"].get("pass@1", 0.0)
    print(
        f"HumanEval pass@1 (greedy): {100 * p1:.2f}% on {evals['problems']} problems — a model this small solves ~none"
    )
    if ft.get("sample"):
        print("sample from the fine-tuned model (greedy):\n" + ft["sample_prompt"] + ft["sample"])


if __name__ == "__main__":
    main()
