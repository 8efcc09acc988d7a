"""Step 2: exact and near-duplicate removal.

The Stack is full of vendored copies and forks; phi-1 (§2.1, and The Stack's own near-dedup) trains on deduplicated
code so that the quality classifier's budget and the model's tokens are not spent on repeats. Exact duplicates are
found by content hash; near duplicates by MinHash over token shingles with datasketch's LSH index, at a Jaccard
threshold from config (default 0.7). The first file in sorted input order is kept: the clean tasks each write their
partition in that order (`metadata["order"]` = [input, file, record]), and `InputOrderReader` merges the partitions
back into one sorted stream, so which copy survives does not depend on the number of tasks or which ran first.

This stage is one task: the LSH index is global. It holds ~1 KB per kept file (the MinHash), fine up to a few
million files; for the full 35M-file Stack use datatrove's MinhashDedupSignature/Buckets/Cluster/Filter stages,
which shard the same computation (see docs/codetextbook.md).
"""

from __future__ import annotations

import hashlib
import heapq
import io
import re

import numpy as np
import orjson
import zstandard
from datasketch import MinHash, MinHashLSH
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from tqdm import tqdm

from data_tools.codetextbook.clean import DROP

TOKEN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|\S")
SHARD_KEY = "dedup_shard"


def code_tokens(text: str) -> list[str]:
    """Identifiers, numbers and single punctuation characters: whitespace and layout changes do not matter."""
    return TOKEN_RE.findall(text)


def shingles(text: str, size: int = 5) -> set[bytes]:
    toks = code_tokens(text)
    if len(toks) < size:
        return {" ".join(toks).encode()}
    return {" ".join(toks[i : i + size]).encode() for i in range(len(toks) - size + 1)}


def minhash(text: str, num_perm: int = 128, shingle_size: int = 5, seed: int = 1) -> MinHash:
    m = MinHash(num_perm=num_perm, seed=seed)
    m.update_batch(list(shingles(text, shingle_size)))
    return m


def content_hash(text: str) -> str:
    """Exact-duplicate key: trailing whitespace and line endings do not make a file different."""
    norm = "\n".join(line.rstrip() for line in text.strip().splitlines())
    return hashlib.sha256(norm.encode("utf-8", errors="surrogatepass")).hexdigest()


class NearDedupIndex:
    """Keeps the first of every group of (near-)identical texts. `add` returns None (kept) or the drop reason."""

    def __init__(self, threshold: float = 0.7, num_perm: int = 128, shingle_size: int = 5, seed: int = 1) -> None:
        self.threshold, self.num_perm, self.shingle_size, self.seed = threshold, num_perm, shingle_size, seed
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.hashes: dict[str, str] = {}
        self.sigs: dict[str, np.ndarray] = {}

    def add(self, key: str, text: str) -> tuple[str | None, str | None]:
        """(drop reason or None, the kept key it duplicates)."""
        h = content_hash(text)
        if h in self.hashes:
            return "exact_duplicate", self.hashes[h]
        m = minhash(text, self.num_perm, self.shingle_size, self.seed)
        # LSH candidates are confirmed with the estimated Jaccard, so band collisions below the threshold stay.
        for cand in self.lsh.query(m):
            if float(np.mean(self.sigs[cand] == m.hashvalues)) >= self.threshold:
                return "near_duplicate", cand
        self.hashes[h] = key
        self.sigs[key] = m.hashvalues
        self.lsh.insert(key, m)
        return None, None


def _iter_clean_file(folder, path: str):
    with folder.open(path, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as r:
        last = None
        for line in io.BufferedReader(r):
            if not line.strip():
                continue
            rec = orjson.loads(line)
            meta = rec.get("metadata") or {}
            key = tuple(meta.get("order") or ())
            if last is not None and key < last:
                raise ValueError(f"{path}: documents out of input order ({list(key)} after {list(last)})")
            last = key
            yield key, rec


class InputOrderReader(PipelineStep):
    """Reads the clean stage's `*.jsonl.zst` partitions as one stream in sorted input order (a k-way merge on
    `metadata["order"]`; each partition is already sorted, so memory stays one record per partition)."""

    name = "🔀 Merge in input order"
    type = "📖 - READER"

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        from datatrove.io import get_datafolder

        folder = get_datafolder(self.folder)
        files = folder.list_files(glob_pattern="*.jsonl.zst") if folder.exists("") else []
        for _, rec in heapq.merge(*(_iter_clean_file(folder, f) for f in files), key=lambda kv: kv[0]):
            self.stat_update("documents")
            yield Document(text=rec["text"], id=rec["id"], metadata=rec.get("metadata") or {})


class Deduplicator(PipelineStep):
    """Global exact + MinHash-LSH near dedup; tags each kept document with an output shard for the next stage."""

    name = "👯 Dedup (exact + MinHash LSH)"
    type = "🫂 - DEDUP"

    def __init__(
        self,
        threshold: float = 0.7,
        num_perm: int = 128,
        shingle_size: int = 5,
        seed: int = 1,
        shards: int = 1,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.threshold, self.num_perm, self.shingle_size, self.seed = threshold, num_perm, shingle_size, seed
        self.shards = shards
        self.progress = progress

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if world_size != 1:
            raise ValueError(f"the dedup stage needs one task (the LSH index is global), got world_size={world_size}")
        index = NearDedupIndex(self.threshold, self.num_perm, self.shingle_size, self.seed)
        kept = 0
        for doc in tqdm(data or [], desc="dedup", unit="file", disable=not self.progress, mininterval=2):
            self.stat_update("dedup_in")
            with self.track_time():
                reason, _ = index.add(doc.id, doc.text)
            if reason:
                self.stat_update(DROP + reason)
                continue
            self.stat_update("dedup_kept")
            doc.metadata[SHARD_KEY] = f"{kept % self.shards:05d}"
            kept += 1
            yield doc
