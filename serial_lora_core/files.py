"""Save a model's adapter to a file, and load a file into a model (validating everything first)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .attention import SerialLoraAttention
from .config import SerialLoraConfig, dtype_name
from .errors import SerialLoraFileError
from .format import AdapterFile, StreamWeights, adapter_key, build_metadata, read_file, write_file
from .hosts import AttentionHost, StreamSpec, get_submodule, match_host
from .inject import (
    DEFAULT_ADAPTER,
    _check_adapter_name,
    adapter_config,
    attach,
    find_attention_modules,
    is_merged,
    serial_lora_modules,
)


ARCHITECTURE_ATTRIBUTE = "serial_lora_architecture"
"""Integrations set `model.serial_lora_architecture = "<name>"`; files record it and errors quote it."""


def model_architecture(model: nn.Module) -> str:
    """The architecture name integrations attached to `model`, else its class name."""
    return getattr(model, ARCHITECTURE_ATTRIBUTE, None) or type(model).__name__


def serial_lora_state_dict(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's weights under their file keys (`<attention>.serial_lora.<stream>.down.weight`, ...)."""
    out = {}
    for attention, module in serial_lora_modules(model):
        if adapter_name in module:
            for stream, adapter in module[adapter_name].items():
                out[adapter_key(attention, stream, "down")] = adapter.down.weight
                out[adapter_key(attention, stream, "up")] = adapter.up.weight
    if not out:
        raise SerialLoraFileError(f"{type(model).__name__} has no Serial LoRA adapter named {adapter_name!r} to save")
    return out


