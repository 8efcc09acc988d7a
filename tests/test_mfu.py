"""MFU's two factors (phi_train/trainer.py, phi_train/model.py): the bf16 peak of the device by its name, and the
training FLOPs per token by PaLM's definition (App. B)."""

from __future__ import annotations

import pytest
import torch

from phi_train.config import model_config
from phi_train.model import PhiModel
from phi_train.trainer import peak_flops_for


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


def test_flops_per_token_is_6n_without_the_embedding_plus_attention():
    cfg = model_config(preset="phi1")
    with torch.device("meta"):
        model = PhiModel(cfg)
    n = model.num_params() - 51_200 * 2048  # the embedding is a lookup, no matmul
    assert model.flops_per_token(2048) == 6 * n + 12 * 24 * 2048 * 2048
