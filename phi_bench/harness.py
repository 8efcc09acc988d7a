"""The measuring harness: interleaved timing, the machine's description, the stdlib corpus and tokenizer."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

from phi_train.errors import PhiTrainError

SECTIONS = ("train", "generate", "kernels", "data", "tokenizer", "sandbox")
GOALS = {"train": 1.3, "generate": 1.5, "data_tokens_per_s": 1.5e6, "sandbox": 2.0}


class BenchError(PhiTrainError):
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
