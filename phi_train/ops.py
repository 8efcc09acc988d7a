"""The kernels under the model's math: which library runs a linear layer's GEMMs, which kernel runs attention.

None of this changes what `phi_train.model` computes, only how fast and in which summation order; the choices are
runtime settings (`kernels.attention`, `kernels.cpu_matmul` in phi_train/config.py), not architecture, so a checkpoint
does not record them and any run may pick others. The measurements behind each choice are in docs/benchmarks.md.

- `Linear`: nn.Linear whose fp32 CPU GEMMs (forward and both gradients) run on oneDNN instead of MKL.
- `attention`: causal or masked multi-head attention on flash-attn (Ampere-or-newer GPUs, when installed), on two
  batched GEMMs and a softmax (`matmul_attention`: short bf16 sequences on CPU), else on torch SDPA.

Shapes: B batch, H heads, T query length, S key length (cache + new), D head dim.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # optional: `pip install phi-train[flash]`
    from flash_attn import flash_attn_func
except Exception:  # ImportError, or a wheel built for another torch/CUDA
    flash_attn_func = None


# oneDNN's fp32 GEMM, as torch's inductor uses for CPU linears; None where torch was built without it (e.g. ARM wheels)
_onednn_gemm = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


def _gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) on oneDNN; x (..., K), weight (N, K), either may be a transposed view."""
    return _onednn_gemm(x, weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """nn.Linear's function and gradients with all three GEMMs (forward, grad of input, grad of weight) on oneDNN.

    Why: torch sends fp32 CPU matmuls to MKL, which takes its AVX2 path on AMD CPUs; oneDNN picks AVX-512 by CPU
    feature, measured 2x faster per GEMM on this project's AMD EPYC machines (docs/benchmarks.md). Same products and
    sums in another order: results differ from MKL's in the last bits, as any two BLAS libraries do."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _gemm(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _gemm(grad, weight.t())
        if ctx.needs_input_grad[1]:
            # oneDNN is fastest with the longer side of the (N, K) result as its columns (measured: 3x for the LM head)
            n, k = weight.shape
            gw = _gemm(x2.t(), g2.t()).t() if n >= k else _gemm(g2.t(), x2.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state_dict keys) whose fp32 CPU GEMMs run on oneDNN when `onednn` is true
    (kernels.cpu_matmul=onednn, the default); false keeps torch's own call (kernels.cpu_matmul=blas).

    GPU tensors, autocast (bf16 on CPU already goes to oneDNN), torch.compile (inductor has its own CPU linear) and
    small products take nn.Linear's own path: a oneDNN call costs ~15 us of set-up, which MKL beats below about a
    million multiply-adds (measured: the decoding step of a tiny model at batch 1)."""

    min_macs = 1 << 20

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, onednn: bool = True, **kw):
        super().__init__(in_features, out_features, bias, **kw)
        self.onednn = onednn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.onednn
            and _onednn_gemm is not None
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
            and x.numel() * self.out_features >= self.min_macs  # rows x in x out
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
        ):
            return _OneDnnLinear.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


@functools.cache
def _compute_capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


FLASH_NEEDS = (
    "kernels.attention=flash needs flash-attn installed and fp16/bf16 tensors on an Ampere-or-newer CUDA GPU"
    " (compute capability >= 8.0); use auto or sdpa"
)


def flash_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether flash-attn's kernels can run on tensors of this device and dtype."""
    return (
        flash_attn_func is not None
        and device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and _compute_capability(device.index) >= (8, 0)  # flash-attn 2 kernels: Ampere or newer
    )


def use_flash(backend: str, x: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether flash-attn's kernel serves this call (kernels.attention=auto|flash|sdpa); it takes no explicit mask."""
    if backend == "sdpa" or mask is not None:
        return False
    ok = flash_supported(x.device, x.dtype)
    if backend == "flash" and not ok:
        raise RuntimeError(FLASH_NEEDS)
    return ok


# torch's CPU flash kernel in bf16 loses to two batched GEMMs and a softmax up to here (measured on the training
# step of the benchmark models: 7-9% faster at T = 256 and 512, 65% slower at 1024, where the T x T scores no longer
# sit in cache); fp32 and GPUs keep SDPA's kernels
CPU_MATMUL_ATTENTION_MAX_T = 512


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(D)) v with the scores materialised (B, H, T, T), softmax in fp32."""
    T, D = q.shape[-2], q.shape[-1]
    scores = (q * D**-0.5) @ k.transpose(-1, -2)  # scaled first, as SDPA does: the raw q.k may not fit the dtype
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
    return (F.dropout(probs, dropout) if dropout > 0 else probs) @ v


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    dropout: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v per head: q (B, H, T, D), k and v (B, H, S, D) -> (B, T, H, D).

    Either a boolean `mask` broadcastable to (B, H, T, S) (True = may attend), or `causal`: the T queries are the last
    T of the S positions (a cache holds the first S - T) and each sees the keys up to its own position. `backend`:
    auto | flash | sdpa (see `use_flash`); the result is the same function whichever kernel runs it."""
    if mask is not None and causal:
        raise ValueError("attention takes a mask or causal=True, not both")
    if use_flash(backend, q, mask):
        # flash-attn wants (B, T, H, D); its causal masking is aligned bottom-right, right for a cache too
        return flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout, causal=causal
        )
    T, S = q.shape[2], k.shape[2]
    if causal and S != T:  # SDPA's is_causal aligns top-left: with cached keys, offset the mask by the cached part
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T) if T > 1 else None  # 1 query: sees all
        causal = False
    if causal and not q.is_cuda and q.dtype == torch.bfloat16 and T <= CPU_MATMUL_ATTENTION_MAX_T:
        y = matmul_attention(q, k, v, dropout)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)  # (B,H,T,D)
    return y.transpose(1, 2)
