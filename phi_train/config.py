"""Typed configuration for every phi-train job.

Precedence, lowest to highest: the dataclass defaults below <- the YAML files in `conf/` (groups `model`, `data`,
`train`, `deepspeed`, `logging`) <- command-line overrides (`train.lr=3e-4`). The dataclasses are registered in
Hydra's ConfigStore, so a key that is not declared here, or a value of the wrong type, fails when the job starts;
semantic checks (heads dividing d_model, positive learning rate, ...) live in `__post_init__` and run when the
resolved config is turned into objects by `to_object`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from phi_train.errors import CONF_ROOT, PhiTrainError, require


class ConfigError(PhiTrainError):
    """A user mistake in the configuration; the entry points print it on one line and exit 2."""


_require = functools.partial(require, error=ConfigError)


@dataclass
class ModelConfig:
    """Architecture only: the model never sees training or data settings."""

    name: str = "custom"
    """Preset name, recorded in checkpoints and exports."""
    n_layer: int = MISSING
    d_model: int = MISSING
    n_head: int = MISSING
    d_mlp: int = MISSING
    """Hidden width of the MLP (phi-1: 4 * d_model)."""
    vocab_size: int | None = None
    """Embedding rows. None: the tokenizer's size, padded up to a multiple of 64 (tensor-core friendly)."""
    max_seq_len: int = 2048
    rotary_dim: int = 32
    """Rotary embeddings act on the first `rotary_dim` dims of each head (phi-1: 32 of 64); the rest carry no position."""
    rotary_base: float = 10000.0
    ln_eps: float = 1e-5
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    """phi-1 pretraining used 0.1 for both (§2.3)."""
    init_std: float = 0.02
    fused_block: bool = False
    """PaLM's fused parallel block: QKV and fc1 in one GEMM, attention's output projection and fc2 in another."""

    def __post_init__(self) -> None:
        for key in ("n_layer", "d_model", "n_head", "d_mlp", "max_seq_len"):
            _require(getattr(self, key) > 0, f"model.{key}={getattr(self, key)} must be a positive integer")
        _require(
            self.d_model % self.n_head == 0,
            f"model.n_head={self.n_head} does not divide model.d_model={self.d_model} (choose n_head so that d_model % n_head == 0)",
        )
        head_dim = self.d_model // self.n_head
        _require(
            0 < self.rotary_dim <= head_dim and self.rotary_dim % 2 == 0,
            f"model.rotary_dim={self.rotary_dim} must be even and in 2..head_dim={head_dim}",
        )
        _require(
            self.vocab_size is None or self.vocab_size > 0,
            f"model.vocab_size={self.vocab_size} must be positive or null",
        )
        for key in ("attn_dropout", "resid_dropout"):
            _require(0.0 <= getattr(self, key) < 1.0, f"model.{key}={getattr(self, key)} must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


# keys that were model settings before they became kernel choices: old command lines get pointed at the new key
MOVED_KEYS = {"model.attention": "kernels.attention", "model.cpu_matmul": "kernels.cpu_matmul"}


@dataclass
class KernelConfig:
    """Which kernels compute the model (phi_train/ops.py): a choice of this run and machine, not architecture, so
    checkpoints do not record it and a run may resume or load with other choices (same function, other rounding)."""

    attention: str = "auto"
    """auto | flash | sdpa. auto: flash-attn's kernel when installed and on an Ampere-or-newer GPU, else torch SDPA."""
    cpu_matmul: str = "onednn"
    """onednn | blas: which library runs the linear layers' fp32 GEMMs on CPU. torch's default (blas = MKL) takes an
    AVX2 path on AMD CPUs; oneDNN uses AVX-512 wherever the CPU has it. GPU and bf16 autocast are unaffected."""

    def __post_init__(self) -> None:
        _require(
            self.attention in ("auto", "flash", "sdpa"),
            f"kernels.attention={self.attention!r} is not one of auto, flash, sdpa",
        )
        _require(
            self.cpu_matmul in ("onednn", "blas"),
            f"kernels.cpu_matmul={self.cpu_matmul!r} is not one of onednn, blas",
        )


@dataclass
class SourceConfig:
    """One shard set of a weighted training mixture."""

    path: str = MISSING
    """Directory or URL prefix of the shard set (as data.path)."""
    weight: float = 1.0
    """Relative share of the training sequences drawn from it (normalised over the sources; > 0)."""


@dataclass
class DataConfig:
    """Where the token shards are and how they stream."""

    path: str = "data/demo/shards"
    """Directory (or URL prefix webdataset accepts) holding `manifest.json` and the `train-*.tar` / `val-*.tar` shards."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A weighted mixture of shard sets for training, `[{path: A, weight: 0.8}, {path: B, weight: 0.2}]`: each chunk of
    a global batch comes from a source drawn by weight (docs/data.md). Empty: `path` alone. The sources must share one
    tokenizer and seq_len; validation and the tokenizer come from the first."""
    seq_len: int | None = None
    """Tokens per training sequence. None: the shards' own `seq_len` (manifest)."""
    num_workers: int = 1
    """Dataloader worker processes per rank. They only host readers: the data a step sees does not depend on them."""
    readers: int | None = None
    """Virtual readers of the training stream, each streaming its share of the shards (docs/data.md); it must divide
    train.global_batch_size. None: the largest divisor of the global batch <= min(16, train shards). Fixed by the
    data and recipe, never by the world size: what a step sees is the same on any number of ranks and workers."""
    shuffle_buffer: int = 1000
    """Sequences held in the sample-level shuffle buffer of each reader."""
    seed: int = 1234
    """Seeds shard order and sample shuffle, mixed with the epoch so every pass is ordered differently."""
    on_bad_shard: str = "raise"
    """raise | skip. skip: a missing or corrupt shard is counted and logged instead of stopping the run."""

    def __post_init__(self) -> None:
        _require(self.num_workers >= 0, f"data.num_workers={self.num_workers} must be >= 0")
        _require(self.readers is None or self.readers >= 1, f"data.readers={self.readers} must be >= 1 or null")
        _require(self.shuffle_buffer >= 1, f"data.shuffle_buffer={self.shuffle_buffer} must be >= 1")
        _require(
            self.on_bad_shard in ("raise", "skip"), f"data.on_bad_shard={self.on_bad_shard!r} is not one of raise, skip"
        )
        _require(self.seq_len is None or self.seq_len > 0, f"data.seq_len={self.seq_len} must be positive or null")
        for i, src in enumerate(self.sources):
            _require(src.weight > 0, f"data.sources[{i}].weight={src.weight} must be > 0")


@dataclass
class TrainConfig:
    """The optimisation recipe. Defaults are phi-1's pretraining recipe (§2.3)."""

    global_batch_size: int = 1024
    """Sequences per optimizer step, reached by gradient accumulation whatever the world size."""
    micro_batch_size: int = 8
    """Sequences per rank per forward/backward."""
    max_steps: int = 36000
    lr: float = 1e-3
    min_lr: float = 0.0
    """Learning rate at the end of the linear decay."""
    warmup_steps: int = 750
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    adam_eps: float = 1e-7
    grad_clip: float = 1.0
    precision: str = "auto"
    """auto | bf16 | fp16 | fp32. auto: bf16 on GPUs that support it, fp32 on CPU."""
    seed: int = 0
    log_every: int = 10
    eval_every: int = 500
    eval_batches: int = 16
    """Validation micro-batches per rank at each evaluation."""
    ckpt_every: int = 1000
    keep_last: int = 3
    """Complete checkpoints kept on disk (at least 2: a corrupt newest one falls back to the one before); older ones
    are removed after a new one is committed."""
    ckpt_dir: str | None = None
    """None: `checkpoints/` inside the run directory."""
    resume: bool = True
    """Resume from the `latest` checkpoint in ckpt_dir when one exists."""
    init_from: str | None = None
    """A checkpoint directory (or tag directory) whose weights start this run (finetune). Optimizer state is not taken."""
    loss_on_prompt: bool = False
    """Fine-tuning shards carry a loss mask: by default only completion tokens are trained on; true = every token."""
    activation_checkpointing: bool = False
    compile: bool = False
    """torch.compile each block."""
    sample_prompt: str | None = None
    """When set, rank 0 prints a greedy completion of this prompt at the end of training."""
    sample_tokens: int = 64

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"train.lr={self.lr} must be > 0")
        _require(0 <= self.min_lr <= self.lr, f"train.min_lr={self.min_lr} must be in [0, train.lr={self.lr}]")
        for key in (
            "global_batch_size",
            "micro_batch_size",
            "max_steps",
            "log_every",
            "eval_every",
            "ckpt_every",
            "keep_last",
        ):
            _require(getattr(self, key) > 0, f"train.{key}={getattr(self, key)} must be a positive integer")
        _require(
            self.keep_last >= 2,
            f"train.keep_last={self.keep_last} must be >= 2: the previous complete checkpoint is the fallback when the "
            "newest one is found corrupt",
        )
        _require(self.warmup_steps >= 0, f"train.warmup_steps={self.warmup_steps} must be >= 0")
        _require(self.weight_decay >= 0, f"train.weight_decay={self.weight_decay} must be >= 0")
        _require(
            self.precision in ("auto", "bf16", "fp16", "fp32"),
            f"train.precision={self.precision!r} is not one of auto, bf16, fp16, fp32",
        )


