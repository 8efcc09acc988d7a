"""Evaluate a checkpoint (or the reference solutions) on HumanEval / MBPP / a custom benchmark.

    python launch/evaluate.py eval=humaneval eval.reference=true          # harness self-check: must be 164/164
    python launch/evaluate.py eval=humaneval eval.checkpoint=runs/phi1/checkpoints
    python launch/evaluate.py eval=mbpp eval.path=data/mbpp.jsonl eval.checkpoint=... eval.n_samples=20 eval.ks=[1,10]
    python launch/evaluate.py eval=humaneval eval.samples=vllm_samples.jsonl     # score anyone's {task_id, completion}
    python launch/evaluate.py eval=unconventional eval.checkpoint=... eval.grader.base_url=https://api.openai.com/v1 \
        eval.grader.model=gpt-4o                                          # teacher-graded rubric score (+ pass@k)

Writes samples.jsonl (as results arrive), summary.json, summary.md and config.json to eval.out_dir; killed midway,
the same command resumes (docs/evaluation.md).
"""

import sys

from phi_train.cli import hydra_command
from phi_train.errors import CONF_ROOT
from phi_train.evaluate import EvaluateConfig, register_configs, run

register_configs()


@hydra_command(EvaluateConfig, "evaluate", CONF_ROOT, schema_name="evaluate_schema")
def main(cfg: EvaluateConfig) -> None:
    run(cfg.eval)


if __name__ == "__main__":
    sys.exit(main())
