"""Tiny models shared by the model, interop and generation tests: a config, and an (unfused, fused) pair of models
holding the same function."""

from __future__ import annotations

import dataclasses

import torch

from phi_train.config import ModelConfig, model_config
from phi_train.interop import fuse_state_dict
from phi_train.model import PhiModel

VOCAB = 320


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        preset="phi1_tiny", n_layer=2, d_model=128, n_head=2, d_mlp=384, vocab_size=VOCAB, max_seq_len=64,
        rotary_base=5000.0, init_std=0.1,
    )  # fmt: skip
    return model_config(**(base | kw))


def fused_pair(seed: int = 0, **kw) -> tuple[PhiModel, PhiModel]:
    """(unfused, fused) models holding the same function, in eval mode. Biases and LayerNorms are randomised (the init
    zeroes them) so the bias split/sum of the conversion is really exercised."""
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


def token_ids(batch: int = 2, length: int = 24, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
