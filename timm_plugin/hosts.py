"""How timm's ViT-family attention modules read their input, for the core's hosts.

Checked against the forward of each attention class in timm 1.0.31:

- `timm.layers.Attention` (ViT, DeiT, CLIP/SigLIP ViTs), `timm.layers.AttentionRope`, `DiffAttention`
  and SAM's `vision_transformer_sam.Attention` call `self.qkv(x)` (or `q_proj/k_proj/v_proj`) as
  modules: the core's built-in FUSED_QKV / SPLIT_QKV hosts apply. An optional `gate` Linear also
  reads x; it is a separate module, so it keeps seeing the original x. SAM's relative-position and
  rope terms read q and k only.
- Beit's `Attention` and `EvaAttention` with `q_bias`/`v_bias` (and `qkv_bias_separate=False`)
  compute `F.linear(x, self.qkv.weight, cat(q_bias, k_bias, v_bias))`: `self.qkv` is never called, so
  a hook on it would silently do nothing. `FUNCTIONAL_QKV` adapts the attention's `x` argument
  instead, which is correct because nothing else in those forwards reads x (EVA's optional `gate`
  would: such modules are refused by `unsupported_attention`). Merging edits `qkv.weight`, which is
  exactly what `F.linear` reads, so merged models stay exact.
"""

from __future__ import annotations

import functools
import re

from torch import nn

from serial_lora_core import AttentionHost, SerialLoraConfig, StreamSpec, find_attention_modules, register_host


@functools.cache
def _functional_qkv_classes() -> tuple[type, ...]:
    from timm.models.beit import Attention as BeitAttention
    from timm.models.eva import EvaAttention

    return BeitAttention, EvaAttention


def computes_qkv_functionally(module: nn.Module) -> bool:
    """Whether `module` computes q, k, v with `F.linear(x, self.qkv.weight, bias)` (never calling `self.qkv`)."""
    return (
        isinstance(module, _functional_qkv_classes())
        and isinstance(getattr(module, "qkv", None), nn.Linear)
        and getattr(module, "q_bias", None) is not None
        and not getattr(module, "qkv_bias_separate", False)
    )


def _functional_and_ungated(module: nn.Module) -> bool:
    return computes_qkv_functionally(module) and getattr(module, "gate", None) is None


FUNCTIONAL_QKV = AttentionHost(
    name="timm_functional_qkv",
    streams={"input": StreamSpec(projections=("qkv",), input_argument=("x", 0))},
    condition=_functional_and_ungated,
)
"""Beit / EVA attention with q and v biases: the adapter transforms the forward's `x` argument."""


def register_timm_hosts() -> None:
    """Make the core recognise timm's functional-qkv attention (tried before the generic FUSED_QKV)."""
    register_host(FUNCTIONAL_QKV)


_BLOCK = re.compile(r"(?:.*\.)?blocks\.\d+")


def unsupported_attention(model: nn.Module) -> list[str]:
    """Why the core cannot adapt every transformer block of `model` (empty when it can).

    A block counts as covered when one of its submodules is attention that a registered host
    recognises. Blocks that fuse q, k and v with other layers (timm's `ParallelScalingBlock` puts
    them in one `in_proj` with the MLP's fc1) are not, nor is functional-qkv attention with a gate.
    """
    found = find_attention_modules(model, SerialLoraConfig())
    problems = [
        f"{name}: {type(module).__name__} computes qkv with F.linear and also feeds x to a gate"
        for name, module in model.named_modules()
        if computes_qkv_functionally(module) and getattr(module, "gate", None) is not None
    ]
    for name, module in model.named_modules():
        if _BLOCK.fullmatch(name) and not any(a.startswith(name + ".") for a in found):
            problems.append(f"{name}: {type(module).__name__} has no attention module with q/k/v projections")
    return problems
