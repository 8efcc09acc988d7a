"""Shared fixtures. `demo_shards`: a real tokenizer and real shards built once per session from stdlib Python files."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest

DEMO_FILES = 200
DEMO_SEQ_LEN = 64
DEMO_VOCAB = 4096


def stdlib_python_files(n: int) -> list[Path]:
    """The first `n` UTF-8 `.py` files (outside test packages) of this interpreter's standard library (sorted: the same set on every run)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        if "test" in path.relative_to(root).parts[0] or "site-packages" in path.parts:
            continue
        try:
            if path.read_bytes().decode("utf-8"):
                out.append(path)
        except (UnicodeDecodeError, OSError):
            continue
        if len(out) == n:
            break
    return out


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    """A directory of ~200 real Python files copied from the standard library."""
    corpus = tmp_path_factory.mktemp("corpus")
    for path in stdlib_python_files(DEMO_FILES):
        rel = path.relative_to(sysconfig.get_paths()["stdlib"]).as_posix()
        shutil.copyfile(path, corpus / rel.replace("/", "__"))
    return corpus


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory, demo_corpus) -> SimpleNamespace:
    """Tokenizer + shards (seq_len 64) of `demo_corpus`.

    Fields: `path` (shard dir holding manifest.json and tokenizer.model), `tokenizer` (model path), `manifest` (dict),
    `corpus` (the source directory), `seq_len`.
    """
    from data_tools.shard import write_shards
    from data_tools.sources import iter_documents
    from data_tools.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("demo")
    texts = [d["text"] for d in iter_documents([str(demo_corpus)])]
    model = train_tokenizer(texts, root / "tokenizer", vocab_size=DEMO_VOCAB)
    manifest = write_shards(
        [str(demo_corpus)], str(model), root / "shards", seq_len=DEMO_SEQ_LEN, shard_sequences=512,
        val_fraction=0.1, workers=2, progress=False,
    )  # fmt: skip
    return SimpleNamespace(
        path=str(root / "shards"), tokenizer=str(root / "shards" / "tokenizer.model"), manifest=manifest,
        corpus=demo_corpus, seq_len=DEMO_SEQ_LEN,
    )  # fmt: skip
