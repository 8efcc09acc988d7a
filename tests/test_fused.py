"""The fused parallel block (model.fused_block=true) computes what the unfused one computes, trains the same, exports
to transformers and decodes with the KV cache."""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from phi_train.config import ModelConfig, model_config
from phi_train.generate import build_model, generate, generate_ids, load_for_inference
from phi_train.interop import (
    InteropError,
    export_hf,
    from_hf_state_dict,
    fuse_state_dict,
    import_hf,
    to_hf_state_dict,
    unfuse_state_dict,
)
from phi_train.model import Block, FusedBlock, PhiModel

torch.set_num_threads(1)
VOCAB = 320


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        preset="phi1_tiny", n_layer=2, d_model=128, n_head=2, d_mlp=384, vocab_size=VOCAB, max_seq_len=64,
        rotary_base=5000.0, init_std=0.1,
    )  # fmt: skip
    return model_config(**(base | kw))


def pair(seed: int = 0, **kw) -> tuple[PhiModel, PhiModel]:
    """(unfused, fused) models holding the same function. Biases and LayerNorms are randomised (the init zeroes them)
    so the bias split/sum of the conversion is really exercised."""
    cfg = tiny_cfg(**kw)
    torch.manual_seed(seed)
    plain = PhiModel(cfg)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name.endswith("bias") or ".ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    fcfg = dataclasses.replace(cfg, fused_block=True)
    fused = PhiModel(fcfg)
    fused.load_state_dict(fuse_state_dict(plain.state_dict(), cfg))
    return plain.eval(), fused.eval()


def ids(batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_fused_layout_and_parameter_count():
    plain, fused = pair()
    assert all(isinstance(b, FusedBlock) for b in fused.blocks) and all(isinstance(b, Block) for b in plain.blocks)
    C, M = 128, 384
    shapes = {k: tuple(v.shape) for k, v in fused.state_dict().items() if k.startswith("blocks.0.")}
    assert shapes == {
        "blocks.0.ln.weight": (C,),
        "blocks.0.ln.bias": (C,),
        "blocks.0.in_proj.weight": (3 * C + M, C),
        "blocks.0.in_proj.bias": (3 * C + M,),
        "blocks.0.out_proj.weight": (C, C + M),
        "blocks.0.out_proj.bias": (C,),
    }
    # the one bias of the fused output GEMM replaces two: exactly d_model fewer parameters per block
    assert plain.num_params() - fused.num_params() == plain.cfg.n_layer * C
    # the unfused path keeps its parameter names (checkpoints and interop depend on them)
    assert "blocks.1.attn.qkv.weight" in plain.state_dict() and "blocks.1.mlp.fc2.bias" in plain.state_dict()


def test_fuse_unfuse_round_trip_is_exact():
    plain, fused = pair()
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


def test_fused_logits_equal_unfused_fp32():
    plain, fused = pair()
    x = ids()
    with torch.no_grad():
        a, b = plain(x), fused(x)
    assert a.shape == b.shape == (2, 24, 320)
    assert a.abs().max() > 1.0  # not a degenerate near-zero output
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)  # only the summation order of the GEMMs differs
    torch.testing.assert_close(fused(x, labels=x), plain(x, labels=x), atol=1e-6, rtol=0)


def test_fused_gradients_equal_unfused():
    plain, fused = pair(seed=3)
    plain.train(), fused.train()  # dropout is 0 in this config: train mode changes nothing but autograd bookkeeping
    x = ids(batch=2, length=32, seed=4)
    loss_a = plain(x[:, :-1], labels=x[:, 1:])
    loss_b = fused(x[:, :-1], labels=x[:, 1:])
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=0)
    loss_a.backward()
    loss_b.backward()
    ga = {k: p.grad for k, p in plain.named_parameters()}
    gb = {k: p.grad for k, p in fused.named_parameters()}
    expected = fuse_state_dict(ga, plain.cfg)
    for i in range(plain.cfg.n_layer):
        # d loss / d out_proj.bias = d loss / d attn.proj.bias = d loss / d mlp.fc2.bias (all add to the residual)
        expected[f"blocks.{i}.out_proj.bias"] = ga[f"blocks.{i}.attn.proj.bias"]
        torch.testing.assert_close(ga[f"blocks.{i}.mlp.fc2.bias"], ga[f"blocks.{i}.attn.proj.bias"], atol=1e-7, rtol=0)
    assert expected.keys() == gb.keys()
    for k in gb:
        assert gb[k].abs().max() > 0 or expected[k].abs().max() == 0, k
        torch.testing.assert_close(gb[k], expected[k], atol=1e-6, rtol=1e-4, msg=k)


