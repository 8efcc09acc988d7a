"""Shared machinery of the synthetic data generators (phi-1 §2.2): config, diversity seeds, a resumable generation job.

phi-1's synthetic textbooks (<1B tokens) and CodeExercises (~180M tokens) were written by GPT-3.5. The paper's one
lesson about generating them (§2.2) is *diversity*: asking the same question many times returns the same answer, so
"randomness" is injected into every prompt by constraining topics, audiences and function names. Here every item is
a prompt template plus a tuple of such seeds drawn reproducibly from a seed; its id is a hash of (template, seeds).

The generation job (`run_generation`) is resumable and idempotent: each teacher reply is appended as one JSON line to
`work_dir/generations.jsonl` (flushed and fsynced per chunk), a rerun reads that file and asks only for the ids that
are missing, and a torn last line (SIGKILL mid-write) is cut off before appending, so no id is ever written twice.
Teacher failures are *not* written (they may be transient and the teacher's cache only holds successes): the next run
retries them. Counts reconcile: requested == generated + sum(failed per reason). Each request carries a `seed`
derived from its item id (`item_seed`): distinct items are sampled independently even when the server batches them,
and a rerun asks for the same sample. A job that ends with items still failed exits 1, naming the count and the
command that continues it (`allow_partial=true` accepts the partial set, exit 0); its output is written either way.
Every job also writes and prints a diversity report (`data_tools.synth.diversity`).

Both `data_tools.synth.textbooks` and `data_tools.synth.exercises` run on one `SynthConfig`, composed by Hydra
(`phi_train.cli`) from `conf/synth/<name>.yaml` (demo and openai start from base by their defaults list) and
`key=value` overrides. Mappings merge key by key: a file that starts from base and defines `templates` adds to the
base's prompts; a file of your own that should replace them does not start from base.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import shlex
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from tqdm import tqdm

from data_tools.codetextbook.config import DedupConfig
from phi_train import cli
from phi_train.cli import to_yaml  # noqa: F401  (re-exported for the generators)
from phi_train.config import WandbConfig
from phi_train.errors import CONF_ROOT, PhiTrainError, ReconcileError, require
from phi_train.teacher import TeacherConfig

CONF_DIR = CONF_ROOT / "synth"
GENERATIONS = "generations.jsonl"
SCHEMA = "synth_schema"
"""The ConfigStore name of `SynthConfig`, first in conf/synth/base.yaml's defaults list."""


class SynthConfigError(PhiTrainError):
    """A bad synth config key/value or input file; printed on one line by the CLIs (exit 2)."""


_require = functools.partial(require, error=SynthConfigError)


# --- config ---------------------------------------------------------------------------------------------------------


@dataclass
class TextbookConfig:
    count: int = 20
    """Distinct (template, seeds) items to generate."""
    seed: int = 0
    """Seeds the diversity draw: the same seed and lists give the same items (and ids)."""
    templates: dict[str, str] = field(default_factory=dict)
    """name -> prompt with placeholders {topic} {subtopic} {audience} {style} {words}."""
    topics: dict[str, list[str]] = field(default_factory=dict)
    """topic -> subtopics."""
    topics_file: str | None = None
    """A YAML file `topic: [subtopic, ...]` replacing `topics` (your own curriculum)."""
    audiences: list[str] = field(default_factory=list)
    styles: list[str] = field(default_factory=list)
    words: list[str] = field(default_factory=list)
    """Random constraint words: each prompt must use `words_per_prompt` of them (phi-1 §2.2's injected randomness)."""
    words_per_prompt: int = 3
    min_chars: int = 300
    """Shorter replies are dropped as `too_short`."""
    work_dir: str = "data/synth/textbooks_work"
    output_dir: str = "data/synth/textbooks"

    def __post_init__(self) -> None:
        _require(self.count >= 1, f"textbooks.count={self.count} must be >= 1")
        _require(0 <= self.words_per_prompt <= 10, f"textbooks.words_per_prompt={self.words_per_prompt} not in 0..10")


