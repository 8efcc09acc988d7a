"""The token stream: exact resume (across epochs, 0/1/2 workers), rank partitioning, bad shards, clear errors."""

from __future__ import annotations

import functools
import http.server
import io
import itertools
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from phi_train.data import DataError, TokenStream, read_manifest

MBS = 32


def make(path: str, split: str = "train", **kw) -> TokenStream:
    args = {
        "seq_len": 64,
        "micro_batch_size": MBS,
        "rank": 0,
        "world_size": 1,
        "num_workers": 1,
        "seed": 7,
        "shuffle_buffer": 64,
    }
    args.update(kw)
    return TokenStream(path, split, **args)


def take(stream: TokenStream, n: int) -> list[torch.Tensor]:
    it = iter(stream)
    out = list(itertools.islice(it, n))
    del it  # shuts the DataLoader workers down
    return out


def all_sequences(root: Path, split: str, manifest: dict) -> list[tuple]:
    out = []
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(root / shard["name"]) as tar:
            for m in tar:
                out.append(tuple(np.load(io.BytesIO(tar.extractfile(m).read())).tolist()))
    return out


def batches_per_epoch(stream: TokenStream) -> tuple[int, int]:
    """(shortest, longest) epoch 0 of this rank's readers, in batches."""
    counts = [
        stream.batches_per_epoch(s, 0)
        for s in range(stream.rank * max(stream.num_workers, 1), (stream.rank + 1) * max(stream.num_workers, 1))
    ]
    return min(counts), max(counts)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_resume_is_bit_identical_across_epochs(demo_shards, workers):
    s = make(demo_shards.path, num_workers=workers)
    W = max(workers, 1)
    per_epoch, longest = batches_per_epoch(s)
    total = longest * W + 3 * W + 1  # every slot crosses into epoch 1
    ref = take(s, total)
    assert all(b.shape == (MBS, 65) and b.dtype == torch.int64 for b in ref)
    assert set(s.stats["epochs_completed"].values()) == {1}
    # Save points: early, just before and just after the epoch boundary (resuming from a resumed stream too).
    cuts = [5, per_epoch * W - 1, per_epoch * W + 2]
    got, state = [], None
    for cut in cuts + [total]:
        st = make(demo_shards.path, num_workers=workers)
        if state is not None:
            st.load_state_dict(state)
        got += take(st, cut - len(got))
        state = st.state_dict()
    assert len(got) == total
    for i, (a, b) in enumerate(zip(ref, got)):
        assert torch.equal(a, b), f"batch {i} differs after resume"


def test_state_reflects_consumed_batches_not_prefetched(demo_shards):
    s = make(demo_shards.path, num_workers=2)
    it = iter(s)
    next(it)
    next(it)
    next(it)
    state = s.state_dict()
    assert state["batches_consumed"] == 3 and state["positions"] == {"0": [0, 2], "1": [0, 1]}
    del it
    # Iterating the same object again continues where the consumer stopped.
    ref = take(make(demo_shards.path, num_workers=2), 5)
    assert torch.equal(take(s, 2)[1], ref[4])


def test_other_ranks_state_is_derived_exactly(demo_shards):
    kw = {"world_size": 2, "num_workers": 2}
    ref1 = take(make(demo_shards.path, rank=1, **kw), 40)
    s0 = make(demo_shards.path, rank=0, **kw)
    take(s0, 25)
    s1 = make(demo_shards.path, rank=1, **kw)
    s1.load_state_dict(s0.state_dict())  # only rank 0's state was saved: rank 1 derives its own positions
    rest = take(s1, 15)
    assert all(torch.equal(a, b) for a, b in zip(ref1[25:], rest))


@pytest.mark.parametrize(
    "change, word",
    [({"num_workers": 2}, "readers_per_rank"), ({"seed": 8}, "seed"), ({"world_size": 2}, "world_size"),
     ({"micro_batch_size": 16}, "micro_batch_size"), ({"shuffle_buffer": 8}, "shuffle_buffer")],
)  # fmt: skip
def test_resume_into_a_different_setup_is_refused(demo_shards, change, word):
    s = make(demo_shards.path)
    take(s, 3)
    other = make(demo_shards.path, **change)
    with pytest.raises(DataError, match=word) as exc:
        other.load_state_dict(s.state_dict())
    assert "\n" not in str(exc.value) and "docs/data.md" in str(exc.value)


def test_changed_shard_set_is_refused(demo_shards, tmp_path):
    s = make(demo_shards.path)
    take(s, 1)
    copy = tmp_path / "copy"
    shutil.copytree(demo_shards.path, copy)
    man = (copy / "manifest.json").read_text().replace('"train-000000.tar"', '"train-000000b.tar"')
    (copy / "manifest.json").write_text(man)
    (copy / "train-000000.tar").rename(copy / "train-000000b.tar")
    with pytest.raises(DataError, match="shards: saved"):
        make(str(copy)).load_state_dict(s.state_dict())


