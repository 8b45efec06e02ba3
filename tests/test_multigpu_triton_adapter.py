"""Serial LoRA on two GPUs: the Triton kernel with its input on a GPU other than the current one
(models split over GPUs), and nn.DataParallel replicas running their own adapters.

Marker `multigpu`, deselected by default; on a machine with two or more CUDA GPUs: `pytest -m multigpu`.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core_models import HOSTS, randomize_adapters
from serial_lora_core import SerialLoraConfig, inject_serial_lora, serial_lora_parameters
from serial_lora_core import adapter as adapter_module
from serial_lora_core import triton_adapter

pytestmark = pytest.mark.multigpu


@pytest.fixture(autouse=True)
def two_gpus() -> None:
    assert torch.cuda.device_count() >= 2, "the multigpu tests need two CUDA GPUs"


def test_input_on_a_gpu_other_than_the_current_one():
    torch.manual_seed(0)
    x = torch.randn(4096, 768, device="cuda:1")
    down, up = torch.randn(32, 768, device="cuda:1") / 30, torch.randn(768, 32, device="cuda:1") / 10
    with torch.cuda.device(0):
        y = triton_adapter.adapted_input(x, down, up, 0.5, torch.bfloat16)
    expected = x + 0.5 * (x @ down.t()) @ up.t()
    assert y.device == x.device
    assert ((y.float() - expected).norm() / expected.norm()).item() < 1e-2


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


# name -> (autocast dtype or None, tolerance): float32, and bfloat16 with the Triton kernel on each replica.
PRECISIONS = {"fp32": (None, 1e-5), "bf16_kernel": (torch.bfloat16, 2e-2)}


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("host", ["fused", "split", "joint"])
def test_data_parallel_over_two_gpus_matches_one_gpu(host, precision, monkeypatch):
    dtype, tolerance = PRECISIONS[precision]
    monkeypatch.setattr(adapter_module, "TRITON_MIN_ELEMENTS", 0)  # the test models are tiny
    case = HOSTS[host]
    model = case.model().cuda()
    inject_serial_lora(model, SerialLoraConfig(rank=4, alpha=8.0))
    randomize_adapters(model, seed=3)
    # Batch 4: each GPU gets two samples.
    inputs = tuple(torch.cat([t, t.flip(0)]).cuda() for t in case.inputs())
    parallel = nn.DataParallel(model, device_ids=[0, 1])
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        with torch.no_grad():
            single, replicated = model(*inputs).float(), parallel(*inputs).float()
        assert relative_error(replicated, single) < tolerance
        # Training through the replicas: the adapters' gradients are those of one device.
        grads = []
        for run in (model, parallel):
            model.zero_grad()
            run(*inputs).float().square().mean().backward()
            grads.append([p.grad.clone() for p in serial_lora_parameters(model)])
    assert len(grads[0]) == len(grads[1]) > 0
    for one, two in zip(*grads):
        assert relative_error(two, one) < tolerance
