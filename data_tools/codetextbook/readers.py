"""datatrove readers for the raw code corpora of phi-1 §2.1 (The Stack + StackOverflow) and for plain checkouts.

Readers never drop a record silently: an undecodable, binary, broken or wrongly-shaped record becomes a Document with
empty text and `metadata["drop_reason"]`, so the clean step counts it and `in == kept + dropped` holds end to end.
The same holds for a file that cannot be read at all (`unreadable`, `not_a_file`, `vanished`): no OSError ends a run.

Each reader takes its files from the run's frozen input list (`inputs.py`), `rank::world_size`, and stamps every
document with `metadata["order"] = [input, file, record]`: its place in sorted input order, which the dedup stage
restores by merging the clean outputs (a duplicate keeps the first copy in that order, whatever the task layout).
"""

from __future__ import annotations

import ast
import html
import os
from html.parser import HTMLParser
from typing import Any, ClassVar

import orjson
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.pipeline.readers.jsonl import JsonlReader
from datatrove.pipeline.readers.parquet import ParquetReader

from data_tools.codetextbook.inputs import is_local, read_list
from data_tools.sources import SNIFF_BYTES, decode_python_source, read_regular_file


def decode_source(raw: bytes) -> tuple[str, str | None]:
    """(text, drop_reason) as CPython reads a module: BOM dropped, PEP 263 coding line honoured, else UTF-8."""
    text, reason = decode_python_source(raw)
    return text, ("non_utf8" if reason == "not_utf8" else reason)


def tagged(doc_id: str, reason: str, metadata: dict[str, Any]) -> Document:
    """A placeholder for a record that cannot be read; the clean step counts it under `reason` and drops it."""
    return Document(text="", id=doc_id, metadata=metadata | {"drop_reason": reason})


def iter_lines(f, chunk: int = 1 << 20):
    """Byte lines of a (possibly decompressing) stream; zstd streams cannot be iterated line by line themselves."""
    rest = b""
    while block := f.read(chunk):
        parts = (rest + block).split(b"\n")
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


class FrozenListReader:
    """Mixin for datatrove disk readers: the files come from the frozen list, and no file can end the run.

    `frozen_list` is `work_dir/inputs/<input>.jsonl.zst`; None lists the folder as datatrove does (library use)."""

    frozen_list: str | None = None
    input_index: int = 0

    def setup_frozen(self, frozen_list: str | None, input_index: int) -> None:
        self.frozen_list, self.input_index = frozen_list, input_index

    def file_unavailable(self, filepath: str) -> str | None:
        """Why a listed file cannot be opened (stat-ed first: a FIFO is never opened), or None."""
        if not is_local(str(self.data_folder.path)):
            return None if self.data_folder.exists(filepath) else "vanished"
        path = self.data_folder.resolve_paths(filepath)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return "unreadable" if os.path.lexists(path) else "vanished"
        except OSError:
            return "unreadable"
        import stat

        return None if stat.S_ISREG(st.st_mode) else "not_a_file"

    def file_placeholder(self, filepath: str, reason: str) -> Document:
        return tagged(f"{self.data_folder.path}/{filepath}", reason, {"path": filepath, "file_error": True})

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        if self.frozen_list is None:
            files = list(
                enumerate(self.data_folder.list_files(recursive=self.recursive, glob_pattern=self.glob_pattern))
            )
        else:
            files = list(enumerate(e.path for e in read_list(self.frozen_list)))
        n = 0
        for file_index, filepath in files[rank::world_size]:
            self.stat_update("input_files")
            docs = self._read_guarded(filepath)
            for record_index, doc in enumerate(docs):
                if self.limit != -1 and n >= self.limit:
                    return
                doc.metadata["order"] = [self.input_index, file_index, record_index]
                self.update_doc_stats(doc)
                n += 1
                yield doc

    def _read_guarded(self, filepath: str) -> DocumentsPipeline:
        if reason := self.file_unavailable(filepath):
            yield self.file_placeholder(filepath, reason)
            return
        try:
            yield from self.read_file(filepath)
        except FileNotFoundError:
            yield self.file_placeholder(filepath, "vanished")
        except OSError:
            # Records already yielded stay counted; the rest of the file is one `unreadable` placeholder.
            yield self.file_placeholder(filepath, "unreadable")


