"""Self-describing ZeRO checkpoints and the commit protocol that makes a kill at any moment safe.

Layout of `ckpt_dir` (DeepSpeed writes the tensors, we write the rest):

    ckpt_dir/
      latest                         <- the tag of the newest COMPLETE checkpoint; moved last, atomically
      global_step000300/
        mp_rank_00_model_states.pt   <- DeepSpeed: module weights + our client state (step, stream, RNG, config)
        *_optim_states.pt            <- DeepSpeed: one ZeRO partition of optimizer state per rank
        meta.json                    <- ours: model config (architecture only), step, tokens, world size, tokenizer
        model_fp32.safetensors       <- ours, final checkpoint only: consolidated fp32 weights for inference/export

Protocol: every rank writes its part (DeepSpeed's `save_checkpoint(save_latest=False)`), a barrier, then rank 0 writes
`meta.json`, replaces `latest` with `os.replace` (atomic on POSIX) and only then deletes tags beyond `keep_last`. A run
killed before `latest` moves resumes from the previous complete checkpoint; a half-written tag directory is simply
overwritten when that step is saved again.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, fields
from pathlib import Path

import torch

from phi_train.config import ConfigError, ModelConfig

LATEST = "latest"
META = "meta.json"
FP32 = "model_fp32.safetensors"


def tag_for(step: int) -> str:
    return f"global_step{step:06d}"


def latest_tag(ckpt_dir: str | Path) -> str | None:
    path = Path(ckpt_dir) / LATEST
    if not path.exists():
        return None
    tag = path.read_text().strip()
    if not (Path(ckpt_dir) / tag / META).exists():
        raise ConfigError(f"{path} names checkpoint {tag!r} but {Path(ckpt_dir) / tag / META} is missing")
    return tag


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit(ckpt_dir: str | Path, tag: str, meta: dict, keep_last: int) -> None:
    """Rank 0, after every rank finished writing `tag`: describe it, point `latest` at it, prune old ones."""
    ckpt_dir = Path(ckpt_dir)
    write_atomic(ckpt_dir / tag / META, json.dumps(meta, indent=2, sort_keys=True))
    write_atomic(ckpt_dir / LATEST, tag)
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("global_step"))
    for old in tags[: max(0, len(tags) - keep_last)]:
        if old != tag:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def make_meta(model_cfg: ModelConfig, vocab_size: int, *, step: int, world_size: int, tokenizer: dict, **extra) -> dict:
    """meta.json of a checkpoint: what inference, export, init_from and resume read back (one shape for both
    writers, the trainer and save_inference)."""
    return {
        "format": 1,
        "step": step,
        "world_size": world_size,
        "model": asdict(model_cfg),
        "vocab_size": vocab_size,
        "tokenizer": tokenizer,
        **extra,
    }


def read_meta(ckpt_dir: str | Path, tag: str) -> dict:
    return json.loads((Path(ckpt_dir) / tag / META).read_text())


# kernel choices that older checkpoints recorded among the architecture (now `kernels.*`, a choice of each run)
_RUNTIME_KEYS = ("attention", "cpu_matmul")


def model_config_from_meta(saved: dict, where: str) -> ModelConfig:
    """The ModelConfig a checkpoint's meta describes; the kernel choices older checkpoints carry are dropped."""
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(saved) - known - set(_RUNTIME_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: meta.json model keys {', '.join(unknown)} are not model settings of this phi_train"
            f" (known: {', '.join(sorted(known))})"
        )
    return ModelConfig(**{k: v for k, v in saved.items() if k in known})


def check_compatible(meta: dict, model_cfg: ModelConfig, vocab_size: int, world_size: int, where: str) -> None:
    """Fail with one line before DeepSpeed fails with forty: the checkpoint must fit this run's model and world."""
    saved = meta["model"]
    ours = asdict(model_cfg)
    shape_keys = ("n_layer", "d_model", "n_head", "d_mlp", "rotary_dim", "fused_block")
    defaults = {f.name: f.default for f in fields(ModelConfig)}  # for keys that older checkpoints lack
    diffs = [
        f"model.{k}={saved.get(k, defaults[k])} (checkpoint) vs {ours[k]} (this run)"
        for k in shape_keys
        if saved.get(k, defaults[k]) != ours[k]
    ]
    if meta["vocab_size"] != vocab_size:
        diffs.append(f"vocab_size={meta['vocab_size']} (checkpoint) vs {vocab_size} (this run)")
    if diffs:
        raise ConfigError(f"cannot resume from {where}: {'; '.join(diffs)} — use another run_dir or train.resume=false")
    if meta["world_size"] != world_size:
        raise ConfigError(
            f"cannot resume from {where}: written by {meta['world_size']} ranks, this run has {world_size}; exact resume "
            "needs the same world size (docs/data.md), or start fresh with train.init_from=<that checkpoint>"
        )


def resolve(path: str | Path, tag: str | None = None) -> tuple[Path, str]:
    """Accept a checkpoint dir (uses `latest`), a dir + tag, or a tag directory itself."""
    path = Path(path)
    if tag is None and (path / META).exists():
        return path.parent, path.name
    if not path.is_dir():
        raise ConfigError(f"checkpoint directory {path} does not exist")
    tag = tag or latest_tag(path)
    if tag is None:
        raise ConfigError(
            f"{path} holds no complete checkpoint (no '{LATEST}' file); pass a tag directory or another path"
        )
    if not (path / tag).is_dir():
        raise ConfigError(f"checkpoint tag {tag!r} not found in {path}")
    return path, tag


def load_model_state(ckpt_dir: str | Path, tag: str | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """Model config, fp32 weights and meta of a checkpoint, on CPU, without a distributed environment."""
    ckpt_dir, tag = resolve(ckpt_dir, tag)
    meta = read_meta(ckpt_dir, tag)
    model_cfg = model_config_from_meta(meta["model"], str(ckpt_dir / tag / META))
    fp32 = ckpt_dir / tag / FP32
    if fp32.exists():
        from safetensors.torch import load_file

        state = load_file(fp32)
    else:  # consolidate the ZeRO partitions (the fp32 master weights) ourselves
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    state = {k: v.float().contiguous() for k, v in state.items()}
    tok = meta.get("tokenizer", {}).get("path")
    if tok and not Path(tok).is_absolute():
        meta["tokenizer"]["path"] = str((ckpt_dir / tag / tok).resolve())
    return model_cfg, state, meta


def save_fp32(ckpt_dir: str | Path, tag: str) -> Path:
    """Consolidated fp32 weights next to the ZeRO files, for inference and export without DeepSpeed."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    out = Path(ckpt_dir) / tag / FP32
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.float().contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, out)
    return out


def save_inference(ckpt_dir: str | Path, model: torch.nn.Module, tokenizer_path: str | Path, step: int = 0) -> Path:
    """A checkpoint without DeepSpeed state, as the trainer's final one looks to inference: meta.json + consolidated
    fp32 weights, committed the same way. For models that never went through the engine (an imported transformers
    Phi, a hand-built model in a test) so that generate/serve/evaluate/export/init_from take them like any other."""
    from safetensors.torch import save_file

    ckpt_dir, tag = Path(ckpt_dir), tag_for(step)
    (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()}, str(ckpt_dir / tag / FP32))
    tokenizer = {"path": str(Path(tokenizer_path).resolve())}
    meta = make_meta(model.cfg, model.vocab_size, step=step, world_size=1, tokenizer=tokenizer)
    commit(ckpt_dir, tag, meta, keep_last=1)
    return ckpt_dir
