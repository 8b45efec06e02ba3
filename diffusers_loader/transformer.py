"""Serial LoRA on a diffusers transformer (SD3's `SD3Transformer2DModel`); the pipeline methods call these.

SD3 needs no host of its own: the core's `joint_qkv` host already describes diffusers' `Attention`
(`to_q/to_k/to_v` read the image tokens, `add_q/k/v_proj` the text tokens; `context_pre_only`
blocks and SD3.5's `attn2` simply have the streams they have).
"""

from __future__ import annotations

import os

from torch import nn

from serial_lora_core import (
    DEFAULT_ADAPTER,
    AdapterFile,
    SerialLoraConfig,
    SerialLoraError,
    adapter_names,
    delete_serial_lora_adapter,
    inject_serial_lora,
    is_merged,
    load_serial_lora,
    merge_serial_lora,
    remove_serial_lora,
    serial_lora_modules,
    set_serial_lora_scale,
    unmerge_serial_lora,
)

from .fetch import resolve_adapter_file


def architecture_name(transformer: nn.Module) -> str:
    """e.g. "SD3Transformer2DModel(num_layers=24, width=1536, dual_attention_layers=())"."""
    config = getattr(transformer, "config", None)
    if config is None:
        return type(transformer).__name__
    width = config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0)
    dual = tuple(config.get("dual_attention_layers", ()) or ())
    return f"{type(transformer).__name__}(num_layers={config.get('num_layers')}, width={width}, dual_attention_layers={dual})"


def _named(transformer: nn.Module) -> nn.Module:
    transformer.serial_lora_architecture = architecture_name(transformer)
    return transformer


def add_serial_lora(transformer: nn.Module, config: SerialLoraConfig | None = None,
                    adapter_name: str = DEFAULT_ADAPTER) -> None:
    """A new trainable adapter on every joint attention (image stream, plus text with `streams`)."""
    inject_serial_lora(_named(transformer), config or SerialLoraConfig(), adapter_name)


def load_into_transformer(transformer: nn.Module, path_or_repo_id: str | os.PathLike, weight_name: str | None = None,
                          adapter_name: str | None = None, **hub_kwargs) -> AdapterFile:
    """Load an adapter file (local file/folder or hub repo id) as `adapter_name` (default: a fresh name)."""
    if adapter_name is None:
        taken = set(adapter_names(transformer))
        adapter_name = DEFAULT_ADAPTER if DEFAULT_ADAPTER not in taken else f"default_{len(taken)}"
    path = resolve_adapter_file(path_or_repo_id, weight_name, **hub_kwargs)
    return load_serial_lora(_named(transformer), path, adapter_name)


def set_adapters(transformer: nn.Module, adapter_names_: str | list[str], weights: float | list[float] | None = None) -> None:
    """Activate these adapters with these strengths (diffusers' `set_adapters`); the others get 0."""
    names = [adapter_names_] if isinstance(adapter_names_, str) else list(adapter_names_)
    if weights is None:
        weights = [1.0] * len(names)
    elif isinstance(weights, (int, float)):
        weights = [float(weights)] * len(names)
    if len(weights) != len(names):
        raise SerialLoraError(f"got {len(names)} adapter names and {len(weights)} weights; pass one weight per adapter")
    known = adapter_names(transformer)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SerialLoraError(f"unknown Serial LoRA adapter(s) {unknown}; loaded: {known}")
    strengths = dict(zip(names, weights))
    for name in known:
        set_serial_lora_scale(transformer, strengths.get(name, 0.0), adapter_name=name)


def fuse(transformer: nn.Module, scale: float = 1.0) -> None:
    merge_serial_lora(transformer, scale)


def unfuse(transformer: nn.Module) -> None:
    unmerge_serial_lora(transformer)


def unload(transformer: nn.Module, adapter_name: str | None = None) -> None:
    """Remove one adapter, or all of them (restoring the original modules and weights)."""
    if adapter_name is None:
        remove_serial_lora(transformer)
    else:
        delete_serial_lora_adapter(transformer, adapter_name)


def has_serial_lora(transformer: nn.Module) -> bool:
    return next(serial_lora_modules(transformer), None) is not None


__all__ = ["add_serial_lora", "architecture_name", "fuse", "has_serial_lora", "is_merged", "load_into_transformer",
           "set_adapters", "unfuse", "unload"]
