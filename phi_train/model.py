"""The phi-1 transformer, from scratch, in the order data flows through it.

phi-1's choices (arXiv 2306.11644 §2.3, and the released microsoft/phi-1 weights), all kept here:
- decoder-only, **parallel block** (GPT-J / PaLM): one LayerNorm per block feeds attention and the MLP side by side,
  `x = x + attn(ln(x)) + mlp(ln(x))`;
- fused QKV projection; multi-head attention with 64-dim heads;
- **rotary** position embeddings on the first 32 of each head's 64 dims (base 10000), GPT-NeoX "rotate half" layout;
  the other 32 dims carry no position; no learned position embeddings;
- MLP `fc1 -> GELU(tanh approximation) -> fc2` of width 4 * d_model;
- final LayerNorm, then an **untied** LM head with a bias; vocabulary padded to a multiple of 64;
- biases everywhere (as the released weights), so parameter counts equal transformers' `PhiForCausalLM`.

Optional, same function: `model.fused_block=true` swaps `Block` for `FusedBlock` (PaLM's two fused GEMMs per block);
`phi_train.interop.fuse_state_dict` / `unfuse_state_dict` convert weights between the two layouts exactly.

Which kernels run it (flash-attn or SDPA, oneDNN or MKL GEMMs) is `phi_train.ops`'s business, chosen at run time
(`kernels.attention`, `kernels.cpu_matmul`): the same function either way, so checkpoints do not record it.

Shapes: B batch, T query length, S key length (cache + new), H heads, D head dim, C = d_model, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from phi_train import ops
from phi_train.config import KernelConfig, ModelConfig
from phi_train.ops import Linear


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Embedding rows rounded up so the LM-head GEMM hits tensor-core friendly sizes."""
    return ((n + multiple - 1) // multiple) * multiple


class Rotary(nn.Module):
    """Rotary embedding tables for the first `dim` dims of a head (phi-1: 32 of 64)."""

    def __init__(self, dim: int, max_seq_len: int, base: float = 10000.0):
        super().__init__()
        self.dim = dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._build(max_seq_len)

    def _build(self, n: int) -> None:
        t = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)  # (n, dim/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (n, dim): "rotate half" pairs dim i with i + dim/2
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def span(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for positions start .. start + length - 1, shaped (1, 1, length, dim): a slice, no gather."""
        if start + length > self.cos.shape[0]:
            self._build(start + length)
        return self.cos[None, None, start : start + length], self.sin[None, None, start : start + length]

    def forward(self, positions: torch.Tensor, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) or (T,) -> cos, sin broadcastable to (B, H, T, dim).

        `end`, when the caller knows it, bounds the positions from above (all < end): the tables are grown from it
        instead of from positions.max(), which on a GPU would stall the host until the device catches up."""
        top = end if end is not None else int(positions.max()) + 1
        if top > self.cos.shape[0]:
            self._build(top)
        cos, sin = self.cos[positions], self.sin[positions]
        if positions.dim() == 1:
            return cos[None, None], sin[None, None]
        return cos[:, None], sin[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x (..., T, D); the rest pass through untouched.

    "Rotate half": x_rot * cos + cat(-x2, x1) * sin, written per half so that no rotated copy of x is built (the
    tables hold each angle twice, cos = cat(c, c)): the same products and sums, a third fewer kernels per call."""
    rd = cos.shape[-1]
    x1, x2 = x[..., : rd // 2].float(), x[..., rd // 2 : rd].float()  # fp32 angles: bf16 loses position at 2k
    c, s = cos[..., : rd // 2], sin[..., : rd // 2]
    return torch.cat([(x1 * c - x2 * s).to(x.dtype), (x2 * c + x1 * s).to(x.dtype), x[..., rd:]], dim=-1)


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to `max_len` positions."""

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int, device, dtype):
        shape = (batch, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.length = 0  # positions filled (same for every row: padding is on the left)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        self.k[layer][:, :, self.length : self.length + t] = k
        self.v[layer][:, :, self.length : self.length + t] = v
        end = self.length + t
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (finished sequences dropped from the batch)."""
        self.k = [k[index] for k in self.k]
        self.v = [v[index] for v in self.v]


def attend(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
    cache: KVCache | None,
    layer: int,
    *,
    n_head: int,
    dropout: float,
    backend: str,
) -> torch.Tensor:
    """Multi-head attention from the fused QKV projection (B, T, 3C) to the heads' concatenated output (B, T, C),
    before the output projection; shared by the unfused `Attention` and the `FusedBlock`. No `mask`: causal, the T
    queries being the last T of the S cached + new positions."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    qkv = qkv.view(B, T, 3, n_head, C // n_head).permute(2, 0, 3, 1, 4)  # (3, B, H, T, D)
    q, k = apply_rotary(qkv[:2], cos, sin)  # queries and keys rotated together: one set of kernels for both
    v = qkv[2]
    if cache is not None:
        k, v = cache.update(layer, k, v)  # (B, H, S, D)
    y = ops.attention(q, k, v, mask, causal=mask is None, dropout=dropout, backend=backend)  # (B, T, H, D)
    return y.reshape(B, T, C)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int, rotary_dim: int, dropout: float, backend: str, onednn: bool):
        super().__init__()
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.rotary_dim, self.dropout, self.backend = rotary_dim, dropout, backend
        self.qkv = Linear(d_model, 3 * d_model, onednn=onednn)
        self.proj = Linear(d_model, d_model, onednn=onednn)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        y = attend(self.qkv(x), cos, sin, mask, cache, layer, n_head=self.n_head, dropout=p, backend=self.backend)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int, onednn: bool):
        super().__init__()
        self.fc1 = Linear(d_model, d_mlp, onednn=onednn)
        self.fc2 = Linear(d_mlp, d_model, onednn=onednn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """The parallel block: one LayerNorm, attention and MLP side by side, both added to the residual.

        x ──┬───────────────────────────────┐
            └─ LayerNorm ─┬─ Attention ─┐   │
                          └─ MLP ───────┴─ + ─> x'

    Sequential blocks (GPT-2, LLaMA) normalise twice and feed the MLP attention's output; the parallel form saves one
    LayerNorm and lets attention's QKV and the MLP's fc1 share a GEMM on the same input (PaLM §2).
    """

    def __init__(self, cfg: ModelConfig, *, backend: str, onednn: bool):
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.attn = Attention(cfg.d_model, cfg.n_head, cfg.rotary_dim, cfg.attn_dropout, backend, onednn)
        self.mlp = MLP(cfg.d_model, cfg.d_mlp, onednn)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0):
        h = self.ln(x)
        a = self.attn(h, cos, sin, mask, cache, layer)
        return x + self.resid_dropout(a) + self.resid_dropout(self.mlp(h))


