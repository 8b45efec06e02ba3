"""Tiny configurations of real timm architectures, and helpers for the timm plugin's tests.

Each family is a real architecture name with width/depth/image-size overrides, so
`timm.create_model("<arch>.serial_lora", **overrides)` goes through timm's registry and entry point
exactly as the full model would, but builds in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import timm
import timm_plugin
from serial_lora_core import serial_lora_modules

VIT_OVERRIDES = dict(depth=2, embed_dim=64, num_heads=2, img_size=32, patch_size=8)
EVA_OVERRIDES = dict(depth=2, embed_dim=64, num_heads=2, img_size=28, patch_size=7)


@dataclass(frozen=True)
class Family:
    """One timm family: the architecture used for it, tiny overrides, and the host that should adapt it."""

    name: str
    architecture: str
    overrides: dict[str, Any]
    host: str
    image_size: int = 32

    @property
    def tagged(self) -> str:
        return f"{self.architecture}.{timm_plugin.TAG}"

    def create(self, *, tag: bool = True, seed: int = 0, **kwargs: Any) -> nn.Module:
        """`timm.create_model` of this family (tagged or plain), seeded, in eval mode."""
        torch.manual_seed(seed)
        model = timm.create_model(self.tagged if tag else self.architecture, **{**self.overrides, **kwargs})
        return model.eval()

    def images(self, batch: int = 2, seed: int = 1) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, self.image_size, self.image_size, generator=generator)


FAMILIES = [
    Family("vit", "vit_base_patch16_224", VIT_OVERRIDES, "fused_qkv"),
    Family("clip_vit", "vit_base_patch16_clip_224", VIT_OVERRIDES, "fused_qkv"),
    Family("deit_distilled", "deit_tiny_distilled_patch16_224", VIT_OVERRIDES, "fused_qkv"),
    Family("sam", "samvit_base_patch16", dict(VIT_OVERRIDES, global_attn_indexes=(1,), window_size=2, neck_chans=16), "fused_qkv"),
    Family("eva02_fused_qkv_bias", "eva02_tiny_patch14_224", EVA_OVERRIDES, "timm_functional_qkv", image_size=28),
    Family("eva02_split_qkv", "eva02_base_patch14_224", EVA_OVERRIDES, "split_qkv", image_size=28),
    Family("vit_rope", "vit_base_patch16_rope_224", VIT_OVERRIDES, "fused_qkv"),
    Family("beit", "beit_base_patch16_224", VIT_OVERRIDES, "timm_functional_qkv"),
]
FAMILY_IDS = [f.name for f in FAMILIES]
BY_NAME = {f.name: f for f in FAMILIES}


def randomize_adapters(model: nn.Module, seed: int = 3, std: float = 0.2) -> None:
    """Give every adapter a non-zero up matrix (a trained adapter), reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in serial_lora_modules(model):
            for adapters in module.values():
                for adapter in adapters.values():
                    adapter.up.weight.copy_(torch.randn(adapter.up.weight.shape, generator=generator) * std)


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights without the adapters (what the plain architecture has)."""
    return {k: v.clone() for k, v in model.state_dict().items() if ".serial_lora." not in k}


def hand_merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base weights with every adapted projection replaced by W (I + s·B·A), in float64 (one adapter per model)."""
    state = base_state_dict(model)
    for attention, module in serial_lora_modules(model):
        for adapters in module.values():
            for stream, adapter in adapters.items():
                a = adapter.down.weight.double()
                b = adapter.up.weight.double()
                eye = torch.eye(a.shape[1], dtype=torch.float64)
                for projection in module.stream_specs[stream].projections:
                    key = f"{attention}.{projection}.weight"
                    state[key] = (state[key].double() @ (eye + adapter.scaling * b @ a)).to(state[key].dtype)
    return state
