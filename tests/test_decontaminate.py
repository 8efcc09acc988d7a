"""Decontamination (phi-1 §5): HumanEval solutions planted in real stdlib code as exact, renamed, reformatted and
lightly edited copies must be found by the right measures and pruned, with few false positives on the real code."""

from __future__ import annotations

import ast
import base64
import io
import json
import os
import re
import subprocess
import sys
import tokenize
from html.parser import HTMLParser
from pathlib import Path

import pytest
import zstandard

os.environ.setdefault("OMP_NUM_THREADS", "1")

from data_tools.decontaminate.config import load_config  # noqa: E402
from data_tools.decontaminate.measures import (  # noqa: E402
    ast_match,
    code_tokens,
    normalized_tree,
    primary_function,
    split_units,
)
from data_tools.decontaminate.scan import main  # noqa: E402
from phi_train.benchmarks import load_humaneval  # noqa: E402
from phi_train.errors import PhiTrainError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PLANTED_TASKS = [f"HumanEval/{i}" for i in range(0, 160, 8)]  # 20 problems spread over the benchmark
KINDS = ("exact", "renamed", "reformatted", "edited")


# --- the four kinds of copies ---------------------------------------------------------------------------------------


def _offsets(code: str) -> list[int]:
    starts, pos = [0], 0
    for line in code.splitlines(keepends=True):
        pos += len(line)
        starts.append(pos)
    return starts


def _apply(code: str, edits: list[tuple[int, int, str]]) -> str:
    for start, end, new in sorted(edits, reverse=True):
        code = code[:start] + new + code[end:]
    return code


def _tokens(code: str) -> list[tokenize.TokenInfo]:
    return list(tokenize.generate_tokens(io.StringIO(code).readline))


def renamed(code: str) -> str:
    """Every name the code binds (functions, arguments, variables) consistently renamed, docstrings included."""
    tree = ast.parse(code)
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
    mapping = {name: f"q{i}_{name[::-1]}" for i, name in enumerate(sorted(bound))}
    word = re.compile(r"\b(" + "|".join(map(re.escape, sorted(bound, key=len, reverse=True))) + r")\b")
    offs, edits, prev = _offsets(code), [], None
    for tok in _tokens(code):
        start = offs[tok.start[0] - 1] + tok.start[1]
        end = offs[tok.end[0] - 1] + tok.end[1]
        if tok.type == tokenize.NAME and tok.string in mapping and not (prev and prev.string == "."):
            edits.append((start, end, mapping[tok.string]))
        elif tok.type == tokenize.STRING:
            edits.append((start, end, word.sub(lambda m: mapping[m.group(1)], tok.string)))
        prev = tok
    return _apply(code, edits)