@dataclass
class MineConfig:
    inputs: list[str] = field(default_factory=list)
    """JSONL(.zst) files with `text` (e.g. data_tools.codetextbook's output_dir files) or directories of .py files."""
    min_body_lines: int = 2
    max_body_lines: int = 30
    max_args: int = 3
    """Functions with more required positional parameters are skipped (their tests are made by probing inputs)."""
    min_tests: int = 2
    max_tests: int = 4
    limit: int = -1
    """Documents read (-1: all)."""

    def __post_init__(self) -> None:
        _require(
            1 <= self.min_body_lines <= self.max_body_lines,
            "exercises.mine: need 1 <= min_body_lines <= max_body_lines",
        )
        _require(1 <= self.min_tests <= self.max_tests, "exercises.mine: need 1 <= min_tests <= max_tests")


@dataclass
class ExerciseConfig:
    source: str = "teacher"
    """teacher (prompts to the teacher LLM) | mine (offline: functions with docstrings from real code)."""
    count: int = 20
    seed: int = 0
    templates: dict[str, str] = field(default_factory=dict)
    """name -> prompt with placeholders {topic} {difficulty} {name} {words}."""
    topics: list[str] = field(default_factory=list)
    topics_file: str | None = None
    """A text file, one topic per line (or YAML list), replacing `topics`."""
    difficulties: list[str] = field(default_factory=list)
    verbs: list[str] = field(default_factory=list)
    nouns: list[str] = field(default_factory=list)
    """The function name is constrained to `<verb>_<noun>` (phi-1 §2.2: constrained function names for diversity)."""
    words: list[str] = field(default_factory=list)
    words_per_prompt: int = 1
    max_tests: int = 8
    """Replies with more asserts keep the first max_tests."""
    sandbox_timeout_s: float = 5.0
    sandbox_workers: int = 2
    mine: MineConfig = field(default_factory=MineConfig)
    work_dir: str = "data/synth/exercises_work"
    output_dir: str = "data/synth/exercises"

    def __post_init__(self) -> None:
        _require(self.source in ("teacher", "mine"), f"exercises.source={self.source!r} is not one of teacher, mine")
        _require(self.count >= 1, f"exercises.count={self.count} must be >= 1")
        _require(self.sandbox_timeout_s > 0, f"exercises.sandbox_timeout_s={self.sandbox_timeout_s} must be > 0")
        _require(self.sandbox_workers >= 1, f"exercises.sandbox_workers={self.sandbox_workers} must be >= 1")


@dataclass
class ReportConfig:
    """The diversity report (`data_tools.synth.diversity`), written to work_dir and printed by every job."""

    clusters: int = 8
    """k of the k-means over TF-IDF embeddings whose size entropy is `cluster_entropy` (fewer with few texts)."""
    wandb: WandbConfig = field(default_factory=lambda: WandbConfig(mode="disabled", project="phi-train-synth"))
    """Also log the report to wandb (mode offline | online); disabled by default: a data job needs no account."""

    def __post_init__(self) -> None:
        _require(self.clusters >= 2, f"report.clusters={self.clusters} must be >= 2")


