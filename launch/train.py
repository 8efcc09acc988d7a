"""Train phi-1 with DeepSpeed.

    deepspeed launch/train.py +model=phi1                                   # one GPU node
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/train.py +model=phi1_tiny train=demo   # two CPU ranks
    python launch/train.py -m +model=phi1_tiny train=demo train.lr=1e-3,3e-4                 # Hydra multirun

Config precedence: dataclass defaults (phi_train/config.py) <- conf/*.yaml <- these command-line overrides.
"""

import os
import sys


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

from omegaconf import DictConfig, OmegaConf  # noqa: E402

from phi_train.cli import hydra_command  # noqa: E402
from phi_train.config import Config, ConfigError, check_override, register_configs  # noqa: E402
from phi_train.errors import CONF_ROOT, report  # noqa: E402

register_configs()


def model_chosen(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "model"):
        choices = ", ".join(sorted(p.stem for p in (CONF_ROOT / "model").glob("*.yaml")))
        raise ConfigError(f"no model chosen: add +model=NAME with NAME one of {choices}")


# typed=False: the trainer takes the DictConfig, to save it resolved next to the run; outputs: the run directories
@hydra_command(Config, "config", CONF_ROOT, schema_name="config_schema", typed=False, outputs=True, check=model_chosen)
def main(cfg: DictConfig) -> None:
    from phi_train.trainer import Trainer

    Trainer(cfg).fit()


if __name__ == "__main__":
    try:
        for arg in sys.argv[1:]:
            check_override(arg)  # keys that moved (model.attention -> kernels.attention) get pointed at the new one
    except ConfigError as exc:
        sys.exit(report(exc))
    sys.exit(main())
