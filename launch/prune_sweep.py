"""The retrain-on-pruned experiment of phi-1 §5 (Table 3): for each tau, prune -> shard -> fine-tune -> evaluate.

    python launch/prune_sweep.py tokenizer=data/demo/shards/tokenizer.model init_from=runs/base/checkpoints \\
        model=phi1_tiny [taus=[0.95,0.9,0.85,0.8]] [decontaminated=data/demo/decontaminate] [dry_run=true]

phi-1 retrained on CodeExercises pruned at each tau and found HumanEval pass@1 stayed well above StarCoder's, i.e.
the gain was not from contamination. This script runs the same loop with our commands as subprocesses:
  python -m data_tools.decontaminate            (once, if `decontaminated` has no pruned_tau*.jsonl.zst yet)
  python -m data_tools.shard                    (the pruned set of this tau -> token shards)
  deepspeed launch/train.py train=finetune ...  (fine-tune from `init_from` on those shards)
  python launch/evaluate.py eval=humaneval ...  (greedy pass@1)
It is resumable: a tau with `<work-dir>/tau<tau>/result.json` is skipped, and within a tau every step whose output
exists (manifest.json, checkpoints/latest, summary.json) is skipped. `dry_run=true` prints the commands only.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from phi_train.cli import hydra_command
from phi_train.errors import PhiTrainError

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class PruneSweepConfig:
    """`launch/prune_sweep.py` (defaults <- `key=value` overrides)."""

    tokenizer: str = MISSING
    """tokenizer.model the shards are cut with."""
    init_from: str = MISSING
    """The pretrained (phi-1-base) checkpoint directory."""
    taus: list[float] = field(default_factory=lambda: [0.95, 0.9, 0.85, 0.8])
    decontaminated: str = "data/demo/decontaminate"
    """output_dir of data_tools.decontaminate."""
    decon_config: str = "demo"
    """conf/decontaminate/<name>.yaml, used when the pruned sets are missing."""
    decon_overrides: list[str] = field(default_factory=list)
    """Extra key=value overrides for data_tools.decontaminate."""
    seq_len: int = 256
    shard_sequences: int = 64
    """Sequences per shard (>= one shard per reader)."""
    prompt_field: str | None = "prompt"
    """Exercise prompt field; null = plain documents."""
    text_field: str = "completion"
    """The completion field (or the document field)."""
    model: str = "phi1_tiny"
    """conf/model/<name>.yaml."""
    benchmark: str = "humaneval"
    """conf/eval/<name>.yaml."""
    work_dir: str = "runs/prune_sweep"
    launcher: str = "deepspeed"
    """e.g. "deepspeed --num_gpus 8" or "python"."""
    train_overrides: list[str] = field(default_factory=list)
    """Extra Hydra overrides for launch/train.py."""
    eval_overrides: list[str] = field(default_factory=list)
    """Extra overrides for launch/evaluate.py."""
    dry_run: bool = False
    """Print the commands, run nothing."""

    def __post_init__(self) -> None:
        bad = [t for t in self.taus if not 0 < t <= 1]
        if bad or not self.taus:
            raise PhiTrainError(f"taus: {bad[0] if bad else '(empty)'} is not a number in (0, 1]")


def tau_file(decon: Path, tau: float) -> Path:
    return decon / f"pruned_tau{tau:g}.jsonl.zst"


def steps(args: PruneSweepConfig, tau: float) -> list[tuple[str, list[str], Path]]:
    """(name, command, the output whose existence means the step is done) for one tau, in order."""
    d = Path(args.work_dir) / f"tau{tau:g}"
    shards, run, ev = d / "shards", d / "run", d / "eval"
    py = sys.executable
    shard = [py, "-m", "data_tools.shard", f"input=[{tau_file(Path(args.decontaminated), tau)}]"]
    shard += [f"tokenizer={args.tokenizer}", f"out={shards}", f"seq_len={args.seq_len}"]
    shard += [f"shard_sequences={args.shard_sequences}"]
    if args.prompt_field:  # exercises: loss on the completion only, as phi-1's fine-tune stage
        shard += [f"prompt_field={args.prompt_field}", f"text_field={args.text_field}"]
    train = [*shlex.split(args.launcher), "launch/train.py", f"+model={args.model}", "train=finetune"]
    train += [f"train.init_from={args.init_from}", f"data.path={shards}", f"run_dir={run}", *args.train_overrides]
    evaluate = [py, "launch/evaluate.py", f"eval={args.benchmark}", f"eval.checkpoint={run / 'checkpoints'}"]
    evaluate += [f"eval.out_dir={ev}", *args.eval_overrides]
    return [
        ("shard", shard, shards / "manifest.json"),
        ("finetune", train, run / "checkpoints" / "latest"),
        ("evaluate", evaluate, ev / "summary.json"),
    ]


def execute(cmd: list[str], dry_run: bool) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    if dry_run:
        return
    try:
        subprocess.run(cmd, cwd=ROOT, check=True)
    except FileNotFoundError:
        raise SystemExit(f"error: {cmd[0]!r} not found (activate the venv or give launcher= a full path)") from None
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"error: step failed with exit {exc.returncode}: {shlex.join(cmd)}") from None


def results_table(args: PruneSweepConfig) -> str:
    stats_path = Path(args.decontaminated) / "stats.json"
    prune = json.loads(stats_path.read_text())["prune"] if stats_path.is_file() else {}
    rows = ["| tau | items removed | items kept | pass@1 |", "|---|---|---|---|"]
    for tau in args.taus:
        key = f"{tau:g}"
        res = Path(args.work_dir) / f"tau{key}" / "result.json"
        p = prune.get(key, {})
        score = f"{100 * json.loads(res.read_text())['pass@1']:.2f}%" if res.is_file() else "pending"
        rows.append(f"| {key} | {p.get('removed', '?')} | {p.get('kept', '?')} | {score} |")
    return "\n".join(rows)


@hydra_command(PruneSweepConfig, "prune_sweep")
def main(args: PruneSweepConfig) -> int:
    decon = Path(args.decontaminated)
    if not all(tau_file(decon, t).is_file() for t in args.taus):
        cmd = [sys.executable, "-m", "data_tools.decontaminate", "--config-name", args.decon_config]
        cmd += [f"output_dir={decon}", f"prune.taus=[{','.join(f'{t:g}' for t in args.taus)}]", *args.decon_overrides]
        execute(cmd, args.dry_run)
    try:
        for tau in args.taus:
            result = Path(args.work_dir) / f"tau{tau:g}" / "result.json"
            if result.is_file():
                print(f"skip tau={tau:g}: {result} exists", flush=True)
                continue
            for name, cmd, done in steps(args, tau):
                if done.exists():
                    print(f"skip {name} for tau={tau:g}: {done} exists", flush=True)
                    continue
                execute(cmd, args.dry_run)
            if not args.dry_run:
                summary = json.loads((Path(args.work_dir) / f"tau{tau:g}" / "eval" / "summary.json").read_text())
                record = {"tau": tau, "pass@1": summary["pass@k"]["pass@1"], "summary": summary}
                result.write_text(json.dumps(record, indent=2) + "\n")
    except subprocess.CalledProcessError as e:
        print(f"error: command failed with exit {e.returncode}: {shlex.join(e.cmd)}", file=sys.stderr)
        print(results_table(args))
        return 1
    print(results_table(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
