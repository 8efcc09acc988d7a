"""The data streams: token shards -> micro-batches, deterministic and exactly resumable.

`GlobalBatchStream` (end of this file) is the trainer's: global batches that do not depend on the world size, each
rank taking its slice, optionally a weighted mixture of shard sets — exactly resumable on another world size.
`TokenStream` (below) is per-rank slots; the trainer uses it for validation passes.

TokenStream contract (docs/data.md has the long form):
- Each rank runs `max(num_workers, 1)` readers ("slots"), globally numbered `slot = rank * W + worker`. For epoch e a
  slot reads `perm_e[slot :: n_slots]`, where `perm_e` is the manifest's shard list shuffled by (seed, e), the same on
  every rank; so in every epoch the slots partition the shards and no two ranks read the same sequence.
- A slot streams its shards in that order, shuffles sequences through a buffer with its own RNG seeded by
  (seed, e, slot) and cuts them into micro-batches. With `loop=True` it goes on to epoch e+1 forever (each slot counts
  its own epochs; a partial last batch of an epoch is dropped); with `loop=False` it stops after one pass and hands
  out the partial last batch (validation).
- Slots run in the DataLoader's workers, which it polls in strict round robin; since every slot is infinite, the
  batch order is a pure function of (manifest, seed, world size, workers, micro batch, shuffle buffer).
- Every batch travels with (slot, epoch, index in epoch). `__iter__` strips it and records it only when the batch is
  handed to the caller, so `state_dict()` is the position right after the last batch the trainer received, not what
  workers prefetched. `load_state_dict` restarts every slot at its position (replaying the epoch's shard order and
  shuffle without decoding the consumed sequences) and rotates the worker -> slot mapping so the round robin
  continues with the right slot: the concatenation of batches before a save and after a resume is bit-identical to an
  uninterrupted stream.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from phi_train.errors import PhiTrainError

log = logging.getLogger(__name__)

STATE_FORMAT = 1


class DataError(PhiTrainError):
    """A data problem the user must fix (missing manifest, bad shard, mismatched resume state); one line."""


# --- locations ---------------------------------------------------------------------------------------------------------


def _is_url(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def shard_url(path: str, name: str) -> str:
    """Where shard `name` of a dataset at `path` lives.

    `path` is a directory, a URL prefix (`http://host/shards`, `s3://...` via fsspec-capable gopen), or a template
    containing `{name}` (needed for commands: `pipe:aws s3 cp s3://bucket/shards/{name} -`).
    """
    if "{name}" in path:
        return path.replace("{name}", name)
    if _is_url(path):
        return path.rstrip("/") + "/" + name
    return str(Path(path) / name)


def read_manifest(path: str) -> dict:
    """The `manifest.json` of the shard set at `path` (directory, URL prefix or `{name}` template)."""
    url = shard_url(path, "manifest.json")
    try:
        if _is_url(path):
            with wds.gopen(url, "rb") as fh:
                raw = fh.read()
        else:
            raw = Path(url).read_bytes()
    except (OSError, ValueError) as exc:
        raise DataError(
            f"no shard manifest at {url!r} ({type(exc).__name__}); point data.path at a directory written by "
            "`python -m data_tools.shard`"
        ) from None
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"shard manifest {url!r} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != 1 or "splits" not in manifest:
        raise DataError(f"shard manifest {url!r} has an unknown format {manifest.get('format')!r} (expected 1)")
    return manifest


# --- determinism helpers ------------------------------------------------------------------------------------------------


def _mix(*parts: object) -> int:
    """A 64-bit seed from its parts; stable across processes and Python versions (unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


def epoch_shards(names: list[str], seed: int, epoch: int, slot: int, n_slots: int) -> list[str]:
    """The shards slot `slot` reads in `epoch`: a (seed, epoch) permutation, same on every rank, dealt round robin."""
    perm = list(names)
    random.Random(_mix("shards", seed, epoch)).shuffle(perm)
    return perm[slot::n_slots]


def shuffled(items: Iterator, rng: random.Random, size: int) -> Iterator:
    """Buffer shuffle: hold `size` items, emit a random one as each new one arrives, then drain in random order."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        out, buf[j] = buf[j], item
        yield out
    rng.shuffle(buf)
    yield from buf


def _fingerprint(shards: list[dict]) -> str:
    return hashlib.sha256(json.dumps([[s["name"], s.get("sha256")] for s in shards]).encode()).hexdigest()[:16]


# --- decoding -----------------------------------------------------------------------------------------------------------

_NPY_HEADERS: dict[bytes, tuple[np.dtype, int, int]] = {}


def _npy_layout(data: bytes) -> tuple[np.dtype, int, int]:
    """(dtype, length, data offset) of a 1-D .npy payload; parsed once per distinct header, then a dict lookup."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("payload is not a .npy array")
    major = data[6]
    hlen = int.from_bytes(data[8:10], "little") if major == 1 else int.from_bytes(data[8:12], "little")
    start = (10 if major == 1 else 12) + hlen
    key = data[:start]
    layout = _NPY_HEADERS.get(key)
    if layout is None:
        fh = io.BytesIO(data)
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        if len(shape) != 1 or fortran:
            raise ValueError(f"expected a 1-D array, got shape {shape}")
        layout = (dtype, shape[0], start)
        _NPY_HEADERS[key] = layout
    return layout


def _stack(payloads: list[bytes], width: int, dtype=np.int64) -> torch.Tensor:
    out = np.empty((len(payloads), width), dtype=dtype)
    for i, data in enumerate(payloads):
        src, n, offset = _npy_layout(data)
        if n != width:
            raise ValueError(f"sequence has {n} tokens, expected seq_len + 1 = {width}")
        out[i] = np.frombuffer(data, dtype=src, count=n, offset=offset)
    return torch.from_numpy(out)


def decode_batch(payloads: list, width: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Stack `tokens.npy` payloads into one int64 tensor [len(payloads), width]: one numpy -> torch per batch.

    Shards with loss masks (fine-tuning exercises) carry (tokens.npy, mask.npy) pairs: then (tokens, mask) with a
    bool mask, True where the token is a training target.
    """
    if payloads and isinstance(payloads[0], tuple):
        tokens = _stack([p[0] for p in payloads], width)
        mask = _stack([p[1] for p in payloads], width, dtype=np.bool_)
        return tokens, mask
    return _stack(payloads, width)


# --- one slot's reader ---------------------------------------------------------------------------------------------------


class _SlotReader:
    """Everything a slot needs, picklable (it travels to DataLoader workers)."""

    def __init__(
        self,
        path: str,
        shards: list[dict],
        *,
        width: int,
        micro_batch_size: int,
        n_slots: int,
        seed: int,
        shuffle_buffer: int,
        on_bad_shard: str,
        loop: bool,
    ):
        self.path = path
        self.names = [s["name"] for s in shards]
        self.width = width
        self.mbs = micro_batch_size
        self.n_slots = n_slots
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.on_bad_shard = on_bad_shard
        self.loop = loop

    def _payloads(self, names: list[str], bad: list[str]) -> Iterator[bytes]:
        """Raw `tokens.npy` bytes of `names`, in order. A shard that fails is raised or (skip) noted in `bad`."""
        for name in names:
            url = shard_url(self.path, name)
            try:
                pipeline = wds.DataPipeline(
                    wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=wds.reraise_exception)
                )
                for sample in pipeline:
                    if "tokens.npy" not in sample:
                        raise ValueError(f"sample {sample.get('__key__')!r} has no tokens.npy")
                    yield (sample["tokens.npy"], sample["mask.npy"]) if "mask.npy" in sample else sample["tokens.npy"]
            except Exception as exc:  # noqa: BLE001 - any failure to read a shard is a bad shard, by name
                msg = str(exc).splitlines()[0] if str(exc) else ""
                msg = f"shard {name!r} ({url}) could not be read: {type(exc).__name__}: {msg}"
                if self.on_bad_shard == "raise":
                    raise DataError(msg + " (set data.on_bad_shard=skip to skip bad shards)") from None
                log.warning("skipping bad %s", msg)
                bad.append(name)

    def batches(self, slot: int, epoch: int, start: int) -> Iterator[tuple]:
        """("batch", tensor, slot, epoch, index, bad shards seen since the last batch) from (epoch, start) on."""
        bad: list[str] = []
        while True:
            names = epoch_shards(self.names, self.seed, epoch, slot, self.n_slots)
            rng = random.Random(_mix("samples", self.seed, epoch, slot))
            to_skip = start * self.mbs
            index = start
            pending: list[bytes] = []
            for payload in shuffled(self._payloads(names, bad), rng, self.shuffle_buffer):
                if to_skip:  # already consumed before the resume: replayed for the shuffle, never decoded
                    to_skip -= 1
                    continue
                pending.append(payload)
                if len(pending) == self.mbs:
                    # `bad` is shared with the shard reader above: hand over a copy, then empty it in place.
                    yield ("batch", decode_batch(pending, self.width), slot, epoch, index, bad[:])
                    bad.clear()
                    pending = []
                    index += 1
            if not self.loop:
                if pending:
                    yield ("batch", decode_batch(pending, self.width), slot, epoch, index, bad[:])
                elif bad:
                    yield ("stats", None, slot, epoch, index, bad[:])
                return
            if index == 0:
                raise DataError(
                    f"reader {slot} got fewer than micro_batch_size={self.mbs} sequences in epoch {epoch} "
                    f"(shards {names}); write more or smaller shards, or lower data.num_workers"
                )
            epoch, start = epoch + 1, 0


class _SlotDataset(IterableDataset):
    """DataLoader worker i serves local slot (i + rotation) % W of this rank."""

    def __init__(
        self, reader: _SlotReader, rank: int, slots_per_rank: int, rotation: int, positions: dict[int, tuple[int, int]]
    ):
        self.reader = reader
        self.rank = rank
        self.slots_per_rank = slots_per_rank
        self.rotation = rotation
        self.positions = positions

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        slot = self.rank * self.slots_per_rank + (worker + self.rotation) % self.slots_per_rank
        epoch, start = self.positions[slot]
        try:
            yield from self.reader.batches(slot, epoch, start)
        except DataError as exc:
            # Hand the message over as data: an exception would cross the worker boundary with a traceback attached.
            yield ("error", str(exc), slot, epoch, start, [])


# --- the public stream ----------------------------------------------------------------------------------------------------


class TokenStream:
    """Micro-batches `LongTensor[micro_batch_size, seq_len + 1]` of one split for one rank (see module docstring)."""

    def __init__(
        self,
        path: str,
        split: str,
        *,
        seq_len: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        seed: int,
        shuffle_buffer: int,
        on_bad_shard: str = "raise",
        loop: bool = True,
    ):
        self.path = str(path)
        self.split = split
        self.manifest = read_manifest(self.path)
        where = shard_url(self.path, "manifest.json")
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(f"split {split!r} not in {where} (has {', '.join(sorted(splits))})")
        if seq_len != self.manifest["seq_len"]:
            raise DataError(
                f"seq_len={seq_len} but the shards in {self.path} hold seq_len={self.manifest['seq_len']}; "
                "set data.seq_len=null or re-shard with --seq-len"
            )
        if micro_batch_size < 1:
            raise DataError(f"micro_batch_size={micro_batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        if num_workers < 0 or shuffle_buffer < 1:
            raise DataError(f"num_workers={num_workers} must be >= 0 and shuffle_buffer={shuffle_buffer} >= 1")
        if on_bad_shard not in ("raise", "skip"):
            raise DataError(f"on_bad_shard={on_bad_shard!r} is not one of raise, skip")
        self.shards: list[dict] = list(splits[split]["shards"])
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.slots_per_rank = max(num_workers, 1)
        self.n_slots = world_size * self.slots_per_rank
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.on_bad_shard = on_bad_shard
        self.loop = loop
        if len(self.shards) < self.n_slots:
            raise DataError(
                f"split {split!r} in {self.path} has {len(self.shards)} shards but world_size={world_size} x "
                f"num_workers={self.slots_per_rank} = {self.n_slots} readers need at least one each; write more shards "
                "(smaller --shard-sequences) or lower data.num_workers"
            )
        self._reader = _SlotReader(
            self.path, self.shards, width=seq_len + 1, micro_batch_size=micro_batch_size, n_slots=self.n_slots,
            seed=seed, shuffle_buffer=shuffle_buffer, on_bad_shard=on_bad_shard, loop=loop,
        )  # fmt: skip
        self._my_slots = [rank * self.slots_per_rank + w for w in range(self.slots_per_rank)]
        self._positions: dict[int, tuple[int, int]] = {s: (0, 0) for s in self._my_slots}
        self._consumed = 0
        self.stats: dict = {
            "batches": 0,
            "sequences": 0,
            "bad_shards_skipped": 0,
            "bad_shards": [],
            "epochs_completed": {},
        }
        self._update_epochs()

    # -- iteration --

    def __iter__(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """Batches [micro_batch_size, seq_len + 1] of token ids; (tokens, loss mask) for shards written with masks."""
        rotation = self._consumed % self.slots_per_rank
        dataset = _SlotDataset(self._reader, self.rank, self.slots_per_rank, rotation, dict(self._positions))
        if self.num_workers == 0:
            items = iter(dataset)
        else:
            # spawn, not fork: a forked worker inherits the rank's open sockets (the rendezvous store among them) and
            # holds the port after a SIGKILL of its rank; not forkserver either: its workers are the forkserver's
            # children, so PyTorch's parent watchdog never sees the rank die and they linger forever
            items = iter(
                DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=self.num_workers,
                    multiprocessing_context="spawn",
                    # its own generator: the DataLoader draws a base seed at start, which must not shift the global
                    # RNG that dropout uses (a resumed run restores that RNG and would otherwise draw it again)
                    generator=torch.Generator().manual_seed(0),
                )
            )
        for kind, batch, slot, epoch, index, bad in items:
            if kind == "error":
                raise DataError(batch)
            if bad:
                self.stats["bad_shards_skipped"] += len(bad)
                self.stats["bad_shards"] = sorted(set(self.stats["bad_shards"]) | set(bad))
            if kind != "batch":
                continue
            if isinstance(batch, list):  # the DataLoader's default_convert turned a (tokens, mask) pair into a list
                batch = tuple(batch)
            self._positions[slot] = (epoch, index + 1)
            self._consumed += 1
            self.stats["batches"] += 1
            self.stats["sequences"] += len(batch[0] if isinstance(batch, tuple) else batch)
            self._update_epochs()
            yield batch

    def _update_epochs(self) -> None:
        self.stats["epochs_completed"] = {s: e for s, (e, _) in self._positions.items()}

    # -- resume --

    def _identity(self) -> dict:
        return {
            "split": self.split,
            "seed": self.seed,
            "world_size": self.world_size,
            "readers_per_rank": self.slots_per_rank,
            "micro_batch_size": self.micro_batch_size,
            "shuffle_buffer": self.shuffle_buffer,
            "seq_len": self.seq_len,
            "loop": self.loop,
            "shards": _fingerprint(self.shards),
        }

    def state_dict(self) -> dict:
        """Position right after the last batch `__iter__` handed out. JSON-serialisable."""
        return {
            "format": STATE_FORMAT,
            **self._identity(),
            "num_workers": self.num_workers,
            "rank": self.rank,
            "batches_consumed": self._consumed,
            "positions": {str(s): list(p) for s, p in self._positions.items()},
            "bad_shards_skipped": self.stats["bad_shards_skipped"],
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state` (call before iterating). Raises DataError when the state belongs to another setup."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DataError(
                f"data stream state has format {state.get('format') if isinstance(state, dict) else state!r}, expected {STATE_FORMAT}"
            )
        mine = self._identity()
        diffs = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diffs:
            raise DataError(
                "cannot resume the data stream exactly, the setup changed (" + "; ".join(diffs) + "); "
                "restore the saved setup, or start a fresh stream at an epoch boundary (docs/data.md)"
            )
        consumed = int(state["batches_consumed"])
        if state.get("rank") == self.rank:
            positions = {int(s): (int(p[0]), int(p[1])) for s, p in state["positions"].items()}
            if set(positions) != set(self._my_slots):
                raise DataError(f"data stream state lists readers {sorted(positions)}, expected {self._my_slots}")
        else:
            # Another rank's state (e.g. only rank 0's was saved): all ranks consume in lockstep, so this rank's
            # positions follow from the batch count and the manifest's sequence counts.
            if state.get("bad_shards_skipped"):
                raise DataError(
                    f"data stream state of rank {state.get('rank')} cannot be used on rank {self.rank}: bad shards were "
                    "skipped, so positions do not follow from the manifest; save every rank's state"
                )
            positions = self.positions_after(consumed)
        self._positions = positions
        self._consumed = consumed
        self.stats["bad_shards_skipped"] = int(state.get("bad_shards_skipped", 0))
        self._update_epochs()

    def batches_per_epoch(self, slot: int, epoch: int) -> int:
        """Full micro-batches slot `slot` yields in `epoch`, from the manifest's sequence counts."""
        counts = {s["name"]: s["sequences"] for s in self.shards}
        names = epoch_shards(list(counts), self.seed, epoch, slot, self.n_slots)
        return sum(counts[n] for n in names) // self.micro_batch_size

    def positions_after(self, consumed: int) -> dict[int, tuple[int, int]]:
        """This rank's slot positions after it handed out `consumed` batches (no bad shards; loop=True)."""
        positions = {}
        W = self.slots_per_rank
        for w, slot in enumerate(self._my_slots):
            left = consumed // W + (1 if w < consumed % W else 0)
            epoch = 0
            while True:
                per_epoch = self.batches_per_epoch(slot, epoch)
                if per_epoch == 0:
                    raise DataError(
                        f"reader {slot} gets no full micro-batch in epoch {epoch}; write more or smaller shards"
                    )
                if left < per_epoch:
                    break
                left -= per_epoch
                epoch += 1
            positions[slot] = (epoch, left)
        return positions


# --- the training stream: global batches independent of the world size ----------------------------------------------------

GLOBAL_STATE_FORMAT = 2


def default_readers(global_batch_size: int, n_shards: int, most: int = 16) -> int:
    """Readers of a global-batch stream when none are configured: the largest divisor of the global batch that is at
    most `most` and the shard count — a function of data and recipe only, never of the world size."""
    return max(v for v in range(1, min(most, n_shards, global_batch_size) + 1) if global_batch_size % v == 0)


def _rows(batch, lo: int, hi: int):
    return tuple(t[lo:hi] for t in batch) if isinstance(batch, (tuple, list)) else batch[lo:hi]


def _cat(parts: list):
    if isinstance(parts[0], (tuple, list)):
        return tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))
    return torch.cat(parts)


