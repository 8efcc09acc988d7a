"""Evaluate a checkpoint (or the reference solutions) on HumanEval / MBPP / a custom benchmark.

    python launch/evaluate.py eval=humaneval eval.reference=true          # harness self-check: must be 164/164
    python launch/evaluate.py eval=humaneval eval.checkpoint=runs/phi1/checkpoints
    python launch/evaluate.py eval=mbpp eval.path=data/mbpp.jsonl eval.checkpoint=... eval.n_samples=20 eval.ks=[1,10]
    python launch/evaluate.py eval=unconventional eval.checkpoint=... eval.grader.base_url=https://api.openai.com/v1 \
        eval.grader.model=gpt-4o                                          # teacher-graded rubric score (+ pass@k)

Writes samples.jsonl, summary.json, summary.md and config.json to eval.out_dir (docs/evaluation.md).
"""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from phi_train.benchmarks import BenchmarkError
from phi_train.evaluate import EvalConfigError, register_configs, run
from phi_train.grading import GradingError
from phi_train.sandbox import SandboxError

register_configs()


def to_eval_config(cfg: DictConfig):
    try:
        return OmegaConf.to_object(cfg).eval
    except EvalConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 -- omegaconf's own validation (missing value, wrong type): keep the message, drop the trace
        raise EvalConfigError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


@hydra.main(version_base=None, config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        run(to_eval_config(cfg))
    except (EvalConfigError, BenchmarkError, SandboxError, GradingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
