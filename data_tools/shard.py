"""Tokenize documents into fixed-length webdataset shards.

`python -m data_tools.shard input=[PATH,...] tokenizer=DIR/tokenizer.model out=OUTDIR seq_len=256
[shard_sequences=512 val_fraction=0.02 workers=2 seed=0 text_field=text prompt_field=null]` (`ShardConfig`).

Layout (docs/data.md has the full contract):
- Every document is tokenized and followed by `<|endoftext|>`; the documents of a split are concatenated into one
  token stream (phi-1 §2.3: "concatenated with an end-of-text token", sequences of fixed length, no padding).
- The stream is cut into sequences of `seq_len + 1` tokens that overlap by one: sequence i = stream[i*L : i*L + L + 1].
  Inputs are `seq[:-1]`, targets `seq[1:]`, so every token of stream[1 : n*L + 1] is a target exactly once.
- Accounting, per split: `tokens == sequences * seq_len + (1 if sequences else 0) + tail_tokens_dropped`, where
  `tokens` counts every document token plus one EOS per document and `tail_tokens_dropped` counts the tokens that
  appear in no sequence at all (the incomplete tail).
- Train/val membership is a hash of the document id (not of its position), so adding documents or changing
  `workers` never moves a document between splits and val never leaks into train.
- `OUTDIR/manifest.json` is written last, atomically: a directory with a manifest is complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from omegaconf import MISSING
from tqdm import tqdm

from data_tools.sources import iter_documents
from phi_train.cli import hydra_command
from phi_train.errors import PhiTrainError
from phi_train.tokenizer import Tokenizer, file_sha256

MANIFEST_FORMAT = 1
SPLITS = ("train", "val")
_CHUNK_DOCS = 64  # documents per worker task: big enough to amortise IPC, small enough to keep the bar moving


class ShardError(PhiTrainError):
    """A bad option or input for sharding; printed on one line."""


def split_of(doc_id: str, val_fraction: float, seed: int = 0) -> str:
    """'val' or 'train' from a hash of the document id: stable across runs, worker counts and corpus growth."""
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") / 2**64 < val_fraction else "train"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# --- tokenization workers -------------------------------------------------------------------------------------------

_WORKER_TOK: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _WORKER_TOK
    _WORKER_TOK = Tokenizer(tokenizer_path)


def _encode_chunk(chunk: list[tuple[str, str, str | None]]) -> list[tuple[str, list[int], list[int] | None]]:
    assert _WORKER_TOK is not None
    ids = _WORKER_TOK.encode_batch([text for _, text, _ in chunk])
    # A prompt is tokenized on its own, as it will be at inference, so the completion's tokens are the ones the
    # model must produce after exactly these prompt tokens.
    prompts = [None if p is None else _WORKER_TOK.encode(p) for _, _, p in chunk]
    return [(doc_id, toks, p) for (doc_id, _, _), toks, p in zip(chunk, ids, prompts)]


def _chunks(docs: Iterable[dict], size: int) -> Iterator[list[tuple[str, str, str | None]]]:
    chunk: list[tuple[str, str, str | None]] = []
    for doc in docs:
        chunk.append((doc["id"], doc["text"], doc.get("prompt")))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tokenized_documents(
    docs: Iterable[dict], tokenizer_path: str, workers: int
) -> Iterator[tuple[str, list[int], list[int] | None]]:
    """(id, token ids, prompt ids or None) for every document, in input order whatever the worker count."""
    chunks = _chunks(docs, _CHUNK_DOCS)
    if workers <= 1:
        _init_worker(tokenizer_path)
        for chunk in chunks:
            yield from _encode_chunk(chunk)
        return
    # fork: workers start in milliseconds and need no `if __name__ == "__main__"` guard in the calling script.
    ctx = mp.get_context("fork")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path,)) as pool:
        for encoded in pool.imap(_encode_chunk, chunks, chunksize=1):
            yield from encoded


# --- sequence cutting and shard writing -------------------------------------------------------------------------------


@dataclass
class SplitWriter:
    """Concatenates one split's documents and writes `seq_len + 1`-token sequences into numbered tar shards."""

    split: str
    out_dir: Path
    seq_len: int
    shard_sequences: int
    dtype: np.dtype
    documents: int = 0
    tokens: int = 0
    sequences: int = 0
    shards: list[dict] = field(default_factory=list)
    _pending: list[np.ndarray] = field(default_factory=list)
    _pending_len: int = 0
    _writer: wds.TarWriter | None = None
    _shard_count: int = 0
    _tmp: Path | None = None

    def add(self, ids: list[int], eos_id: int) -> None:
        arr = np.empty(len(ids) + 1, dtype=self.dtype)
        arr[:-1] = ids
        arr[-1] = eos_id
        self.documents += 1
        self.tokens += len(arr)
        self._pending.append(arr)
        self._pending_len += len(arr)
        if self._pending_len >= self.seq_len + 1:
            self._cut()

    def _cut(self) -> None:
        stream = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        L = self.seq_len
        n = (len(stream) - 1) // L  # sequences that fit: the last needs L + 1 tokens starting at n_prev * L
        for i in range(n):
            self._write(stream[i * L : i * L + L + 1])
        rest = stream[n * L :]  # starts with the last target token: it is the first input of the next sequence
        self._pending = [rest]
        self._pending_len = len(rest)

    def _shard_name(self, index: int) -> str:
        return f"{self.split}-{index:06d}.tar"

    def _write(self, seq: np.ndarray, mask: np.ndarray | None = None) -> None:
        if self._writer is None:
            self._tmp = self.out_dir / (self._shard_name(len(self.shards)) + ".tmp")
            # Fixed mtime: identical inputs give byte-identical shards (and sha256s).
            self._writer = wds.TarWriter(str(self._tmp), encoder=False, mtime=0.0)
            self._shard_count = 0
        key = f"{self.split}-{len(self.shards):06d}-{self._shard_count:06d}"
        sample = {"__key__": key, "tokens.npy": encode_npy(np.ascontiguousarray(seq))}
        if mask is not None:
            sample["mask.npy"] = encode_npy(np.ascontiguousarray(mask))
        self._writer.write(sample)
        self._shard_count += 1
        self.sequences += 1
        if self._shard_count == self.shard_sequences:
            self._close_shard()

    def _close_shard(self) -> None:
        assert self._writer is not None
        self._writer.close()
        self._writer = None
        final = self.out_dir / self._shard_name(len(self.shards))
        self._tmp.replace(final)
        self.shards.append(
            {
                "name": final.name,
                "sequences": self._shard_count,
                "sha256": file_sha256(final),
                "bytes": final.stat().st_size,
            }
        )

    def finish(self) -> dict:
        if self._writer is not None:
            self._close_shard()
        tail = self._pending_len - (1 if self.sequences else 0)
        assert self.tokens == self.sequences * self.seq_len + (1 if self.sequences else 0) + tail
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "sequences": self.sequences,
            "tail_tokens_dropped": tail,
            "shards": self.shards,
        }


