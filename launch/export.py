"""Export a phi_train checkpoint as a transformers PhiForCausalLM directory (safetensors + config + tokenizer).

    python launch/export.py checkpoint=runs/X/checkpoints [tag=global_step000300] out=DIR

The result loads with `transformers.PhiForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`,
and back into PhiModel with `phi_train.generate.load_for_inference(DIR)`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from omegaconf import MISSING

from phi_train.cli import hydra_command


@dataclass
class ExportConfig:
    checkpoint: str = MISSING
    """Checkpoint directory (uses `latest`) or a tag directory."""
    out: str = MISSING
    """Output directory."""
    tag: str | None = None
    """Checkpoint tag, e.g. global_step000300 (null: latest)."""


@hydra_command(ExportConfig, "export")
def main(cfg: ExportConfig) -> None:
    from phi_train.checkpoint import load_model_state
    from phi_train.interop import export_hf

    model_cfg, state, meta = load_model_state(cfg.checkpoint, cfg.tag)
    tok = meta.get("tokenizer")
    tok_path = tok.get("path") if isinstance(tok, dict) else tok
    out = export_hf(state, model_cfg, tok_path, cfg.out)
    n = sum(t.numel() for t in state.values())
    print(
        f"exported {model_cfg.name} ({n:,} parameters) from {cfg.checkpoint} to {out}"
        + ("" if tok_path else " (no tokenizer recorded)")
    )


if __name__ == "__main__":
    sys.exit(main())
