"""Serial LoRA as a ComfyUI weight patch: W <- W + strength·s·(W B) A on a whole (fused) weight.

One patch covers every projection a stream feeds when they share one fused weight (ComfyUI's
MMDiT `attn.qkv`): the row blocks of (W B) A are exactly W_q B A, W_k B A and W_v B A.
ComfyUI's own patcher applies it (lowvram/offload, unpatching, strength, stacking); a patch
earlier in the list changes W, so stacked patches compose in order.

ComfyUI rebuilds adapters as `type(adapter)(adapter.loaded_keys, weights)` with the tensors of
`weights` moved elsewhere (its lowvram prefetch, `comfy.lora.prefetch_prepared_value`) and
replaces `adapter.weights` in bypass mode, so everything lives in `weights` and is read from there.
"""

from __future__ import annotations

from typing import Callable

import torch

from comfy.weight_adapter import WeightAdapterBase
from serial_lora_core import SerialLoraError
from serial_lora_core.formula import adapted_input, weight_delta


class SerialLoraWeightAdapter(WeightAdapterBase):
    """One stream's pair as a ComfyUI patch. `weights` = (down A: r x d, up B: d x r, scaling s = alpha/r,
    source file name, whole): `whole` is False when the patch covers only some rows of a fused
    weight (then bypass mode, which sees the module's whole output, cannot apply it)."""

    name = "serial_lora"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights

    @classmethod
    def from_pair(cls, down: torch.Tensor, up: torch.Tensor, scaling: float, source: str = "",
                  whole: bool = True) -> "SerialLoraWeightAdapter":
        """The patch for one stream of a Serial LoRA file."""
        return cls(set(), (down, up, float(scaling), source, bool(whole)))

    @classmethod
    def load(cls, x, lora, alpha, dora_scale):
        # Serial LoRA files are never read through ComfyUI's LoRA key matching (see nodes.py).
        return None

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        down, up, scaling, source = self.weights[:4]
        if weight.dim() != 2 or weight.shape[1] != down.shape[1]:
            raise SerialLoraError(f"Serial LoRA {source!r} cannot patch {key!r}: weight shape {tuple(weight.shape)}, "
                                  f"adapter in_features {down.shape[1]}; the adapter is for another model")
        diff = weight_delta(weight, down, up, strength * scaling, dtype=intermediate_dtype)
        weight += function(diff.type(weight.dtype))
        return weight

    def bypass_forward(self, org_forward: Callable, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Bypass mode: W (x + m·s·B A x) + b = (W + m·s·W B A) x + b, exact without reading W."""
        down, up, scaling, source, whole = self.weights[:5]
        if not whole:
            raise SerialLoraError(
                f"Serial LoRA {source!r}: this patch covers only some rows of a fused weight, which bypass mode cannot "
                "apply (it sees the whole module output); load this adapter without bypass")
        down = down.to(device=x.device, dtype=x.dtype)
        up = up.to(device=x.device, dtype=x.dtype)
        return org_forward(adapted_input(x, down, up, getattr(self, "multiplier", 1.0) * scaling), *args, **kwargs)

    def h(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # Serial LoRA changes the module's input, not its output: only bypass_forward can apply it.
        raise SerialLoraError("Serial LoRA has no additive output term h(x); bypass mode applies it through "
                              "bypass_forward (ComfyUI's BypassForwardHook calls that)")