def save_serial_lora(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = DEFAULT_ADAPTER,
    *,
    architecture: str | None = None,
    base_model: str | None = None,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write adapter `adapter_name` of `model` to a .safetensors file, atomically.

    Args:
        architecture: name of the base architecture stored in the file (default:
            `model_architecture(model)`); loading into another architecture names both in its error.
        base_model: optional hub id or path of the base weights, for users of the file.
        dtype: store the weights in this dtype (default: as they are).
        metadata: extra string metadata to store.
    """
    tensors = serial_lora_state_dict(model, adapter_name)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    config = adapter_config(model, adapter_name)
    streams: dict[str, list[str]] = {}
    hosts = set()
    for attention, module in serial_lora_modules(model):
        if adapter_name not in module:
            continue
        hosts.add(module.host.name)
        for stream in module[adapter_name]:
            projections = list(module.stream_specs[stream].projections)
            if streams.setdefault(stream, projections) != projections:
                raise SerialLoraFileError(
                    f"stream {stream!r} feeds {streams[stream]} in one attention and {projections} in "
                    f"{attention!r}; one file describes one layout. Adapt them under different adapter names."
                )
    meta = build_metadata(
        rank=config.rank,
        alpha=config.alpha,
        use_rslora=config.use_rslora,
        dropout=config.dropout,
        streams=streams,
        hosts=sorted(hosts),
        architecture=architecture or model_architecture(model),
        base_model=base_model,
        dtype=dtype_name(next(iter(tensors.values())).dtype),
        model_attention_modules=len(find_attention_modules(model, SerialLoraConfig())),
        extra=metadata,
    )
    return write_file(path, tensors, meta)


def _describe(architecture: str | None, adapter: AdapterFile) -> str:
    theirs = adapter.architecture or "an unnamed architecture"
    ours = architecture or "this model"
    return f"the file was trained on {theirs!r}, the model is {ours!r}"


@dataclass(frozen=True)
class _Step:
    """One stream of the file, checked against the model and ready to copy."""

    attention: str
    module: nn.Module
    host: AttentionHost
    streams: Mapping[str, StreamSpec]
    stream: str
    pair: StreamWeights


def _plan(model: nn.Module, adapter: AdapterFile, adapter_name: str, architecture: str | None) -> list[_Step]:
    """Check the file against the model without changing it; return what to attach and copy."""
    def fail(message: str) -> SerialLoraFileError:
        return SerialLoraFileError(f"{adapter.path}: {message} ({_describe(architecture, adapter)}); "
                                   "the model was not changed. Use the adapter made for this model.")

    if is_merged(model):
        raise SerialLoraFileError(f"{adapter.path}: cannot load while adapters are merged; call unmerge_serial_lora() "
                                  "first (the model was not changed)")
    expected = adapter.model_attention_modules
    if expected is not None:
        actual = len(find_attention_modules(model, SerialLoraConfig()))
        if actual != expected:
            raise fail(f"the file was saved from a model with {expected} attention modules, this model has {actual}")
    existing = {name: module for name, module in serial_lora_modules(model) if adapter_name in module}
    if existing:
        present = {(name, stream) for name, module in existing.items() for stream in module[adapter_name]}
        missing = sorted(present - set(adapter.weights))
        if missing:
            keys = [adapter_key(a, s, "down") for a, s in missing[:5]]
            raise fail(f"the model's adapter {adapter_name!r} has {len(missing)} stream(s) the file lacks, "
                       f"e.g. missing key(s) {keys}")
    plan = []
    for (attention, stream), pair in adapter.weights.items():
        module = get_submodule(model, attention) if attention else model
        key = adapter_key(attention, stream, "down")
        if module is None:
            raise fail(f"key {key!r} names attention module {attention!r}, which the model does not have")
        wrapper = getattr(module, "serial_lora", None)
        if isinstance(wrapper, SerialLoraAttention):
            host, streams = wrapper.host, wrapper.stream_specs
        else:
            match = match_host(module)
            if match is None:
                raise fail(f"key {key!r}: module {attention!r} ({type(module).__name__}) is not an attention module "
                           "that a registered host recognises")
            host, streams = match
        if stream not in streams:
            raise fail(f"key {key!r}: attention {attention!r} has no stream {stream!r} (it has {sorted(streams)})")
        in_features = get_submodule(module, streams[stream].projections[0]).in_features
        if pair.down.shape[1] != in_features:
            raise fail(f"key {key!r} has shape {tuple(pair.down.shape)} but {attention!r} stream {stream!r} has "
                       f"{in_features} features: expected ({adapter.rank}, {in_features})")
        if isinstance(wrapper, SerialLoraAttention) and adapter_name in wrapper:
            current = wrapper[adapter_name][stream] if stream in wrapper[adapter_name] else None
            if current is None:
                raise fail(f"key {key!r}: the model's adapter {adapter_name!r} does not adapt stream {stream!r} of {attention!r}")
            if current.rank != adapter.rank:
                raise fail(f"key {key!r}: the model's adapter {adapter_name!r} has rank {current.rank}, the file "
                           f"rank {adapter.rank}; load under another adapter_name or delete the adapter first")
        plan.append(_Step(attention, module, host, streams, stream, pair))
    return plan


def load_serial_lora(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = DEFAULT_ADAPTER,
    *,
    architecture: str | None = None,
    trainable: bool = False,
    dtype: torch.dtype | None = None,
) -> AdapterFile:
    """Load a Serial LoRA file into `model` as adapter `adapter_name`.

    If the model does not have that adapter yet, it is created on exactly the attention modules
    and streams of the file. Everything (keys, shapes, rank, dtype, finiteness, checksum, format
    version) is checked before the model is touched: a bad file raises `SerialLoraFileError`
    naming the key and shapes, and leaves the model exactly as it was.

    Args:
        architecture: the model's architecture name, quoted in errors next to the file's
            (default: `model_architecture(model)`).
        trainable: leave the loaded adapter trainable (default: frozen, for inference).
        dtype: adapter dtype for a newly created adapter (default: the projection's dtype).
    """
    _check_adapter_name(adapter_name)
    adapter = read_file(path)
    architecture = architecture or model_architecture(model)
    plan = _plan(model, adapter, adapter_name, architecture)
    if architecture and adapter.architecture and architecture != adapter.architecture:
        warnings.warn(f"{adapter.path}: trained on {adapter.architecture!r}, loaded into {architecture!r} "
                      "(shapes match, so it loads)", stacklevel=2)
    config = SerialLoraConfig(
        rank=adapter.rank, alpha=adapter.alpha, use_rslora=adapter.use_rslora, dtype=dtype,
        dropout=float(adapter.metadata.get("dropout", "0.0")) if trainable else 0.0,
    )
    by_module: dict[str, list[_Step]] = {}
    for step in plan:
        by_module.setdefault(step.attention, []).append(step)
    for steps in by_module.values():
        first = steps[0]
        wrapper = attach(first.module, first.host, first.streams)
        if adapter_name not in wrapper:
            wrapper.add_adapter(adapter_name, config, [step.stream for step in steps])
        for step in steps:
            target = wrapper[adapter_name][step.stream]
            with torch.no_grad():
                target.down.weight.copy_(step.pair.down)
                target.up.weight.copy_(step.pair.up)
            # An adapter that already existed takes the file's scale too (alpha / rsLoRA may differ).
            target.scale = adapter.scale
            target.config = replace(target.config, alpha=adapter.alpha, use_rslora=adapter.use_rslora)
            target.requires_grad_(trainable)
    return adapter
