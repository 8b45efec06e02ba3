"""The Triton inference kernel on a real GPU (bfloat16 and float16), with the core's hooks around it.

Deselected by default (marker `gpu`); on a CUDA machine with Triton: `pytest -m gpu`. It fails, never
skips, where there is no GPU. Recorded runs: BENCHMARKS.md.
"""

from __future__ import annotations

import pytest
import torch

from core_models import HOSTS, randomize_adapters
from serial_lora_core import SerialLoraConfig, inject_serial_lora
from serial_lora_core import adapter as adapter_module
from serial_lora_core import triton_adapter
from serial_lora_core.adapter import StreamAdapter

pytestmark = pytest.mark.gpu

# (rows, d, r): ViT-B/16 and SD3-medium shapes, small and non-power-of-two ranks, a width that is not a
# multiple of the column block, and more rows than fit int32 offsets once multiplied by d.
KERNEL_CASES = {
    "vit_b16_b4": (4 * 257, 768, 32),
    "sd3_1024px": (2 * 4096, 1536, 64),
    "rank_8": (1000, 768, 8),
    "rank_12_width_1000": (333, 1000, 12),
    "rank_128": (4096, 1536, 128),
    "int64_offsets": (1_500_000, 1536, 16),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def relative_error(actual: torch.Tensor, expected: torch.Tensor, chunk: int = 1 << 16) -> float:
    """||actual - expected|| / ||expected|| over rows, in float32 chunks (the largest case is ~9 GB)."""
    diff = total = 0.0
    for a, e in zip(actual.split(chunk), expected.split(chunk)):
        e = e.float()
        diff += (a.float() - e).square().sum().item()
        total += e.square().sum().item()
    return (diff / total) ** 0.5


@pytest.fixture(autouse=True)
def cuda() -> None:
    assert torch.cuda.is_available(), "the gpu tests need a CUDA GPU; run the CPU suite without -m gpu"
    assert torch.cuda.get_device_capability() >= (8, 0), "the Triton kernel needs an Ampere or newer GPU"


@pytest.fixture
def kernel_calls(monkeypatch) -> list:
    calls = []
    original = triton_adapter.adapted_input

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(triton_adapter, "adapted_input", counting)
    monkeypatch.setattr(adapter_module, "TRITON_MIN_ELEMENTS", 0)  # the tests' models are tiny
    return calls


@pytest.mark.parametrize(("programs_per_sm", "stage_in_y"), [(0, 0), (2, 0), (8, 1)], ids=["grid", "persistent", "staged"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_kernel_matches_the_pytorch_path(case, dtype, programs_per_sm, stage_in_y, kernel_calls, monkeypatch):
    rows, d, r = KERNEL_CASES[case]
    torch.manual_seed(0)
    adapter = StreamAdapter(d, r, scaling=2.0).cuda().eval()
    torch.nn.init.normal_(adapter.up.weight, std=0.05)
    x = torch.randn(rows, d, device="cuda")
    monkeypatch.setitem(triton_adapter.LAUNCH, "programs_per_sm", programs_per_sm)
    monkeypatch.setitem(triton_adapter.LAUNCH, "stage_in_y", stage_in_y)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        fused = adapter(x)
        monkeypatch.setattr(StreamAdapter, "use_triton", False)
        plain = adapter(x)
    assert len(kernel_calls) == 1 and fused.dtype == plain.dtype == dtype
    assert relative_error(fused, plain) < 1e-2
    with torch.no_grad():
        x.addmm_(x @ adapter.down.weight.t(), adapter.up.weight.t(), alpha=adapter.factor)  # x is now exact
    assert relative_error(fused, x) < 1e-2


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("host", ["fused", "split", "joint"])
def test_model_inference_uses_the_kernel_and_agrees(host, dtype, kernel_calls, monkeypatch):
    model = HOSTS[host].model().cuda()
    inject_serial_lora(model, SerialLoraConfig(rank=4, alpha=8.0))
    randomize_adapters(model)
    inputs = tuple(t.cuda() for t in HOSTS[host].inputs())
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        fused = model(*inputs).float()
        calls = len(kernel_calls)
        monkeypatch.setattr(StreamAdapter, "use_triton", False)
        plain = model(*inputs).float()
    assert calls == len(kernel_calls) == 2 * (2 if host == "joint" else 1)  # per stream per block
    assert ((fused - plain).norm() / plain.norm()).item() < 2e-2


def test_low_precision_weights_without_autocast_use_the_kernel(kernel_calls, monkeypatch):
    model = HOSTS["fused"].model().cuda()
    inject_serial_lora(model, SerialLoraConfig(rank=4))
    randomize_adapters(model)
    model.to(torch.bfloat16)
    x = HOSTS["fused"].inputs()[0].cuda().bfloat16()
    with torch.no_grad():
        fused = model(x).float()
        monkeypatch.setattr(StreamAdapter, "use_triton", False)
        plain = model(x).float()
    assert len(kernel_calls) == 2
    assert ((fused - plain).norm() / plain.norm()).item() < 2e-2


def test_training_and_compile_keep_the_pytorch_path(kernel_calls):
    model = HOSTS["fused"].model().cuda()
    inject_serial_lora(model, SerialLoraConfig(rank=4))
    randomize_adapters(model)
    x = HOSTS["fused"].inputs()[0].cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(x).float().sum().backward()
    assert kernel_calls == []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(x).float()
        compiled = torch.compile(model)(x).float()
    assert len(kernel_calls) == 2  # the eager call only
    assert ((compiled - eager).norm() / eager.norm()).item() < 2e-2

