"""The GPU section (gpu=true, CUDA only): the trainer's DeepSpeed engine at seq 2048, MFU, the head-to-head, the profile."""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable

from phi_bench.cpu import hf_loss, hf_twin, ours_loss, train_step
from phi_bench.harness import BenchError, interleaved, median


def engine_throughput(
    model_cfg, micro_batch: int, seq: int, steps: int, warmup: int = 2, profile: bool = False
) -> dict:
    """Training tokens/s of `model_cfg` through the trainer's own DeepSpeed engine on one device: the DeepSpeed config
    comes from `trainer.deepspeed_config` (ZeRO-2; bf16 on GPUs with bf16, as `train.precision=auto`; torch's fused
    AdamW on GPUs), the parameters are the engine's (bf16 copies, fp32 master weights in the optimizer), the step is
    `engine(x, labels)`, `engine.backward`, `engine.step` as in `Trainer.train_step`. Runs on CPU too (fp32), which is
    how the test suite exercises it; the figures that matter are the GPU ones. `profile`: also 3 steps under
    torch.profiler, whose op table (by self time on the device, else on the CPU) lands in "profile_table"."""
    import deepspeed
    import torch

    from phi_train.config import Config, DeepSpeedConfig, TrainConfig
    from phi_train.model import PhiModel
    from phi_train.trainer import deepspeed_config, device_peak_flops, init_distributed, param_groups, precision

    init_distributed()
    conf = Config(
        model=model_cfg,
        train=TrainConfig(global_batch_size=micro_batch, micro_batch_size=micro_batch, lr=1e-5, warmup_steps=0),
        deepspeed=DeepSpeedConfig(zero_stage=2),
    )
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(0)
    model = PhiModel(model_cfg)
    flops_per_token = model.flops_per_token(seq)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, 0.1), config=deepspeed_config(conf, world_size=1)
    )
    x = torch.randint(0, model.vocab_size, (micro_batch, seq + 1), device=device)

    def step():
        loss = engine(x[:, :-1], x[:, 1:])
        engine.backward(loss)
        engine.step()
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            step()
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            loss = step()
        sync()
        seconds = time.perf_counter() - t
        tps = steps * micro_batch * seq / seconds
        peak = device_peak_flops()
        out = {
            "precision": precision(conf),
            "tokens_per_s": tps,
            "step_s": seconds / steps,
            "loss": float(loss.detach()),
            "mfu": tps * flops_per_token / peak if peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        }
        if profile:
            out["profile_table"] = profile_table(step, sync, cuda=device.type == "cuda")
        return out
    finally:
        engine.destroy()  # the caller frees the memory once this frame (engine, model, batch) is gone


def profile_table(step: Callable[[], object], sync: Callable[[], None], cuda: bool, steps: int = 3) -> str:
    """Where the time of `steps` calls of `step` goes: torch.profiler's op table, top 30 by self time on the GPU
    (on the CPU when there is none)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)


def head_to_head(model_cfg, micro_batch: int, seq: int, rounds: int, device: str) -> dict:
    """Training tokens/s of ours vs transformers' PhiForCausalLM with the same weights in the same loop on `device`:
    bf16 autocast over fp32 weights, torch's AdamW (fused on CUDA), interleaved rounds, each step synchronised. The
    peers are transformers' attention paths that load here: `sdpa` always, `flash_attention_2` when flash-attn is
    installed on CUDA; the faster one is the ratio's denominator."""
    import torch

    from phi_train.model import PhiModel
    from phi_train.ops import flash_attn_func

    torch.manual_seed(0)
    ours = PhiModel(model_cfg).train()
    x = torch.randint(0, ours.vocab_size, (micro_batch, seq + 1), device=device)
    models = {"ours": ours}
    peer_attn = {"transformers": "sdpa"}
    if device.startswith("cuda") and flash_attn_func is not None:
        peer_attn["transformers_flash"] = "flash_attention_2"
    skipped = {}
    for name, attn in peer_attn.items():
        try:
            models[name] = hf_twin(ours, attn=attn).train()
        except Exception as exc:  # an attention path this transformers/flash-attn pair cannot load: say so, go on
            skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    kind = torch.device(device).type
    fns = {}
    for name, model in models.items():
        model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=kind == "cuda")
        fns[name] = train_step(model, opt, ours_loss(x) if name == "ours" else hf_loss(x), autocast=kind)
    if len(fns) == 1:
        return {"error": f"no transformers attention path loaded: {skipped}", "skipped_peers": skipped}
    times = interleaved(fns, rounds=rounds, warmup=2)
    tps = {k: micro_batch * seq / median(v) for k, v in times.items()}
    peer = max((k for k in tps if k != "ours"), key=lambda k: tps[k])
    return {"tokens_per_s": tps, "peer": peer, "ratio": tps["ours"] / tps[peer], "skipped_peers": skipped}


