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