class PythonFilesReader(FrozenListReader, BaseDiskReader):
    """A directory (local or fsspec URL) of `*.py` files: a checkout, a site-packages, the stdlib."""

    name = "🐍 Python files"

    def __init__(self, data_folder: str, exclude: list[str] | None = None, max_bytes: int = 1_000_000, **kwargs):
        super().__init__(data_folder, **kwargs)
        self.exclude = list(exclude or [])
        self.max_bytes = max_bytes

    def file_unavailable(self, filepath: str) -> str | None:
        return None  # read_file checks everything itself, in one stat

    def read_file(self, filepath: str) -> DocumentsPipeline:
        meta = {"source": "directory", "path": filepath, "repo": str(self.data_folder.path), "license": None}
        doc_id = f"{self.data_folder.path}/{filepath}"
        if is_local(str(self.data_folder.path)):
            # Oversize files are recognised from their size and never read into memory.
            raw, reason = read_regular_file(self.data_folder.resolve_paths(filepath), self.max_bytes)
        else:
            try:
                if self.data_folder.size(filepath) > self.max_bytes:
                    raw, reason = None, "oversize"
                else:
                    with self.data_folder.open(filepath, "rb") as f:
                        raw, reason = f.read(), None
            except FileNotFoundError:
                raw, reason = None, "vanished"
            except OSError:
                raw, reason = None, "unreadable"
        if raw is not None:
            text, reason = decode_source(raw)
        yield tagged(doc_id, reason, meta) if reason else Document(text=text, id=doc_id, metadata=meta)


def stack_record_to_document(data: Any, source_file: str, index: int) -> Document:
    """One record of The Stack (`content`, `max_stars_repo_path`, `lang`, licences...) -> Document with provenance."""
    fallback_id = f"{source_file}/{index}"
    if not isinstance(data, dict):
        return tagged(fallback_id, "bad_schema", {"source": "stack", "path": source_file})
    repo = data.get("max_stars_repo_name") or data.get("repo_name") or data.get("repository_name")
    path = data.get("max_stars_repo_path") or data.get("path")
    licenses = data.get("max_stars_repo_licenses") or data.get("licenses") or data.get("license")
    meta = {
        "source": "stack",
        "path": path,
        "repo": repo,
        "license": list(licenses) if isinstance(licenses, (list, tuple)) else licenses,
        "lang": data.get("lang"),
    }
    doc_id = str(data.get("hexsha") or data.get("id") or fallback_id)
    content = data.get("content")
    if isinstance(content, bytes):
        content, reason = decode_source(content)
        if reason:
            return tagged(doc_id, reason, meta)
    if not isinstance(content, str):
        return tagged(doc_id, "bad_schema", meta)
    if "\x00" in content[:SNIFF_BYTES]:
        return tagged(doc_id, "binary", meta)
    return Document(text=content.removeprefix("\ufeff"), id=doc_id, metadata=meta)


class _LineRecordsReader(FrozenListReader, JsonlReader):
    """JSONL / JSONL.zst / JSONL.gz read line by line as bytes, so a broken or non-UTF-8 line is counted, not lost."""

    def record_to_document(self, data: Any, source_file: str, index: int) -> Document:
        raise NotImplementedError

    def read_file(self, filepath: str) -> DocumentsPipeline:
        with self.data_folder.open(filepath, "rb", compression=self.compression) as f:
            for li, line in enumerate(iter_lines(f)):
                if not line.strip():
                    continue
                fallback_id = f"{filepath}/{li}"
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    yield tagged(fallback_id, "non_utf8", {"path": filepath})
                    continue
                try:
                    data = orjson.loads(line)
                except orjson.JSONDecodeError:
                    yield tagged(fallback_id, "bad_json", {"path": filepath})
                    continue
                yield self.record_to_document(data, filepath, li)


class StackJsonlReader(_LineRecordsReader):
    name = "📚 The Stack (jsonl)"

    def record_to_document(self, data: Any, source_file: str, index: int) -> Document:
        return stack_record_to_document(data, source_file, index)


class StackParquetReader(FrozenListReader, ParquetReader):
    """datatrove's ParquetReader with The Stack's schema; a row without `content` is tagged `bad_schema`, not skipped."""

    name = "📚 The Stack (parquet)"

    def get_document_from_dict(self, data: dict, source_file: str, id_in_file: int | str) -> Document:
        return stack_record_to_document(data, source_file, int(id_in_file) if str(id_in_file).isdigit() else 0)