def test_ranks_partition_one_epoch(demo_shards):
    root = Path(demo_shards.path)
    everything = all_sequences(root, "train", demo_shards.manifest)
    seen = []
    for rank in (0, 1):
        for batch in make(demo_shards.path, rank=rank, world_size=2, num_workers=2, loop=False):
            seen += [tuple(row) for row in batch.tolist()]
    assert len(seen) == len(everything)
    assert sorted(seen) == sorted(everything)


def test_val_is_a_finite_pass(demo_shards):
    n = demo_shards.manifest["splits"]["val"]["sequences"]
    batches = list(make(demo_shards.path, split="val", num_workers=0, loop=False))
    assert sum(len(b) for b in batches) == n
    assert batches[-1].shape[1] == 65


def _broken_copy(demo_shards, tmp_path: Path, how: str) -> tuple[Path, str]:
    copy = tmp_path / how
    copy.mkdir()
    for f in Path(demo_shards.path).iterdir():
        (copy / f.name).symlink_to(f)
    name = demo_shards.manifest["splits"]["train"]["shards"][3]["name"]
    (copy / name).unlink()
    if how == "corrupt":
        data = (Path(demo_shards.path) / name).read_bytes()
        (copy / name).write_bytes(data[: len(data) // 2 + 100])  # truncated mid-member
    return copy, name


@pytest.mark.parametrize("how", ["missing", "corrupt"])
def test_bad_shard_raises_with_its_name(demo_shards, tmp_path, how):
    copy, name = _broken_copy(demo_shards, tmp_path, how)
    with pytest.raises(DataError, match=name) as exc:
        list(make(str(copy), num_workers=1, loop=False))
    assert "\n" not in str(exc.value) and "on_bad_shard=skip" in str(exc.value)


def test_bad_shard_skip_counts_and_goes_on(demo_shards, tmp_path):
    copy, name = _broken_copy(demo_shards, tmp_path, "missing")
    s = make(str(copy), num_workers=2, loop=False, on_bad_shard="skip", micro_batch_size=64)
    n = sum(len(b) for b in s)
    shards = demo_shards.manifest["splits"]["train"]["shards"]
    assert n == sum(sh["sequences"] for sh in shards if sh["name"] != name)
    assert s.stats["bad_shards_skipped"] == 1 and s.stats["bad_shards"] == [name]


def test_streams_over_http(demo_shards):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=demo_shards.path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert read_manifest(url)["seq_len"] == 64
        remote = take(make(url, num_workers=0), 4)
        local = take(make(demo_shards.path, num_workers=0), 4)
        assert all(torch.equal(a, b) for a, b in zip(remote, local))
    finally:
        server.shutdown()


def test_configuration_errors_are_one_line(demo_shards, tmp_path):
    with pytest.raises(DataError, match="no shard manifest"):
        read_manifest(str(tmp_path))
    with pytest.raises(DataError, match="seq_len=128"):
        make(demo_shards.path, seq_len=128)
    n_val = len(demo_shards.manifest["splits"]["val"]["shards"])
    with pytest.raises(DataError, match=f"has {n_val} shards"):
        make(demo_shards.path, split="val", world_size=4, num_workers=2)
    with pytest.raises(DataError, match="split 'test'"):
        make(demo_shards.path, split="test")


# ---------------------------------------------------------------- global batches independent of the world size
G = 12
# small shards (353 sequences in 4 shards), so that every reader crosses epoch boundaries within a few dozen batches
SMALL = str(Path(__file__).resolve().parent / "assets" / "golden" / "shards")


def global_stream(path: str, rank: int = 0, world: int = 1, workers: int = 0, **kw):
    from phi_train.data import GlobalBatchStream

    args = {"seq_len": 64, "global_batch_size": G, "micro_batch_size": 2, "rank": rank, "world_size": world,
            "readers": None, "num_workers": workers, "seed": 7, "shuffle_buffer": 64}  # fmt: skip
    return GlobalBatchStream(path, **{**args, **kw})


def global_batches(path: str, world: int, workers: int, n: int, states=None) -> tuple[list[torch.Tensor], list]:
    """n global batches as the `world` ranks see them together (each rank's slices in rank order), and the ranks'
    states after them."""
    per_rank, out_states = [], []
    for rank in range(world):
        s = global_stream(path, rank, world, workers)
        if states is not None:
            s.load_state_dict(states)
        micro = take(s, n * s.accumulation)
        per_rank.append([torch.cat(micro[i * s.accumulation : (i + 1) * s.accumulation]) for i in range(n)])
        out_states.append(s.state_dict())
    return [torch.cat([r[i] for r in per_rank]) for i in range(n)], out_states


@pytest.fixture(scope="module")
def global_reference():
    s = global_stream(SMALL)
    n = max(s.chunks_per_epoch(k, 0) for k in range(s.readers)) + 3  # every reader crosses its first epoch boundary
    return global_batches(SMALL, 1, 0, n)[0]


@pytest.mark.parametrize("world, workers", [(3, 2), (6, 0)])
def test_global_batches_do_not_depend_on_world_size_or_workers(global_reference, world, workers):
    got, _ = global_batches(SMALL, world, workers, len(global_reference))
    assert all(torch.equal(a, b) for a, b in zip(got, global_reference))


@pytest.mark.parametrize("before, after", [(2, 1), (2, 3), (1, 6)])
def test_state_saved_on_n_ranks_resumes_exactly_on_m(global_reference, before, after):
    cut = len(global_reference) // 2 + 1  # some readers are past their epoch boundary already
    first, states = global_batches(SMALL, before, 1 if before == 2 else 0, cut)
    rest, _ = global_batches(SMALL, after, 0, len(global_reference) - cut, states=states)
    assert all(torch.equal(a, b) for a, b in zip(first + rest, global_reference))
    assert global_stream(SMALL).readers == states[0]["readers"] == 4


def test_global_stream_refuses_another_setup_and_bad_readers(demo_shards):
    from phi_train.data import DataError

    s = global_stream(demo_shards.path)
    take(s, 3 * s.accumulation)
    with pytest.raises(DataError, match="seed: saved 7, now 8") as exc:
        global_stream(demo_shards.path, seed=8).load_state_dict(s.state_dict())
    assert "\n" not in str(exc.value)
    with pytest.raises(DataError, match="data.readers=5 must divide the global batch 12"):
        global_stream(demo_shards.path, readers=5)
    with pytest.raises(DataError, match="format"):
        global_stream(demo_shards.path).load_state_dict(make(demo_shards.path).state_dict())


# ---------------------------------------------------------------- weighted mixtures
@pytest.fixture(scope="module")
def two_sources(demo_shards, tmp_path_factory):
    """Two shard sets with the demo tokenizer from disjoint halves of the demo corpus, and source b's rows."""
    from data_tools.shard import write_shards

    root = tmp_path_factory.mktemp("mix")
    files = sorted(Path(demo_shards.corpus).iterdir())
    out = {}
    for name, part in (("a", files[:40]), ("b", files[40:60])):
        (root / name).mkdir()
        for f in part:
            (root / name / f.name).symlink_to(f)
        write_shards([str(root / name)], demo_shards.tokenizer, root / f"{name}-shards", seq_len=64,
                     shard_sequences=48, val_fraction=0.0, workers=1, progress=False)  # fmt: skip
        out[name] = str(root / f"{name}-shards")
    manifest = read_manifest(out["b"])
    rows_b = set(all_sequences(Path(out["b"]), "train", manifest))
    return [{"path": out["a"], "weight": 0.8}, {"path": out["b"], "weight": 0.2}], rows_b


def mixed(sources, rank=0, world=1, workers=0):
    return global_stream(sources, rank, world, workers, readers=4, micro_batch_size=1, shuffle_buffer=8)


def test_mixture_matches_its_weights_counts_per_source_and_resumes_exactly(two_sources):
    sources, rows_b = two_sources
    n = 24
    ref = [torch.cat(take(mixed(sources), n * 12)[i * 12 : (i + 1) * 12]) for i in range(n)]
    from_b = sum(tuple(r) in rows_b for b in ref for r in b.tolist())
    total, chunks = n * 12, n * 4  # each chunk (3 sequences) is one draw of its source
    sigma = (chunks * 0.2 * 0.8) ** 0.5
    assert from_b % 3 == 0 and abs(from_b / 3 - 0.2 * chunks) < 4 * sigma, (from_b, total)  # binomial error
    s = mixed(sources)
    take(s, n * 12)
    assert s.stats["sequences_per_source"] == [total - from_b, from_b]
    # saved on 2 ranks (1 worker each) after 10 global batches, resumed on 3 ranks: the same global batches
    states, got = [], [[] for _ in range(10)]
    for rank in range(2):
        st = mixed(sources, rank, 2, workers=1)
        micro = take(st, 10 * 6)
        for i in range(10):
            got[i].append(torch.cat(micro[i * 6 : (i + 1) * 6]))
        states.append(st.state_dict())
    rest = [[] for _ in range(n - 10)]
    for rank in range(3):
        st = mixed(sources, rank, 3)
        st.load_state_dict(states)
        micro = take(st, (n - 10) * 4)
        for i in range(n - 10):
            rest[i].append(torch.cat(micro[i * 4 : (i + 1) * 4]))
    assert all(torch.equal(torch.cat(a), b) for a, b in zip(got + rest, ref))
    with pytest.raises(DataError, match="weights: saved"):
        mixed([sources[0], {**sources[1], "weight": 0.3}]).load_state_dict(states)


def test_mixture_refuses_bad_sources_in_one_line(two_sources, demo_shards, tmp_path):
    sources, _ = two_sources
    for bad, word in [([], "data.sources is empty"), ([{"path": sources[0]["path"], "weight": 0}], "weight > 0"),
                      ([sources[0], {"path": str(tmp_path), "weight": 1}], "no shard manifest")]:  # fmt: skip
        with pytest.raises(DataError, match=word) as exc:
            mixed(bad)
        assert "\n" not in str(exc.value)
