"""The Serial LoRA formulas, once: the scaling rule and the exact weight change of a projection.

Every consumer (merge, export, the ComfyUI weight patch, the analysis) calls these; nothing else in
the project writes `alpha / r` or `(W B) A`.

Names follow PEFT/diffusers: `scaling` is alpha/r (alpha/sqrt(r) with rsLoRA), fixed by the
adapter's hyper-parameters; `scale` is the user's knob on top of it (0 = base model, 1 = trained).
"""

from __future__ import annotations

import math

import torch


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
