"""Train phi-1 with DeepSpeed.

    deepspeed launch/train.py +model=phi1                                   # one GPU node
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/train.py +model=phi1_tiny train=demo   # two CPU ranks
    python launch/train.py -m +model=phi1_tiny train=demo train.lr=1e-3,3e-4                 # Hydra multirun

Config precedence: dataclass defaults (phi_train/config.py) <- conf/*.yaml <- these command-line overrides.
"""

import os
import sys
from pathlib import Path


def take_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends `--local_rank=N`; Hydra would read it as an override, so take it off here."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank"):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "0")
            skip = "=" not in arg
            os.environ.setdefault("LOCAL_RANK", value)
            continue
        out.append(arg)
    return out


sys.argv = take_local_rank(sys.argv)

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from phi_train.config import ConfigError, check_override, register_configs  # noqa: E402
from phi_train.data import DataError  # noqa: E402

register_configs()
CONF = Path(__file__).resolve().parent.parent / "conf"


def fail(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


@hydra.main(config_path=str(CONF), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "model"):
        choices = ", ".join(sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
        fail(f"no model chosen: add +model=NAME with NAME one of {choices}")
    try:
        from phi_train.trainer import Trainer

        Trainer(cfg).fit()
    except (ConfigError, DataError) as exc:
        fail(str(exc))


if __name__ == "__main__":
    try:
        for arg in sys.argv[1:]:
            check_override(arg)
    except ConfigError as exc:
        fail(str(exc))
    main()
