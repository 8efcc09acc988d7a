"""Shards hold exactly the tokenized documents: counts, checksums and contents are checked by reading the tars back."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_tools.shard import ShardError, split_of, write_shards
from data_tools.sources import SourceError, iter_documents
from phi_train.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent


def read_tar(path: Path) -> list[tuple[str, np.ndarray]]:
    """(key, tokens) of every sample, with the standard library's tarfile (independent of webdataset)."""
    out = []
    with tarfile.open(path) as tar:
        for member in tar:
            assert member.name.endswith(".tokens.npy"), member.name
            data = tar.extractfile(member).read()
            out.append((member.name.removesuffix(".tokens.npy"), np.load(io.BytesIO(data))))
    return out


def test_manifest_reconciles_with_tar_contents_and_documents(demo_shards):
    man, root, L = demo_shards.manifest, Path(demo_shards.path), demo_shards.seq_len
    assert json.loads((root / "manifest.json").read_text()) == man
    assert man["format"] == 1 and man["seq_len"] == L and man["dtype"] == "uint16"
    tok = Tokenizer(root / man["tokenizer"]["path"])
    assert man["tokenizer"]["sha256"] == tok.sha256 and man["tokenizer"]["eos_id"] == tok.eos_id

    docs = list(iter_documents([str(demo_shards.corpus)]))
    expected: dict[str, list[int]] = {"train": [], "val": []}
    n_docs = {"train": 0, "val": 0}
    for d in docs:
        split = split_of(d["id"], man["val_fraction"], man["seed"])
        expected[split] += tok.encode(d["text"]) + [tok.eos_id]
        n_docs[split] += 1
    assert sum(n_docs.values()) + sum(man["dropped"].values()) == len(docs) == 200

    for split, info in man["splits"].items():
        assert info["documents"] == n_docs[split] > 0
        stream = np.array(expected[split])
        assert info["tokens"] == len(stream)
        # The accounting identity (docs/data.md): the +1 is the final target token shared by the overlap.
        assert info["tokens"] == info["sequences"] * L + 1 + info["tail_tokens_dropped"]
        assert 0 <= info["tail_tokens_dropped"] < L
        seqs = []
        for s_idx, shard in enumerate(info["shards"]):
            path = root / shard["name"]
            assert shard["name"] == f"{split}-{s_idx:06d}.tar"
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
            assert path.stat().st_size == shard["bytes"]
            samples = read_tar(path)
            assert len(samples) == shard["sequences"]
            assert [k for k, _ in samples] == [f"{split}-{s_idx:06d}-{i:06d}" for i in range(len(samples))]
            for _, arr in samples:
                assert arr.dtype == np.uint16 and arr.shape == (L + 1,)
            seqs += [arr for _, arr in samples]
        assert len(seqs) == info["sequences"]
        assert all(sh["sequences"] == 512 for sh in info["shards"][:-1])
        # Sequence i is stream[i*L : i*L + L + 1]: reading the tars back gives the documents' tokens exactly.
        for i in (0, 1, len(seqs) // 2, len(seqs) - 1):
            np.testing.assert_array_equal(seqs[i], stream[i * L : i * L + L + 1])
        rebuilt = np.concatenate([seqs[0]] + [s[1:] for s in seqs[1:]])
        np.testing.assert_array_equal(rebuilt, stream[: len(rebuilt)])
        assert len(stream) - len(rebuilt) == info["tail_tokens_dropped"]
    assert (root / "tokenizer.model").read_bytes() == Path(demo_shards.tokenizer).read_bytes()


def test_val_and_train_are_disjoint_by_document(demo_shards):
    docs = list(iter_documents([str(demo_shards.corpus)]))
    man = demo_shards.manifest
    val_ids = {d["id"] for d in docs if split_of(d["id"], man["val_fraction"], man["seed"]) == "val"}
    assert 0 < len(val_ids) < len(docs)
    # Membership depends on the id only: the same id always lands in the same split, whatever else is in the corpus.
    assert all(split_of(i, man["val_fraction"], man["seed"]) == "val" for i in sorted(val_ids))
    assert man["splits"]["val"]["documents"] == len(val_ids)
    assert man["splits"]["train"]["documents"] == len(docs) - len(val_ids)
    # The contents test above rebuilds each split's stream from exactly its documents, so no val token is in train.


def _shard_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_tools.shard", *args],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_worker_count_does_not_change_a_byte(tmp_path, demo_shards):
    src = tmp_path / "src"
    src.mkdir()
    for f in sorted(Path(demo_shards.corpus).iterdir())[:40]:
        (src / f.name).write_bytes(f.read_bytes())
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        res = _shard_cli(
            f"input=[{src}]", f"tokenizer={demo_shards.tokenizer}", f"out={out}", "seq_len=32",
            "shard_sequences=300", "val_fraction=0.2", f"workers={workers}",
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert "train" in res.stdout and "val" in res.stdout  # the summary table
        outs[workers] = out
    names = sorted(p.name for p in outs[1].iterdir())
    assert names == sorted(p.name for p in outs[2].iterdir())
    assert any(n.startswith("val-") for n in names) and sum(n.startswith("train-") for n in names) >= 2
    for name in names:
        assert (outs[1] / name).read_bytes() == (outs[2] / name).read_bytes(), name


def test_drops_are_counted_and_reconcile(tmp_path, demo_shards):
    good = [f.read_text() for f in sorted(Path(demo_shards.corpus).iterdir())[:5]]
    jsonl = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": t, "id": f"d{i}"}) for i, t in enumerate(good)]
    lines += ['{"text": "broken', json.dumps({"content": "no text field"}), json.dumps({"text": ""}), ""]
    jsonl.write_text("\n".join(lines) + "\n")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "ok.py").write_text("print('hi')\n")
    (tree / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    man = write_shards(
        [str(jsonl), str(tree)], demo_shards.tokenizer, tmp_path / "out", seq_len=16, shard_sequences=100,
        val_fraction=0.0, workers=1, progress=False,
    )  # fmt: skip
    assert man["dropped"] == {"bad_json": 1, "empty": 1, "missing_field": 1, "not_utf8": 1}
    kept = sum(s["documents"] for s in man["splits"].values())
    assert kept == 6
    assert kept + sum(man["dropped"].values()) == 10  # 8 non-blank JSONL lines + 2 files
    assert man["splits"]["val"] == {"documents": 0, "tokens": 0, "sequences": 0, "tail_tokens_dropped": 0, "shards": []}


def test_bad_options_are_one_line_errors(tmp_path, demo_shards):
    with pytest.raises(SourceError, match="does not exist"):
        write_shards([str(tmp_path / "nope")], demo_shards.tokenizer, tmp_path / "o", seq_len=8, progress=False)
    with pytest.raises(ShardError, match="seq_len=0"):
        write_shards([str(demo_shards.corpus)], demo_shards.tokenizer, tmp_path / "o", seq_len=0, progress=False)
    res = _shard_cli(f"input=[{demo_shards.corpus}]", f"tokenizer={demo_shards.tokenizer}", f"out={tmp_path / 'o'}",
                     "seq_len=8", "val_fraction=1.5")  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == "error: val_fraction=1.5 must be in [0, 1)"
    res = _shard_cli(f"input=[{demo_shards.corpus}]", f"tokenizer={tmp_path / 'x.model'}", f"out={tmp_path / 'o'}",
                     "seq_len=8")  # fmt: skip
    assert res.returncode == 2 and "x.model" in res.stderr and "Traceback" not in res.stderr
