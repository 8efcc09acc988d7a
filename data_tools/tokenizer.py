"""Train the code tokenizer: `python -m data_tools.tokenizer input=[PATH,...] out=DIR vocab_size=8192`.

SentencePiece BPE with code-safe settings (see `phi_train/tokenizer.py` for why each one matters). SentencePiece trains
on "sentences"; we feed it the corpus line by line (a newline is its own user-defined piece, so it never has to be
learned from data), cutting lines longer than `max_sentence_length` into chunks instead of letting the trainer skip
them. After training, every training document is encoded and decoded again and the CLI fails if a single one does not
come back byte for byte.
"""

from __future__ import annotations

import io
import random
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
from omegaconf import MISSING
from tqdm import tqdm

from data_tools.sources import iter_documents
from phi_train.cli import hydra_command
from phi_train.errors import PhiTrainError
from phi_train.tokenizer import EOS_PIECE, Tokenizer


class TrainError(PhiTrainError):
    """Bad options or data for tokenizer training; one line."""


def training_lines(docs: Iterable[str], max_len: int) -> Iterator[str]:
    """Split documents into non-empty lines of at most `max_len` characters (the units SentencePiece counts)."""
    for doc in docs:
        for line in doc.split("\n"):
            for start in range(0, len(line), max_len):
                chunk = line[start : start + max_len]
                if chunk:
                    yield chunk


def sample_documents(docs: Iterable[dict], n: int | None, seed: int) -> list[dict]:
    """All documents, or a uniform sample of `n` of them (reservoir sampling: one pass, deterministic for a seed)."""
    if n is None:
        return list(docs)
    rng = random.Random(seed)
    sample: list[dict] = []
    for i, doc in enumerate(docs):
        if i < n:
            sample.append(doc)
        else:
            j = rng.randint(0, i)
            if j < n:
                sample[j] = doc
    return sample


def train_tokenizer(
    texts: list[str],
    out_dir: str | Path,
    *,
    vocab_size: int,
    max_sentence_length: int = 8192,
    num_threads: int = 2,
) -> Path:
    """Train a BPE model on `texts` and write `out_dir/tokenizer.model`; return its path."""
    if vocab_size < 300:
        # 256 byte pieces + specials must fit, with room left for merges.
        raise TrainError(f"vocab_size={vocab_size} is too small: it must be >= 300 (256 byte-fallback pieces + merges)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=training_lines(texts, max_sentence_length),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            # Code is whitespace-sensitive: keep every byte as it is.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,  # indentation runs ("▁▁▁▁", "▁▁▁▁▁▁▁▁") become single pieces
            split_by_whitespace=True,
            split_digits=True,  # numbers are spelled digit by digit: no arbitrary multi-digit pieces
            byte_fallback=True,  # any unseen character becomes its UTF-8 bytes, never <unk>
            character_coverage=0.9999,
            user_defined_symbols=["\n", "\t"],
            unk_id=0,
            eos_id=1,
            bos_id=-1,
            pad_id=-1,
            eos_piece=EOS_PIECE,
            max_sentence_length=max_sentence_length * 4,  # bytes; our chunks are at most this many characters
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as exc:
        # e.g. "Vocabulary size too high (8192). Please set it to a value <= 5123."
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise TrainError(f"SentencePiece training failed for vocab_size={vocab_size}: {msg}") from None
    path = out / "tokenizer.model"
    tmp = path.with_suffix(".model.tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(path)
    return path


def round_trip_failures(tok: Tokenizer, texts: list[str]) -> list[int]:
    """Indices of texts that do not survive encode -> decode byte for byte."""
    bad = []
    for i, text in enumerate(tqdm(texts, desc="round trip", unit="doc", disable=len(texts) < 2000)):
        if tok.decode(tok.encode(text)) != text:
            bad.append(i)
    return bad


@dataclass
class TokenizerTrainConfig:
    """`python -m data_tools.tokenizer` (defaults <- `key=value` overrides)."""

    input: list[str] = MISSING
    """JSONL(.zst) files or directories of .py files."""
    out: str = MISSING
    """Directory for tokenizer.model."""
    vocab_size: int = 8192
    max_sentence_length: int = 8192
    """Longer lines are cut into chunks."""
    sample_docs: int | None = None
    """Train on a uniform sample of this many documents (null: all)."""
    text_field: str = "text"
    """JSON field holding the text of JSONL inputs."""
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        if self.sample_docs is not None and self.sample_docs < 1:
            raise TrainError(f"sample_docs={self.sample_docs} must be >= 1 (or null: every document)")
        if self.max_sentence_length < 16:
            raise TrainError(f"max_sentence_length={self.max_sentence_length} must be >= 16")


@hydra_command(TokenizerTrainConfig, "tokenizer")
def main(cfg: TokenizerTrainConfig) -> int:
    dropped: Counter = Counter()
    docs = iter_documents(cfg.input, text_field=cfg.text_field, dropped=dropped)
    docs = tqdm(docs, desc="reading", unit="doc")
    texts = [d["text"] for d in sample_documents(docs, cfg.sample_docs, cfg.seed)]
    if not texts:
        raise TrainError(f"no documents found in {cfg.input} (dropped: {dict(dropped) or 'none'})")
    path = train_tokenizer(
        texts,
        cfg.out,
        vocab_size=cfg.vocab_size,
        max_sentence_length=cfg.max_sentence_length,
        num_threads=cfg.threads,
    )
    tok = Tokenizer(path)
    bad = round_trip_failures(tok, texts)
    print(f"wrote {path} (vocab_size={tok.vocab_size}, eos_id={tok.eos_id}, sha256={tok.sha256[:12]})")
    print(f"trained on {len(texts)} documents; dropped: {dict(dropped) or 'none'}")
    if bad:
        print(f"round trip FAILED on {len(bad)}/{len(texts)} documents (first index {bad[0]})", file=sys.stderr)
        return 1
    print(f"round trip exact on {len(texts)}/{len(texts)} documents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