def mixture_draw(seed: int, batch: int, weights: list[float], readers: int) -> list[int]:
    """The source of each of the `readers` chunks of global batch `batch`: a pure function of (seed, batch)."""
    if len(weights) == 1:
        return [0] * readers
    return random.Random(_mix("mixture", seed, batch)).choices(range(len(weights)), weights=weights, k=readers)


def _serving(draw: list[int], counters: list[int], readers: int) -> list[tuple[int, int, int]]:
    """(source, reader of that source, its chunk number) serving each chunk of a global batch; advances `counters`.
    A source's chunks are dealt to its readers round robin: chunk n is reader n % V's."""
    out = []
    for s in draw:
        out.append((s, counters[s] % readers, counters[s]))
        counters[s] += 1
    return out


class _ReaderGroup(IterableDataset):
    """The readers one DataLoader worker hosts. Per global batch one item: for each chunk of that batch one of its
    readers serves, (chunk k, source, reader, epoch, index, rows this rank keeps or None, bad shards)."""

    def __init__(self, stream: GlobalBatchStream, hosted: list[list[tuple[int, int]]]):
        self.readers = stream._readers  # one _SlotReader per source
        self.hosted = hosted  # per worker: [(source, reader)]
        self.positions = dict(stream._positions)
        self.counters = list(stream._counters)
        self.batch = stream._global_batches
        self.seed, self.weights, self.V = stream.seed, stream.weights, stream.readers
        self.keep = {k: (lo, hi) for k, lo, hi in stream.needed}

    def __iter__(self):
        info = get_worker_info()
        mine = set(self.hosted[info.id if info is not None else 0])
        gens = {(s, j): self.readers[s].batches(j, *self.positions[(s, j)]) for s, j in mine}
        counters, b = list(self.counters), self.batch
        try:
            while True:
                item = []
                serving = _serving(mixture_draw(self.seed, b, self.weights, self.V), counters, self.V)
                for k, (s, j, _) in enumerate(serving):
                    if (s, j) in mine:
                        _, batch, _, epoch, index, bad = next(gens[(s, j)])
                        rows = _rows(batch, *self.keep[k]) if k in self.keep else None
                        item.append((k, s, j, epoch, index, rows, bad))
                yield item
                b += 1
        except DataError as exc:
            yield [("error", str(exc))]


