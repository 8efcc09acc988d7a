"""The frozen input list of a run: which files each input has, listed once, so a resumed run reads the same files.

datatrove's readers list their folder in every task and take `files[rank::world_size]`; if a file appears or
disappears between the first task and a resumed one, the indices shift and the resumed tasks read another
partition: files are lost or read twice without an error. Here the first run lists every input once, before the
clean stage, into `work_dir/inputs/<i>.jsonl.zst` (one `[relative path, size, mtime_ns]` row per file, sorted) plus
`work_dir/inputs/manifest.json`; every task reads its partition of that list. A rerun lists again and compares:
with `inputs_changed=refuse` a different list is a one-line error naming the change; with `use-frozen` the run
goes on with the frozen list, a file that is gone is counted as `vanished` and a modified one is read as it now is.

Local folders are walked with `os.scandir` without following symlinks (a symlink loop cannot recurse, a symlink
to a directory is listed as an entry and later counted as `not_a_file`); FIFOs and devices are listed, never opened.
Other fsspec URLs are listed with datatrove's DataFolder (size, and the modification time or ETag when the
filesystem reports one).
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import orjson
import zstandard

from data_tools.codetextbook.config import InputConfig
from phi_train.errors import PhiTrainError

MANIFEST = "manifest.json"
PY_SUFFIXES = (".py",)


class InputsChangedError(PhiTrainError):
    """A rerun sees a different input list than the one the run was started with (exit 2, one line)."""


@dataclass(frozen=True)
class Entry:
    path: str
    """Relative to the input's folder, '/'-separated."""
    size: int
    version: str
    """mtime_ns for local files ('' for an entry that cannot be stat-ed), else the filesystem's mtime/ETag if any."""


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _local_root(path: str) -> str:
    return path.removeprefix("file://")


def _excluded(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) for p in patterns)


def _wanted(inp: InputConfig, rel: str) -> bool:
    if inp.kind == "python_files" and not rel.endswith(PY_SUFFIXES):
        return False
    return not _excluded(rel, inp.exclude)


def _walk_local(root: str, inp: InputConfig) -> list[Entry]:
    out: list[Entry] = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(os.path.join(root, rel_dir)) as it:
                entries = list(it)
        except OSError:
            continue  # a directory that vanished or cannot be listed holds no entry we could have frozen
        for e in entries:
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            try:
                is_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                stack.append(rel)
                continue
            if not _wanted(inp, rel):
                continue
            try:
                st = os.stat(e.path)  # the target's size and mtime for a symlink: what will be read
                out.append(Entry(rel, st.st_size, str(st.st_mtime_ns)))
            except OSError:
                out.append(Entry(rel, -1, ""))  # dangling or looping symlink: listed, counted when read
    return sorted(out, key=lambda x: x.path)


def _walk_remote(inp: InputConfig) -> list[Entry]:
    from datatrove.io import get_datafolder

    folder = get_datafolder(inp.path)
    out = []
    for name, info in folder.find("", detail=True).items():
        if info.get("type") == "directory":
            continue
        rel = name.removeprefix(folder.path).lstrip("/") if name.startswith(folder.path) else name
        if not _wanted(inp, rel):
            continue
        version = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("ETag")
        out.append(Entry(rel, int(info.get("size") or 0), str(version or "")))
    return sorted(out, key=lambda x: x.path)


def list_input(inp: InputConfig) -> list[Entry]:
    """Every file of one input, sorted by relative path (the order the whole pipeline follows)."""
    if is_local(inp.path):
        root = _local_root(inp.path)
        if not os.path.isdir(root):
            raise InputsChangedError(f"inputs[].path={inp.path!r} is not a directory")
        return _walk_local(root, inp)
    return _walk_remote(inp)


def _identity(inp: InputConfig) -> dict:
    return {"kind": inp.kind, "path": inp.path, "exclude": list(inp.exclude)}


def _write_list(path: Path, entries: list[Entry]) -> str:
    buf = b"".join(orjson.dumps([e.path, e.size, e.version]) + b"\n" for e in entries)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(zstandard.ZstdCompressor().compress(buf))
    tmp.replace(path)
    return hashlib.sha256(buf).hexdigest()


def read_list(path: str | Path) -> list[Entry]:
    with open(path, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as r:
        return [Entry(*orjson.loads(line)) for line in io.BufferedReader(r) if line.strip()]


def list_path(work_dir: str, index: int) -> str:
    return str(Path(work_dir) / "inputs" / f"{index:03d}.jsonl.zst")


def describe_change(index: int, inp: InputConfig, old: list[Entry], new: list[Entry]) -> str | None:
    a, b = {e.path: e for e in old}, {e.path: e for e in new}
    removed = sorted(set(a) - set(b))
    added = sorted(set(b) - set(a))
    modified = sorted(p for p in set(a) & set(b) if a[p] != b[p])
    if not (removed or added or modified):
        return None
    parts = []
    for word, paths in (("removed", removed), ("added", added), ("modified", modified)):
        if paths:
            parts.append(f"{len(paths)} {word} (e.g. {paths[0]!r})")
    return f"inputs[{index}] ({inp.path}): " + ", ".join(parts)


def freeze_inputs(inputs: list[InputConfig], work_dir: str, on_change: str = "refuse") -> list[int]:
    """Write the frozen list on the first run; on a rerun compare and refuse or keep the frozen list. Returns the
    number of files per input. The manifest is written last, so a run killed while listing lists again."""
    d = Path(work_dir) / "inputs"
    manifest_path = d / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        frozen = [m["input"] for m in manifest["inputs"]]
        now = [_identity(i) for i in inputs]
        if frozen != now:
            raise InputsChangedError(
                f"the inputs config differs from the one {work_dir} was started with ({frozen} vs {now}); "
                "use a new work_dir"
            )
        if on_change == "use-frozen":
            return [m["files"] for m in manifest["inputs"]]
        for i, inp in enumerate(inputs):
            change = describe_change(i, inp, read_list(list_path(work_dir, i)), list_input(inp))
            if change:
                raise InputsChangedError(
                    f"{change} since {manifest_path} was written; rerun with inputs_changed=use-frozen to resume on "
                    "the frozen list (gone files counted as vanished), or start a new work_dir"
                )
        return [m["files"] for m in manifest["inputs"]]
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, inp in enumerate(inputs):
        entries = list_input(inp)
        digest = _write_list(Path(list_path(work_dir, i)), entries)
        rows.append({"input": _identity(inp), "files": len(entries), "sha256": digest})
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"inputs": rows}, indent=2))
    tmp.replace(manifest_path)
    return [r["files"] for r in rows]
