"""The Serial LoRA formulas, once: the scaling rule and the exact weight change of a projection.

Every consumer (merge, export, the ComfyUI weight patch and bypass, the analysis) calls these; nothing
else in the project writes `alpha / r`, `(W B) A` or `x + f·B A x` (the fused forward of
`StreamAdapter.add_to` and the Triton kernel compute that last one in their own, faster way).

Names follow PEFT/diffusers: `scaling` is alpha/r (alpha/sqrt(r) with rsLoRA), fixed by the
adapter's hyper-parameters; `scale` is the user's knob on top of it (0 = base model, 1 = trained).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


def equivalent_up(
    weight: torch.Tensor, up: torch.Tensor, factor: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """factor·W B (out x r): the `up` of the plain LoRA equal to Serial LoRA on W (its `down` is A).

    `factor` is scaling x scale. Computed in `dtype` (float32 by default) on W's device.
    """
    w = weight.detach().to(dtype)
    return factor * (w @ up.detach().to(device=w.device, dtype=dtype))


def weight_delta(
    weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, factor: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """factor·(W B) A (out x d): the exact change Serial LoRA makes to a projection weight W.

    W (I + f·B A) x = (W + f·(W B) A) x, so merging adds this to W. Computed in `dtype` on W's device.
    """
    return equivalent_up(weight, up, factor, dtype) @ down.detach().to(device=weight.device, dtype=dtype)


def adapted_input(
    x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, factor: float, base: torch.Tensor | None = None
) -> torch.Tensor:
    """base + factor·B A x (base defaults to x): a stream's input as its q/k/v projections see it.

    Plain tensor operations in the tensors' own dtype and device, so symbolic tracers (torch.fx) and
    ComfyUI's bypass mode can run it. `base` differs from x when several adapters are summed, or when
    dropout is applied to the x fed to A but not to the x that passes through.
    """
    return (x if base is None else base) + factor * F.linear(F.linear(x, down), up)
