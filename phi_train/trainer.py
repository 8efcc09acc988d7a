"""The training engine: the resolved config in, a trained and checkpointed model out.

DeepSpeed does the optimizer step, gradient accumulation, clipping, mixed precision and ZeRO partitioning; this file
builds its config, feeds it batches from the shard stream, logs, evaluates, and saves/resumes checkpoints whose client
state (step, tokens seen, each rank's stream position and RNG state, the resolved config) makes a resumed run see and
compute exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from phi_train import checkpoint as ckpt
from phi_train.config import Config, ConfigError, to_object
from phi_train.model import PhiModel
from phi_train.tokenizer import Tokenizer

# Dense bf16 peaks (FLOP/s) for MFU by PaLM's definition; unknown devices report no MFU rather than a made-up one.
# Matched as substrings of torch.cuda.get_device_name(), longest first ("L40S" before "L40" before "L4").
PEAK_BF16 = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "H200 NVL": 835e12,
    "H200": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 125e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
}


def peak_flops_for(name: str) -> float | None:
    """The peak of the longest key found in `name` as a whole word ("A100" is not in "RTX A1000", "B200" not in
    "GB200"): an unknown device gets no MFU rather than another device's."""
    for key in sorted(PEAK_BF16, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name):
            return PEAK_BF16[key]
    return None


def device_peak_flops() -> float | None:
    return peak_flops_for(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


def lr_lambda(step: int, warmup: int, max_steps: int, lr: float, min_lr: float) -> float:
    """Multiplier of the peak lr: linear warmup, then linear decay to min_lr at max_steps (phi-1 §2.3)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    frac = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return (lr - frac * (lr - min_lr)) / lr


def precision(conf: Config) -> str:
    if conf.train.precision != "auto":
        return conf.train.precision
    if torch.cuda.is_available():
        # native bf16 only (Ampere+): emulated bf16 on a V100/T4 is slower than fp16 with a loss scale
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "fp32"


def deepspeed_config(conf: Config, world_size: int) -> dict:
    """DeepSpeed's JSON config, derived from ours so there is one source of truth."""
    t, z = conf.train, conf.deepspeed
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size={t.micro_batch_size}"
            f" x world_size={world_size} = {per_step}; pick a global batch that is"
        )
    zero: dict = {
        "stage": z.zero_stage,
        "overlap_comm": z.overlap_comm,
        "contiguous_gradients": z.contiguous_gradients,
        "reduce_bucket_size": z.reduce_bucket_size,
        "allgather_bucket_size": z.allgather_bucket_size,
    }
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if z.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    prec = precision(conf)
    gpu = torch.cuda.is_available()
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // per_step,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": [t.beta1, t.beta2],
                "eps": t.adam_eps,
                "weight_decay": t.weight_decay,
                # torch's AdamW except for a GPU run with optimizer offload (DeepSpeed's CPUAdam then). GPUs: torch's
                # fused kernel, no JIT build of DeepSpeed's FusedAdam (pip-only machines have no nvcc). CPU:
                # DeepSpeed's FusedAdam rounds the first update after a checkpoint load differently (1 ulp), which
                # would break bit-exact resume.
                "torch_adam": not (gpu and z.offload_optimizer),
                **({"fused": True} if gpu and not z.offload_optimizer else {}),
            },
        },
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, LayerNorms and embeddings (GPT-NeoX, nanoGPT): decay only matmul weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.startswith("wte") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def single_process_env() -> None:
    """`python launch/train.py` without a launcher (a Hydra multirun, a notebook): a world of one on a free port."""
    if "RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


