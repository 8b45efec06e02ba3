"""The Triton kernel with its input on a GPU other than the current one (models split over GPUs).

Marker `multigpu`, deselected by default; on a machine with two or more CUDA GPUs: `pytest -m multigpu`.
"""

from __future__ import annotations

import pytest
import torch

from serial_lora_core import triton_adapter

pytestmark = pytest.mark.multigpu


def test_input_on_a_gpu_other_than_the_current_one():
    assert torch.cuda.device_count() >= 2, "the multigpu tests need two CUDA GPUs"
    torch.manual_seed(0)
    x = torch.randn(4096, 768, device="cuda:1")
    down, up = torch.randn(32, 768, device="cuda:1") / 30, torch.randn(768, 32, device="cuda:1") / 10
    with torch.cuda.device(0):
        y = triton_adapter.adapted_input(x, down, up, 0.5, torch.bfloat16)
    expected = x + 0.5 * (x @ down.t()) @ up.t()
    assert y.device == x.device
    assert ((y.float() - expected).norm() / expected.norm()).item() < 1e-2