class FusedBlock(nn.Module):
    """The same parallel block with PaLM's two fused GEMMs (PaLM §2, "Parallel Layers"; config `model.fused_block`).

    Attention and MLP read the same ln(x), so their input projections are one matmul, and their output projections,
    summed into the residual anyway, are one matmul over the concatenated inputs:

        [qkv | fc1_pre] = ln(x) @ in_proj.T + in_proj.bias                    in_proj  (3C + M, C)
        x' = x + [attn_heads | gelu(fc1_pre)] @ out_proj.T + out_proj.bias     out_proj (C, C + M)

    with in_proj = [attn.qkv; mlp.fc1] (rows), out_proj = [attn.proj | mlp.fc2] (columns) and out_proj.bias =
    attn.proj.bias + mlp.fc2.bias, so the function equals `Block`'s exactly (interop.fuse_state_dict/unfuse_state_dict
    convert). One difference, in training only: residual dropout acts once on the summed output, where `Block` drops
    the attention and MLP outputs with two independent masks (same keep rate, a different noise); with
    resid_dropout=0 (phi1_tiny; every eval) the two are identical.
    """

    def __init__(self, cfg: ModelConfig, *, backend: str, onednn: bool):
        super().__init__()
        C, M = cfg.d_model, cfg.d_mlp
        self.d_model, self.n_head = C, cfg.n_head
        self.attn_dropout, self.backend = cfg.attn_dropout, backend
        self.ln = nn.LayerNorm(C, eps=cfg.ln_eps)
        self.in_proj = Linear(C, 3 * C + M, onednn=onednn)
        self.out_proj = Linear(C + M, C, onednn=onednn)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0):
        C = self.d_model
        h = self.in_proj(self.ln(x))  # (B, T, 3C + M)
        p = self.attn_dropout if self.training else 0.0
        a = attend(h[..., : 3 * C], cos, sin, mask, cache, layer, n_head=self.n_head, dropout=p, backend=self.backend)
        m = F.gelu(h[..., 3 * C :], approximate="tanh")
        return x + self.resid_dropout(self.out_proj(torch.cat([a, m], dim=-1)))


