"""The phi-1 architecture as the paper and the released weights have it (arXiv 2306.11644 §2.3), and the fused
parallel block (model.fused_block=true) computing the same function, training the same."""

from __future__ import annotations

import math
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tiny import fused_pair, token_ids

from phi_train.config import ConfigError, ModelConfig, model_config
from phi_train.interop import fuse_state_dict
from phi_train.model import Block, FusedBlock, PhiModel, Rotary, apply_rotary, pad_vocab

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent


def small_cfg(**kw) -> ModelConfig:
    base = {
        "n_layer": 2,
        "d_model": 128,
        "n_head": 2,
        "d_mlp": 512,
        "vocab_size": 100,
        "max_seq_len": 64,
        "init_std": 0.1,
    }
    return model_config(preset="phi1_tiny", **{**base, **kw})


@pytest.mark.parametrize(("preset", "expected"), [("phi1", 1_418_270_720), ("phi1_small", 356_794_368)])
def test_parameter_counts_equal_transformers_phi(preset, expected):
    from transformers import PhiConfig, PhiForCausalLM

    cfg = model_config(preset=preset)
    with torch.device("meta"):  # no memory, no init: shapes only
        ours = PhiModel(cfg)
        theirs = PhiForCausalLM(
            PhiConfig(
                vocab_size=51_200,
                hidden_size=cfg.d_model,
                intermediate_size=cfg.d_mlp,
                num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head,
                tie_word_embeddings=False,
            )
        )
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert ours.num_params() == n_theirs == expected


def test_block_is_parallel_attention_plus_mlp_on_one_layernorm():
    torch.manual_seed(0)
    model = PhiModel(small_cfg()).eval()
    block = model.blocks[0]
    with torch.no_grad():  # give the LayerNorm non-trivial affine parameters so it is really exercised
        block.ln.weight.normal_(1.0, 0.2)
        block.ln.bias.normal_(0.0, 0.2)
    x = torch.randn(2, 10, 128)
    cos, sin = model.rotary(torch.arange(10))
    with torch.no_grad():
        got = block(x, cos, sin)
        h = block.ln(x)
        parallel = x + block.attn(h, cos, sin, None, None, 0) + block.mlp(h)
        a = block.attn(h, cos, sin, None, None, 0)
        sequential = x + a + block.mlp(block.ln(x + a))  # GPT-2 style, what it must not be
    torch.testing.assert_close(got, parallel, atol=0, rtol=0)
    assert (got - sequential).abs().max() > 1e-3
    # and the MLP is fc1 -> tanh-GELU -> fc2
    torch.testing.assert_close(
        block.mlp(h), block.mlp.fc2(F.gelu(block.mlp.fc1(h), approximate="tanh")), atol=0, rtol=0
    )


def test_rotary_touches_exactly_the_first_32_of_64_dims():
    cfg = model_config(preset="phi1")
    assert (cfg.head_dim, cfg.rotary_dim) == (64, 32)
    rot = Rotary(cfg.rotary_dim, 128, cfg.rotary_base)
    q = torch.randn(1, 4, 1, 64)
    at0 = apply_rotary(q, *rot(torch.tensor([0])))
    torch.testing.assert_close(at0, q, atol=1e-6, rtol=0)  # position 0: the identity
    for pos in (1, 7, 100):
        out = apply_rotary(q, *rot(torch.tensor([pos])))
        assert torch.equal(out[..., 32:], q[..., 32:])  # dims 32..63 carry no position
        assert (out[..., :32] - q[..., :32]).abs().amax(dim=-1).min() > 1e-3  # dims 0..31 move, in every head
        torch.testing.assert_close(out[..., :32].norm(dim=-1), q[..., :32].norm(dim=-1))  # a rotation: norms kept


def test_rotary_scores_depend_only_on_the_position_difference():
    rot = Rotary(32, 512, 10000.0)
    q, k = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1, 64)

    def score(m: int, n: int) -> float:
        qm = apply_rotary(q, *rot(torch.tensor([m])))
        kn = apply_rotary(k, *rot(torch.tensor([n])))
        return float((qm * kn).sum())

    for m, n in [(5, 2), (40, 40), (3, 17)]:
        ref = score(m, n)
        for shift in (1, 13, 300):
            assert score(m + shift, n + shift) == pytest.approx(ref, abs=1e-4)
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # but it does depend on the difference


