"""Read documents for tokenizer training and sharding: JSONL(.zst) files with a text field, or trees of `.py` files.

This is deliberately only a reader. The heavy filtering (quality classifier, dedup, decontamination) lives in its own
pipeline; whatever it writes (JSONL) comes through here. Nothing is lost silently: every line or file that cannot be
read is counted under a reason in the `Counter` the caller passes (or `DocumentReader.dropped`), so the caller can
reconcile `read + sum(dropped) == seen`.
"""

from __future__ import annotations

import codecs
import errno
import io
import os
import stat
import tokenize
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson

from phi_train.errors import PhiTrainError


class SourceError(PhiTrainError):
    """A path or option the user gave cannot be read; printed on one line by the CLIs."""


def read_regular_file(path: str | os.PathLike, max_bytes: int | None = None) -> tuple[bytes | None, str | None]:
    """(bytes, None) or (None, reason) for a local path that came from a listing; never raises, never blocks.

    Reasons: `vanished` (gone since it was listed), `unreadable` (a dangling symlink, a symlink loop, no permission,
    an I/O error), `not_a_file` (a FIFO, a device, a socket or a directory, e.g. a symlink to a directory named
    x.py), `oversize` (above `max_bytes`, known from the size alone). The target is stat-ed before it is opened, so
    a FIFO is never opened; `O_NONBLOCK` and an fstat after the open cover one swapped in between the two calls.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, "unreadable" if os.path.lexists(path) else "vanished"  # a symlink whose target is missing
    except OSError:
        return None, "unreadable"  # ELOOP, EACCES on a parent, ENAMETOOLONG...
    if not stat.S_ISREG(st.st_mode):
        return None, "not_a_file"
    if max_bytes is not None and st.st_size > max_bytes:
        return None, "oversize"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None, "vanished"
    except OSError as e:
        return None, "not_a_file" if e.errno in (errno.ENXIO, errno.EISDIR) else "unreadable"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, "not_a_file"
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            return f.read() if max_bytes is None else f.read(max_bytes + 1), None
    except OSError:
        return None, "unreadable"
    finally:
        if fd >= 0:
            os.close(fd)


def decode_python_source(raw: bytes) -> tuple[str, str | None]:
    """(text, None) or ("", reason) the way CPython reads a module: a UTF-8 BOM is dropped, a PEP 263 coding line
    (`# -*- coding: latin-1 -*-`) is honoured, and without either the file must be UTF-8 (PEP 3120). Reasons:
    `binary` (NUL bytes in the head), `not_utf8` (undecodable in its declared or default encoding)."""
    if b"\x00" in raw[:SNIFF_BYTES]:
        return "", "binary"
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        codecs.lookup(encoding)
        return raw.decode(encoding), None
    except (SyntaxError, LookupError, UnicodeDecodeError):
        return "", "not_utf8"


SNIFF_BYTES = 8192


def _open_text_lines(path: Path) -> Iterator[bytes]:
    """Yield raw lines of a JSONL or JSONL.zst file (bytes: decoding errors are counted per line, not per file)."""
    if path.name.endswith(".zst"):
        import zstandard

        with path.open("rb") as fh:
            reader = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(fh))
            yield from reader
    else:
        with path.open("rb") as fh:
            yield from fh


def _iter_jsonl(path: Path, text_field: str, dropped: Counter, prompt_field: str | None = None) -> Iterator[dict]:
    for lineno, raw in enumerate(_open_text_lines(path), start=1):
        if not raw.strip():
            continue  # blank lines are layout, not documents
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            dropped["bad_json"] += 1
            continue
        if not isinstance(record, dict) or text_field not in record:
            dropped["missing_field"] += 1
            continue
        text = record[text_field]
        if not isinstance(text, str):
            dropped["missing_field"] += 1
            continue
        if not text:
            dropped["empty"] += 1
            continue
        doc_id = record.get("id")
        doc = {"text": text, "id": str(doc_id) if doc_id is not None else f"{path.name}:{lineno}"}
        if prompt_field is not None:
            prompt = record.get(prompt_field)
            if not isinstance(prompt, str) or not prompt:
                dropped["missing_field"] += 1
                continue
            doc["prompt"] = prompt
        yield doc


def _iter_tree(root: Path, suffixes: tuple[str, ...], dropped: Counter) -> Iterator[dict]:
    # Sorted walk so the document order (and therefore the shards) is the same on every machine.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.endswith(suffixes):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            text, reason = _read_source(path)
            if reason:
                dropped[reason] += 1
                continue
            if not text:
                dropped["empty"] += 1
                continue
            yield {"text": text, "id": rel}


def iter_documents(
    paths: list[str],
    *,
    text_field: str = "text",
    suffixes: tuple[str, ...] = (".py",),
    dropped: Counter | None = None,
    prompt_field: str | None = None,
) -> Iterator[dict]:
    """Yield `{"text", "id"}` for every readable document of `paths`, in a deterministic order.

    A path is a `.jsonl` / `.jsonl.zst` / `.json` file (one JSON object per line, text under `text_field`, optional
    `id`; default id `FILE:LINE`), a directory of such files (read in name order), a single source file, or a
    directory of source files walked in sorted order for files ending in `suffixes` (id = relative path). Unreadable records are counted in `dropped` by reason:
    bad_json, missing_field, empty, not_utf8, binary, unreadable, not_a_file, vanished. All paths are checked before the first document is yielded,
    so a typo fails at once rather than after an hour of tokenizing. With `prompt_field` (fine-tuning pairs such as
    CodeExercises) every record must also carry that field, yielded as `prompt`; only JSONL inputs can.
    """
    if dropped is None:
        dropped = Counter()
    resolved = [Path(p) for p in paths]
    for p in resolved:
        if not p.exists():
            raise SourceError(f"input path {str(p)!r} does not exist (give JSONL/JSONL.zst files or directories)")
        if prompt_field is not None and not (p.is_dir() or p.name.endswith(JSONL_SUFFIXES)):
            raise SourceError(f"input {str(p)!r}: prompt/completion pairs come from JSONL(.zst) files only")
    return _iter_all(resolved, text_field, suffixes, dropped, prompt_field)


JSONL_SUFFIXES = (".jsonl", ".jsonl.zst", ".json", ".ndjson")


def _iter_all(
    paths: list[Path], text_field: str, suffixes: tuple[str, ...], dropped: Counter, prompt_field: str | None = None
) -> Iterator[dict]:
    for p in paths:
        jsonl = sorted(q for q in p.iterdir() if q.name.endswith(JSONL_SUFFIXES)) if p.is_dir() else []
        if jsonl:  # a directory of JSONL parts (what data_tools.codetextbook and the synth jobs write)
            for q in jsonl:
                yield from _iter_jsonl(q, text_field, dropped, prompt_field)
        elif p.is_dir():
            yield from _iter_tree(p, suffixes, dropped)
        elif p.name.endswith(JSONL_SUFFIXES):
            yield from _iter_jsonl(p, text_field, dropped, prompt_field)
        else:
            # A single plain source file: the same rules as inside a directory.
            yield from _iter_tree_file(p, dropped)


def _read_source(path: Path) -> tuple[str, str | None]:
    raw, reason = read_regular_file(path)
    if raw is None:
        return "", reason
    if path.suffix in (".py", ".pyi"):
        return decode_python_source(raw)
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return "", "not_utf8"


def _iter_tree_file(path: Path, dropped: Counter) -> Iterator[dict]:
    text, reason = _read_source(path)
    if reason:
        dropped[reason] += 1
        return
    if not text:
        dropped["empty"] += 1
        return
    yield {"text": text, "id": path.name}