@dataclass
class PackedWriter(SplitWriter):
    """Prompt/completion pairs (CodeExercises) packed whole into `seq_len + 1`-token sequences with a loss mask.

    A pair never straddles two sequences: when the next one does not fit, the sequence is closed with EOS padding,
    masked. The mask is 1 on the completion and its closing EOS, 0 on prompts and padding, so no loss is taken on a
    prompt token — nor across a pair boundary, since every pair starts with its (masked) prompt. Pairs longer than
    `seq_len + 1` tokens are dropped and counted (`too_long`).
    """

    targets: int = 0
    padding: int = 0
    too_long: int = 0
    too_long_tokens: int = 0
    _eos: int = 0
    _tokens_buf: list[np.ndarray] = field(default_factory=list)
    _mask_buf: list[np.ndarray] = field(default_factory=list)
    _buf_len: int = 0

    def add_pair(self, prompt: list[int], completion: list[int], eos_id: int) -> None:
        self._eos = eos_id
        n = len(prompt) + len(completion) + 1
        self.documents += 1
        self.tokens += n
        if n > self.seq_len + 1:
            self.too_long += 1
            self.too_long_tokens += n
            return
        if self._buf_len + n > self.seq_len + 1:
            self._flush()
        toks = np.empty(n, dtype=self.dtype)
        toks[: len(prompt)], toks[len(prompt) : -1], toks[-1] = prompt, completion, eos_id
        mask = np.zeros(n, dtype=np.uint8)
        mask[len(prompt) :] = 1
        self.targets += int(mask.sum())
        self._tokens_buf.append(toks)
        self._mask_buf.append(mask)
        self._buf_len += n

    def _flush(self) -> None:
        if not self._tokens_buf:
            return
        pad = self.seq_len + 1 - self._buf_len
        self.padding += pad
        toks = np.concatenate([*self._tokens_buf, np.full(pad, self._eos, dtype=self.dtype)])
        mask = np.concatenate([*self._mask_buf, np.zeros(pad, dtype=np.uint8)])
        self._write(toks, mask)
        self._tokens_buf, self._mask_buf, self._buf_len = [], [], 0

    def finish(self) -> dict:
        self._flush()
        if self._writer is not None:
            self._close_shard()
        assert self.tokens == self.sequences * (self.seq_len + 1) - self.padding + self.too_long_tokens
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "sequences": self.sequences,
            "target_tokens": self.targets,
            "padding_tokens": self.padding,
            "too_long_dropped": self.too_long,
            "too_long_tokens_dropped": self.too_long_tokens,
            "shards": self.shards,
        }


