"""The retrain-on-pruned experiment of phi-1 §5 (Table 3): for each tau, prune -> shard -> fine-tune -> evaluate.

    python launch/prune_sweep.py --tokenizer data/demo/shards/tokenizer.model --init-from runs/base/checkpoints \\
        --model phi1_tiny [--taus 0.95 0.9 0.85 0.8] [--decontaminated data/demo/decontaminate] [--dry-run]

phi-1 retrained on CodeExercises pruned at each tau and found HumanEval pass@1 stayed well above StarCoder's, i.e.
the gain was not from contamination. This script runs the same loop with our commands as subprocesses:
  python -m data_tools.decontaminate            (once, if `--decontaminated` has no pruned_tau*.jsonl.zst yet)
  python -m data_tools.shard                    (the pruned set of this tau -> token shards)
  deepspeed launch/train.py train=finetune ...  (fine-tune from `--init-from` on those shards)
  python launch/evaluate.py eval=humaneval ...  (greedy pass@1)
It is resumable: a tau with `<work-dir>/tau<tau>/result.json` is skipped, and within a tau every step whose output
exists (manifest.json, checkpoints/latest, summary.json) is skipped. `--dry-run` prints the commands only.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tau_file(decon: Path, tau: str) -> Path:
    return decon / f"pruned_tau{float(tau):g}.jsonl.zst"


def steps(args: argparse.Namespace, tau: str) -> list[tuple[str, list[str], Path]]:
    """(name, command, the output whose existence means the step is done) for one tau, in order."""
    d = Path(args.work_dir) / f"tau{float(tau):g}"
    shards, run, ev = d / "shards", d / "run", d / "eval"
    py = sys.executable
    shard = [py, "-m", "data_tools.shard", "--input", str(tau_file(Path(args.decontaminated), tau))]
    shard += ["--tokenizer", args.tokenizer, "--out", str(shards), "--seq-len", str(args.seq_len)]
    shard += ["--shard-sequences", str(args.shard_sequences)]
    if args.prompt_field:  # exercises: loss on the completion only, as phi-1's fine-tune stage
        shard += ["--prompt-field", args.prompt_field, "--text-field", args.text_field]
    train = [*shlex.split(args.launcher), "launch/train.py", f"+model={args.model}", "train=finetune"]
    train += [f"train.init_from={args.init_from}", f"data.path={shards}", f"run_dir={run}", *args.train_override]
    evaluate = [py, "launch/evaluate.py", f"eval={args.benchmark}", f"eval.checkpoint={run / 'checkpoints'}"]
    evaluate += [f"eval.out_dir={ev}", *args.eval_override]
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
        raise SystemExit(
            f"error: {cmd[0]!r} not found (activate the venv or pass --launcher with a full path)"
        ) from None
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"error: step failed with exit {exc.returncode}: {shlex.join(cmd)}") from None


def results_table(args: argparse.Namespace) -> str:
    stats_path = Path(args.decontaminated) / "stats.json"
    prune = json.loads(stats_path.read_text())["prune"] if stats_path.is_file() else {}
    rows = ["| tau | items removed | items kept | pass@1 |", "|---|---|---|---|"]
    for tau in args.taus:
        key = f"{float(tau):g}"
        res = Path(args.work_dir) / f"tau{key}" / "result.json"
        p = prune.get(key, {})
        score = f"{100 * json.loads(res.read_text())['pass@1']:.2f}%" if res.is_file() else "pending"
        rows.append(f"| {key} | {p.get('removed', '?')} | {p.get('kept', '?')} | {score} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--taus", nargs="+", default=["0.95", "0.9", "0.85", "0.8"])
    ap.add_argument(
        "--decontaminated", default="data/demo/decontaminate", help="output_dir of data_tools.decontaminate"
    )
    ap.add_argument("--config-name", default="demo", help="decontaminate config, used when the pruned sets are missing")
    ap.add_argument("--decon-override", action="append", default=[], help="key=value for data_tools.decontaminate")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.model the shards are cut with")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--shard-sequences", type=int, default=64, help="sequences per shard (>= one shard per reader)")
    ap.add_argument("--prompt-field", default="prompt", help="exercise prompt field; empty string = plain documents")
    ap.add_argument("--text-field", default="completion", help="the completion field (or the document field)")
    ap.add_argument("--model", default="phi1_tiny", help="conf/model/<name>.yaml")
    ap.add_argument("--init-from", required=True, help="the pretrained (phi-1-base) checkpoint directory")
    ap.add_argument("--benchmark", default="humaneval", help="conf/eval/<name>.yaml")
    ap.add_argument("--work-dir", default="runs/prune_sweep")
    ap.add_argument("--launcher", default="deepspeed", help='e.g. "deepspeed --num_gpus 8" or "python"')
    ap.add_argument("--train-override", action="append", default=[], help="extra Hydra override for launch/train.py")
    ap.add_argument("--eval-override", action="append", default=[], help="extra override for launch/evaluate.py")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    try:
        bad = [t for t in args.taus if not 0 < float(t) <= 1]
    except ValueError:
        bad = args.taus
    if bad:
        print(f"error: --taus {bad[0]!r} is not a number in (0, 1]", file=sys.stderr)
        return 2

    decon = Path(args.decontaminated)
    if not all(tau_file(decon, t).is_file() for t in args.taus):
        cmd = [sys.executable, "-m", "data_tools.decontaminate", "--config-name", args.config_name]
        cmd += [f"output_dir={decon}", f"prune.taus=[{','.join(args.taus)}]", *args.decon_override]
        execute(cmd, args.dry_run)
    try:
        for tau in args.taus:
            result = Path(args.work_dir) / f"tau{float(tau):g}" / "result.json"
            if result.is_file():
                print(f"skip tau={float(tau):g}: {result} exists", flush=True)
                continue
            for name, cmd, done in steps(args, tau):
                if done.exists():
                    print(f"skip {name} for tau={float(tau):g}: {done} exists", flush=True)
                    continue
                execute(cmd, args.dry_run)
            if not args.dry_run:
                summary = json.loads((Path(args.work_dir) / f"tau{float(tau):g}" / "eval" / "summary.json").read_text())
                record = {"tau": float(tau), "pass@1": summary["pass@k"]["pass@1"], "summary": summary}
                result.write_text(json.dumps(record, indent=2) + "\n")
    except subprocess.CalledProcessError as e:
        print(f"error: command failed with exit {e.returncode}: {shlex.join(e.cmd)}", file=sys.stderr)
        print(results_table(args))
        return 1
    print(results_table(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
