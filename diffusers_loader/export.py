"""Exact export of a loaded Serial LoRA to a standard diffusers/PEFT LoRA file.

Per projection, down = A and up = s·W B: `pipe.load_lora_weights()` of stock diffusers loads the
result and reproduces the Serial LoRA. The file is 4x larger and only valid for the base weights
it was computed against (a fine-tuned base needs a new export).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from serial_lora_core import DEFAULT_ADAPTER, model_equivalent_lora, save_standard_lora


def export_to_lora(pipe_or_transformer, path: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER,
                   scale: float = 1.0, dtype: torch.dtype = torch.float32) -> Path:
    """Write the standard-LoRA equivalent of `adapter_name` (keys `transformer.<module>.lora_A.weight`).

    The adapter's current strength and `scale` are baked into `lora_B`; the file's
    `lora_adapter_metadata` gives diffusers r = lora_alpha, so stock `pipe.load_lora_weights(path)`
    applies it at a LoRA scale of exactly 1. The transformer must not be fused (W must be the base).
    The command-line equivalent, from a file and base weights: `serial-lora export-lora IN OUT --base MODEL`.
    """
    transformer = pipe_or_transformer if isinstance(pipe_or_transformer, nn.Module) else pipe_or_transformer.transformer
    pairs = model_equivalent_lora(transformer, adapter_name, scale)
    return save_standard_lora(pairs, path, prefix="transformer.", dtype=dtype)