def reformatted(code: str) -> str:
    """Black-like layout changes: arguments split one per line, 2-space indentation, extra blank lines."""
    offs, edits, depth = _offsets(code), [], 0
    toks = _tokens(code)
    for tok, nxt in zip(toks, toks[1:]):
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif tok.string == "," and depth > 0 and nxt.start[0] == tok.end[0] and nxt.string not in ")]}":
            pos = offs[tok.end[0] - 1] + tok.end[1]
            edits.append((pos, offs[nxt.start[0] - 1] + nxt.start[1], "\n" + " " * 12))
    code = _apply(code, edits)
    in_string = set()
    for tok in _tokens(code):
        if tok.type == tokenize.STRING and tok.end[0] > tok.start[0]:
            in_string.update(range(tok.start[0] + 1, tok.end[0] + 1))
    out = []
    for row, line in enumerate(code.splitlines(), 1):
        if row not in in_string:
            stripped = line.lstrip(" ")
            line = " " * ((len(line) - len(stripped)) // 2) + stripped
        out.append(line)
        if line.rstrip().endswith(":") and row not in in_string:
            out.append("")
    return "\n".join(out) + "\n"


SWAPS = {"<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "==", "+": "-", "-": "+"}


def edited(code: str, solution_start: int) -> str:
    """A light edit a contaminated exercise might carry: one operator of the solution flipped, a comment added."""
    offs = _offsets(code)
    for tok in _tokens(code):
        start = offs[tok.start[0] - 1] + tok.start[1]
        if start >= solution_start and tok.type == tokenize.OP and tok.string in SWAPS:
            code = _apply(code, [(start, start + len(tok.string), SWAPS[tok.string])])
            break
    return "# practice exercise\n" + code


def planted_items(host_texts: list[str]) -> list[dict]:
    """4 copies of each PLANTED_TASKS problem. Reformatted and edited ones are appended to a real stdlib file, so
    the unit split has to find them inside unrelated code."""
    problems = {p.task_id: p for p in load_humaneval()}
    items = []
    for i, task in enumerate(PLANTED_TASKS):
        p = problems[task]
        code = p.prompt + p.reference
        host = host_texts[i % len(host_texts)]
        variants = {
            "exact": code,
            "renamed": renamed(code),
            "reformatted": host + "\n\n" + reformatted(code),
            "edited": host + "\n\n" + edited(code, len(p.prompt)),
        }
        for kind, text in variants.items():
            ast.parse(text)  # every planted item is valid Python
            items.append({"id": f"planted/{kind}/{task}", "text": text, "task": task, "kind": kind})
    return items


# --- fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory, demo_corpus) -> dict:
    """One real run: demo_corpus (200 real stdlib files) + 80 planted items, against all 164 HumanEval problems."""
    root = tmp_path_factory.mktemp("decon")
    hosts = [p.read_text() for p in sorted(demo_corpus.iterdir())[-10:]]
    planted = planted_items(hosts)
    with (root / "planted.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in planted)
    out = root / "out"
    rc = main(
        [
            "--config-name",
            "demo",
            f"train.paths=[{demo_corpus},{root / 'planted.jsonl'}]",
            f"output_dir={out}",
            "progress=false",
        ]
    )
    assert rc == 0
    nearest = {r["task_id"]: r for r in map(json.loads, (out / "nearest.jsonl").read_text().splitlines())}
    flagged = {r["item_id"]: r for r in map(json.loads, (out / "flagged.jsonl").read_text().splitlines())}
    stats = json.loads((out / "stats.json").read_text())
    return {"out": out, "planted": planted, "nearest": nearest, "flagged": flagged, "stats": stats}


# --- the measures on their own --------------------------------------------------------------------------------------


def test_ast_match_is_invariant_to_renaming_and_layout_not_to_edits():
    p = next(p for p in load_humaneval() if p.task_id == "HumanEval/0")
    code = p.prompt + p.reference
    a = normalized_tree(code)
    assert ast_match(a, normalized_tree(renamed(code))) == 1.0
    assert ast_match(a, normalized_tree(reformatted(code))) == 1.0
    light = ast_match(a, normalized_tree(edited(code, len(p.prompt))))
    assert 0.9 <= light < 1.0
    other = next(p for p in load_humaneval() if p.task_id == "HumanEval/1")
    assert ast_match(a, normalized_tree(other.prompt + other.reference)) < 0.6
    assert normalized_tree("def broken(:\n") is None


def test_tokens_drop_layout_and_comments_keep_identifiers():
    words = [t.text for t in code_tokens("def f(a,\n      b):  # hi\n    return a+b\n")[0]]
    assert words == ["def", "f", "(", "a", ",", "b", ")", ":", "return", "a", "+", "b"]
    toks, ok = code_tokens('s = """unterminated\n')
    assert not ok and toks  # falls back to regex tokens, so broken code is still compared
    units, parsed = split_units("class A:\n    def m(self):\n        return 1\n\ndef g():\n    pass\n")
    assert parsed and [u.name for u in units] == ["g", "m"]  # methods are units too, dedented to parse alone
    assert split_units("def broken(:\n")[1] is False


# --- the study on planted copies ------------------------------------------------------------------------------------


def test_ngrams_find_verbatim_copies_and_miss_renamed_ones(study):
    hits = {(item, task) for item, r in study["flagged"].items() for task in r["ngram_hits"]}
    for task in PLANTED_TASKS:
        for kind in ("exact", "reformatted"):
            assert (f"planted/{kind}/{task}", task) in hits, (kind, task)
    renamed_found = sum((f"planted/renamed/{t}", t) in hits for t in PLANTED_TASKS)
    assert renamed_found <= len(PLANTED_TASKS) // 4  # the gap the AST match closes


def test_ast_match_catches_every_renamed_and_reformatted_copy(study):
    for task in PLANTED_TASKS:
        for kind in ("exact", "renamed", "reformatted"):
            r = study["flagged"].get(f"planted/{kind}/{task}")
            assert r is not None and r["ast"] == 1.0 and r["ast_task"] == task, (kind, task, r)


def test_embedding_and_difflib_rank_exact_copies_first(study):
    for task in PLANTED_TASKS:
        near = study["nearest"][task]
        # token-hashing embeddings ignore layout: the exact and the reformatted copy tie at distance 0
        at_zero = {e["item_id"] for e in near["embedding"] if e["l2"] < 1e-3}
        assert f"planted/exact/{task}" in at_zero and at_zero <= {f"planted/{k}/{task}" for k in KINDS}
        assert near["difflib"][0]["ratio"] == 1.0
        assert near["ast"][0]["match"] == 1.0


def test_recall_and_false_positives_at_tau_0_8(study):
    removed = {i for i, r in study["flagged"].items() if 0.8 in r["removed_at_tau"]}
    planted = {r["id"] for r in study["planted"]}
    recall = len(removed & planted) / len(planted)
    real = study["stats"]["train"]["items"] - len(planted)
    fp_rate = len(removed - planted) / real
    print(f"\nrecall@tau0.8={recall:.3f} false positives={len(removed - planted)}/{real} ({fp_rate:.3%})")
    assert recall >= 0.95
    assert fp_rate <= 0.02


def test_pruned_copies_reconcile(study):
    out, stats = study["out"], study["stats"]
    planted_ids = {r["id"] for r in study["planted"]}
    for tau, s in stats["prune"].items():
        with zstandard.open(out / s["file"], "rt") as f:
            rows = [json.loads(line) for line in f]
        assert s["in"] == s["kept"] + s["removed"] == stats["train"]["items"]
        assert len(rows) == s["kept"]
        flagged = sum(1 for r in study["flagged"].values() if float(tau) in r["removed_at_tau"])
        assert s["removed"] == flagged
        if tau == "0.8":
            kept_planted = {r["id"] for r in rows} & planted_ids
            assert len(kept_planted) <= 0.05 * len(planted_ids)
            assert all("task" in r for r in rows if r["id"] in planted_ids)  # JSONL records are kept whole
    removed = [stats["prune"][t]["removed"] for t in ("0.95", "0.9", "0.85", "0.8")]
    assert removed == sorted(removed) and removed[-1] >= 76


class _Report(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.pre: list[str] = []
        self._in_pre = False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        self._in_pre = tag == "pre"
        if self._in_pre:
            self.pre.append("")

    def handle_endtag(self, tag):
        self._in_pre = False if tag == "pre" else self._in_pre

    def handle_data(self, data):
        if self._in_pre:
            self.pre[-1] += data


def test_report_renders(study):
    out = study["out"]
    parser = _Report()
    parser.feed((out / "report.html").read_text())
    assert len(parser.imgs) == 1 and parser.imgs[0].startswith("data:image/png;base64,")
    png = base64.b64decode(parser.imgs[0].split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert (out / "removed_vs_tau.png").read_bytes() == png
    assert len(parser.pre) == 2 * 20  # side by side: benchmark code | training unit, for the top 20 pairs
    primaries = {primary_function(p.prompt + p.reference, p.entry_point) for p in load_humaneval()}
    assert all(left in primaries for left in parser.pre[0::2])  # left column: benchmark code, unescaped intact
    assert any("<" in p or "&" in p or '"' in p for p in parser.pre)  # code needing escapes round-trips
    md = (out / "report.md").read_text()
    assert "| 0.8 |" in md and "removed_vs_tau.png" in md


# --- bad input ------------------------------------------------------------------------------------------------------


def test_bad_input_is_one_line(tmp_path, capsys):
    cases = [
        ([f"train.paths=[{tmp_path / 'nope.jsonl'}]"], "nope.jsonl"),
        (["ngram.nn=3"], "nn"),
        (["prune.taus=[1.5]"], "prune.taus"),
        (["benchmark.name=mbpp"], "benchmark.path"),
        (["benchmark.name=custom", f"benchmark.path={tmp_path / 'missing.jsonl'}"], "missing.jsonl"),
        (["embedding.embedder=bert"], "embedding.embedder"),
        (["benchmark.problems=[HumanEval/999]"], "HumanEval/999"),
    ]
    for overrides, needle in cases:
        assert main(["--config-name", "demo", f"output_dir={tmp_path / 'o'}", *overrides]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and needle in err, (overrides, err)
    with pytest.raises(PhiTrainError, match="unknown config name 'no_such_config'; choose one of codetextbook, demo"):
        load_config("no_such_config")
    proc = subprocess.run(
        [sys.executable, "-m", "data_tools.decontaminate", "--config-name", "demo", "train.limit=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "train.limit=0" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- the retrain-on-pruned sweep ------------------------------------------------------------------------------------


def test_prune_sweep_dry_run_prints_commands_and_resumes(tmp_path):
    work = tmp_path / "sweep"
    (work / "tau0.9").mkdir(parents=True)
    (work / "tau0.9" / "result.json").write_text(json.dumps({"tau": "0.9", "pass@1": 0.25}))
    cmd = [
        sys.executable, "launch/prune_sweep.py", "dry_run=true", f"work_dir={work}",
        f"decontaminated={tmp_path / 'decon'}", "tokenizer=tok/tokenizer.model",
        "init_from=runs/base/checkpoints", "model=phi1_tiny", "taus=[0.95,0.9,0.8]",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "python -m data_tools.decontaminate" in out  # the pruned sets do not exist yet: made first
    for tau in ("0.95", "0.8"):
        assert f"pruned_tau{tau}.jsonl.zst" in out
        assert "train.init_from=runs/base/checkpoints" in out
        assert f"eval.checkpoint={work / f'tau{tau}' / 'run' / 'checkpoints'}" in out
    assert "skip tau=0.9" in out
    order = [out.index(s) for s in ("data_tools.shard", "launch/train.py", "launch/evaluate.py")]
    assert order == sorted(order)
    assert "| 0.9 |" in out and "25.00%" in out  # the results table includes the finished tau