def reference_attention(attn, x, cos, sin, mask):
    """Plain math: softmax(q k^T / sqrt(D) + mask) v, then the output projection."""
    B, T, C = x.shape
    q, k, v = attn.qkv(x).view(B, T, 3, attn.n_head, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    scores = scores.masked_fill(~mask, float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v
    return attn.proj(y.transpose(1, 2).reshape(B, T, C))


def test_sdpa_agrees_with_plain_math_attention():
    torch.manual_seed(0)
    model = PhiModel(small_cfg(), attention="sdpa").eval()
    attn = model.blocks[0].attn
    x = torch.randn(3, 12, 128)
    cos, sin = model.rotary(torch.arange(12))
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    with torch.no_grad():
        torch.testing.assert_close(
            attn(x, cos, sin, None, None, 0), reference_attention(attn, x, cos, sin, causal), atol=1e-5, rtol=1e-5
        )
        # an explicit boolean mask (generation's left padding): row 1 may not see its first 4 keys
        mask = causal[None, None].repeat(3, 1, 1, 1)
        mask[1, :, :, :4] = False
        mask[1, 0, torch.arange(4), torch.arange(4)] = True
        torch.testing.assert_close(
            attn(x, cos, sin, mask, None, 0), reference_attention(attn, x, cos, sin, mask), atol=1e-5, rtol=1e-5
        )


def test_vocabulary_is_padded_to_a_multiple_of_64():
    assert [pad_vocab(n) for n in (1, 64, 65, 50_257, 51_200)] == [64, 64, 128, 50_304, 51_200]
    model = PhiModel(small_cfg(vocab_size=None), vocab_size=1000)
    assert (
        model.vocab_size == 1024 and model.wte.weight.shape == (1024, 128) and model.lm_head.weight.shape == (1024, 128)
    )
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 1024)
    with pytest.raises(ValueError, match="vocab_size is null"):
        PhiModel(small_cfg(vocab_size=None))


def test_head_is_untied_with_a_bias():
    model = PhiModel(small_cfg())
    assert model.lm_head.weight.data_ptr() != model.wte.weight.data_ptr()
    assert model.lm_head.bias is not None


def test_cached_forward_equals_the_full_forward():
    torch.manual_seed(0)
    model = PhiModel(small_cfg()).eval()
    from phi_train.model import KVCache

    x = torch.randint(0, 100, (2, 16))
    cache = KVCache(2, 2, 2, 16, 64, "cpu", torch.float32)
    with torch.no_grad():
        full = model(x)
        parts = [model(x[:, :10], cache=cache)] + [model(x[:, t : t + 1], cache=cache) for t in range(10, 16)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", sorted((ROOT / "conf" / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_model_preset_builds(path):
    cfg = model_config(preset=path.stem)
    assert cfg.name == path.stem
    assert cfg.head_dim == 64 and cfg.rotary_dim == 32 and cfg.d_mlp == 4 * cfg.d_model  # phi-1's shape rules (§2.3)
    # the YAML also validates against the structured schema Hydra uses (unknown keys / wrong types would fail)
    body = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(path)).items() if k != "defaults"}
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), body)
    assert OmegaConf.to_object(merged) == cfg
    with torch.device("meta"):
        PhiModel(cfg, vocab_size=51_200)


def test_bad_model_config_is_a_one_line_error():
    with pytest.raises(ConfigError, match="n_head=3 does not divide model.d_model=128"):
        small_cfg(n_head=3)
    with pytest.raises(ConfigError, match="model preset 'phi9' not found; choose one of .*phi1_small"):
        model_config(preset="phi9")


def test_rotary_from_a_slice_equals_rotary_from_positions_and_grows_past_max_seq_len():
    torch.manual_seed(0)
    model = PhiModel(small_cfg()).eval()
    assert model.rotary.cos.shape[0] == 64
    x = torch.randint(0, 100, (2, 80))  # longer than max_seq_len=64: the tables grow from the known bound
    with torch.no_grad():
        implicit = model(x)
        explicit = model(x, positions=torch.arange(80).expand(2, 80))
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)
    assert model.rotary.cos.shape[0] >= 80
    cos, sin = model.rotary.span(70, 10)  # the slice is the rows of those positions
    assert torch.equal(cos[0, 0], model.rotary.cos[70:80]) and torch.equal(sin[0, 0], model.rotary.sin[70:80])


# ---------------------------------------------------------------- the fused parallel block (PaLM §2)


def test_fused_layout_and_parameter_count():
    plain, fused = fused_pair()
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


def test_fused_logits_equal_unfused_fp32():
    plain, fused = fused_pair()
    x = token_ids()
    with torch.no_grad():
        a, b = plain(x), fused(x)
    assert a.shape == b.shape == (2, 24, 320)
    assert a.abs().max() > 1.0  # not a degenerate near-zero output
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)  # only the summation order of the GEMMs differs
    torch.testing.assert_close(fused(x, labels=x), plain(x, labels=x), atol=1e-6, rtol=0)


def test_fused_gradients_equal_unfused():
    plain, fused = fused_pair(seed=3)
    plain.train(), fused.train()  # dropout is 0 in this config: train mode changes nothing but autograd bookkeeping
    x = token_ids(batch=2, length=32, seed=4)
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
    _, fused = fused_pair(seed=5)
    fused.train()
    x = token_ids(seed=6)
    fused(x[:, :-1], labels=x[:, 1:]).backward()
    want = {k: p.grad.clone() for k, p in fused.named_parameters()}
    fused.zero_grad(set_to_none=True)
    fused.activation_checkpointing = True
    fused(x[:, :-1], labels=x[:, 1:]).backward()
    for k, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, want[k], atol=1e-6, rtol=1e-5, msg=k)


def test_fused_residual_dropout_acts_in_training_only():
    _, fused = fused_pair(resid_dropout=0.5)
    x = token_ids()
    with torch.no_grad():
        eval_out = fused(x)
        torch.testing.assert_close(fused(x), eval_out, rtol=0, atol=0)  # eval: deterministic
        fused.train()
        torch.manual_seed(0)
        t1 = fused(x)
        torch.manual_seed(0)
        torch.testing.assert_close(fused(x), t1, rtol=0, atol=0)  # training noise comes from torch's seeded RNG
        torch.manual_seed(1)
        t2 = fused(x)
    assert not torch.allclose(t1, eval_out) and not torch.allclose(t1, t2)
