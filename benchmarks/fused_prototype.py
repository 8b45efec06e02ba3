"""Prototype, not library code: what a fused inference kernel for the unfused adapter would buy.

Under bf16 autocast the attention input x arrives in float32 (layer norms run in float32 under
autocast) and the projection casts it to bf16 anyway. The core's unfused path then reads the bf16 copy
twice more and writes the adapted input once (down-projection, then `addmm`): three extra passes over
an M x d bf16 tensor per adapted stream. One Triton kernel can fold the adapter into the cast itself:
read x (float32) once, compute z = A x per row block, write y = bf16(x) + s·B z once, i.e. the bytes of
the cast the base model pays anyway. This script checks it against the core's path and times ViT and SD3
inference with the core's `StreamAdapter._add_to` patched to use it (no-grad, CUDA, autocast only).

    python benchmarks/fused_prototype.py --out OUT [--smoke]      (TRITON_INTERPRET=1 runs it on a CPU)
"""

from __future__ import annotations

import argparse
import os

import torch
import triton
import triton.language as tl
from common import compare, device, done, environment, free, ratios, section, write

from serial_lora_core.adapter import StreamAdapter


@triton.jit
def _fused_adapter(x_ptr, a_ptr, b_ptr, y_ptr, m, scale, D: tl.constexpr, R: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, FP16: tl.constexpr):
    low = tl.float16 if FP16 else tl.bfloat16  # the autocast dtype
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    live = rows[:, None] < m
    ranks = tl.arange(0, R)
    z = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=live, other=0.0).to(low)
        a = tl.load(a_ptr + ranks[None, :] * D + cols[:, None])  # A^T block, (BLOCK_D, R)
        z += tl.dot(x, a)
    z16 = z.to(low)  # like the core's path: the down-projection's output is bf16
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=live, other=0.0).to(low)
        b = tl.load(b_ptr + cols[None, :] * R + ranks[:, None])  # B^T block, (R, BLOCK_D)
        y = x.to(tl.float32) + scale * tl.dot(z16, b)
        tl.store(y_ptr + rows[:, None] * D + cols[None, :], y.to(low), mask=live)


def fused_adapter(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """low(x) + scale·B·A·low(x) for x (..., d), A = down (r, d), B = up (d, r), in one pass (low = dtype)."""
    d, r = x.shape[-1], down.shape[0]
    flat = x.reshape(-1, d).contiguous()
    y = torch.empty(flat.shape, device=x.device, dtype=dtype)
    block_m, block_d = 64, 128 if d % 128 == 0 else 64
    grid = (triton.cdiv(flat.shape[0], block_m),)
    _fused_adapter[grid](flat, down.to(dtype).contiguous(), up.to(dtype).contiguous(), y, flat.shape[0], scale,
                         D=d, R=r, BLOCK_M=block_m, BLOCK_D=block_d, FP16=dtype == torch.float16, num_warps=4)
    return y.view(*x.shape[:-1], d)


def supported(adapter: StreamAdapter, x: torch.Tensor, dtype: torch.dtype) -> bool:
    r, d = adapter.rank, adapter.features
    return (dtype in (torch.bfloat16, torch.float16) and not torch.is_grad_enabled() and (x.is_cuda or INTERPRET)
            and isinstance(adapter.dropout, torch.nn.Identity) and r >= 16 and r & (r - 1) == 0 and d % 64 == 0)


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOW = torch.float16 if INTERPRET else torch.bfloat16  # the interpreter's bf16 tl.dot is wrong (numpy has no bf16)
_original_add_to = StreamAdapter._add_to


def _patched_add_to(self, base, x, dtype):
    if base is x and supported(self, x, dtype):
        return fused_adapter(x, self.down.weight, self.up.weight, self.scale * self.weight, dtype)
    return _original_add_to(self, base, x, dtype)


def use_fused(on: bool) -> None:
    StreamAdapter._add_to = _patched_add_to if on else _original_add_to


def check(smoke: bool) -> dict:
    """Relative error of the fused kernel against the core's path, on random inputs and adapters."""
    out = {"dtype": str(LOW)}
    shapes = ([(3, 70, 128, 16), (2, 33, 256, 32)] if smoke
              else [(4, 257, 768, 32), (2, 4096, 1536, 64), (1, 1000, 1536, 128)])
    for shape in shapes:
        *lead, d, r = shape
        adapter = StreamAdapter(d, r, scale=1.0).to(device())
        torch.nn.init.normal_(adapter.up.weight, std=0.05)
        x = torch.randn(*lead, d, device=device())
        with torch.no_grad(), torch.autocast(device().type, dtype=LOW):
            reference = _original_add_to(adapter, x, x, LOW).float()
            fused = fused_adapter(x, adapter.down.weight, adapter.up.weight, adapter.scale, LOW).float()
        exact = x + adapter.scale * (x @ adapter.down.weight.t()) @ adapter.up.weight.t()
        out[str(shape)] = {"fused_vs_core": ((fused - reference).norm() / reference.norm()).item(),
                           "core_vs_fp32": ((reference - exact).norm() / exact.norm()).item(),
                           "fused_vs_fp32": ((fused - exact).norm() / exact.norm()).item()}
    return out


def end_to_end(smoke: bool) -> dict:
    import sd3
    import vit

    def patched(make, on):
        def build():
            step = make()

            def run():
                use_fused(on)
                try:
                    step()
                finally:
                    use_fused(False)

            return run

        return build

    iters, warmup = (2, 1) if smoke else (50, 3)
    batch, img, rank = (4, 32, 16) if smoke else (256, 224, 32)
    results = {}
    t0 = section("vit infer, fused prototype")
    serial = vit.inferer("serial_unfused", rank, batch, img, smoke)
    results["vit"] = compare({"base": vit.inferer("base", rank, batch, img, smoke),
                              "serial_unfused": patched(serial, False),
                              "serial_unfused_fused_kernel": patched(serial, True)}, iters, warmup)
    results["vit"]["ratios"] = ratios(results["vit"], "base", ["serial_unfused", "serial_unfused_fused_kernel"])
    done("vit", t0, results["vit"])
    free()
    b, lat, text, r = (2, 16, 8, 16) if smoke else (2, 128, 154, 64)
    t0 = section("sd3 infer, fused prototype")
    serial = sd3.inferer("serial_unfused", r, b, lat, text, smoke)
    results["sd3"] = compare({"base": sd3.inferer("base", r, b, lat, text, smoke),
                              "serial_unfused": patched(serial, False),
                              "serial_unfused_fused_kernel": patched(serial, True)}, iters if smoke else 40, warmup)
    results["sd3"]["ratios"] = ratios(results["sd3"], "base", ["serial_unfused", "serial_unfused_fused_kernel"])
    done("sd3", t0, results["sd3"])
    free()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    results = {"env": environment(), "check": check(args.smoke)}
    print(results["check"], flush=True)
    write(results, "fused_prototype", args.out)
    results.update(end_to_end(args.smoke))
    write(results, "fused_prototype", args.out)


if __name__ == "__main__":
    main()