@dataclass
class SynthConfig:
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(temperature=1.0, max_tokens=1024))
    textbooks: TextbookConfig = field(default_factory=TextbookConfig)
    exercises: ExerciseConfig = field(default_factory=ExerciseConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    chunk_size: int = 64
    """Items sent to the teacher between two appends to generations.jsonl (what a kill can lose at most)."""
    allow_partial: bool = False
    """Exit 0 even when items are still failed after the teacher retries (default: exit 1, naming them)."""
    progress: bool = True

    def __post_init__(self) -> None:
        _require(self.chunk_size >= 1, f"chunk_size={self.chunk_size} must be >= 1")


def load_config(config_name: str = "demo", overrides: Sequence[str] = ()) -> SynthConfig:
    """What `python -m data_tools.synth.textbooks|exercises --config-name NAME OVERRIDES...` runs with (NAME may be a
    path to a YAML file)."""
    return cli.load(SynthConfig, config_name, overrides, CONF_DIR, SCHEMA)


def read_topics_file(path: str, want_mapping: bool, key: str = "topics_file") -> Any:
    """A user's own topic list: YAML (mapping topic -> subtopics, or list) or plain text (one topic per line)."""
    p = Path(path)
    if not p.is_file():
        raise SynthConfigError(f"{key}={path!r} does not exist")
    if p.suffix in (".yaml", ".yml", ".json"):
        data = OmegaConf.to_container(OmegaConf.load(p))
    else:
        data = [line.strip() for line in p.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if want_mapping:
        if isinstance(data, list):  # plain topics: the topic is its own only subtopic
            data = {str(t): [str(t)] for t in data}
        ok = isinstance(data, dict) and data and all(isinstance(v, list) and v for v in data.values())
        _require(bool(ok), f"{key}={path!r} must map each topic to a non-empty list of subtopics")
        return {str(k): [str(s) for s in v] for k, v in data.items()}
    _require(isinstance(data, list) and bool(data), f"{key}={path!r} must hold a non-empty list of topics")
    return [str(t) for t in data]


# --- items and diversity seeds ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    id: str
    template: str
    """Template name."""
    seeds: dict[str, Any]
    prompt: str


def item_seed(item_id: str) -> int:
    """The sampling seed of an item: 60 bits of its id, so every item has its own reproducible stream and no two items
    of a batch share one (the server seeds each row separately)."""
    return int(item_id[:15], 16)


def prompt_space(templates: dict[str, str], **choices: int) -> int:
    """How many distinct prompts the seed lists can make: templates x the product of each placeholder's choices
    (counted only for placeholders some template uses)."""
    used = {k for t in templates.values() for k in choices if "{" + k + "}" in t}
    return len(templates) * math.prod(n for k, n in choices.items() if k in used)


def item_id(template_name: str, template_text: str, seeds: dict[str, Any]) -> str:
    """Deterministic id of (template, seed tuple): editing a template's text makes new items, not stale reuse."""
    blob = json.dumps({"t": template_name, "text": template_text, "s": seeds}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def draw_items(
    count: int,
    seed: int,
    templates: dict[str, str],
    draw: Callable[[random.Random], dict[str, Any]],
    what: str,
) -> list[Item]:
    """`count` distinct items: template and seeds drawn from `random.Random(f"{seed}:{i}")` until `count` distinct ids.

    Per-index generators make item i independent of how many items were asked for: raising `count` keeps the first
    items (and their cached replies) and adds new ones.
    """
    _require(bool(templates), f"{what}.templates is empty: give at least one name -> prompt template")
    names = sorted(templates)
    items: dict[str, Item] = {}
    attempts = 0
    while len(items) < count:
        if attempts >= 20 * count + 100:
            raise SynthConfigError(
                f"{what}: only {len(items)} distinct prompts after {attempts} draws but count={count}; "
                f"lower {what}.count or add topics/words"
            )
        rng = random.Random(f"{seed}:{attempts}")
        attempts += 1
        name = rng.choice(names)
        seeds = draw(rng)
        try:
            prompt = templates[name].format(**seeds)
        except (KeyError, IndexError, ValueError) as e:
            raise SynthConfigError(
                f"{what}.templates.{name}: bad placeholder {e}; valid: {', '.join('{' + k + '}' for k in seeds)}"
            ) from None
        iid = item_id(name, templates[name], seeds)
        items.setdefault(iid, Item(iid, name, seeds, prompt))
    return list(items.values())


def pick_words(rng: random.Random, words: list[str], k: int) -> str:
    return ", ".join(rng.sample(words, min(k, len(words)))) if words and k else ""


# --- the resumable generation job -------------------------------------------------------------------------------------


class GenerationStore:
    """`work_dir/generations.jsonl`: one record per item id that the teacher answered. Append-only, crash-safe."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict[str, Any]] = {}
        self.torn_bytes = 0
        if self.path.exists():
            self._repair_and_load()

    def _repair_and_load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a write cut by SIGKILL: drop the partial line so the next append starts clean
            self.torn_bytes = len(data) - end
            with open(self.path, "r+b") as f:
                f.truncate(end)
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "id" in rec:
                self.records.setdefault(rec["id"], rec)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.records

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        lines = []
        for rec in records:
            if rec["id"] in self.records:
                continue
            self.records[rec["id"]] = rec
            lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
        if not lines:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())


@dataclass
class GenerationCounts:
    requested: int = 0
    generated: int = 0
    """Items with a reply (this run's or an earlier run's)."""
    reused: int = 0
    """Of `generated`: answered by an earlier run (read from generations.jsonl: not sent again)."""
    failed: Counter = field(default_factory=Counter)
    """Teacher failures of this run, by reason (http_500, rate_limited, bad_response, ...)."""

    def check(self) -> None:
        if self.requested != self.generated + sum(self.failed.values()):
            raise ReconcileError(
                f"generation: requested={self.requested} != generated={self.generated} + failed={sum(self.failed.values())}"
            )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"failed": dict(self.failed)}


def make_client(t: TeacherConfig, cache_dir: str | Path):
    from phi_train.teacher import TeacherClient

    return TeacherClient.from_config(t, cache_dir)


def run_generation(
    items: list[Item], client, store: GenerationStore, sampling: dict[str, Any], chunk_size: int, progress: bool
) -> GenerationCounts:
    """Ask the teacher for every item not yet in `store`, `chunk_size` at a time, appending each chunk's replies."""
    counts = GenerationCounts(requested=len(items))
    missing = [it for it in items if it.id not in store]
    counts.reused = len(items) - len(missing)
    bar = tqdm(total=len(missing), desc="teacher", unit="item", disable=not progress)
    for start in range(0, len(missing), chunk_size):
        chunk = missing[start : start + chunk_size]
        replies = client.complete_many_sync([it.prompt for it in chunk], [item_seed(it.id) for it in chunk], **sampling)
        records = []
        for it, reply in zip(chunk, replies, strict=True):
            if reply.text is None:
                counts.failed[reply.error_reason or "unknown"] += 1
                continue
            records.append(
                {
                    "id": it.id,
                    "template": it.template,
                    "seeds": it.seeds,
                    "prompt": it.prompt,
                    "seed": item_seed(it.id),
                    "reply": reply.text,
                    "teacher_model": client.model,
                    "usage": asdict(reply.usage),
                }
            )
        store.append(records)
        bar.update(len(chunk))
    bar.close()
    counts.generated = sum(it.id in store for it in items)
    counts.check()
    return counts


def teacher_sampling(t: TeacherConfig) -> dict[str, Any]:
    return t.sampling()


def exit_status(summary: dict[str, Any], cfg: SynthConfig, module: str) -> int:
    """0, or 1 with a one-line error when teacher failures remain and `allow_partial` is false."""
    gen = summary.get("generation")
    failed = sum(gen["failed"].values()) if gen else 0
    if not failed:
        return 0
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(gen["failed"].items()))
    # sys.argv is what Hydra was handed: the user's arguments plus our quiet-output overrides, which are dropped
    args = [a for a in sys.argv[1:] if a not in cli.QUIET and not a.startswith("hydra.searchpath=")]
    if "--config-path" in args and "--config-name" in args:  # a config file was named by path: say it so again
        i, j = args.index("--config-path"), args.index("--config-name")
        path = f"{args[i + 1]}/{args[j + 1]}.yaml"
        args = [a for k, a in enumerate(args) if k not in (i, i + 1, j, j + 1)]
        args = ["--config-name", path, *args]
    command = " ".join(["python -m", module, *map(shlex.quote, args)])
    if cfg.allow_partial:
        print(f"warning: {failed} of {gen['requested']} items failed ({reasons}); accepted (allow_partial=true)",
              file=sys.stderr)  # fmt: skip
        return 0
    print(
        f"error: {failed} of {gen['requested']} items still failed after the teacher's retries ({reasons}); output "
        f"has the {gen['generated']} others. Continue (only the failed items are sent again): {command}  "
        "-- or accept the partial set with allow_partial=true",
        file=sys.stderr,
    )
    return 1


# --- output ---------------------------------------------------------------------------------------------------------


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records atomically (tmp + rename); zstd-compressed when the name ends in .zst. Returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    lines = (json.dumps(rec, ensure_ascii=False).encode() + b"\n" for rec in records)
    n = 0
    with open(tmp, "wb") as raw:
        if path.name.endswith(".zst"):
            import zstandard

            with zstandard.ZstdCompressor(level=10).stream_writer(raw, closefd=False) as out:
                for line in lines:
                    out.write(line)
                    n += 1
        else:
            for line in lines:
                raw.write(line)
                n += 1
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, path)
    return n


def check_drops(stage: str, n_in: int, kept: int, dropped: Counter) -> None:
    if n_in != kept + sum(dropped.values()):
        raise ReconcileError(f"{stage}: in={n_in} != kept={kept} + dropped={sum(dropped.values())} ({dict(dropped)})")


def print_summary(title: str, rows: list[tuple[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("count")
    t.add_column("items", justify="right")
    for label, value in rows:
        t.add_row(label, f"{value:,}" if isinstance(value, int) else str(value))
    Console(stderr=True).print(t)
