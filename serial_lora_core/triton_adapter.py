"""One Triton kernel for an unfused adapter at inference: y = low(x) + s·B·A·low(x).

Why: under autocast the attention input arrives in float32 (layer norms run in float32) and the
projection casts it to the autocast dtype anyway. The PyTorch path then reads that cast copy twice
more (down-projection, then the in-place `addmm`), three extra passes over an M x d tensor that make
the adapter a memory-bound few percent of a ViT forward. This kernel folds the adapter into the cast:
per block of rows it reads x and accumulates z = A x in float32, then reads the block again (from L2)
and writes low(x) + s·B·z once. Training never comes here (it needs autograd).

Importing this module needs Triton; `serial_lora_core.adapter` imports it lazily and only for CUDA
tensors, so CPU installs never touch it. With TRITON_INTERPRET=1 set before import it runs on CPU
tensors through Triton's interpreter, which is how the CPU test-suite checks its arithmetic. The
default launch parameters are data: `triton_tuned.json` next to this file.
"""

from __future__ import annotations

import contextlib
import functools
import json
from importlib import resources

import torch
import triton
import triton.language as tl

LAUNCH_KEYS = ("block_m", "block_d", "num_warps", "programs_per_sm", "num_stages", "stage_in_y")


def load_launch_parameters(text: str, source: str) -> dict[str, int]:
    """The kernel's default launch parameters from the JSON table `text` (read from `source`).

    block_m/block_d: row and column block sizes (powers of two >= 16). programs_per_sm > 0 runs a
    persistent grid of that many programs per multiprocessor, each walking row blocks, so that fewer
    blocks are in flight and a block's rows are still in L2 for the second pass; 0 launches one
    program per row block. stage_in_y = 1 writes the low-precision copy of x into the output during
    the first pass and reads that back in the second (half the bytes of x).
    """
    table = json.loads(text)
    if not isinstance(table, dict) or sorted(table) != sorted(LAUNCH_KEYS) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in table.values()):
        raise ValueError(f"{source}: expected a JSON object of non-negative integers with exactly the keys "
                         f"{list(LAUNCH_KEYS)}, got {table!r}; rewrite it with benchmarks/apply_tuned.py")
    return table


TUNED_FILE = "triton_tuned.json"
# Chosen on an H100 by benchmarks/triton_tune.py (results in BENCHMARKS.md), written by benchmarks/apply_tuned.py.
LAUNCH = load_launch_parameters(resources.files(__package__).joinpath(TUNED_FILE).read_text(), TUNED_FILE)


@triton.jit
def _adapt_kernel(x_ptr, down_ptr, up_ptr, y_ptr, rows_total, factor,
                  D: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, FP16: tl.constexpr, STAGE_IN_Y: tl.constexpr):
    low = tl.float16 if FP16 else tl.bfloat16
    ranks = tl.arange(0, R_PAD)
    live_ranks = ranks < R  # tl.dot needs >= 16 wide operands: small ranks are zero-padded
    for block in range(tl.program_id(0), tl.cdiv(rows_total, BLOCK_M), tl.num_programs(0)):
        rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # row x D can pass 2**31
        live_rows = rows[:, None] < rows_total
        z = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            live_cols = cols < D
            mask = live_rows & live_cols[None, :]
            x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(low)
            if STAGE_IN_Y:  # the second pass then reads 2 bytes per element instead of 4
                tl.store(y_ptr + rows[:, None] * D + cols[None, :], x, mask=mask)
            a = tl.load(down_ptr + ranks[None, :] * D + cols[:, None],  # A^T block: (BLOCK_D, R_PAD)
                        mask=live_cols[:, None] & live_ranks[None, :], other=0.0)
            z += tl.dot(x, a)
        z_low = z.to(low)  # the PyTorch path's down-projection output is in the low dtype too
        if STAGE_IN_Y:
            tl.debug_barrier()  # the block's staged rows, written by other threads, are visible
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            live_cols = cols < D
            mask = live_rows & live_cols[None, :]
            source = y_ptr if STAGE_IN_Y else x_ptr
            x = tl.load(source + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(low)
            b = tl.load(up_ptr + cols[None, :] * R + ranks[:, None],  # B^T block: (R_PAD, BLOCK_D)
                        mask=live_ranks[:, None] & live_cols[None, :], other=0.0)
            y = x.to(tl.float32) + factor * tl.dot(z_low, b)
            tl.store(y_ptr + rows[:, None] * D + cols[None, :], y.to(low), mask=mask)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def adapted_input(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, factor: float, dtype: torch.dtype,
                  *, block_m: int | None = None, block_d: int | None = None, num_warps: int | None = None,
                  programs_per_sm: int | None = None, num_stages: int | None = None,
                  stage_in_y: bool | None = None) -> torch.Tensor:
    """low(x) + factor·up·down·low(x) in `dtype` (float16 or bfloat16), for x (..., d) contiguous.

    `factor` is the adapter's scaling x scale (`StreamAdapter.factor`), as in `formula.adapted_input`.

    `down` is A (r x d) and `up` is B (d x r), in any float dtype (cast to `dtype` like autocast does).
    The keyword arguments are launch parameters (block sizes: powers of two >= 16; None = `LAUNCH`,
    from triton_tuned.json), for tuning only.
    """
    if dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"adapted_input: dtype must be float16 or bfloat16, got {dtype}")
    if not x.is_contiguous():
        raise ValueError("adapted_input: x must be contiguous; call .contiguous() or use the PyTorch path")
    features, rank = x.shape[-1], down.shape[0]
    if down.shape != (rank, features) or up.shape != (features, rank):
        raise ValueError(
            f"adapted_input: down must be (r, d) and up (d, r) for x (..., {features}); "
            f"got down {tuple(down.shape)} and up {tuple(up.shape)}"
        )
    flat = x.view(-1, features)
    y = torch.empty(flat.shape, device=x.device, dtype=dtype)
    rows = flat.shape[0]
    if rows:
        block_m, block_d = block_m or LAUNCH["block_m"], block_d or LAUNCH["block_d"]
        num_warps = num_warps or LAUNCH["num_warps"]
        programs_per_sm = LAUNCH["programs_per_sm"] if programs_per_sm is None else programs_per_sm
        stage_in_y = bool(LAUNCH["stage_in_y"] if stage_in_y is None else stage_in_y)
        blocks = triton.cdiv(rows, block_m)
        if programs_per_sm:
            blocks = min(blocks, programs_per_sm * _multiprocessors(x.device))
        # Triton launches on the current CUDA device, which need not be x's (models split over GPUs).
        on_other_gpu = x.is_cuda and x.device.index != torch.cuda.current_device()
        with torch.cuda.device(x.device) if on_other_gpu else contextlib.nullcontext():
            _adapt_kernel[(blocks,)](
                flat, down.to(dtype).contiguous(), up.to(dtype).contiguous(), y, rows, float(factor),
                D=features, R=rank, R_PAD=max(16, triton.next_power_of_2(rank)), BLOCK_M=block_m, BLOCK_D=block_d,
                FP16=dtype == torch.float16, STAGE_IN_Y=stage_in_y, num_warps=num_warps,
                num_stages=num_stages or LAUNCH["num_stages"],
            )
    return y.view(x.shape)
