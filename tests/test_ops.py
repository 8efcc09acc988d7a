"""phi_train/ops.py: the kernels compute the model's function whichever is chosen (oneDNN or MKL GEMMs; flash-attn,
SDPA or matmul attention), each call takes the kernel it is meant to, and the choices are run settings (`kernels.*`).
No test here times anything."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
import torch.nn.functional as F

from phi_train.config import ConfigError, KernelConfig, check_override, model_config
from phi_train.model import PhiModel
from phi_train.ops import CPU_MATMUL_ATTENTION_MAX_T, Linear, _onednn_gemm, attention, matmul_attention

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
needs_onednn = pytest.mark.skipif(_onednn_gemm is None, reason="torch built without oneDNN")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")


def tiny(**kw):
    return model_config(
        preset="phi1_tiny", n_layer=2, d_model=128, n_head=2, d_mlp=512, vocab_size=300, max_seq_len=64, **kw
    )


# ---------------------------------------------------------------- Linear: fp32 CPU GEMMs on oneDNN


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
    assert y.grad_fn is not None and "OneDnnLinear" in type(y.grad_fn).__name__  # oneDNN's path, not F.linear's
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
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert y.dtype == torch.bfloat16  # autocast's own (oneDNN bf16) path
        assert torch.equal(y, F.linear(x, layer.weight, layer.bias))
    with torch.device("meta"):
        assert Linear(32, 64)(torch.empty(4, 32)).shape == (4, 64)


def test_cpu_matmul_onednn_and_blas_train_the_same_model():
    """Same loss and gradients from the two GEMM libraries (different summation order only)."""
    torch.manual_seed(0)
    a = PhiModel(tiny(), cpu_matmul="onednn")
    b = PhiModel(tiny(), cpu_matmul="blas")
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


# ---------------------------------------------------------------- attention: which kernel, the same function


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


def test_causal_bf16_on_cpu_takes_matmul_attention_up_to_its_limit_and_sdpa_beyond():
    torch.manual_seed(0)
    for T in (CPU_MATMUL_ATTENTION_MAX_T, CPU_MATMUL_ATTENTION_MAX_T + 1):
        q, k, v = (torch.randn(1, 2, T, 64, dtype=torch.bfloat16) for _ in range(3))
        got = attention(q, k, v, causal=True)  # (B, T, H, D)
        matmul = matmul_attention(q, k, v, 0.0).transpose(1, 2)
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        assert got.shape == (1, T, 2, 64)
        assert not torch.equal(matmul, sdpa)  # the two kernels round differently: the checks below tell them apart
        assert torch.equal(got, matmul if T <= CPU_MATMUL_ATTENTION_MAX_T else sdpa), T
    q, k, v = (torch.randn(1, 2, 40, 64) for _ in range(3))  # fp32 keeps SDPA at any length
    assert torch.equal(
        attention(q, k, v, causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    )


def plain_attention(q, k, v, allowed):
    """softmax(q k^T / sqrt(D)) v over the keys `allowed` (T, S) lets each query see; -> (B, T, H, D)."""
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2)


def test_causal_attention_with_cached_keys_is_aligned_bottom_right():
    """With S - T keys already cached, query i sits at position S - T + i and sees keys 0 .. S - T + i."""
    torch.manual_seed(0)
    k, v = torch.randn(2, 2, 12, 64), torch.randn(2, 2, 12, 64)
    for T in (12, 5, 1):  # training/prefill, a prefill into a non-empty cache, a decoding step
        q = torch.randn(2, 2, T, 64)
        allowed = torch.arange(12)[None, :] <= torch.arange(T)[:, None] + (12 - T)
        torch.testing.assert_close(
            attention(q, k, v, causal=True), plain_attention(q, k, v, allowed), atol=1e-5, rtol=1e-5
        )
    # an explicit mask (generation's left padding) is taken as given
    q = torch.randn(2, 2, 12, 64)
    mask = torch.ones(12, 12, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    mask[1, :, 4:, :4] = False
    got = attention(q, k, v, mask)
    torch.testing.assert_close(got[1], plain_attention(q, k, v, mask[1, 0])[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="a mask or causal=True, not both"):
        attention(q, k, v, mask, causal=True)


def test_bf16_cpu_model_with_matmul_attention_tracks_fp32():
    """The bf16 CPU path (autocast, T <= CPU_MATMUL_ATTENTION_MAX_T) computes the model's function."""
    torch.manual_seed(0)
    model = PhiModel(tiny()).eval()
    x = torch.randint(0, 300, (2, 48))
    with torch.no_grad():
        fp32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x).float()
    assert x.shape[1] <= CPU_MATMUL_ATTENTION_MAX_T  # the length that takes matmul_attention
    assert (bf16 - fp32).abs().max() < 0.1 * fp32.abs().max()
    assert not torch.equal(bf16, fp32)  # it did run in bf16