@dataclass
class DeepSpeedConfig:
    """Turned into DeepSpeed's JSON config by `phi_train.engine.deepspeed_config`."""

    zero_stage: int = 2
    offload_optimizer: bool = False
    """ZeRO-Offload of optimizer state to CPU memory (stage >= 1)."""
    offload_param: bool = False
    """Parameter offload to CPU memory (stage 3 only)."""
    reduce_bucket_size: int = 200_000_000
    allgather_bucket_size: int = 200_000_000
    overlap_comm: bool = True
    contiguous_gradients: bool = True

    def __post_init__(self) -> None:
        _require(self.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage={self.zero_stage} is not one of 0, 1, 2, 3")
        _require(
            not self.offload_param or self.zero_stage == 3,
            f"deepspeed.offload_param=true needs deepspeed.zero_stage=3 (got {self.zero_stage})",
        )


@dataclass
class WandbConfig:
    mode: str = "offline"
    """offline (no account needed; `wandb sync` later) | online | disabled."""
    project: str = "phi-train"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(
            self.mode in ("offline", "online", "disabled"),
            f"logging.wandb.mode={self.mode!r} is not one of offline, online, disabled",
        )


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True
    """A progress bar on rank 0's console."""


@dataclass
class Config:
    model: ModelConfig = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    run_dir: str | None = None
    """Where the resolved config, metrics, wandb files and (by default) checkpoints go. None: Hydra's output
    directory, `runs/<model>-<data>-<train>` (conf/config.yaml), or one per job in a multirun — deterministic, so
    re-running the same command resumes."""


def register_configs() -> None:
    import hashlib

    if not OmegaConf.has_resolver("digest"):
        OmegaConf.register_new_resolver("digest", lambda s: hashlib.sha1(str(s).encode()).hexdigest()[:8])
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="train", name="train_schema", node=TrainConfig)
    cs.store(group="deepspeed", name="deepspeed_schema", node=DeepSpeedConfig)
    cs.store(group="logging", name="logging_schema", node=LoggingConfig)
    cs.store(group="kernels", name="kernels_schema", node=KernelConfig)


