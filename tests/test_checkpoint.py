"""phi_train/checkpoint.py: meta.json records the architecture only, and checkpoints written by older versions (no
`fused_block`; kernel choices `attention` / `cpu_matmul` among the model settings) still resume and load."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from phi_train.checkpoint import META, check_compatible, load_model_state, make_meta, resolve, save_inference
from phi_train.config import ConfigError, model_config
from phi_train.generate import load_for_inference
from phi_train.model import PhiModel

torch.set_num_threads(1)


def tiny(**kw):
    return model_config(
        preset="phi1_tiny", n_layer=2, d_model=128, n_head=2, d_mlp=512, vocab_size=300, max_seq_len=64, **kw
    )


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    from data_tools.tokenizer import train_tokenizer

    texts = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n\tprint(i * 2)  # twice\n"] * 40
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=320, num_threads=1)


def test_resume_check_reads_checkpoints_written_before_fused_block_existed():
    cfg = tiny()
    old = {k: v for k, v in asdict(cfg).items() if k != "fused_block"}
    check_compatible({"model": old, "vocab_size": 320, "world_size": 2}, cfg, 320, 2, "ckpt")  # unfused: fits
    with pytest.raises(ConfigError, match="model.fused_block=False \\(checkpoint\\) vs True") as err:
        check_compatible({"model": old, "vocab_size": 320, "world_size": 2}, tiny(fused_block=True), 320, 2, "ckpt")
    assert "\n" not in str(err.value)


def test_meta_records_the_architecture_only():
    meta = make_meta(tiny(), 320, step=4, world_size=2, tokenizer={"path": "tokenizer.model"})
    assert meta["model"] == asdict(tiny())
    assert not {"attention", "cpu_matmul", "kernels"} & set(meta["model"]) and "kernels" not in meta


def test_checkpoint_with_kernel_choices_in_its_model_meta_still_resumes_and_loads(tmp_path, tokenizer_path):
    """meta.json as written before the kernel choices left ModelConfig: they are dropped, the caller picks its own."""
    torch.manual_seed(0)
    model = PhiModel(tiny()).eval()
    ckpt = save_inference(tmp_path / "checkpoints", model, tokenizer_path, step=6)
    ckpt_dir, tag = resolve(ckpt)
    path = ckpt_dir / tag / META
    meta = json.loads(path.read_text())
    meta["model"] |= {"attention": "flash", "cpu_matmul": "blas"}  # flash: would fail on this CPU if it were obeyed
    path.write_text(json.dumps(meta))

    check_compatible(meta, tiny(), model.vocab_size, 1, str(path))  # resume: the architecture fits
    cfg, state, _ = load_model_state(ckpt)
    assert cfg == model.cfg
    loaded, tok = load_for_inference(str(ckpt))
    assert loaded.kernels.attention == "auto" and all(b.attn.qkv.onednn for b in loaded.blocks)
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        sdpa, _ = load_for_inference(str(ckpt), attention="sdpa", cpu_matmul="blas")
        assert sdpa.kernels.cpu_matmul == "blas" and not sdpa.lm_head.onednn
        torch.testing.assert_close(sdpa(x), model(x), rtol=1e-5, atol=1e-5)  # other GEMM library: rounding only

    meta["model"]["n_kv_head"] = 1  # a setting this version does not know is refused, by name, in one line
    path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="meta.json model keys n_kv_head are not model settings") as err:
        load_model_state(ckpt)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- checkpoints that prove themselves


@pytest.fixture()
def two_checkpoints(tmp_path, tokenizer_path):
    """ckpt_dir with complete checkpoints at steps 2 and 4 (4 = latest), each with checksums in its meta.json."""
    import shutil

    torch.manual_seed(0)
    ckpt_dir = tmp_path / "checkpoints"
    save_inference(ckpt_dir, PhiModel(tiny()), tokenizer_path, step=2)
    shutil.copytree(ckpt_dir / "global_step000002", tmp_path / "keep")
    save_inference(ckpt_dir, PhiModel(tiny()), tokenizer_path, step=4)  # prunes step 2 (keep_last=1): put it back
    shutil.copytree(tmp_path / "keep", ckpt_dir / "global_step000002")
    return ckpt_dir


def _flip(path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4096] = bytes(b ^ 0xFF for b in data[mid : mid + 4096])  # 4 KiB flipped, size unchanged
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "bit-flip": (lambda d: _flip(d / "model_fp32.safetensors"), "sha256"),
    "truncated": (lambda d: os.truncate(d / "model_fp32.safetensors", 1000), "truncated"),
    "file-missing": (lambda d: (d / "model_fp32.safetensors").unlink(), "is missing"),
    "empty-meta": (lambda d: (d / META).write_text(""), "not valid JSON"),
    "meta-not-a-checkpoint": (lambda d: (d / META).write_text("[1, 2]"), "lacks"),
    "meta-missing": (lambda d: (d / META).unlink(), "meta.json is missing"),
    "binary-meta": (lambda d: (d / META).write_bytes(b"\xff\xfe\x00"), "not valid JSON"),
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back_in_one_line(two_checkpoints, how):
    from phi_train.checkpoint import newest_usable

    damage, word = CORRUPTIONS[how]
    damage(two_checkpoints / "global_step000004")
    lines = []
    assert newest_usable(two_checkpoints, warn=lines.append) == "global_step000002"
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert word in lines[0] and "global_step000004" in lines[0] and "resuming from global_step000002" in lines[0]
    _, _, meta = load_model_state(two_checkpoints)  # inference/init_from fall back the same way
    assert meta["step"] == 2


def test_intact_checkpoints_verify_and_every_file_is_listed(two_checkpoints):
    from phi_train.checkpoint import newest_usable, verify

    lines = []
    assert newest_usable(two_checkpoints, warn=lines.append) == "global_step000004" and not lines
    meta = json.loads((two_checkpoints / "global_step000004" / META).read_text())
    on_disk = {p.name for p in (two_checkpoints / "global_step000004").iterdir()} - {META}
    assert set(meta["files"]) == on_disk and verify(two_checkpoints, "global_step000004") is None


def test_latest_naming_a_missing_tag_falls_back(two_checkpoints):
    import shutil

    from phi_train.checkpoint import newest_usable

    shutil.rmtree(two_checkpoints / "global_step000004")
    (two_checkpoints / "latest").write_text("global_step000009")
    lines = []
    assert newest_usable(two_checkpoints, warn=lines.append) == "global_step000002"
    assert len(lines) == 1 and "global_step000009" in lines[0]


def test_nothing_usable_is_one_line_error_and_nothing_committed_is_a_fresh_start(two_checkpoints, tmp_path):
    from phi_train.checkpoint import newest_usable

    for tag in ("global_step000002", "global_step000004"):
        _flip(two_checkpoints / tag / "model_fp32.safetensors")
    with pytest.raises(ConfigError, match="no usable checkpoint .* train.resume=false") as err:
        newest_usable(two_checkpoints)
    assert "\n" not in str(err.value) and "global_step000002" in str(err.value)
    with pytest.raises(ConfigError, match="unusable: .*sha256"):
        load_model_state(two_checkpoints / "global_step000004")  # a tag named explicitly: no fallback, one line
    # killed during its very first save: a tag directory without meta.json and no `latest` is no checkpoint at all
    (tmp_path / "fresh" / "global_step000002").mkdir(parents=True)
    (tmp_path / "fresh" / "global_step000002" / "mp_rank_00_model_states.pt").write_bytes(b"half")
    assert newest_usable(tmp_path / "fresh") is None
    assert newest_usable(tmp_path / "nothing-here") is None
