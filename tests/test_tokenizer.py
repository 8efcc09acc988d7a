"""The tokenizer is lossless on real code and on adversarial strings, never emits <unk>, and its CLI fails cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.sources import iter_documents
from phi_train.tokenizer import EOS_PIECE, Tokenizer, TokenizerError, file_sha256

REPO = Path(__file__).resolve().parent.parent

NASTY = [
    "",
    "\tdef f():\n\t\treturn 1\n",
    "line one\r\nline two\r\n\r\n",
    "trailing spaces   \nand tabs\t\t\n",
    " " * 500 + "x" + "\t" * 100 + "\n" * 50,
    "    " * 40 + "deep = 1\n",
    "naïve café — “quotes” ü 中文字符 русский עברית",
    "emoji 🙂🐍🚀 and ZWJ 👩‍💻, flags 🇫🇷",
    "control \x00\x01\x02\x07\x1b[31m\x7f end",
    "the spm meta space ▁ itself, ▁▁ twice, and at the end ▁",
    "▁",
    "\ufeffBOM first",
    "\u00a0nbsp\u2003em-space\u200bzero-width",
    "<|endoftext|> <unk> <s> </s> <0x41> are plain text here",
    "1234567890 3.14159 0xDEADBEEF 1e-10",
    "\n",
    "\r",
    " leading space",
]


@pytest.fixture(scope="module")
def tok(demo_shards) -> Tokenizer:
    return Tokenizer(demo_shards.tokenizer)


def test_round_trip_is_exact_on_every_corpus_document(tok, demo_shards):
    docs = list(iter_documents([str(demo_shards.corpus)]))
    assert len(docs) >= 150
    failures = [d["id"] for d in docs if tok.decode(tok.encode(d["text"])) != d["text"]]
    assert failures == []
    # Batch encoding is the same function, only faster.
    texts = [d["text"] for d in docs[:20]]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_no_unk_ever_and_no_bos(tok, demo_shards):
    docs = [d["text"] for d in iter_documents([str(demo_shards.corpus)])]
    for text in docs + NASTY:
        ids = tok.encode(text)
        assert tok.unk_id not in ids
        assert tok.eos_id not in ids  # EOS is only ever appended by the sharder
        assert all(0 <= i < tok.vocab_size for i in ids)


@pytest.mark.parametrize("text", NASTY)
def test_round_trip_on_nasty_strings(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "x"])[0] == ids


def test_code_structure_gets_compact_pieces(tok):
    # Newline, tab and indentation runs are single pieces, so code does not explode into bytes.
    assert [tok.id_to_piece(i) for i in tok.encode("\n")] == ["\n"]
    assert [tok.id_to_piece(i) for i in tok.encode("\t")] == ["\t"]
    assert len(tok.encode("        return")) <= 3
    # Digits are split one per piece (split_digits).
    assert len(tok.encode("12345")) == 5


def test_metadata(tok, demo_shards):
    assert tok.id_to_piece(tok.eos_id) == EOS_PIECE
    assert tok.vocab_size == 4096
    assert tok.sha256 == file_sha256(demo_shards.tokenizer)
    assert tok.path == demo_shards.tokenizer


def test_missing_or_bogus_model_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer(tmp_path / "nope.model")
    bogus = tmp_path / "bogus.model"
    bogus.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="bogus.model"):
        Tokenizer(bogus)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_tools.tokenizer", *args],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_trains_and_checks_round_trip(tmp_path, demo_corpus):
    jsonl = tmp_path / "docs.jsonl"
    import json

    files = sorted(demo_corpus.iterdir())[:30]
    jsonl.write_text("".join(json.dumps({"text": f.read_text(), "id": f.name}) + "\n" for f in files))
    res = _cli(f"input=[{jsonl}]", f"out={tmp_path / 'tok'}", "vocab_size=1000", "sample_docs=25")
    assert res.returncode == 0, res.stderr
    assert "round trip exact on 25/25 documents" in res.stdout
    assert "vocab_size=1000" in res.stdout
    assert Tokenizer(tmp_path / "tok" / "tokenizer.model").vocab_size == 1000


def test_cli_errors_are_one_line(tmp_path, demo_corpus):
    res = _cli(f"input=[{tmp_path / 'missing'}]", f"out={tmp_path / 'tok'}")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: input path")
    assert "Traceback" not in res.stderr
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.py").write_text("x = 1\n")
    res = _cli(f"input=[{one}]", f"out={tmp_path / 'tok'}", "vocab_size=50000")
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "vocab_size=50000" in last and "Traceback" not in res.stderr