def to_object(cfg: DictConfig) -> Config:
    """Resolve interpolations and build the dataclasses, running every `__post_init__` check."""
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except ConfigError:
        raise
    except Exception as exc:  # omegaconf's own validation errors: keep the message, drop the trace
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(msg) from None


def model_config(**overrides) -> ModelConfig:
    """A ModelConfig from a preset in conf/model plus overrides, for tests and notebooks (no Hydra run needed)."""

    name = overrides.pop("preset", None)
    base: dict = {}
    if name is not None:
        path = CONF_ROOT / "model" / f"{name}.yaml"
        if not path.exists():
            choices = sorted(p.stem for p in path.parent.glob("*.yaml"))
            raise ConfigError(f"model preset {name!r} not found; choose one of {', '.join(choices)}")
        base = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(path)).items() if k != "defaults"}
    base.update(overrides)
    return ModelConfig(**base)


def check_override(arg: str) -> None:
    """Point an override of a key that moved (`model.attention`) at its new home, on one line.

    Everything else about an override (unknown keys, wrong types) is checked against the schema by
    `phi_train.cli.check_override` when the command composes its config."""
    old = arg.split("=", 1)[0].lstrip("+~")
    if old in MOVED_KEYS:
        value = arg.split("=", 1)[1] if "=" in arg else "..."
        raise ConfigError(
            f"{old} is now {MOVED_KEYS[old]} (a kernel choice, not architecture): use {MOVED_KEYS[old]}={value}"
        )
