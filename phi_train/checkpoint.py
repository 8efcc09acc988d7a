"""Self-describing ZeRO checkpoints and the commit protocol that makes a kill at any moment safe.

Layout of `ckpt_dir` (DeepSpeed writes the tensors, we write the rest):

    ckpt_dir/
      latest                         <- the tag of the newest COMPLETE checkpoint; moved last, atomically
      global_step000300/
        mp_rank_00_model_states.pt   <- DeepSpeed: module weights + our client state (step, stream, RNG, config)
        *_optim_states.pt            <- DeepSpeed: one ZeRO partition of optimizer state per rank
        meta.json                    <- ours: model config (architecture only), step, tokens, world size, tokenizer,
                                        and `files`: the sha256 and size of every other file of the tag
        model_fp32.safetensors       <- ours, final checkpoint only: consolidated fp32 weights for inference/export

Protocol: every rank writes its part (DeepSpeed's `save_checkpoint(save_latest=False)`), a barrier, then rank 0 writes
`meta.json`, replaces `latest` with `os.replace` (atomic on POSIX) and only then deletes tags beyond `keep_last`. A run
killed before `latest` moves resumes from the previous complete checkpoint; a half-written tag directory is removed
and written again when that step is saved again.

Proof before load: `newest_usable` checks a tag's `meta.json` and every file it lists (size, then sha256) before any
byte of it is loaded, newest first. A bit-flipped optimizer file, a truncated model file or an empty `meta.json` is
named in one line and the previous complete checkpoint is used instead — which is why `train.keep_last` is at least 2.
DeepSpeed itself checks nothing: a flipped bit loads silently and the run diverges (or fills with NaN) steps later.
Checkpoints written before `files` existed are loaded unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch

from phi_train.config import ConfigError, ModelConfig

LATEST = "latest"
META = "meta.json"
FP32 = "model_fp32.safetensors"


def tag_for(step: int) -> str:
    return f"global_step{step:06d}"


def step_of(tag: str) -> int:
    return int(tag.removeprefix("global_step")) if tag.removeprefix("global_step").isdigit() else -1


def tags(ckpt_dir: str | Path) -> list[str]:
    """Tag directories of `ckpt_dir`, newest first (complete or not)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and step_of(p.name) >= 0]
    return sorted(found, key=step_of, reverse=True)


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """What `latest` names (None without one); whether that tag is intact is `verify`'s question."""
    path = Path(ckpt_dir) / LATEST
    try:
        return path.read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(tag_dir: Path) -> dict[str, dict]:
    """{relative path: {bytes, sha256}} of every file of a tag but meta.json (and our own temporary files)."""
    out = {}
    for p in sorted(tag_dir.rglob("*")):
        rel = p.relative_to(tag_dir).as_posix()
        if p.is_file() and rel != META and not p.name.startswith("."):
            out[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return out


def verify(ckpt_dir: str | Path, tag: str) -> str | None:
    """Why checkpoint `tag` cannot be loaded (one line), or None when meta.json and every file it lists are intact."""
    tag_dir = Path(ckpt_dir) / tag
    if not (tag_dir / META).is_file():
        return f"{tag_dir / META} is missing (the save did not finish)"
    try:
        meta = json.loads((tag_dir / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return (
            f"{tag_dir / META} is not valid JSON ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        )
    missing = [
        k
        for k in ("format", "step", "model", "vocab_size", "world_size")
        if not isinstance(meta, dict) or k not in meta
    ]
    if missing:
        return f"{tag_dir / META} lacks {', '.join(missing)}"
    files = meta.get("files")
    if files is None:
        return None  # written before checksums existed
    for name, want in sorted(files.items()):
        path = tag_dir / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path} has {size} bytes, meta.json says {want['bytes']} (truncated or replaced)"
        got = sha256_file(path)
        if got != want["sha256"]:
            return f"{path} has sha256 {got[:12]}..., meta.json says {want['sha256'][:12]}... (corrupted)"
    return None


def newest_usable(ckpt_dir: str | Path, warn=None) -> str | None:
    """The newest checkpoint of `ckpt_dir` that verifies, or None when there is none to resume (no `latest` and no
    committed tag: a fresh run, or one killed during its first save). Each rejected newer one is reported through
    `warn` in one line; when checkpoints exist but none verifies, a one-line ConfigError."""
    ckpt_dir = Path(ckpt_dir)
    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    named = latest_tag(ckpt_dir)
    candidates = tags(ckpt_dir)
    if named and named not in candidates:
        candidates.insert(0, named)
    problems = []
    for tag in candidates:
        if not (ckpt_dir / tag / META).exists() and tag != named:
            continue  # never committed: not a checkpoint, not a problem
        problem = (
            verify(ckpt_dir, tag)
            if (ckpt_dir / tag).is_dir()
            else f"{ckpt_dir / LATEST} names {tag!r}, which is missing"
        )
        if problem is None:
            for line in problems:
                warn(f"warning: checkpoint unusable: {line}; resuming from {tag} instead")
            return tag
        problems.append(problem)
    if problems:
        raise ConfigError(
            f"no usable checkpoint in {ckpt_dir}: {'; '.join(problems)} — restore the files, or start fresh with "
            "train.resume=false (or another run_dir)"
        )
    return None


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit(ckpt_dir: str | Path, tag: str, meta: dict, keep_last: int) -> None:
    """Rank 0, after every rank finished writing `tag`: describe it (with every file's checksum), point `latest` at
    it, prune old ones."""
    ckpt_dir = Path(ckpt_dir)
    meta = {**meta, "files": file_digests(ckpt_dir / tag)}
    write_atomic(ckpt_dir / tag / META, json.dumps(meta, indent=2, sort_keys=True))
    write_atomic(ckpt_dir / LATEST, tag)
    for old in tags(ckpt_dir)[keep_last:]:
        if old != tag:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def add_file(ckpt_dir: str | Path, tag: str, name: str) -> None:
    """Record a file added to a committed tag (the final fp32 weights) in its meta.json checksums."""
    tag_dir = Path(ckpt_dir) / tag
    meta = json.loads((tag_dir / META).read_text())
    if "files" in meta:
        meta["files"][name] = {"bytes": (tag_dir / name).stat().st_size, "sha256": sha256_file(tag_dir / name)}
        write_atomic(tag_dir / META, json.dumps(meta, indent=2, sort_keys=True))


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
    path = Path(ckpt_dir) / tag / META
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read as JSON ({type(exc).__name__}); pass another checkpoint") from None
    if not isinstance(meta, dict) or "model" not in meta:
        raise ConfigError(f"{path} is not a checkpoint description (no 'model'); pass another checkpoint")
    return meta


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
    """Fail with one line before DeepSpeed fails with forty: the checkpoint must fit this run's model."""
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
    # another world size is fine: the trainer reshards the ZeRO state (DeepSpeed's universal checkpoint) on load


def resolve(path: str | Path, tag: str | None = None) -> tuple[Path, str]:
    """Accept a checkpoint dir (uses `latest`), a dir + tag, or a tag directory itself."""
    path = Path(path)
    if tag is None and (path / META).exists():
        return path.parent, path.name
    if not path.is_dir():
        raise ConfigError(f"checkpoint directory {path} does not exist")
    tag = tag or newest_usable(path)
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
    problem = verify(ckpt_dir, tag)
    if problem:
        raise ConfigError(f"checkpoint {ckpt_dir / tag} is unusable: {problem}")
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
    add_file(ckpt_dir, tag, FP32)
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