def test_fused_activation_checkpointing_gives_the_same_gradients():
    _, fused = pair(seed=5)
    fused.train()
    x = ids(seed=6)
    fused(x[:, :-1], labels=x[:, 1:]).backward()
    want = {k: p.grad.clone() for k, p in fused.named_parameters()}
    fused.zero_grad(set_to_none=True)
    fused.activation_checkpointing = True
    fused(x[:, :-1], labels=x[:, 1:]).backward()
    for k, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, want[k], atol=1e-6, rtol=1e-5, msg=k)


def test_fused_residual_dropout_acts_in_training_only():
    _, fused = pair(resid_dropout=0.5)
    x = ids()
    with torch.no_grad():
        eval_out = fused(x)
        torch.testing.assert_close(fused(x), eval_out, rtol=0, atol=0)  # eval: deterministic
        fused.train()
        torch.manual_seed(0)
        t1 = fused(x)
        torch.manual_seed(1)
        t2 = fused(x)
    assert not torch.allclose(t1, eval_out) and not torch.allclose(t1, t2)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    from data_tools.tokenizer import train_tokenizer

    texts = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n\tprint(i * 2)  # twice\n"] * 40
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=VOCAB, num_threads=1)


def test_fused_model_exports_to_transformers_with_equal_logits(tmp_path, tokenizer_path):
    import json

    from transformers import PhiForCausalLM

    _, fused = pair(seed=7)
    hf_state = to_hf_state_dict(fused.state_dict(), fused.cfg)
    assert "model.layers.0.self_attn.q_proj.weight" in hf_state and not any("in_proj" in k for k in hf_state)
    out = export_hf(fused.state_dict(), fused.cfg, tokenizer_path, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["phi_train"]["fused_block"] is True
    hf = PhiForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, fused(x), atol=2e-5, rtol=1e-5)

    # import: back to the fused layout, bit-identical weights (the bias went through attn.proj + a zero fc2 bias)
    cfg, state = import_hf(out)
    assert cfg.fused_block and dataclasses.asdict(cfg) == dataclasses.asdict(fused.cfg)
    ref = fused.state_dict()
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)

    # and the inference loader builds a fused model from the export
    model, tok = load_for_inference(str(out))
    assert isinstance(model.blocks[0], FusedBlock) and tok.vocab_size == VOCAB
    with torch.no_grad():
        torch.testing.assert_close(model(x), fused(x), atol=0, rtol=0)


def test_transformers_weights_import_into_a_fused_model():
    plain, fused = pair(seed=8)
    hf_state = to_hf_state_dict(plain.state_dict(), plain.cfg)
    from phi_train.interop import hf_config

    conf = hf_config(fused.cfg, fused.vocab_size).to_dict()  # a config that asks for the fused layout
    cfg, state = from_hf_state_dict(hf_state, conf)
    model = build_model(cfg, state)
    assert isinstance(model.blocks[0], FusedBlock)
    x = ids(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), atol=2e-5, rtol=1e-5)


def test_kv_cache_generation_with_the_fused_block(tokenizer_path):
    from phi_train.tokenizer import Tokenizer

    plain, fused = pair(seed=11)
    prompts = [[5, 17, 200, 3, 9, 44], [7], [100, 101, 102]]  # different lengths: left padding and masks
    got = generate_ids(fused, prompts, max_new_tokens=12, batch_size=3)
    assert got == generate_ids(plain, prompts, max_new_tokens=12, batch_size=3)
    assert [len(g) for g in got] == [12, 12, 12]
    # the cache gives what greedy decoding by full recomputation gives
    for prompt, new in zip(prompts, got):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                seq.append(int(fused(torch.tensor([seq]))[0, -1].argmax()))
        assert seq[len(prompt) :] == new
    # sampling and text generation run through the fused path too
    tok = Tokenizer(tokenizer_path)
    texts = generate(fused, tok, ["def add(", "for i in"], max_new_tokens=8, temperature=0.8, top_p=0.9, seed=1)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert texts == generate(fused, tok, ["def add(", "for i in"], max_new_tokens=8, temperature=0.8, top_p=0.9, seed=1)


def test_conversion_errors_are_one_line_and_name_the_key():
    plain, fused = pair()
    with pytest.raises(InteropError, match=r"blocks\.0\.in_proj\.weight is missing .*fused layout") as err:
        unfuse_state_dict(plain.state_dict(), plain.cfg)
    assert "\n" not in str(err.value)
    bad = dict(plain.state_dict())
    bad["blocks.1.mlp.fc1.weight"] = bad["blocks.1.mlp.fc1.weight"][:10]
    with pytest.raises(InteropError, match=r"blocks\.1\.mlp\.fc1\.weight has shape \(10, 128\), expected \(384, 128\)"):
        fuse_state_dict(bad, plain.cfg)
