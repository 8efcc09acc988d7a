"""Step 2: exact and near-duplicate removal.

The Stack is full of vendored copies and forks; phi-1 (§2.1, and The Stack's own near-dedup) trains on deduplicated
code so that the quality classifier's budget and the model's tokens are not spent on repeats. Exact duplicates are
found by content hash; near duplicates by MinHash over token shingles with datasketch's LSH index, at a Jaccard
threshold from config (default 0.7). The first file seen (input order, which is deterministic) is kept.

This stage is one task: the LSH index is global. It holds ~1 KB per kept file (the MinHash), fine up to a few
million files; for the full 35M-file Stack use datatrove's MinhashDedupSignature/Buckets/Cluster/Filter stages,
which shard the same computation (see docs/codetextbook.md).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
from datasketch import MinHash, MinHashLSH
from datatrove.data import DocumentsPipeline
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
