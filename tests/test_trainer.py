"""The training engine under the real `deepspeed` launcher: 2 CPU ranks over gloo, ZeRO-2, real checkpoints, real SIGKILLs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "launch" / "train.py")
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")

# Small enough for seconds per run on two CPU ranks, big enough to exercise every part (grad accumulation 2).
TINY = [
    "+model=phi1_tiny",
    "model.n_layer=2",
    "model.d_model=128",
    "model.n_head=2",
    "model.d_mlp=512",
    "model.max_seq_len=64",
    "model.resid_dropout=0.1",  # dropout draws random numbers: resume must restore every rank's RNG to match
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.max_steps=8",
    "train.warmup_steps=2",
    "train.lr=3e-3",
    "train.log_every=1",
    "train.eval_every=4",
    "train.eval_batches=2",
    "train.ckpt_every=2",
    "train.keep_last=2",
    "logging.wandb.mode=disabled",
    "logging.progress=false",
]


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PHI_TRAIN_FAULT")}
    e.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return e


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(shards, run_dir: Path, *extra: str, fault: str | None = None, timeout: int = 300, ranks: int = 2):
    from phi_train.trainer import shm_comm_buffer

    port = str(free_port())
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", port, TRAIN, *TINY]
    cmd += [f"data.path={shards.path}", f"hydra.run.dir={run_dir}", *extra]
    extra_env = {"PHI_TRAIN_FAULT": fault} if fault else {}
    buffers = [shm_comm_buffer(rank, "127.0.0.1", port) for rank in range(ranks)]  # the launcher's default address
    proc = None
    try:
        proc = subprocess.run(
            cmd, cwd=run_dir.parent, env=env(**extra_env), capture_output=True, text=True, timeout=timeout
        )
    finally:  # a SIGKILLed rank never reaches its exit-time clean-up of DeepSpeed's shm buffer
        left = [b for b in buffers if b.exists()]
        for b in left:
            b.unlink()
    assert proc.returncode != 0 or not left, f"a finished run left DeepSpeed's shm buffers behind: {left}"
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), f"metrics repeat or skip steps: {steps}"
    return {r["step"]: r["loss"] for r in recs}


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "checkpoints" / "global_step000008" / "model_fp32.safetensors")


@pytest.fixture(scope="module")
def reference(demo_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    proc = launch(demo_shards, run_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def test_uninterrupted_run_learns_and_checkpoints(reference):
    loss = losses(reference)
    assert sorted(loss) == list(range(1, 9))
    assert loss[8] < loss[1] - 0.5, loss  # from ~ln(vocab) down: the model learns from the shards
    ckpts = reference / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "global_step000008"
    # keep_last=2: older complete checkpoints are pruned only after the newer one is committed
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["global_step000006", "global_step000008"]
    meta = json.loads((ckpts / "global_step000008" / "meta.json").read_text())
    assert meta["step"] == 8 and meta["world_size"] == 2 and meta["model"]["d_model"] == 128
    assert meta["tokens_seen"] == 8 * 8 * 64
    assert (ckpts / "global_step000008" / "tokenizer.model").exists()
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["steps"] == 8 and not summary["resumed"]
    assert summary["last"]["val_loss"] == pytest.approx(summary["last"]["val_loss"])  # a number, not NaN


def test_sigkill_in_save_and_mid_step_resume_bit_identical(reference, demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    # 1) killed between writing checkpoint 4 and committing it: `latest` must still name step 2
    proc = launch(demo_shards, run_dir, fault="save:4")
    assert proc.returncode != 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "global_step000002"
    # 2) restarted with the same command, then killed in the middle of step 7 (after checkpoint 6 was committed)
    proc = launch(demo_shards, run_dir, fault="step:7")
    assert proc.returncode != 0
    assert "resumed at step 2" in proc.stdout, proc.stdout[-2000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "global_step000006"
    # 3) restarted again: runs to the end
    proc = launch(demo_shards, run_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed at step 6" in proc.stdout
    # per-step losses bit-identical to the uninterrupted run (CPU, fp32, same world size and workers)
    assert losses(run_dir) == losses(reference)
    a, b = final_weights(run_dir), final_weights(reference)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_zero3_two_ranks_trains_checkpoints_and_samples(reference, demo_shards, tmp_path):
    """ZeRO-3 partitions every parameter across the ranks, so each forward needs all of them: the end-of-run sample
    must run on every rank (rank 0 alone would wait forever for the others' shards)."""
    run_dir = tmp_path / "z3"
    proc = launch(
        demo_shards, run_dir, "deepspeed=zero3", "train.max_steps=4", "train.sample_prompt='def add(a, b):'",
        "train.sample_tokens=8", timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and isinstance(summary["sample"], str)
    assert (run_dir / "checkpoints" / "global_step000004" / "model_fp32.safetensors").exists()
    # same seed, data and dropout draws: the first step's loss does not depend on how the parameters are partitioned
    assert losses(run_dir)[1] == pytest.approx(losses(reference)[1], rel=1e-5)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.d_mlp=256", "model.d_mlp=512 (checkpoint) vs 256 (this run)"),
        # resuming needs the saved layout (init_from converts; a resume restores optimizer state too)
        ("model.fused_block=true", "model.fused_block=False (checkpoint) vs True (this run)"),
    ],
)
def test_incompatible_resume_fails_in_one_line(reference, demo_shards, tmp_path, override, message):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run_dir / "checkpoints")
    proc = launch(demo_shards, run_dir, override, "train.max_steps=10")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines and message in lines[0], proc.stderr[-2000:]


