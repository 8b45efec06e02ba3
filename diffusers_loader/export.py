"""Exact export of loaded Serial LoRAs to a standard diffusers/PEFT LoRA file.

Per projection, down = A and up = s·W B: `pipe.load_lora_weights()` of stock diffusers loads the
result and reproduces the Serial LoRA. Several active adapters export as one LoRA whose rank is the
sum of theirs (their pairs side by side), which is exactly the sum of their weight changes. The file
is 4x larger per adapter and only valid for the base weights it was computed against (a fine-tuned
base needs a new export).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from serial_lora_core import SerialLoraError, adapter_names, model_equivalent_lora, save_standard_lora
from serial_lora_core.export import DIFFUSERS_PREFIX

Pairs = dict[str, tuple[torch.Tensor, torch.Tensor]]


def side_by_side(per_adapter: list[Pairs]) -> Pairs:
    """One LoRA equal to the sum of several: per projection down = [A_1; A_2; ...] and up = [U_1, U_2, ...],
    with zero blocks where an adapter does not touch that projection (every projection then has the
    same rank, which diffusers' single LoraConfig needs)."""
    some = {p: pair for pairs in per_adapter for p, pair in pairs.items()}  # a pair of each projection's shapes
    combined: Pairs = {}
    for projection, (any_down, any_up) in some.items():
        downs, ups = [], []
        for pairs in per_adapter:
            rank = next(iter(pairs.values()))[0].shape[0]
            zeros = (any_down.new_zeros(rank, any_down.shape[1]), any_up.new_zeros(any_up.shape[0], rank))
            down, up = pairs.get(projection, zeros)
            downs.append(down)
            ups.append(up)
        combined[projection] = (torch.cat(downs), torch.cat(ups, dim=1))
    return combined


def export_to_lora(pipe_or_transformer, path: str | os.PathLike, adapter_name: str | None = None,
                   scale: float = 1.0, dtype: torch.dtype = torch.float32) -> Path:
    """Write the standard-LoRA equivalent of the loaded Serial LoRA (keys `transformer.<module>.lora_A.weight`).

    `adapter_name=None` exports the only loaded adapter, or, with several, every active one (scale
    not 0) combined: their exact summed change, as after `set_serial_lora_adapters`. The adapters'
    current scales and `scale` (a factor on top of them) are baked into `lora_B`; the file's `lora_adapter_metadata` gives
    diffusers r = lora_alpha, so stock `pipe.load_lora_weights(path)` applies it at a LoRA scale of
    exactly 1. The transformer must not be fused (W must be the base). The command-line equivalent,
    from a file and base weights: `serial-lora export-lora IN OUT --base MODEL`.
    """
    transformer = pipe_or_transformer if isinstance(pipe_or_transformer, nn.Module) else pipe_or_transformer.transformer
    loaded = adapter_names(transformer)
    if adapter_name is not None and adapter_name not in loaded:
        raise SerialLoraError(f"no Serial LoRA adapter named {adapter_name!r} to export; loaded: {loaded} "
                              "(pass one of them as adapter_name, or None for the active ones combined)")
    if not loaded:
        raise SerialLoraError("no Serial LoRA adapter is loaded; load one with pipe.load_serial_lora_weights() first")
    names = [adapter_name] if adapter_name is not None else loaded
    per_adapter = {name: model_equivalent_lora(transformer, name, scale) for name in names}
    # An adapter at scale 0 (switched off by set_serial_lora_adapters) contributes exactly nothing.
    active = [pairs for pairs in per_adapter.values() if any(up.any() for _, up in pairs.values())]
    if len(names) > 1 and not active:
        raise SerialLoraError(f"none of the loaded Serial LoRA adapters {loaded} is active (all have scale 0); "
                              "set a scale with pipe.set_serial_lora_adapters() or pass adapter_name")
    pairs = per_adapter[names[0]] if len(names) == 1 else side_by_side(active)
    return save_standard_lora(pairs, path, prefix=DIFFUSERS_PREFIX, dtype=dtype)
