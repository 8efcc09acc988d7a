"""transformers PhiForCausalLM <-> PhiModel: same logits both ways, exact state round trip, the CLIs on real files;
the fused block's layout conversions (fuse/unfuse, export and import of a fused model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from tiny import VOCAB, fused_pair, token_ids

from phi_train.config import model_config
from phi_train.generate import build_model, generate, load_for_inference
from phi_train.interop import (
    InteropError,
    config_from_hf,
    export_hf,
    from_hf_state_dict,
    fuse_state_dict,
    hf_config,
    import_hf,
    to_hf_state_dict,
    unfuse_state_dict,
)
from phi_train.model import FusedBlock, PhiModel

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def tiny_model(vocab: int, seed: int = 0) -> PhiModel:
    cfg = model_config(
        preset="phi1_tiny",
        n_layer=2,
        d_model=128,
        n_head=2,
        d_mlp=512,
        vocab_size=vocab,
        max_seq_len=64,
        rotary_base=5000.0,
        ln_eps=1e-6,
        init_std=0.1,
    )
    torch.manual_seed(seed)
    return PhiModel(cfg).eval()


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    from data_tools.tokenizer import train_tokenizer

    texts = [
        "def add(a, b):\n    return a + b\n",
        "for i in range(10):\n\tprint(i * 2)  # twice\n",
        "x = 'héllo'\n",
    ] * 40
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=320, num_threads=1)


def ids(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def test_state_dict_round_trip_is_exact():
    model = tiny_model(vocab=120)
    state = model.state_dict()
    hf = to_hf_state_dict(state, model.cfg)
    assert "model.layers.1.self_attn.k_proj.bias" in hf and "model.final_layernorm.weight" in hf
    assert sum(t.numel() for t in hf.values()) == sum(t.numel() for t in state.values())
    cfg, back = from_hf_state_dict(hf, json.loads(_config_json(model)))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert asdict(cfg) == asdict(model.cfg)


def _config_json(model: PhiModel) -> str:
    from phi_train.interop import hf_config

    return hf_config(model.cfg, model.vocab_size).to_json_string()


def test_exported_model_loads_in_transformers_with_equal_logits(tmp_path, tokenizer_path):
    from transformers import AutoTokenizer, PhiForCausalLM

    from phi_train.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    model = tiny_model(vocab=tok.vocab_size)
    out = export_hf(model.state_dict(), model.cfg, tokenizer_path, tmp_path / "hf")
    assert {p.name for p in out.iterdir()} >= {
        "model.safetensors",
        "config.json",
        "tokenizer.model",
        "tokenizer_config.json",
    }
    hf = PhiForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    x = ids(tok.vocab_size)
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert theirs.shape == ours.shape == (2, 24, 320)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    assert hf.config.eos_token_id == tok.eos_id
    # the tokenizer config loads offline as well, with our ids
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    for text in ["def add(a, b):\n    return a + b\n", "\tprint('héllo')  # x", "  two leading spaces"]:
        assert hf_tok.encode(text) == tok.encode(text)
        assert hf_tok.decode(tok.encode(text)) == text
    assert hf_tok.eos_token_id == tok.eos_id


def test_transformers_model_imports_with_equal_logits(tmp_path):
    from transformers import PhiConfig, PhiForCausalLM

    conf = PhiConfig(
        vocab_size=100,  # not a multiple of 64: PhiModel pads it with zero rows
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 2000.0, "partial_rotary_factor": 0.25},
        layer_norm_eps=1e-6,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    hf = PhiForCausalLM(conf).eval()
    with torch.no_grad():  # transformers zero-initialises biases and LayerNorms: randomise them so they are tested
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(str(tmp_path / "hf"))
    cfg, state = import_hf(tmp_path / "hf")
    assert (cfg.rotary_dim, cfg.rotary_base, cfg.ln_eps, cfg.d_mlp) == (16, 2000.0, 1e-6, 256)
    model = build_model(cfg, state)
    assert model.vocab_size == 128
    x = ids(100)
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    torch.testing.assert_close(ours[..., :100], theirs, atol=1e-4, rtol=0)


def test_unsupported_transformers_configs_are_refused_in_one_line():
    base = {
        "hidden_act": "gelu_new",
        "num_attention_heads": 2,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 1,
    }
    for bad, word in [
        ({"hidden_act": "relu"}, "hidden_act='relu'"),
        ({"qk_layernorm": True}, "qk_layernorm"),
        ({"num_key_value_heads": 1}, "num_key_value_heads=1"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type='linear'"),
    ]:
        with pytest.raises(InteropError, match=word) as err:
            config_from_hf({**base, **bad})
        assert "\n" not in str(err.value)
    with pytest.raises(InteropError, match="no config.json"):
        import_hf(ROOT / "conf")


def write_checkpoint(ckpt_dir: Path, model: PhiModel, tokenizer_path: Path) -> None:
    """A phi_train checkpoint as the trainer leaves its final one: meta.json + consolidated fp32 safetensors."""
    from phi_train.checkpoint import save_inference

    save_inference(ckpt_dir, model, tokenizer_path, step=3)


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"launch/{script}", *args],
        cwd=ROOT,
        env=ENV,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_export_and_sample_clis_on_a_real_checkpoint(tmp_path, tokenizer_path):
    from transformers import PhiForCausalLM

    from phi_train.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    model = tiny_model(vocab=tok.vocab_size, seed=5)
    ckpt = tmp_path / "run" / "checkpoints"
    write_checkpoint(ckpt, model, tokenizer_path)

    r = run("export.py", f"checkpoint={ckpt}", f"out={tmp_path / 'hf'}")
    assert r.returncode == 0, r.stderr
    assert "exported" in r.stdout
    hf = PhiForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    x = ids(tok.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=0)

    # the same greedy completion from the checkpoint, from the export, and in-process
    prompt = "def add(a, b):\n"
    [expected] = generate(model, tok, [prompt], max_new_tokens=12)
    for src in (str(ckpt), str(tmp_path / "hf")):
        # quoted for Hydra's grammar (the prompt has parentheses, a comma and a newline)
        r = run("sample.py", f"checkpoint={src}", f"prompt='{prompt}'", "max_new_tokens=12", "device=cpu")
        assert r.returncode == 0, r.stderr
        assert r.stdout == prompt + expected + "\n"
    loaded, _ = load_for_inference(str(tmp_path / "hf"))
    assert generate(loaded, tok, [prompt], max_new_tokens=12) == [expected]


def test_clis_fail_in_one_line_on_a_missing_checkpoint(tmp_path):
    r = run("export.py", f"checkpoint={tmp_path / 'nope'}", f"out={tmp_path / 'out'}")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "nope" in r.stderr and "Traceback" not in r.stderr
    r = run("sample.py", f"checkpoint={tmp_path / 'nope'}", "prompt=x", "device=cpu")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nope" in r.stderr


def test_exports_record_architecture_only_and_older_exports_with_a_kernel_choice_still_import():
    model = tiny_model(vocab=120)
    conf = hf_config(model.cfg, model.vocab_size).to_dict()
    assert set(conf["phi_train"]) == {"name", "vocab_size", "fused_block"}
    old = {**conf, "phi_train": {**conf["phi_train"], "attention": "sdpa"}}  # as exports written before kernels.*
    assert asdict(config_from_hf(old)) == asdict(model.cfg)


# ---------------------------------------------------------------- the fused block's layout (model.fused_block=true)


def test_fuse_unfuse_round_trip_is_exact():
    plain, fused = fused_pair()
    cfg = plain.cfg
    state = fused.state_dict()
    back = fuse_state_dict(unfuse_state_dict(state, cfg), cfg)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    un = unfuse_state_dict(state, cfg)
    assert un.keys() == plain.state_dict().keys()
    assert torch.count_nonzero(un["blocks.0.mlp.fc2.bias"]) == 0  # the summed bias lives in attn.proj.bias
    ref = plain.state_dict()
    torch.testing.assert_close(
        un["blocks.0.attn.proj.bias"], ref["blocks.0.attn.proj.bias"] + ref["blocks.0.mlp.fc2.bias"], rtol=0, atol=0
    )
    # every other tensor is the unfused model's own, bit for bit
    same = [k for k in ref if not k.endswith(("attn.proj.bias", "mlp.fc2.bias"))]
    assert all(torch.equal(un[k], ref[k]) for k in same)


def test_fused_model_exports_to_transformers_with_equal_logits(tmp_path, tokenizer_path):
    from transformers import PhiForCausalLM

    _, fused = fused_pair(seed=7)
    hf_state = to_hf_state_dict(fused.state_dict(), fused.cfg)
    assert "model.layers.0.self_attn.q_proj.weight" in hf_state and not any("in_proj" in k for k in hf_state)
    out = export_hf(fused.state_dict(), fused.cfg, tokenizer_path, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["phi_train"]["fused_block"] is True
    hf = PhiForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    x = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, fused(x), atol=2e-5, rtol=1e-5)

    # import: back to the fused layout, bit-identical weights (the bias went through attn.proj + a zero fc2 bias)
    cfg, state = import_hf(out)
    assert cfg.fused_block and asdict(cfg) == asdict(fused.cfg)
    ref = fused.state_dict()
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)

    # and the inference loader builds a fused model from the export
    model, tok = load_for_inference(str(out))
    assert isinstance(model.blocks[0], FusedBlock) and tok.vocab_size == VOCAB
    with torch.no_grad():
        torch.testing.assert_close(model(x), fused(x), atol=0, rtol=0)


def test_transformers_weights_import_into_a_fused_model():
    plain, fused = fused_pair(seed=8)
    hf_state = to_hf_state_dict(plain.state_dict(), plain.cfg)
    conf = hf_config(fused.cfg, fused.vocab_size).to_dict()  # a config that asks for the fused layout
    cfg, state = from_hf_state_dict(hf_state, conf)
    model = build_model(cfg, state)
    assert isinstance(model.blocks[0], FusedBlock)
    x = token_ids(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), atol=2e-5, rtol=1e-5)


def test_conversion_errors_are_one_line_and_name_the_key():
    plain, fused = fused_pair()
    with pytest.raises(InteropError, match=r"blocks\.0\.in_proj\.weight is missing .*fused layout") as err:
        unfuse_state_dict(plain.state_dict(), plain.cfg)
    assert "\n" not in str(err.value)
    bad = dict(plain.state_dict())
    bad["blocks.1.mlp.fc1.weight"] = bad["blocks.1.mlp.fc1.weight"][:10]
    with pytest.raises(
        InteropError, match=r"blocks\.1\.mlp\.fc1\.weight has shape \(10, 128\), expected \(384, 128\)"
    ) as err:
        fuse_state_dict(bad, plain.cfg)
    assert "\n" not in str(err.value)