BAD = [
    (["+model=phi1_tiny", "train.lrr=1"], "train.lrr"),
    (["+model=phi1_tiny", "model.n_head=5"], "model.n_head=5 does not divide model.d_model=256"),
    (["+model=phi1_tiny", "train.lr=-0.1"], "train.lr=-0.1 must be > 0"),
    (["+model=phi1_tiny", "data.path=/nonexistent/shards"], "/nonexistent/shards"),
    (["train.lr=1e-3"], "add +model=NAME with NAME one of phi1, phi1_small, phi1_tiny"),
    (["+model=phi1_tiny", "train.global_batch_size=10", "train.micro_batch_size=4"], "not a multiple"),
    (["+model=nope"], "unknown model 'nope'; choose one of phi1, phi1_small, phi1_tiny"),
    (["+model=phi1_tiny", "train.keep_last=1"], "train.keep_last=1 must be >= 2"),
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_config_fails_fast_in_one_line(overrides, expected, demo_shards, tmp_path):
    if not any(o.startswith("data.path") for o in overrides):
        overrides = [*overrides, f"data.path={demo_shards.path}"]
    proc = subprocess.run(
        [sys.executable, TRAIN, *overrides, f"hydra.run.dir={tmp_path / 'run'}", "logging.wandb.mode=disabled"],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "_schema" not in proc.stderr, proc.stderr[-2000:]
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) <= 3, proc.stderr


def test_hydra_multirun_sweep_one_dir_per_job(demo_shards, tmp_path):
    overrides = [o for o in TINY if not o.startswith(("train.max_steps", "logging.wandb"))]
    proc = subprocess.run(
        [
            sys.executable,
            TRAIN,
            "-m",
            *overrides,
            "train.max_steps=2",
            "train.lr=1e-3,3e-4",
            f"data.path={demo_shards.path}",
            "logging.wandb.mode=offline",
        ],  # fmt: skip
        cwd=tmp_path,
        env=env(WANDB_SILENT="true"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = sorted((tmp_path / "runs" / "sweep").glob("phi1_tiny-demo-pretrain/*/summary.json"))
    assert len(jobs) == 2, list((tmp_path / "runs").rglob("*"))[:50]
    lrs = sorted(yaml.safe_load((p.parent / "config.resolved.yaml").read_text())["train"]["lr"] for p in jobs)
    assert lrs == [3e-4, 1e-3]
    for p in jobs:
        assert json.loads(p.read_text())["steps"] == 2
        assert list(p.parent.glob("wandb/offline-run-*")), "each job gets its own offline wandb run"


def exercise_pairs(corpus: Path, limit: int = 400) -> list[dict]:
    """(signature + docstring -> body) pairs mined from real stdlib functions, the offline CodeExercises shape."""
    import ast

    pairs = []
    for path in sorted(corpus.iterdir()):
        src = path.read_text()
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        lines = src.splitlines(keepends=True)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and ast.get_docstring(node) and len(node.body) > 1:
                doc_end = node.body[0].end_lineno
                prompt = "".join(lines[node.lineno - 1 : doc_end])
                body = "".join(lines[doc_end : node.end_lineno])
                if 0 < len(prompt) < 300 and 0 < len(body) < 300:
                    pairs.append({"id": f"{path.name}:{node.name}", "prompt": prompt, "completion": body})
        if len(pairs) >= limit:
            break
    return pairs


@pytest.fixture(scope="module")
def exercise_shards(demo_shards, tmp_path_factory):
    from data_tools.shard import write_shards

    root = tmp_path_factory.mktemp("exercises")
    pairs = exercise_pairs(Path(demo_shards.corpus))
    (root / "ex.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    manifest = write_shards(
        [str(root / "ex.jsonl")], demo_shards.tokenizer, root / "shards", seq_len=64, shard_sequences=16,
        val_fraction=0.1, workers=1, prompt_field="prompt", text_field="completion", progress=False,
    )  # fmt: skip
    return root / "shards", pairs, manifest


def test_exercise_shards_mask_exactly_the_completions(exercise_shards, demo_shards):
    from phi_train.data import TokenStream
    from phi_train.tokenizer import Tokenizer

    shards, pairs, manifest = exercise_shards
    assert manifest["loss_mask"] is True
    tok = Tokenizer(demo_shards.tokenizer)
    train = manifest["splits"]["train"]
    val = manifest["splits"]["val"]
    assert train["documents"] + val["documents"] == len(pairs)
    for s in (train, val):  # counts reconcile: every token is in a sequence, padding, or a dropped over-long pair
        assert s["tokens"] == s["sequences"] * 65 - s["padding_tokens"] + s["too_long_tokens_dropped"]
    stream = TokenStream(str(shards), "train", seq_len=64, micro_batch_size=4, rank=0, world_size=1, num_workers=0,
                         seed=0, shuffle_buffer=1, loop=False)  # fmt: skip
    completions = {tuple(tok.encode(p["completion"]) + [tok.eos_id]) for p in pairs}
    prompts = {tuple(tok.encode(p["prompt"])) for p in pairs}
    seen_targets = 0
    for tokens, mask in stream:
        for row, keep in zip(tokens.tolist(), mask.tolist()):
            # split the row into runs of equal mask value: every masked-in run is exactly one completion + EOS,
            # every masked-out run is prompts (and trailing EOS padding)
            runs, start = [], 0
            for i in range(1, len(row) + 1):
                if i == len(row) or keep[i] != keep[start]:
                    runs.append((keep[start], tuple(row[start:i])))
                    start = i
            for flag, run in runs:
                if flag:
                    assert run in completions
                    seen_targets += len(run)
                else:
                    assert run in prompts or set(run) == {tok.eos_id} or any(run[: len(p)] == p for p in prompts), (
                        "a masked-out run must be prompt tokens or padding"
                    )
    assert seen_targets == train["target_tokens"]


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused-from-unfused"])
def test_finetune_from_pretrain_checkpoint_completion_only_loss(reference, exercise_shards, tmp_path, fused):
    """Also across block layouts: a fused fine-tune from the unfused pretrain checkpoint converts the weights (the
    same function), so its first loss is the same number."""
    shards, _, manifest = exercise_shards
    run_dir = tmp_path / "ft"
    proc = launch(
        SimpleNamespace(path=str(shards)), run_dir, "train=finetune", "train.max_steps=4", "train.warmup_steps=1",
        "train.lr=1e-3", "train.global_batch_size=8", "train.micro_batch_size=2", "train.ckpt_every=2",
        f"train.init_from={reference / 'checkpoints'}", "model.resid_dropout=0.0",  # eval-equal forward at step 1
        f"model.fused_block={str(fused).lower()}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = losses(run_dir)[1]
    # the first step starts from the pretrained weights: its loss is the pretrained model's loss on completions, so
    # it must equal that model's completion-only loss on the same batches, and differ from its whole-sequence loss
    import torch

    from phi_train.checkpoint import load_model_state
    from phi_train.data import GlobalBatchStream
    from phi_train.model import PhiModel

    cfg, state, _ = load_model_state(reference / "checkpoints")
    model = PhiModel(cfg, vocab_size=manifest["tokenizer"]["vocab_size"])
    model.load_state_dict(state)
    model.eval()
    from phi_train.trainer import summed_loss

    totals = {"completion": [0.0, 0], "whole": [0.0, 0]}  # (summed token loss, target tokens)
    # the first global batch (the stream's readers: the train config's shuffle buffer, data seed, global batch)
    stream = GlobalBatchStream(str(shards), seq_len=64, global_batch_size=8, micro_batch_size=2, rank=0, world_size=1,
                               readers=None, num_workers=0, seed=1234, shuffle_buffer=256)  # fmt: skip
    it = iter(stream)
    for _ in range(4):
        tokens, mask = next(it)
        labels = tokens[:, 1:]
        for kind, lab in (("completion", labels.masked_fill(~mask[:, 1:], -100)), ("whole", labels)):
            with torch.no_grad():
                totals[kind][0] += summed_loss(model(tokens[:, :-1]), lab).item()
            totals[kind][1] += int((lab != -100).sum())
    # token-weighted over the whole global batch: every completion token counts once, whatever micro-batch holds it
    completion_only = totals["completion"][0] / totals["completion"][1]
    whole = totals["whole"][0] / totals["whole"][1]
    assert first == pytest.approx(completion_only, rel=1e-4), (first, completion_only, whole)
    assert abs(first - whole) > 1e-3


# ---------------------------------------------------------------- token-weighted loss
# Run by the real launcher: one optimizer step of `token_weighted_step` (the trainer's step) on a fixed global batch
# of 8 sequences with very uneven targets, cut as WORLD ranks x ACCUM micro-batches. Plain SGD without clipping
# makes the weight change the gradient times lr (Adam's first step would hide its scale); lr 1024 keeps the
# weights' own rounding (1.0 for LayerNorm gains) far below the gradient's.
LOSS_PROBE = r"""
import sys
import deepspeed, torch, torch.distributed as dist
from phi_train.trainer import init_distributed, token_weighted_step

args = [a for a in sys.argv[1:] if not a.startswith('--local_rank')]
accum, out = int(args[0]), args[1]
init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
sys.path.insert(0, args[2])
from test_trainer import probe_batch, probe_model
model = probe_model()
w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
mbs = 8 // (world * accum)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1024.0), config={
    "train_batch_size": 8, "train_micro_batch_size_per_gpu": mbs, "gradient_accumulation_steps": accum,
    "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
    "steps_per_print": 10**9})
inputs, labels = probe_batch()
mine = slice(rank * 8 // world, (rank + 1) * 8 // world)
inputs, labels = inputs[mine], labels[mine]
micro = [(inputs[i:i + mbs], labels[i:i + mbs]) for i in range(0, len(inputs), mbs)]
total, n = token_weighted_step(engine, micro)
dist.all_reduce(total)
grads = {k: (w0[k] - p.detach()) / 1024 for k, p in engine.module.named_parameters()}
# a step without a single target: zero loss, zero gradient, no NaN anywhere
before = {k: p.detach().clone() for k, p in engine.module.named_parameters()}
empty, none = token_weighted_step(engine, [(x, torch.full_like(y, -100)) for x, y in micro])
dist.all_reduce(empty)
unchanged = all(torch.equal(before[k], p) for k, p in engine.module.named_parameters())
if rank == 0:
    torch.save({"loss": (total / n).item(), "n": n.item(), "grads": grads, "empty_loss": empty.item(),
                "empty_n": none.item(), "unchanged": unchanged}, out)
"""


def probe_model():
    import torch

    from phi_train.config import model_config
    from phi_train.model import PhiModel

    torch.manual_seed(0)
    cfg = model_config(preset="phi1_tiny", n_layer=2, d_model=64, n_head=2, d_mlp=256, vocab_size=128, max_seq_len=32)
    return PhiModel(cfg, cpu_matmul="blas")


def probe_batch():
    """8 sequences of 16 targets: 0, 1, 2, 16, 3, 16, 0, 5 of them count (prompt-style masks)."""
    import torch

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 128, (8, 17), generator=g)
    labels = tokens[:, 1:].clone()
    for row, n in enumerate([0, 1, 2, 16, 3, 16, 0, 5]):
        labels[row, : 16 - n] = -100
    return tokens[:, :16], labels


def run_probe(world: int, accum: int, tmp_path: Path) -> dict:
    import torch

    from phi_train.trainer import shm_comm_buffer

    script, out, port = tmp_path / f"probe_{world}x{accum}.py", tmp_path / f"probe_{world}x{accum}.pt", free_port()
    script.write_text(LOSS_PROBE)
    cmd = [DEEPSPEED, "--num_gpus", str(world), "--master_port", str(port), str(script), str(accum), str(out)]
    try:
        proc = subprocess.run([*cmd, str(ROOT / "tests")], cwd=tmp_path, env=env(), capture_output=True, text=True,
                              timeout=240)  # fmt: skip
    finally:
        for rank in range(world):
            shm_comm_buffer(rank, "127.0.0.1", str(port)).unlink(missing_ok=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out)


def test_token_weighted_loss_is_independent_of_ranks_and_accumulation(tmp_path):
    """2 ranks x accumulation 4 and 1 rank x accumulation 8 (one micro-batch without targets in each) give the loss
    and gradient of the whole batch in one piece: sum of token losses / all target tokens."""

    from phi_train.trainer import summed_loss

    model = probe_model()
    inputs, labels = probe_batch()
    whole = summed_loss(model(inputs), labels) / (labels != -100).sum()
    whole.backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters()}
    # what averaging per-micro-batch means would give: far off, so the masks are uneven enough to tell them apart
    model.zero_grad()
    rows = [i for i in range(8) if (labels[i] != -100).any()]
    (sum(model(inputs[i : i + 1], labels[i : i + 1]) for i in rows) / len(rows)).backward()
    off = max((p.grad - ref[k]).norm() / ref[k].norm() for k, p in model.named_parameters())
    assert off > 0.1, off
    for world, accum in [(2, 4), (1, 8)]:
        got = run_probe(world, accum, tmp_path)
        assert got["n"] == 43
        assert got["loss"] == pytest.approx(whole.item(), rel=1e-6), (world, accum)
        for k, g in ref.items():
            err = ((got["grads"][k] - g).norm() / g.norm()).item()
            assert err < 1e-5, f"{world} ranks x accumulation {accum}: gradient of {k} off by {err:.2e} (relative)"
        assert got["empty_loss"] == 0.0 and got["empty_n"] == 0 and got["unchanged"], (world, accum)


# ---------------------------------------------------------------- checkpoints that prove themselves, true metrics


def test_bit_flipped_newest_checkpoint_falls_back_and_rerun_keeps_summary(reference, demo_shards, tmp_path):
    """4 KiB flipped in one rank's optimizer file of the newest checkpoint: one line names it, the run resumes from
    the previous complete checkpoint and recomputes exactly the reference's steps; the torn last metrics line of the
    killed run is dropped; running the finished command again keeps the final summary."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run_dir / "checkpoints")
    text = (reference / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").write_text(text + '{"step": 9, "lo')  # torn by a kill mid-write
    [optim] = (run_dir / "checkpoints" / "global_step000008").glob("*rank_1*optim_states.pt")
    data = bytearray(optim.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 4096])
    optim.write_bytes(bytes(data))
    proc = launch(demo_shards, run_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    warned = [line for line in (proc.stdout + proc.stderr).splitlines() if "checkpoint unusable" in line]
    assert len(warned) == 1 and optim.name in warned[0] and "resuming from global_step000006" in warned[0], warned
    assert "Traceback" not in proc.stderr and "resumed at step 6" in proc.stdout
    assert losses(run_dir) == losses(reference)
    a, b = final_weights(run_dir), final_weights(reference)
    assert all((a[k] == b[k]).all() for k in a)
    before = json.loads((run_dir / "summary.json").read_text())
    proc = launch(demo_shards, run_dir)  # already finished: trains nothing
    assert proc.returncode == 0 and "resumed at step 8" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = json.loads((run_dir / "summary.json").read_text())
    assert after["last"] == before["last"] and after["last"]["step"] == 8 and "val_loss" in after["last"]
    assert losses(run_dir) == losses(reference)


def test_kill_before_first_checkpoint_repeats_no_step(reference, demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    for _ in range(2):  # killed mid-step 2, before the first checkpoint, twice: each restart is a fresh start
        proc = launch(demo_shards, run_dir, fault="step:2")
        assert proc.returncode != 0 and "fresh start" in proc.stdout, proc.stdout[-2000:]
        assert sorted(losses(run_dir)) == [1]
    proc = launch(demo_shards, run_dir, fault="step:3")  # now past checkpoint 2
    assert proc.returncode != 0
    got = losses(run_dir)  # asserts no step repeats
    assert got == {s: losses(reference)[s] for s in (1, 2)}


# ---------------------------------------------------------------- elastic exact resume
ELASTIC = ["train.global_batch_size=12", "model.resid_dropout=0.0", "train.max_steps=6", "train.eval_every=6"]


def digests(run_dir: Path) -> dict[int, str]:
    return {r["step"]: r["batch_digest"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def elastic_reference(demo_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("elastic") / "run"
    proc = launch(demo_shards, run_dir, *ELASTIC)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("ranks", [1, 3])
def test_run_saved_on_two_ranks_resumes_exactly_on_another_world_size(elastic_reference, demo_shards, tmp_path, ranks):
    """Killed mid-step 5 on 2 ranks (checkpoint 4 committed), resumed on 1 or 3: the same global batches per step
    (digest of every row at its global position) and losses within fp32 reduction-order tolerance."""
    run_dir = tmp_path / "run"
    proc = launch(demo_shards, run_dir, *ELASTIC, fault="step:5")
    assert proc.returncode != 0
    proc = launch(demo_shards, run_dir, *ELASTIC, ranks=ranks, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed at step 4" in proc.stdout and f"this run has {ranks}: resharding" in proc.stdout
    assert digests(run_dir) == digests(elastic_reference)
    got, ref = losses(run_dir), losses(elastic_reference)
    assert sorted(got) == list(range(1, 7))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-5), step
    assert not list((run_dir / "checkpoints").glob("*universal*")), "the resharded copy is removed after loading"


def test_weighted_mixture_trains_and_reports_tokens_per_source(demo_shards, tmp_path):
    run_dir = tmp_path / "mix"
    src = f"[{{path:{demo_shards.path},weight:0.8}},{{path:{demo_shards.path},weight:0.2}}]"
    proc = launch(demo_shards, run_dir, f"data.sources={src}", "train.max_steps=2", "data.readers=4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = json.loads((run_dir / "summary.json").read_text())["last"]
    assert sum(last["tokens_seen_per_source"]) == last["tokens_seen"] == 2 * 8 * 64
    assert last["tokens_seen/source0"] == last["tokens_seen_per_source"][0]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["tokens_seen_per_source"] == last["tokens_seen_per_source"]
