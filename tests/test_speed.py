"""The speed work (issue 7) computes the same function: oneDNN linears, sync-free rotary, mask-free generation, the
GPU benchmark's engine path (run here on CPU), the MFU peak table. No test here times anything."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from phi_train.config import ConfigError, model_config
from phi_train.model import Linear, PhiModel, _onednn_gemm, matmul_attention
from phi_train.trainer import peak_flops_for

ROOT = Path(__file__).resolve().parent.parent
needs_onednn = pytest.mark.skipif(_onednn_gemm is None, reason="torch built without oneDNN")


def tiny(**kw):
    return model_config(
        preset="phi1_tiny", n_layer=2, d_model=128, n_head=2, d_mlp=512, vocab_size=300, max_seq_len=64, **kw
    )


@needs_onednn
@pytest.mark.parametrize(
    "lead, k, n, bias",
    [((8, 32), 128, 512, True), ((96,), 512, 128, True), ((3, 5), 7, 11, False), ((1, 1), 64, 4096, True)],
)
def test_onednn_linear_equals_torch_linear_values_and_gradients(lead, k, n, bias):
    torch.manual_seed(0)
    layer = Linear(k, n, bias=bias)
    layer.min_macs = 0  # oneDNN for every size here
    x = torch.randn(*lead, k, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    got = [y.detach(), x.grad, layer.weight.grad] + ([layer.bias.grad] if bias else [])
    assert layer.weight.grad.is_contiguous()  # the transposed oneDNN product was laid out as the parameter
    x.grad = None
    layer.zero_grad(set_to_none=True)
    ref = F.linear(x, layer.weight, layer.bias)
    ref.backward(g)
    want = [ref.detach(), x.grad, layer.weight.grad] + ([layer.bias.grad] if bias else [])
    for a, b in zip(got, want):  # fp32 sums in another order (up to 4096 terms): within 1e-5 of the largest entry
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5 * b.abs().max()


@needs_onednn
def test_onednn_linear_handles_a_transposed_input():
    layer = Linear(16, 24)
    layer.min_macs = 0
    x = torch.randn(16, 10).t()  # (10, 16), not contiguous
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_small_products_stay_on_torch_linear():
    """Below min_macs (a decoding step of a small model) the result is torch's own, bit for bit."""
    layer = Linear(256, 768)
    x = torch.randn(1, 1, 256)
    assert x.numel() * 768 < layer.min_macs
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_linear_leaves_autocast_and_the_meta_device_to_torch():
    layer = Linear(32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(4, 32)).dtype == torch.bfloat16  # autocast's own (oneDNN bf16) path
    with torch.device("meta"):
        assert Linear(32, 64)(torch.empty(4, 32)).shape == (4, 64)


def test_cpu_matmul_onednn_and_blas_train_the_same_model():
    """Same loss and gradients from the two GEMM libraries (different summation order only)."""
    torch.manual_seed(0)
    a = PhiModel(tiny(cpu_matmul="onednn"))
    b = PhiModel(tiny(cpu_matmul="blas"))
    b.load_state_dict(a.state_dict())
    assert all(m.onednn for m in a.modules() if isinstance(m, Linear))
    assert not any(m.onednn for m in b.modules() if isinstance(m, Linear))
    x = torch.randint(0, 300, (3, 33))
    la, lb = a(x[:, :-1], labels=x[:, 1:]), b(x[:, :-1], labels=x[:, 1:])
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bad_cpu_matmul_is_a_one_line_error():
    with pytest.raises(ConfigError, match="model.cpu_matmul='mkl' is not one of onednn, blas"):
        tiny(cpu_matmul="mkl")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matmul_attention_equals_sdpa_causal(dtype, tol):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    ours = matmul_attention(q, k, v, 0.0)
    ours.sum().backward()
    grads = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref.sum().backward()
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
    for a, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(a, t.grad, rtol=tol, atol=tol)


def test_bf16_cpu_model_with_matmul_attention_tracks_fp32():
    """The bf16 CPU path (autocast, T <= CPU_MATMUL_ATTENTION_MAX_T) computes the model's function."""
    torch.manual_seed(0)
    model = PhiModel(tiny()).eval()
    x = torch.randint(0, 300, (2, 48))
    with torch.no_grad():
        fp32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x).float()
    assert (bf16 - fp32).abs().max() < 0.1 * fp32.abs().max()


def test_rotary_from_a_slice_equals_rotary_from_positions_and_grows_past_max_seq_len():
    torch.manual_seed(0)
    model = PhiModel(tiny()).eval()
    x = torch.randint(0, 300, (2, 80))  # longer than max_seq_len=64: the tables grow from the known bound
    with torch.no_grad():
        implicit = model(x)
        explicit = model(x, positions=torch.arange(80).expand(2, 80))
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)
    assert model.rotary.cos.shape[0] >= 80


def test_equal_length_batch_takes_the_mask_free_path_with_the_same_tokens():
    from phi_train.generate import generate_ids

    torch.manual_seed(0)
    model = PhiModel(tiny()).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [1, 2, 3, 4, 5]]
    together = generate_ids(model, prompts, max_new_tokens=12, batch_size=3)
    alone = [generate_ids(model, [p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    padded = generate_ids(model, prompts + [[7]], max_new_tokens=12, batch_size=4)[:3]  # masked path
    assert together == alone == padded


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L40", 181e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA GeForce GTX 1080", None),
        ("NVIDIA RTX A1000", None),  # not an A100
        ("NVIDIA GB200", None),  # not a B200 (no peak recorded: no MFU rather than a wrong one)
    ],
)
def test_mfu_peak_matches_the_most_specific_device_name(name, peak):
    assert peak_flops_for(name) == peak


def test_resume_check_reads_checkpoints_written_before_fused_block_existed():
    from dataclasses import asdict

    from phi_train.checkpoint import check_compatible

    cfg = tiny()
    old = {k: v for k, v in asdict(cfg).items() if k != "fused_block"}
    check_compatible({"model": old, "vocab_size": 320, "world_size": 2}, cfg, 320, 2, "ckpt")  # unfused: fits
    with pytest.raises(ConfigError, match="model.fused_block=False \\(checkpoint\\) vs True"):
        check_compatible({"model": old, "vocab_size": 320, "world_size": 2}, tiny(fused_block=True), 320, 2, "ckpt")