def test_flash_attention_on_cpu_is_a_clear_error():
    model = PhiModel(tiny(), attention="flash")
    assert all(b.attn.backend == "flash" for b in model.blocks)
    with pytest.raises(RuntimeError, match="kernels.attention=flash needs flash-attn") as err:
        model(torch.zeros(1, 4, dtype=torch.long))
    assert "auto or sdpa" in str(err.value) and "\n" not in str(err.value)
    # a loader fails when it loads, not at the first request
    from phi_train.generate import build_model

    with pytest.raises(ConfigError, match="kernels.attention=flash needs flash-attn"):
        build_model(model.cfg, model.state_dict(), attention="flash")
    sdpa = build_model(model.cfg, model.state_dict(), attention="sdpa", cpu_matmul="blas")
    assert all(b.attn.backend == "sdpa" and not b.attn.qkv.onednn for b in sdpa.blocks)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_backends_agree(dtype):
    """flash-attn (when installed) and SDPA give the same logits in half precision; bf16 forward is close to fp32."""
    torch.manual_seed(0)
    cfg = tiny(init_std=0.1)
    ref = PhiModel(cfg, attention="sdpa").cuda().eval()
    ids = torch.randint(0, ref.vocab_size, (2, 48), device="cuda")
    with torch.no_grad():
        fp32 = ref(ids).float()
        half = ref.to(dtype)(ids).float()
        assert (half - fp32).abs().max() < 0.1
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return
        flash = PhiModel(cfg, attention="flash").cuda().to(dtype).eval()
        flash.load_state_dict(ref.state_dict())
        assert (flash(ids).float() - half).abs().max() < 2e-2


# ---------------------------------------------------------------- the choices as configuration (`kernels.*`)


def test_bad_kernel_choices_are_one_line_errors():
    with pytest.raises(ConfigError, match="kernels.cpu_matmul='mkl' is not one of onednn, blas"):
        PhiModel(tiny(), cpu_matmul="mkl")
    with pytest.raises(ConfigError, match="kernels.attention='xformers' is not one of auto, flash, sdpa"):
        KernelConfig(attention="xformers")
    with pytest.raises(TypeError, match="attention"):  # no longer an architecture setting
        tiny(attention="sdpa")


def test_kernels_compose_from_the_command_line_and_old_model_keys_point_at_them():
    from hydra import compose, initialize_config_dir

    from phi_train.config import register_configs, to_object

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        conf = to_object(compose("config", ["+model=phi1_tiny", "kernels.attention=sdpa", "kernels.cpu_matmul=blas"]))
        assert conf.kernels == KernelConfig(attention="sdpa", cpu_matmul="blas")
        assert to_object(compose("config", ["+model=phi1_tiny"])).kernels == KernelConfig()
        with pytest.raises(ConfigError, match="kernels.attention='xformers' is not one of auto, flash, sdpa"):
            to_object(compose("config", ["+model=phi1_tiny", "kernels.attention=xformers"]))
    for arg, new in [
        ("model.cpu_matmul=blas", "kernels.cpu_matmul=blas"),
        ("+model.attention=sdpa", "kernels.attention=sdpa"),
    ]:
        with pytest.raises(ConfigError, match=f"use {new}"):
            check_override(arg)
    check_override("kernels.attention=sdpa")  # the new key passes


def test_train_cli_names_the_new_key_for_model_attention(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), "+model=phi1_tiny", "model.attention=sdpa"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "model.attention is now kernels.attention" in lines[0] and "use kernels.attention=sdpa" in lines[0]
