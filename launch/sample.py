"""Print a completion of a prompt by a phi_train checkpoint or a transformers Phi export.

python launch/sample.py --checkpoint DIR --prompt "def f(x):" [--max-new-tokens 64 --temperature 0 --top-p 0.95]
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint dir (or tag dir), or an exported transformers dir")
    ap.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto (cuda when available, else cpu) | cpu | cuda | cuda:N")
    ap.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    args = ap.parse_args(argv)

    import torch

    from phi_train.generate import generate, load_for_inference

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    name = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    try:
        model, tok = load_for_inference(args.checkpoint, device=device, dtype=dtype, tag=args.tag)
        [text] = generate(
            model,
            tok,
            [args.prompt],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            stop=args.stop,
            seed=args.seed,
        )
    except ValueError as exc:  # ConfigError / GenerateError / InteropError / TokenizerError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
