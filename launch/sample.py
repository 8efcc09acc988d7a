"""Print a completion of a prompt by a phi_train checkpoint or a transformers Phi export.

    python launch/sample.py checkpoint=DIR prompt='"def f(x):"' [max_new_tokens=64 temperature=0 top_p=0.95 stop=[...]]

A prompt with spaces, colons or parentheses is quoted twice: once for the shell, once for Hydra's override grammar.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from omegaconf import MISSING

from phi_train.cli import hydra_command
from phi_train.errors import PhiTrainError

DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class SampleConfig:
    checkpoint: str = MISSING
    """Checkpoint dir (or tag dir), or an exported transformers dir."""
    prompt: str = MISSING
    tag: str | None = None
    """Checkpoint tag (null: latest)."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    """Stop strings."""
    seed: int = 0
    device: str = "auto"
    """auto (cuda when available, else cpu) | cpu | cuda | cuda:N."""
    dtype: str | None = None
    """fp32 | bf16 | fp16; null: bf16 on CUDA, fp32 on CPU."""
    attention: str = "auto"
    """auto | flash | sdpa: the attention kernel (phi_train.generate.load_for_inference)."""

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise PhiTrainError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)} (or null)")


@hydra_command(SampleConfig, "sample")
def main(cfg: SampleConfig) -> None:
    import torch

    from phi_train.generate import generate, load_for_inference

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    name = cfg.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    model, tok = load_for_inference(cfg.checkpoint, device=device, dtype=dtype, tag=cfg.tag, attention=cfg.attention)
    [text] = generate(
        model,
        tok,
        [cfg.prompt],
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        stop=cfg.stop,
        seed=cfg.seed,
    )
    print(cfg.prompt + text)


if __name__ == "__main__":
    sys.exit(main())