class GlobalBatchStream:
    """Training micro-batches for one rank, cut from global batches that do not depend on the world size.

    A global batch of G sequences is V = `readers` chunks of G / V. With one source, chunk k of every global batch
    comes from virtual reader k, which streams its share of the shards exactly as a slot of `TokenStream` does (in
    epoch e, reader k reads the (seed, e) shard permutation's `[k::V]`, shuffled by its own (seed, e, k) RNG). With a
    weighted mixture of sources, each chunk's source is drawn by weight from an RNG seeded by (seed, global batch),
    and each source's chunks are dealt round robin to that source's own V readers. Either way the sequence of global
    batches is a pure function of (manifests, weights, seed, G, V, shuffle buffer).

    Rank r of M takes rows [r*G/M, (r+1)*G/M) of every global batch, in micro-batches; DataLoader workers only host
    readers. With one source a rank runs just the readers its rows fall in; with a mixture every rank runs every
    reader (any of them may serve its rows next) and decodes only its rows. So neither the world size nor the worker
    count changes what a step sees, and a run saved on N ranks resumes exactly on M.

    State: the global batches handed out, each source's chunks consumed, and every hosted reader's (epoch, next
    chunk). The union of all ranks' states has every reader's position; `load_state_dict` takes that list.
    """

    def __init__(
        self,
        sources: str | list[dict],
        *,
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        readers: int | None,
        num_workers: int,
        seed: int,
        shuffle_buffer: int,
        on_bad_shard: str = "raise",
    ):
        sources = [{"path": sources, "weight": 1.0}] if isinstance(sources, str) else list(sources)
        if not sources:
            raise DataError("data.sources is empty; give at least one {path, weight}")
        self.paths, self.weights, self.shards = [], [], []
        for i, src in enumerate(sources):
            path, weight = str(src.get("path") or ""), src.get("weight", 1.0)
            if not path or not isinstance(weight, (int, float)) or not weight > 0:
                raise DataError(f"data.sources[{i}]={dict(src)!r} needs a path and a weight > 0")
            manifest = read_manifest(path)
            if manifest["seq_len"] != seq_len:
                raise DataError(f"seq_len={seq_len} but the shards in {path} hold seq_len={manifest['seq_len']}")
            if "train" not in manifest["splits"]:
                raise DataError(f"split 'train' not in {shard_url(path, 'manifest.json')}")
            if i and manifest["tokenizer"].get("sha256") != self.manifest["tokenizer"].get("sha256"):
                raise DataError(f"data.sources[{i}] {path} was tokenized with another tokenizer than {self.paths[0]}")
            if not i:
                self.manifest = manifest
            self.paths.append(path)
            self.weights.append(float(weight))
            self.shards.append(list(manifest["splits"]["train"]["shards"]))
        G, M = global_batch_size, world_size
        if G % (M * micro_batch_size):
            raise DataError(f"global batch {G} is not a multiple of micro_batch_size={micro_batch_size} x world {M}")
        fewest = min(len(s) for s in self.shards)
        V = readers or default_readers(G, fewest)
        if G % V or V > fewest:
            raise DataError(
                f"data.readers={V} must divide the global batch {G} and be at most the {fewest} train shards of the "
                f"smallest source; try data.readers={default_readers(G, fewest)}"
            )
        if on_bad_shard not in ("raise", "skip"):
            raise DataError(f"on_bad_shard={on_bad_shard!r} is not one of raise, skip")
        self.seq_len, self.global_batch_size, self.micro_batch_size = seq_len, G, micro_batch_size
        self.rank, self.world_size, self.readers, self.num_workers = rank, M, V, num_workers
        self.seed, self.shuffle_buffer, self.on_bad_shard = seed, shuffle_buffer, on_bad_shard
        self.chunk = G // V
        self.first_row, self.end_row = rank * G // M, (rank + 1) * G // M
        self.accumulation = (self.end_row - self.first_row) // micro_batch_size
        # (chunk k, first row, end row within it) of the chunks this rank's rows fall in, in row order
        self.needed = [
            (k, max(self.first_row, k * self.chunk) - k * self.chunk, min(self.end_row, (k + 1) * self.chunk) - k * self.chunk)
            for k in range(V)
            if k * self.chunk < self.end_row and (k + 1) * self.chunk > self.first_row
        ]  # fmt: skip
        self._readers = [
            _SlotReader(path, shards, width=seq_len + 1, micro_batch_size=self.chunk, n_slots=V, seed=_source_seed(seed, s),
                        shuffle_buffer=shuffle_buffer, on_bad_shard=on_bad_shard, loop=True)
            for s, (path, shards) in enumerate(zip(self.paths, self.shards))
        ]  # fmt: skip
        if len(self.paths) == 1:
            self.hosted = [(0, k) for k, _, _ in self.needed]
        else:
            self.hosted = [(s, j) for s in range(len(self.paths)) for j in range(V)]
        self._positions: dict[tuple[int, int], tuple[int, int]] = {h: (0, 0) for h in self.hosted}
        self._counters = [0] * len(self.paths)
        self._global_batches = 0
        self.stats: dict = {"global_batches": 0, "sequences": 0, "bad_shards_skipped": 0, "bad_shards": [],
                            "epochs_completed": {}, "sequences_per_source": [0] * len(self.paths)}  # fmt: skip

    def _identity(self) -> dict:
        return {
            "seed": self.seed,
            "readers": self.readers,
            "global_batch_size": self.global_batch_size,
            "shuffle_buffer": self.shuffle_buffer,
            "seq_len": self.seq_len,
            "shards": "+".join(_fingerprint(s) for s in self.shards),
            "weights": self.weights,
        }

    def _epochs(self) -> dict:
        return {f"{s}:{j}" if len(self.paths) > 1 else j: e for (s, j), (e, _) in self._positions.items()}

    def _source_epochs(self) -> list[int]:
        """Per source, the passes every one of its (hosted) readers has completed."""
        return [
            min((e for (s2, _), (e, _) in self._positions.items() if s2 == s), default=0)
            for s in range(len(self.paths))
        ]

    def __iter__(self):
        """Micro-batches [micro_batch_size, seq_len + 1] (or (tokens, mask)); `accumulation` of them per global batch."""
        n_workers = max(1, min(self.num_workers, len(self.hosted)))
        dataset = _ReaderGroup(self, [self.hosted[w::n_workers] for w in range(n_workers)])
        if self.num_workers == 0:
            items = iter(dataset)
        else:  # spawn and a private generator: see TokenStream.__iter__
            items = iter(DataLoader(dataset, batch_size=None, num_workers=n_workers, multiprocessing_context="spawn",
                                    generator=torch.Generator().manual_seed(0)))  # fmt: skip
        while True:
            parts = []
            for _ in range(n_workers):  # the DataLoader polls its workers in strict round robin: one item each
                for entry in next(items):
                    if entry[0] == "error":
                        raise DataError(entry[1])
                    parts.append(entry)
            kept = sorted((e for e in parts if e[5] is not None), key=lambda e: e[0])  # rows in chunk order
            rows = _cat([tuple(e[5]) if isinstance(e[5], list) else e[5] for e in kept])
            mbs = self.micro_batch_size
            for i in range(self.accumulation):
                if i == self.accumulation - 1:  # the state moves once the whole global batch was handed out
                    for _, s, j, epoch, index, _, bad in parts:
                        self._positions[(s, j)] = (epoch, index + 1)
                        if bad:
                            self.stats["bad_shards_skipped"] += len(bad)
                            self.stats["bad_shards"] = sorted(set(self.stats["bad_shards"]) | set(bad))
                    draw = mixture_draw(self.seed, self._global_batches, self.weights, self.readers)
                    _serving(draw, self._counters, self.readers)
                    self._global_batches += 1
                    self.stats["global_batches"] = self._global_batches
                    self.stats["sequences_per_source"] = [n * self.chunk for n in self._counters]
                    self.stats["epochs_completed"] = self._epochs()
                    self.stats["epochs_per_source"] = self._source_epochs()
                self.stats["sequences"] += mbs
                yield _rows(rows, i * mbs, (i + 1) * mbs)

    def state_dict(self) -> dict:
        """Position after the last complete global batch handed out. JSON-serialisable."""
        return {
            "format": GLOBAL_STATE_FORMAT,
            **self._identity(),
            "global_batches": self._global_batches,
            "chunks_per_source": list(self._counters),
            "positions": {f"{s}:{j}": list(p) for (s, j), p in self._positions.items()},
            "bad_shards_skipped": self.stats["bad_shards_skipped"],
        }

    def load_state_dict(self, states: dict | list[dict]) -> None:
        """Resume from the states of every rank of the saved run (any world size), or one of them."""
        states = states if isinstance(states, list) else [states]
        if not states or any(not isinstance(s, dict) or s.get("format") != GLOBAL_STATE_FORMAT for s in states):
            raise DataError(
                f"data stream state has format {[s.get('format') if isinstance(s, dict) else s for s in states][:1]}, "
                f"expected {GLOBAL_STATE_FORMAT} (saved by an older phi_train: resume with that version, or start "
                "fresh with train.init_from=<checkpoint>)"
            )
        mine = self._identity()
        diffs = [f"{k}: saved {states[0].get(k)!r}, now {v!r}" for k, v in mine.items() if states[0].get(k) != v]
        if diffs:
            raise DataError(
                "cannot resume the data stream exactly, the setup changed (" + "; ".join(diffs) + "); restore the "
                "saved setup, or start fresh with train.init_from=<checkpoint> (docs/data.md)"
            )
        batches = {int(s["global_batches"]) for s in states}
        if len(batches) != 1:
            raise DataError(f"data stream states disagree on the global batches consumed: {sorted(batches)}")
        known = {}
        for st in states:
            for key, p in st["positions"].items():
                s, j = (int(x) for x in key.split(":"))
                known[(s, j)] = (int(p[0]), int(p[1]))
        missing = [h for h in self.hosted if h not in known]
        if missing:
            if len(self.paths) > 1 or any(s.get("bad_shards_skipped") for s in states):
                raise DataError(f"data stream state lacks readers {missing}: save every rank's state")
            known.update(
                {(0, k): p for k, p in self.positions_after(next(iter(batches)), [j for _, j in missing]).items()}
            )
        self._positions = {h: known[h] for h in self.hosted}
        self._global_batches = next(iter(batches))
        self._counters = [int(n) for n in states[0]["chunks_per_source"]]
        self.stats["global_batches"] = self._global_batches
        self.stats["sequences_per_source"] = [n * self.chunk for n in self._counters]
        self.stats["bad_shards_skipped"] = max(int(s.get("bad_shards_skipped", 0)) for s in states)
        self.stats["epochs_completed"] = self._epochs()
        self.stats["epochs_per_source"] = self._source_epochs()

    def positions_after(self, global_batches: int, readers: list[int]) -> dict[int, tuple[int, int]]:
        """One source: reader positions after `global_batches` chunks each, from the manifest's counts (no bad shards)."""
        out = {}
        for k in readers:
            left, epoch = global_batches, 0
            while True:
                per_epoch = self.chunks_per_epoch(k, epoch)
                if per_epoch == 0:
                    raise DataError(f"reader {k} gets no full chunk of {self.chunk} sequences in epoch {epoch}")
                if left < per_epoch:
                    break
                left, epoch = left - per_epoch, epoch + 1
            out[k] = (epoch, left)
        return out

    def chunks_per_epoch(self, reader: int, epoch: int, source: int = 0) -> int:
        """Chunks reader `reader` of `source` serves in `epoch`, from the manifest's sequence counts."""
        counts = {s["name"]: s["sequences"] for s in self.shards[source]}
        names = epoch_shards(list(counts), _source_seed(self.seed, source), epoch, reader, self.readers)
        return sum(counts[n] for n in names) // self.chunk


def _source_seed(seed: int, source: int) -> int:
    """Source 0 keeps the data seed (a one-source run reads as before); the others get their own shuffles."""
    return seed if source == 0 else _mix("source", seed, source)
