"""Export a phi_train checkpoint as a transformers PhiForCausalLM directory (safetensors + config + tokenizer).

    python launch/export.py --checkpoint runs/X/checkpoints [--tag global_step000300] --out DIR

The result loads with `transformers.PhiForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`,
and back into PhiModel with `phi_train.generate.load_for_inference(DIR)`.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint directory (uses `latest`) or a tag directory")
    ap.add_argument("--tag", default=None, help="checkpoint tag, e.g. global_step000300 (default: latest)")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)

    from phi_train.checkpoint import load_model_state
    from phi_train.interop import export_hf

    try:
        cfg, state, meta = load_model_state(args.checkpoint, args.tag)
        tok = meta.get("tokenizer")
        tok_path = tok.get("path") if isinstance(tok, dict) else tok
        out = export_hf(state, cfg, tok_path, args.out)
    except ValueError as exc:  # ConfigError / InteropError / TokenizerError: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in state.values())
    print(
        f"exported {cfg.name} ({n:,} parameters) from {args.checkpoint} to {out}"
        + ("" if tok_path else " (no tokenizer recorded)")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