def write_shards(
    inputs: list[str],
    tokenizer_path: str,
    out_dir: str | Path,
    *,
    seq_len: int,
    shard_sequences: int = 512,
    val_fraction: float = 0.02,
    workers: int = 2,
    seed: int = 0,
    text_field: str = "text",
    prompt_field: str | None = None,
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` into shards under `out_dir`; return the manifest (also written to `out_dir/manifest.json`).

    With `prompt_field`, records are prompt/completion pairs (completion under `text_field`) packed with loss masks
    for fine-tuning (PackedWriter); without it, documents are concatenated for pretraining (SplitWriter).
    """
    if seq_len < 1:
        raise ShardError(f"seq_len={seq_len} must be >= 1")
    if shard_sequences < 1:
        raise ShardError(f"shard_sequences={shard_sequences} must be >= 1")
    if not 0.0 <= val_fraction < 1.0:
        raise ShardError(f"val_fraction={val_fraction} must be in [0, 1)")
    if workers < 1:
        raise ShardError(f"workers={workers} must be >= 1")
    tok = Tokenizer(tokenizer_path)
    dropped: Counter = Counter()
    docs = iter_documents(inputs, text_field=text_field, dropped=dropped, prompt_field=prompt_field)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A directory holds one consistent set: drop the old manifest first (so a crash never leaves a manifest pointing
    # at a mix of old and new shards), then the old shards.
    (out / "manifest.json").unlink(missing_ok=True)
    for split in SPLITS:
        for old in list(out.glob(f"{split}-*.tar")) + list(out.glob(f"{split}-*.tar.tmp")):
            old.unlink()
    local_tok = out / "tokenizer.model"
    if Path(tokenizer_path).resolve() != local_tok.resolve():
        shutil.copyfile(tokenizer_path, local_tok)

    dtype = token_dtype(tok.vocab_size)
    writer_cls = SplitWriter if prompt_field is None else PackedWriter
    writers = {s: writer_cls(s, out, seq_len, shard_sequences, dtype) for s in SPLITS}
    bar = tqdm(desc="sharding", unit="doc", disable=not progress)
    for doc_id, ids, prompt_ids in tokenized_documents(docs, str(local_tok), workers):
        writer = writers[split_of(doc_id, val_fraction, seed)]
        if prompt_ids is None:
            writer.add(ids, tok.eos_id)
        else:
            writer.add_pair(prompt_ids, ids, tok.eos_id)
        bar.update(1)
    bar.close()

    manifest = {
        "format": MANIFEST_FORMAT,
        "seq_len": seq_len,
        "dtype": dtype.name,
        "loss_mask": prompt_field is not None,
        "tokenizer": {
            "path": "tokenizer.model",
            "sha256": file_sha256(local_tok),
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
        },
        "splits": {s: w.finish() for s, w in writers.items()},
        "dropped": dict(sorted(dropped.items())),
        "inputs": list(inputs),
        "val_fraction": val_fraction,
        "seed": seed,
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / "manifest.json")
    return manifest


def print_summary(manifest: dict, out_dir: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"shards in {out_dir} (seq_len={manifest['seq_len']}, dtype={manifest['dtype']})")
    for col in ("split", "documents", "tokens", "sequences", "tail dropped", "shards", "MiB"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for name, s in manifest["splits"].items():
        mib = sum(sh["bytes"] for sh in s["shards"]) / 2**20
        table.add_row(
            name,
            f"{s['documents']:,}",
            f"{s['tokens']:,}",
            f"{s['sequences']:,}",
            f"{s.get('tail_tokens_dropped', s.get('too_long_tokens_dropped', 0)):,}",
            str(len(s["shards"])),
            f"{mib:.1f}",
        )
    console = Console()
    console.print(table)
    console.print(f"dropped documents: {manifest['dropped'] or 'none'}")


@dataclass
class ShardConfig:
    """`python -m data_tools.shard` (defaults <- `key=value` overrides)."""

    input: list[str] = MISSING
    """JSONL(.zst) files or directories of .py files."""
    tokenizer: str = MISSING
    """tokenizer.model from data_tools.tokenizer."""
    out: str = MISSING
    """Output directory for the shards and manifest.json."""
    seq_len: int = MISSING
    shard_sequences: int = 512
    """Sequences per tar shard."""
    val_fraction: float = 0.02
    workers: int = 2
    """Tokenizer processes."""
    seed: int = 0
    """Mixed into the train/val hash."""
    text_field: str = "text"
    """The document field (or, with prompt_field, the completion)."""
    prompt_field: str | None = None
    """Fine-tuning pairs: JSONL records with this prompt field; the loss is on the completion only (e.g. prompt)."""


@hydra_command(ShardConfig, "shard")
def main(cfg: ShardConfig) -> None:
    manifest = write_shards(
        cfg.input,
        cfg.tokenizer,
        cfg.out,
        seq_len=cfg.seq_len,
        shard_sequences=cfg.shard_sequences,
        val_fraction=cfg.val_fraction,
        workers=cfg.workers,
        seed=cfg.seed,
        text_field=cfg.text_field,
        prompt_field=cfg.prompt_field,
    )
    print_summary(manifest, cfg.out)


if __name__ == "__main__":
    sys.exit(main())