class PhiModel(nn.Module):
    """The phi-1 model of architecture `cfg`. `attention` (auto | flash | sdpa) and `cpu_matmul` (onednn | blas) pick
    the kernels that compute it (phi_train.ops; config `kernels.*`), not the function."""

    def __init__(
        self, cfg: ModelConfig, vocab_size: int | None = None, *, attention: str = "auto", cpu_matmul: str = "onednn"
    ):
        super().__init__()
        vocab = cfg.vocab_size or vocab_size
        if vocab is None:
            raise ValueError("model.vocab_size is null and no tokenizer size was given")
        self.cfg = cfg
        self.kernels = KernelConfig(attention=attention, cpu_matmul=cpu_matmul)  # checks the two choices
        onednn = cpu_matmul == "onednn"
        self.vocab_size = pad_vocab(vocab)
        self.wte = nn.Embedding(self.vocab_size, cfg.d_model)
        self.rotary = Rotary(cfg.rotary_dim, cfg.max_seq_len, cfg.rotary_base)
        block = FusedBlock if cfg.fused_block else Block
        self.blocks = nn.ModuleList(block(cfg, backend=attention, onednn=onednn) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.lm_head = Linear(cfg.d_model, self.vocab_size, onednn=onednn)  # untied, with bias, as the released phi-1
        self.activation_checkpointing = False
        self.apply(self._init)
        # GPT-2's scaled init of the projections that write into the residual stream: 2 per block (attn + mlp);
        # the fused block's out_proj holds both
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.fc2.weight", "out_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=self.cfg.init_std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=self.cfg.init_std)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ):
        """input_ids (B, T). With `labels` (B, T; -100 = no loss) returns the mean loss, else logits (B, T, V).

        `positions` (B, T; each < cache length + T) and a boolean `attn_mask` (B, 1, T, S; True = may attend) serve
        left-padded batches in generation; training passes neither and gets the causal fast path.
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        # positions never exceed the tokens seen so far, so start + T bounds them without asking the device
        cos, sin = self.rotary.span(start, T) if positions is None else self.rotary(positions, end=start + T)
        x = self.wte(input_ids)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, attn_mask, None, i, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn_mask, cache, i)
        if cache is not None:
            cache.length += T
        x = self.ln_f(x)
        if return_hidden:
            return x
        logits = self.lm_head(x)  # (B, T, V)
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token by PaLM's definition (App. B): 6N for the matmuls of weights, plus 12·L·d·T for
        attention scores and values (forward + backward). N excludes the embedding lookup, which is no matmul."""
        n = self.num_params() - self.wte.weight.numel()
        return 6 * n + 12 * self.cfg.n_layer * self.cfg.d_model * seq_len