def free_cuda() -> None:
    """Give back the last measurement's GPU memory before the next (DeepSpeed's engine holds reference cycles)."""
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def bench_gpu(quick: bool) -> list[dict]:
    """phi1 and phi1_small at seq 2048 through the trainer's DeepSpeed engine (ZeRO-2, bf16, fused AdamW), unfused and
    fused, a micro-batch sweep: tokens/s/GPU, MFU by PaLM's definition (model.flops_per_token), peak memory."""
    import torch

    from phi_train.config import model_config

    if not torch.cuda.is_available():
        raise BenchError("gpu=true needs a CUDA device (torch.cuda.is_available() is False)")
    rows = []
    for preset in ("phi1_small", "phi1"):
        for fused in (False, True):
            for mb in (1, 2, 4) if quick else (1, 2, 4, 8, 16):
                cfg = model_config(preset=preset, fused_block=fused, attn_dropout=0.0, resid_dropout=0.0)
                row = {"model": preset, "fused": fused, "micro_batch": mb, "seq": 2048}
                try:
                    row |= engine_throughput(cfg, mb, 2048, steps=5 if quick else 10)
                except torch.cuda.OutOfMemoryError:
                    row["oom"] = True
                free_cuda()
                rows.append(row)
                print(json.dumps(row), flush=True)
                if row.get("oom"):
                    break  # larger micro-batches of this model will not fit either
    return rows


def gpu_profile_if_short(rows: list[dict], goal: float = 0.55, **model_overrides) -> dict | None:
    """The issue's rule: if phi1's best configuration is short of the MFU goal, record where the time goes.

    `model_overrides` shrink phi1 (tests run this path on CPU with a one-layer model); the GPU run passes none."""
    import torch

    from phi_train.config import model_config

    best = max((r for r in rows if r["model"] == "phi1" and r.get("mfu")), key=lambda r: r["mfu"], default=None)
    if best is None or best["mfu"] >= goal:
        return None
    cfg = model_config(preset="phi1", fused_block=best["fused"], attn_dropout=0.0, resid_dropout=0.0, **model_overrides)
    try:
        res = engine_throughput(cfg, best["micro_batch"], best["seq"], steps=3, profile=True)
    except torch.cuda.OutOfMemoryError:  # the profiler's own buffers on top of a configuration that just fit
        return {"model": "phi1", "error": "out of memory while profiling"}
    finally:
        free_cuda()
    return {"model": "phi1", "fused": best["fused"], "micro_batch": best["micro_batch"], "mfu": best["mfu"],
            "table": res["profile_table"]}  # fmt: skip


def bench_gpu_peer(quick: bool) -> list[dict]:
    """Ours against transformers' PhiForCausalLM on the GPU (head_to_head): phi1_small at micro-batch 4 and phi1 at 2,
    seq 2048, bf16 autocast."""
    import torch

    from phi_train.config import model_config

    rows = []
    for preset, mb in (("phi1_small", 4), ("phi1", 2)):
        cfg = model_config(preset=preset, attn_dropout=0.0, resid_dropout=0.0)
        row = {"model": preset, "micro_batch": mb, "seq": 2048}
        try:
            row |= head_to_head(cfg, mb, 2048, rounds=3 if quick else 6, device="cuda")
        except torch.cuda.OutOfMemoryError:
            row["oom"] = True  # two models and two optimizers must fit at once
        free_cuda()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# --- the report ----------------------------------------------------------------------------------------------------------


# rows of the training table: the default model (judged against the goal), then the breakdown of where it comes from
