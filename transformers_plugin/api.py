"""Inject, save and load Serial LoRA on transformers CLIP/SAM and open_clip models, tower by tower."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Iterable

from torch import nn

import serial_lora_core as core
from serial_lora_core import SerialLoraConfig, SerialLoraError, SerialLoraFileError, find_attention_modules, read_file

from .hosts import mark_streams_by_input, prepare_open_clip, tower_of

TOWERS_KEY = "towers"
"""File metadata key: JSON list of the towers the adapter adapts (e.g. ["text", "vision"])."""

FROZEN_BY_DEFAULT = ("prompt_encoder", "mask_decoder")
"""Towers not adapted unless asked for: SAM adapts its image encoder only (as the paper)."""

MULTI_INPUT_TOWERS = ("mask_decoder",)
"""Towers whose attention reads several inputs: asking for one marks them for one pair per input."""


def prepare(model: nn.Module, towers: Iterable[str] = ()) -> None:
    """Describe the model's attention to the core: open_clip's packed attention, and multi-input
    attention (SAM's mask decoder) when one of `towers` asks for it. Idempotent."""
    prepare_open_clip(model)
    if any(t in MULTI_INPUT_TOWERS for t in towers):
        mark_streams_by_input(model)


def attention_towers(model: nn.Module) -> dict[str, list[str]]:
    """Tower -> names of the attention modules the core can adapt in it (after `prepare`)."""
    towers: dict[str, list[str]] = {}
    for name in find_attention_modules(model, SerialLoraConfig()):
        towers.setdefault(tower_of(model, name), []).append(name)
    return towers


def inject(
    model: nn.Module,
    config: SerialLoraConfig | None = None,
    adapter_name: str = core.DEFAULT_ADAPTER,
    *,
    towers: Iterable[str] | None = None,
) -> dict[str, core.SerialLoraAttention]:
    """`inject_serial_lora` on every attention of the chosen towers (default: all but SAM's prompt
    encoder and mask decoder), e.g. both CLIP towers, or SAM's image encoder.

    `config.target_modules`, if set, further narrows the selection. Raises ValueError naming the
    towers the model has when one of `towers` is not among them.
    """
    config = config or SerialLoraConfig()
    if not isinstance(config, SerialLoraConfig):
        raise TypeError(f"config must be a SerialLoraConfig, got {type(config).__name__}")
    if isinstance(towers, str):
        towers = (towers,)
    wanted = None if towers is None else tuple(towers)
    prepare(model, wanted or ())
    available = attention_towers(model)
    if wanted is None:
        wanted = tuple(t for t in available if t not in FROZEN_BY_DEFAULT)
    missing = [t for t in wanted if t not in available]
    if missing or not wanted:
        raise ValueError(f"towers={list(wanted)}: {type(model).__name__} has attention in towers {sorted(available)}; "
                         f"{'no tower ' + repr(missing[0]) if missing else 'none selected'}. Pick from those.")
    names = [n for t in wanted for n in available[t] if config.target_modules is None or config.targets(n)]
    if not names:
        raise ValueError(f"target_modules={list(config.target_modules)} selects no attention of towers {list(wanted)}; "
                         f"their attention modules are e.g. {[available[t][0] for t in wanted]}")
    exact = tuple(f"^{re.escape(n)}$" for n in names)
    return core.inject_serial_lora(model, dataclasses.replace(config, target_modules=exact), adapter_name)


def adapted_towers(model: nn.Module, adapter_name: str = core.DEFAULT_ADAPTER) -> list[str]:
    """The towers in which adapter `adapter_name` adapts at least one attention."""
    return sorted({tower_of(model, name) for name, module in core.serial_lora_modules(model) if adapter_name in module})


def save_serial_lora(model: nn.Module, path: str | os.PathLike, adapter_name: str = core.DEFAULT_ADAPTER, **kwargs) -> Path:
    """`serial_lora_core.save_serial_lora`, recording the adapted towers in the file (metadata "towers")."""
    metadata = {**(kwargs.pop("metadata", None) or {}), TOWERS_KEY: json.dumps(adapted_towers(model, adapter_name))}
    return core.save_serial_lora(model, path, adapter_name, metadata=metadata, **kwargs)


def file_towers(path: str | os.PathLike) -> list[str]:
    """The towers a Serial LoRA file records (empty for files saved without this integration).

    Reads and validates the whole file (SerialLoraFileError naming the file if it is bad)."""
    value = read_file(path).metadata.get(TOWERS_KEY, "[]")
    try:
        towers = json.loads(value)
    except json.JSONDecodeError:
        towers = None
    if not isinstance(towers, list) or not all(isinstance(t, str) for t in towers):
        raise SerialLoraFileError(f"{path}: metadata {TOWERS_KEY!r} must be a JSON list of tower names, got {value!r}")
    return towers


def load_serial_lora(model: nn.Module, path: str | os.PathLike, adapter_name: str = core.DEFAULT_ADAPTER, **kwargs):
    """Load a Serial LoRA file into a transformers CLIP/SAM or open_clip model (one line).

    Prepares what the core cannot see by itself (open_clip's packed attention; SAM's mask decoder if
    the file adapts it), then calls `serial_lora_core.load_serial_lora` (same arguments), which checks
    the whole file before changing the model.
    """
    prepare(model, file_towers(path))
    return core.load_serial_lora(model, path, adapter_name, **kwargs)


def from_pretrained(
    pretrained_model_name_or_path: str | os.PathLike,
    serial_lora_path: str | os.PathLike,
    model_class: type | None = None,
    **from_pretrained_kwargs,
) -> nn.Module:
    """`model_class.from_pretrained(...)` (default `transformers.AutoModel`) with a Serial LoRA file loaded."""
    if model_class is None:
        from transformers import AutoModel as model_class
    if not hasattr(model_class, "from_pretrained"):
        raise TypeError(f"model_class must have from_pretrained (a transformers model class), got {model_class!r}")
    if not Path(serial_lora_path).is_file():
        raise SerialLoraError(f"Serial LoRA file {str(serial_lora_path)!r} does not exist; pass the .safetensors "
                              "file written by save_serial_lora")
    model = model_class.from_pretrained(pretrained_model_name_or_path, **from_pretrained_kwargs)
    load_serial_lora(model, serial_lora_path)
    return model