def shm_comm_buffer(rank: int, addr: str | None = None, port: str | None = None) -> Path:
    """The /dev/shm file DeepSpeed's CPU shared-memory all-reduce (deepspeed/ops/csrc/cpu/comm/shm.cpp) creates for
    `rank` of the job on addr:port (default: this process's MASTER_ADDR:MASTER_PORT), ~70 MB each. DeepSpeed never
    removes it."""
    addr = addr if addr is not None else os.environ.get("MASTER_ADDR", "")
    port = port if port is not None else os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def init_distributed() -> None:
    """The process group, once per process (a world of one without a launcher). On CPU, this rank's DeepSpeed shm
    all-reduce buffer is removed when the process exits, normally or by an error: every rank opens all buffers during
    initialisation and keeps the mappings, so the names can go; DeepSpeed itself never removes them, and each CPU run
    would leave ~70 MB per rank in /dev/shm until it is full and new runs hang."""
    import deepspeed

    if dist.is_initialized():
        return
    single_process_env()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if not torch.cuda.is_available():
        atexit.register(shm_comm_buffer(dist.get_rank()).unlink, missing_ok=True)


def shards_tokenizer(data_path: str, manifest: dict, run_dir: Path) -> Tokenizer:
    """The shards' own tokenizer (fetched into the run directory when shards are remote), checked against the
    manifest's checksum — which the Tokenizer computes on load anyway."""
    import webdataset as wds

    from phi_train.data import DataError, _is_url, shard_url

    url = shard_url(data_path, "tokenizer.model")
    if not _is_url(data_path):
        local = Path(url)
    else:
        local = run_dir / "tokenizer.model"
        if not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            with wds.gopen(url, "rb") as fh:
                local.write_bytes(fh.read())
    if not local.exists():
        raise DataError(f"{url} is missing: shards must carry the tokenizer they were written with")
    tokenizer, want = Tokenizer(local), manifest["tokenizer"]["sha256"]
    if tokenizer.sha256 != want:
        raise DataError(
            f"{url} does not match the manifest's tokenizer sha256 {want[:12]}...: shards and tokenizer differ"
        )
    return tokenizer


def wandb_run_id(run_dir: Path) -> str:
    """Stable per run directory, so a resumed run continues its own wandb run and two runs that share a directory
    *name* (runs/a/demo, runs/b/demo) never merge."""
    import hashlib
    import re

    name = re.sub(r"[^A-Za-z0-9_-]", "-", run_dir.name)[:40]  # wandb ids take letters, digits, - and _ only
    return f"{name}-{hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:10]}"


def fault(point: str) -> None:
    """Test hook: PHI_TRAIN_FAULT=step:N kills this process mid-step N, save:N between writing checkpoint N and
    committing it — real SIGKILLs at chosen moments, for the resume tests."""
    if os.environ.get("PHI_TRAIN_FAULT") == point:
        os.kill(os.getpid(), 9)


def gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the next-token losses of logits (B, T, V) at labels (B, T; -100 = no target): 0 when none."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")  # fmt: skip


