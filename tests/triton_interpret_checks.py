"""Runs the Triton adapter kernel through Triton's CPU interpreter and prints what the tests assert on.

Started by tests/test_core_triton_adapter.py in a subprocess with TRITON_INTERPRET=1 (the variable must
be set before Triton compiles anything, so it cannot be switched on inside the pytest process). The
library dispatches to the kernel on CUDA only; this script makes its device check (`triton_device`)
accept the CPU, where the interpreter runs. Float16 only: the interpreter computes bfloat16 dots
wrongly (NumPy has no bfloat16); the GPU test (tests/test_gpu_triton_adapter.py) covers bfloat16.
Prints one JSON object.
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import torch

from core_models import HOSTS, randomize_adapters
from serial_lora_core import SerialLoraConfig, inject_serial_lora
from serial_lora_core import adapter as adapter_module
from serial_lora_core import triton_adapter
from serial_lora_core.adapter import StreamAdapter

# (leading shape, d, r): row counts that do and do not fill a row block, widths below, at and above a
# column block, ranks below the 16 that tl.dot needs and not powers of two, and no rows at all.
KERNEL_CASES = {
    "tokens_3x70_d48_r4": ((3, 70), 48, 4),
    "tokens_2x33_d256_r32": ((2, 33), 256, 32),
    "vector_5_d100_r12": ((5,), 100, 12),
    "rows_65_d130_r17": ((65,), 130, 17),
    "empty_0x7_d64_r8": ((0, 7), 64, 8),
}

# Kernel variants (programs_per_sm, stage_in_y): one program per row block, a persistent grid, and the
# second pass reading the staged low-precision copy from the output.
VARIANTS = {"grid": (0, False), "persistent": (2, False), "staged": (0, True)}

calls = 0
_kernel = triton_adapter.adapted_input


def _counting(*args, **kwargs):
    global calls
    calls += 1
    return _kernel(*args, **kwargs)


def kernel_errors() -> dict:
    """Relative error of the kernel against the same arithmetic in PyTorch (float16 in, float32 sums)."""
    out = {}
    for (name, (lead, d, r)), (variant, (programs, staged)) in itertools.product(KERNEL_CASES.items(), VARIANTS.items()):
        generator = torch.Generator().manual_seed(len(name))
        x = torch.randn(*lead, d, generator=generator)
        down = torch.randn(r, d, generator=generator) / d**0.5
        up = torch.randn(d, r, generator=generator) * 0.1
        y = triton_adapter.adapted_input(x, down, up, 0.7, torch.float16, programs_per_sm=programs,
                                         stage_in_y=staged)
        low = x.half()
        z = (low.float() @ down.half().float().t()).half()
        expected = low.float() + 0.7 * (z.float() @ up.half().float().t())
        error = ((y.float() - expected).norm() / expected.norm().clamp_min(1e-12)).item()
        out[f"{name}-{variant}"] = {"error": error, "dtype": str(y.dtype), "shape_kept": list(y.shape) == list(x.shape)}
    return out


def model_outputs() -> dict:
    """Whole tiny models at inference under float16 autocast: kernel on vs the PyTorch path."""
    global calls
    adapter_module.triton_device = lambda device: True  # the interpreter runs the kernel on the CPU
    triton_adapter.adapted_input = _counting
    out = {}
    model = HOSTS["fused"].model()
    inject_serial_lora(model, SerialLoraConfig(rank=4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        model(*HOSTS["fused"].inputs())
    out["below_min_elements"] = {"kernel_calls": calls}
    adapter_module.TRITON_MIN_ELEMENTS = 0  # the tiny models below are far under the size where the kernel pays
    for host in ("fused", "split", "joint"):
        model = HOSTS[host].model()
        inject_serial_lora(model, SerialLoraConfig(rank=4, alpha=8.0))
        randomize_adapters(model)
        inputs = HOSTS[host].inputs()
        results = {}
        for use_triton in (True, False):
            StreamAdapter.use_triton = use_triton
            calls = 0
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
                results[use_triton] = (model(*inputs).float(), calls)
        StreamAdapter.use_triton = True
        streams = len({s for m in model.modules() if hasattr(m, "stream_specs") for s in m.stream_specs})
        (fused, kernel_calls), (plain, plain_calls) = results[True], results[False]
        # Training (autograd on) and dropout must take the PyTorch path.
        calls = 0
        with torch.autocast("cpu", dtype=torch.float16):
            model(*inputs).float().sum().backward()
        training_calls = calls
        out[host] = {
            "error": ((fused - plain).norm() / plain.norm()).item(),
            "kernel_calls": kernel_calls,
            "expected_calls": 2 * streams,  # two blocks, one call per stream per block
            "calls_with_use_triton_off": plain_calls,
            "calls_with_autograd": training_calls,
        }
    model = HOSTS["fused"].model()
    inject_serial_lora(model, SerialLoraConfig(rank=4, dropout=0.5))
    model.train()
    calls = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        model(*HOSTS["fused"].inputs())
    out["dropout_in_training_mode"] = {"kernel_calls": calls}
    calls = 0
    with torch.no_grad():
        model.eval()(*HOSTS["fused"].inputs())
    out["float32_no_autocast"] = {"kernel_calls": calls}
    return out


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1")
    print(json.dumps({"kernel": kernel_errors(), "models": model_outputs()}))