class _HtmlToSegments(HTMLParser):
    """StackOverflow HTML -> [(kind, text)] with kind `prose` or `code`; `<pre>` blocks are kept verbatim."""

    BLOCK_TAGS: ClassVar[frozenset[str]] = frozenset(
        {"p", "li", "br", "div", "h1", "h2", "h3", "h4", "blockquote", "tr"}
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.segments: list[tuple[str, str]] = []
        self._buf: list[str] = []
        self._in_pre = 0

    def _flush(self, kind: str) -> None:
        text = "".join(self._buf)
        self._buf = []
        if text.strip():
            self.segments.append((kind, text.strip("\n") if kind == "code" else text.strip()))

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "pre":
            self._flush("prose")
            self._in_pre += 1
        elif tag in self.BLOCK_TAGS and not self._in_pre:
            self._buf.append("\n")
        elif tag == "code" and not self._in_pre:
            self._buf.append("`")

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre" and self._in_pre:
            self._in_pre -= 1
            self._flush("code")
        elif tag == "code" and not self._in_pre:
            self._buf.append("`")
        elif tag in self.BLOCK_TAGS and not self._in_pre:
            self._buf.append("\n")

    def handle_data(self, data: str) -> None:
        self._buf.append(data)

    def close(self) -> None:
        super().close()
        self._flush("code" if self._in_pre else "prose")


def html_to_segments(body: str) -> list[tuple[str, str]]:
    parser = _HtmlToSegments()
    parser.feed(body)
    parser.close()
    return parser.segments


def _as_comment(text: str) -> str:
    return "\n".join(f"# {line}".rstrip() for line in html.unescape(text).splitlines() if line.strip())


def qa_to_python(title: str, question_html: str, answers_html: list[str]) -> tuple[str, int]:
    """A question and its answers as one Python file: prose becomes comments, code blocks that parse stay code, code
    blocks that do not (shell sessions, fragments) become comments. Returns (text, number of code blocks kept)."""
    parts = [_as_comment(f"Question: {title}")]
    n_code = 0
    for label, body in [("", question_html)] + [(f"Answer {i + 1}:", a) for i, a in enumerate(answers_html)]:
        if label:
            parts.append(_as_comment(label))
        for kind, text in html_to_segments(body):
            if kind == "code":
                try:
                    ast.parse(text)
                except (SyntaxError, ValueError):
                    parts.append(_as_comment(text))
                    continue
                parts.append(text)
                n_code += 1
            else:
                parts.append(_as_comment(text))
    return "\n\n".join(p for p in parts if p) + "\n", n_code


class StackOverflowReader(_LineRecordsReader):
    """StackOverflow dumps as JSONL: `{id, title, body, tags?, answers: [{body, score?, is_accepted?}]}`, HTML bodies.

    The accepted answer and the best-scored ones (up to `max_answers`) follow the question, as phi-1 mixed
    StackOverflow Python Q&A into its filtered corpus."""

    name = "💬 StackOverflow (jsonl)"

    def __init__(self, data_folder: str, max_answers: int = 3, **kwargs):
        super().__init__(data_folder, **kwargs)
        self.max_answers = max_answers

    def record_to_document(self, data: Any, source_file: str, index: int) -> Document:
        fallback_id = f"{source_file}/{index}"
        if not isinstance(data, dict):
            return tagged(fallback_id, "bad_schema", {"source": "stackoverflow", "path": source_file})
        doc_id = f"stackoverflow/{data.get('id', fallback_id)}"
        meta = {"source": "stackoverflow", "path": source_file, "repo": None, "license": "CC BY-SA", "kind": "qa"}
        title, body, answers = data.get("title"), data.get("body"), data.get("answers", [])
        if not isinstance(title, str) or not isinstance(body, str) or not isinstance(answers, list):
            return tagged(doc_id, "bad_schema", meta)
        answers = [a for a in answers if isinstance(a, dict) and isinstance(a.get("body"), str)]
        answers.sort(key=lambda a: (not a.get("is_accepted", False), -(a.get("score") or 0)))
        text, n_code = qa_to_python(title, body, [a["body"] for a in answers[: self.max_answers]])
        return Document(text=text, id=doc_id, metadata=meta | {"code_blocks": n_code})