def rows_digest(micro: list[torch.Tensor], first_row: int) -> int:
    """This rank's share of a global batch's digest: sum over its rows of (global row index + 1) x a 64-bit hash of
    the row, mod 2**63. Summed over the ranks (mod 2**63) it is the same number whatever the world size and
    micro-batch size that cut the global batch: the per-step proof in metrics.jsonl that a run saw the same data."""
    import hashlib

    rows = torch.cat(micro).numpy()
    h = [int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little") for r in rows]
    return sum((first_row + i + 1) * x for i, x in enumerate(h)) % 2**63


def token_weighted_step(engine, micro: list[tuple[torch.Tensor, torch.Tensor]], fault_point: str = "") -> tuple:
    """One optimizer step whose gradient is that of the whole global batch, however it is cut into micro-batches and
    ranks: the sum of every target token's loss over all micro-batches and ranks, divided by the number of target
    tokens all ranks hold in this step (all-reduced once, before the first backward).

    Averaging per-micro-batch means instead weighs a micro-batch with 20 completion tokens like one with 2,000, so the
    result would depend on micro-batch size, accumulation and world size (the gradient-accumulation loss bug
    transformers fixed in 2024). DeepSpeed averages gradients over the data-parallel ranks, so each rank's share is
    scaled by `world / tokens` and DeepSpeed's own 1/accumulation scaling is switched off. A micro-batch, or a whole
    step, without targets contributes zero loss and zero gradient, never NaN.

    Returns (this rank's summed token loss, the step's target tokens over all ranks), on the device.
    """
    n = torch.zeros((), dtype=torch.float64, device=micro[0][1].device)
    for _, labels in micro:
        n += (labels != -100).sum()
    dist.all_reduce(n)  # float64: exact for any token count a run reaches
    scale = dist.get_world_size() / n.clamp(min=1).float()
    total = torch.zeros((), device=n.device)
    for inputs, labels in micro:
        loss = summed_loss(engine(inputs), labels)
        engine.backward(loss * scale, scale_wrt_gas=False)
        fault(fault_point)
        engine.step()
        total += loss.detach()
    return total, n


class Trainer:
    """One training run. `fit()` resumes if it can, trains to `max_steps`, and returns a summary dict."""

    def __init__(self, cfg: DictConfig):
        import deepspeed

        from phi_train.data import GlobalBatchStream, read_manifest

        self.conf: Config = to_object(cfg)
        self.resolved = OmegaConf.to_container(cfg, resolve=True)
        conf = self.conf
        # one path, or the first source of a mixture: the tokenizer and validation data come from it
        self.data_path = conf.data.sources[0].path if conf.data.sources else conf.data.path
        self.manifest = read_manifest(self.data_path)  # before any process group: a wrong path fails fast
        init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )

        self.run_dir = Path(conf.run_dir or HydraConfig.get().runtime.output_dir)
        self.ckpt_dir = Path(conf.train.ckpt_dir or self.run_dir / "checkpoints")
        self.seq_len = conf.data.seq_len or self.manifest["seq_len"]
        if self.seq_len > self.manifest["seq_len"]:
            raise ConfigError(
                f"data.seq_len={self.seq_len} is longer than the shards' seq_len={self.manifest['seq_len']}"
            )
        if self.seq_len > conf.model.max_seq_len:
            raise ConfigError(f"data seq_len={self.seq_len} exceeds model.max_seq_len={conf.model.max_seq_len}")
        self.tokenizer = shards_tokenizer(self.data_path, self.manifest, self.run_dir)

        torch.manual_seed(conf.train.seed)  # identical init on every rank
        k = conf.kernels
        model = PhiModel(
            conf.model, vocab_size=self.tokenizer.vocab_size, attention=k.attention, cpu_matmul=k.cpu_matmul
        )
        model.activation_checkpointing = conf.train.activation_checkpointing
        if conf.train.compile:
            for block in model.blocks:
                block.compile()
        self.vocab_size = model.vocab_size
        self.n_params = model.num_params()
        self.flops_per_token = model.flops_per_token(self.seq_len)
        if conf.train.init_from:  # fine-tuning starts from pretrained weights (fresh optimizer and schedule)
            src, state, _ = ckpt.load_model_state(conf.train.init_from)
            if src.fused_block != conf.model.fused_block:  # same function, other layout: convert exactly
                from phi_train.interop import fuse_state_dict, unfuse_state_dict

                state = fuse_state_dict(state, src) if conf.model.fused_block else unfuse_state_dict(state, src)
            try:
                model.load_state_dict(state)
            except RuntimeError as exc:
                first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
                raise ConfigError(
                    f"train.init_from={conf.train.init_from}: weights do not fit this model ({first})"
                ) from None

        t = conf.train
        self.ds_config = deepspeed_config(conf, self.world)
        self.grad_accum = self.ds_config["gradient_accumulation_steps"]
        self.resume_tag, self.load_tag = self.find_checkpoint(), None
        if self.resume_tag is not None:
            meta = ckpt.read_meta(self.ckpt_dir, self.resume_tag)
            where = str(self.ckpt_dir / self.resume_tag)
            ckpt.check_compatible(meta, conf.model, self.vocab_size, self.world, where)
            self.load_tag = self.resume_tag
            if meta["world_size"] != self.world:  # ZeRO partitions of another world: reshard them on load
                self.load_tag = self.to_universal(self.resume_tag, meta["world_size"])
                self.ds_config["checkpoint"] = {"load_universal": True}
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, t.weight_decay),
            config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: lr_lambda(s, t.warmup_steps, t.max_steps, t.lr, t.min_lr)
            ),
        )
        d = conf.data
        self.stream = GlobalBatchStream(
            [{"path": s.path, "weight": s.weight} for s in d.sources] or d.path, seq_len=self.seq_len, global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
            rank=self.rank, world_size=self.world, readers=d.readers, num_workers=d.num_workers, seed=d.seed,
            shuffle_buffer=d.shuffle_buffer, on_bad_shard=d.on_bad_shard,
        )  # fmt: skip
        assert self.stream.accumulation == self.grad_accum
        self.step = 0
        self.metrics_path = self.run_dir / "metrics.jsonl"
        # (step, this rank's summed token loss, the step's target tokens over all ranks, lr) awaiting a log
        # and this rank's share of the global batch's digest (rows_digest)
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, float, int]] = []
        self.interval_start, self.paused = time.perf_counter(), 0.0  # throughput clock, see flush_metrics
        self.wandb = None
        self.digest = 0

    # ---------------------------------------------------------------- checkpoints
    def save(self) -> None:
        tag = ckpt.tag_for(self.step)
        if self.rank == 0 and (self.ckpt_dir / tag).exists():
            # left by a save that was killed, or a checkpoint found corrupt and fallen back from: never mix its files
            # (or its old meta.json) with the new ones
            shutil.rmtree(self.ckpt_dir / tag)
        dist.barrier()
        client = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "stream": gather(self.stream.state_dict()),
            "rng": gather(rng_state()),
            # what DeepSpeed's universal-checkpoint conversion asks of a client (a resume on another world size)
            "universal_checkpoint_info": {"universal_checkpoint_version": 0.4},
        }
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client, save_latest=False)
        dist.barrier()
        fault(f"save:{self.step}")
        if self.rank == 0:
            shutil.copy(self.tokenizer.path, self.ckpt_dir / tag / "tokenizer.model")
            meta = ckpt.make_meta(
                self.conf.model, self.vocab_size, step=self.step, world_size=self.world,
                tokenizer={"path": "tokenizer.model", "sha256": self.tokenizer.sha256},
                tokens_seen=self.tokens_seen, config=self.resolved,
            )  # fmt: skip
            ckpt.commit(self.ckpt_dir, tag, meta, self.conf.train.keep_last)
        dist.barrier()

    def find_checkpoint(self) -> str | None:
        """The newest checkpoint that verifies: rank 0 checks every file's checksum and tells the others."""
        choice = [None]
        if self.rank == 0 and self.conf.train.resume:
            try:
                choice = [ckpt.newest_usable(self.ckpt_dir)]
            except ConfigError as exc:
                choice = [exc]
        dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], ConfigError):
            raise choice[0]
        return choice[0]

    def to_universal(self, tag: str, saved_world: int) -> str:
        """DeepSpeed's universal checkpoint of `tag` (every parameter's fp32 master copy and Adam moments whole,
        loadable on any world size), written by rank 0 next to it; the run loads that, then removes it."""
        import subprocess
        import sys

        out = f"{tag}_universal"  # not a tag name (see checkpoint.tags): pruning and fallback never see it
        failed = [None]
        if self.rank == 0:
            shutil.rmtree(self.ckpt_dir / out, ignore_errors=True)
            print(
                f"phi-train: {tag} was saved on {saved_world} ranks, this run has {self.world}: resharding it",
                flush=True,
            )
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                   str(self.ckpt_dir / tag), "--output_folder", str(self.ckpt_dir / out), "--num_extract_workers",
                   "1", "--num_merge_workers", "1"]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                lines = [line for line in proc.stderr.splitlines() if line.strip()]
                failed = [
                    f"resharding {self.ckpt_dir / tag} for {self.world} ranks failed: {lines[-1] if lines else ''}"
                ]
        dist.broadcast_object_list(failed, src=0)
        if failed[0]:
            raise ConfigError(failed[0])
        return out

    def maybe_resume(self) -> bool:
        """Load the checkpoint `find_checkpoint` chose, or start fresh; either way metrics.jsonl then holds exactly the
        steps before this run's first one. Same world size: DeepSpeed's own files, every rank's own data and RNG
        state — bit-identical to an uninterrupted run. Another world size: the resharded universal checkpoint; the
        data stream takes the same global batches on (every saved rank's reader positions), dropout RNG the saved
        state of rank `rank % saved world`."""
        tag = self.resume_tag
        if tag is None:
            self.truncate_metrics(0)
            return False
        where = str(self.ckpt_dir / tag)
        try:
            _, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=self.load_tag)
        except Exception as exc:  # noqa: BLE001 - verified files DeepSpeed still refuses: say so on one line
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ConfigError(f"DeepSpeed could not load checkpoint {where}: {type(exc).__name__}: {first}") from None
        if client is None:
            raise ConfigError(f"DeepSpeed could not load checkpoint {where}")
        self.step = client["step"]
        self.stream.load_state_dict(client["stream"])
        set_rng_state(client["rng"][self.rank % len(client["rng"])])
        if self.load_tag != tag:
            dist.barrier()
            if self.rank == 0:
                shutil.rmtree(self.ckpt_dir / self.load_tag, ignore_errors=True)
                (self.ckpt_dir / "latest_universal").unlink(missing_ok=True)
        self.truncate_metrics(self.step)
        return True

    def truncate_metrics(self, step: int) -> None:
        """Keep the metrics of steps <= `step` (the ones this run will not recompute); a torn line — the run was
        killed while writing it — and anything after it is dropped."""
        if self.rank != 0 or not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int) or rec["step"] > step:
                break
            kept.append(line)
        ckpt.write_atomic(self.metrics_path, "".join(f"{line}\n" for line in kept))

    def previous_last(self) -> dict | None:
        """The last record of a run that had already finished (this invocation trained no step)."""
        try:
            return json.loads((self.run_dir / "summary.json").read_text()).get("last")
        except (OSError, ValueError, AttributeError):
            pass
        lines = self.metrics_path.read_text().splitlines() if self.metrics_path.exists() else []
        return json.loads(lines[-1]) if lines else None

    @property
    def tokens_seen(self) -> int:
        return self.step * self.conf.train.global_batch_size * self.seq_len

    # ---------------------------------------------------------------- the step
    def inputs_and_labels(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Shift a batch of seq_len + 1 tokens into inputs and next-token labels. Shards with a loss mask (fine-tuning
        pairs) label prompt and padding positions -100, so only completion tokens carry loss — unless
        `train.loss_on_prompt` asks for the whole sequence."""
        tokens, mask = batch if isinstance(batch, tuple) else (batch, None)
        if self.device.type == "cuda":  # a copy from pageable memory first waits for the GPU's queue to drain
            tokens, mask = tokens.pin_memory(), (mask.pin_memory() if mask is not None else None)
        tokens = tokens.to(self.device, non_blocking=True)
        inputs, labels = tokens[:, : self.seq_len], tokens[:, 1 : self.seq_len + 1]
        if mask is not None and not self.conf.train.loss_on_prompt:
            keep = mask.to(self.device, non_blocking=True)[:, 1 : self.seq_len + 1]  # slice on the device: a
            # sliced host view would be copied to pageable memory first
            labels = labels.masked_fill(~keep, -100)
        return inputs, labels

    def train_step(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over the next `grad_accum` micro-batches; (this rank's summed token loss, the step's
        valid tokens over all ranks), both on the device, no host sync."""
        raw = [next(batches) for _ in range(self.grad_accum)]
        self.digest = rows_digest([b[0] if isinstance(b, tuple) else b for b in raw], self.stream.first_row)
        micro = [self.inputs_and_labels(b) for b in raw]
        return token_weighted_step(self.engine, micro, fault_point=f"step:{self.step + 1}")

    @torch.no_grad()
    def evaluate(self) -> float:
        """Validation loss per target token over `eval_batches` micro-batches per rank and all ranks."""
        from phi_train.data import TokenStream

        t, d = self.conf.train, self.conf.data
        n_val = len(self.manifest["splits"].get("val", {}).get("shards", []))
        if not n_val:
            return float("nan")
        # fewer val shards than ranks: every rank reads them all (the mean is the same, just computed redundantly)
        rank, world = (self.rank, self.world) if n_val >= self.world else (0, 1)
        val = TokenStream(
            self.data_path, "val", seq_len=self.seq_len, micro_batch_size=t.micro_batch_size, rank=rank,
            world_size=world, num_workers=0, seed=d.seed, shuffle_buffer=1, on_bad_shard=d.on_bad_shard, loop=False,
        )  # fmt: skip
        # One finite pass, at most eval_batches; every rank then runs the same number of forwards (ZeRO-3 gathers
        # parameters inside forward, so unequal counts would hang), the smallest any rank has.
        batches = list(itertools.islice(iter(val), t.eval_batches))
        n = torch.tensor(len(batches), device=self.device)
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
        if n.item() == 0:
            return float("nan")
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in batches[: n.item()]:
            inputs, labels = self.inputs_and_labels(batch)
            total[0] += summed_loss(self.engine(inputs), labels)
            total[1] += (labels != -100).sum()
        self.engine.train()
        dist.all_reduce(total)
        return (total[0] / total[1].clamp(min=1)).item()

    # ---------------------------------------------------------------- logging
    @contextlib.contextmanager
    def off_the_clock(self):
        """Time spent inside (evaluation, checkpointing) does not count towards tokens/s. The device is synced first:
        the steps' queued GPU work belongs to training time."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - t0

    def flush_metrics(self, extra: dict | None = None) -> dict | None:
        """Write every pending step's loss (one host sync for the whole interval) and return the last record."""
        if not self.pending:
            return None
        sums = torch.stack([p[1] for p in self.pending])
        dist.all_reduce(sums)
        counts = torch.stack([p[2] for p in self.pending]).clamp(min=1)
        losses = (sums.double() / counts).tolist()  # waits for the device: the interval's steps are done
        digests = torch.tensor([p[4] for p in self.pending], dtype=torch.int64, device=self.device)
        dist.all_reduce(digests)  # int64 wraps mod 2**64, a multiple of 2**63: the sum mod 2**63 stays exact
        digests = [f"{d % 2**63:016x}" for d in digests.tolist()]
        # wall time since the last flush, less evaluation and checkpointing: per-step host timers would only measure
        # how fast the host queues GPU work (no per-step sync by design)
        now = time.perf_counter()
        seconds = now - self.interval_start - self.paused
        self.interval_start, self.paused = now, 0.0
        tokens = len(self.pending) * self.conf.train.global_batch_size * self.seq_len
        tok_s = tokens / max(seconds, 1e-9)
        peak = device_peak_flops()
        rec = None
        per_source = [n * self.seq_len for n in self.stream.stats["sequences_per_source"]]
        if self.rank == 0:
            with open(self.metrics_path, "a") as f:
                for (step, _, _, lr, _), loss, digest in zip(self.pending, losses, digests):
                    rec = {"step": step, "loss": loss, "lr": lr, "batch_digest": digest}
                    if step == self.step and len(per_source) > 1:  # known for the interval's last step only
                        rec["tokens_seen_per_source"] = per_source
                    f.write(json.dumps(rec) + "\n")
            rec = {
                **rec,
                "tokens_seen": self.tokens_seen,
                **({"tokens_seen_per_source": per_source} if len(per_source) > 1 else {}),
                **({f"tokens_seen/source{i}": n for i, n in enumerate(per_source)} if len(per_source) > 1 else {}),
                **({"epochs_per_source": self.stream.stats.get("epochs_per_source")} if len(per_source) > 1 else {}),
                "tokens_per_s": tok_s,
                "tokens_per_s_per_device": tok_s / self.world,
                "grad_norm": float(self.engine.get_global_grad_norm() or float("nan")),
                "mfu": (self.flops_per_token * tok_s / self.world / peak) if peak else None,
                **(extra or {}),
            }
            if self.wandb is not None:
                self.wandb.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=rec["step"])
        self.pending.clear()
        return rec

    def init_logging(self) -> None:
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.resolved.yaml").write_text(OmegaConf.to_yaml(self.resolved))
        w = self.conf.logging.wandb
        if w.mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=w.project, entity=w.entity, group=w.group, tags=list(w.tags), mode=w.mode,
                dir=str(self.run_dir), name=self.run_dir.name, id=wandb_run_id(self.run_dir),
                resume="allow", config=self.resolved,
            )  # fmt: skip

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict:
        t = self.conf.train
        self.init_logging()
        resumed = self.maybe_resume()
        start_step = self.step
        if self.rank == 0:
            print(
                f"phi-train: {self.conf.model.name} {self.n_params / 1e6:.1f}M params | world {self.world} | "
                f"global batch {t.global_batch_size} x {self.seq_len} tokens (grad accum {self.grad_accum}) | "
                f"{precision(self.conf)} ZeRO-{self.conf.deepspeed.zero_stage} | "
                + (f"resumed at step {self.step}" if resumed else "fresh start"),
                flush=True,
            )
        bar = None
        if self.rank == 0 and self.conf.logging.progress:
            from tqdm import tqdm

            bar = tqdm(total=t.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        batches = iter(self.stream)
        last = None
        self.interval_start, self.paused = time.perf_counter(), 0.0
        while self.step < t.max_steps:
            lr = self.scheduler.get_last_lr()[0]
            loss_sum, n_tokens = self.train_step(batches)
            self.step += 1
            self.pending.append((self.step, loss_sum, n_tokens, lr, self.digest))
            extra = {}
            if self.step % t.eval_every == 0 or self.step == t.max_steps:
                with self.off_the_clock():
                    val = self.evaluate()
                extra = {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
            if self.step % t.log_every == 0 or extra or self.step % t.ckpt_every == 0 or self.step == t.max_steps:
                rec = self.flush_metrics(extra)
                if rec is not None:
                    last = rec
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}"
                        )
                        msg = f"step {rec['step']:>6} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
                        msg += f"{rec['tokens_per_s']:.0f} tok/s | grad norm {rec['grad_norm']:.3f}"
                        if rec.get("mfu"):
                            msg += f" | MFU {100 * rec['mfu']:.1f}%"
                        if "val_loss" in rec:
                            msg += f" | val loss {rec['val_loss']:.4f} (ppl {rec['val_ppl']:.1f})"
                        bar.write(msg)
            if self.step % t.ckpt_every == 0 or self.step == t.max_steps:
                with self.off_the_clock():
                    self.save()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if last is None and self.rank == 0:
            last = self.previous_last()
        final_tag = ckpt.tag_for(self.step)
        if self.rank == 0 and not (self.ckpt_dir / final_tag / ckpt.FP32).exists():
            ckpt.save_fp32(self.ckpt_dir, final_tag)
        summary = {"steps": self.step, "start_step": start_step, "resumed": resumed, "tokens_seen": self.tokens_seen,
                   "params": self.n_params, "last": last, "checkpoint": str(self.ckpt_dir / final_tag)}  # fmt: skip
        if t.sample_prompt:
            # every rank generates: under ZeRO-3 each forward gathers parameters from all ranks (rank 0 alone would
            # wait forever); greedy decoding gives every rank the same text, rank 0 reports it
            sample = self.sample(t.sample_prompt)
            if self.rank == 0:
                summary["sample_prompt"], summary["sample"] = t.sample_prompt, sample
                print(f"--- sample (greedy) ---\n{t.sample_prompt}{sample}\n-----------------------", flush=True)
        if self.rank == 0:
            ckpt.write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
            if self.wandb is not None:
                self.wandb.finish()
        dist.barrier()
        return summary

    def sample(self, prompt: str) -> str:
        """Greedy continuation of `prompt`, run by every rank. Fixed-length decoding (cut at EOS afterwards): every
        rank runs exactly the same number of forwards whatever it samples, which ZeRO-3's all-gathers need, even if
        some rank's argmax ever differed."""
        from phi_train.generate import generate

        # generate() puts the module in eval mode and back
        [out] = generate(
            self.engine.module,
            self.tokenizer,
            [prompt],
            max_new_tokens=self.conf.train.sample_tokens,
            fixed_length=True,
        )
        return out
