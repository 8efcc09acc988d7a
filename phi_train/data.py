"""The training data stream: token shards -> micro-batches, deterministic and exactly resumable.

Contract (docs/data.md has the long form):
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
