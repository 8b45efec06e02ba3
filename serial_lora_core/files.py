"""Save a model's adapter to a file, and load a file into a model (validating everything first)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .attention import ATTRIBUTE, SerialLoraAttention, check_adapter_name
from .config import SerialLoraConfig, check_scale, dtype_name
from .errors import SerialLoraFileError
from .format import (
    AdapterFile,
    StreamWeights,
    adapter_key,
    build_metadata,
    modules_to_save_key,
    read_file,
    validate_metadata,
    write_file,
)
from .hosts import AttentionHost, StreamSpec, get_submodule, match_host, registered_hosts
from .inject import DEFAULT_ADAPTER, adapter_config, attach, is_merged, serial_lora_modules, unwrap_model

Fail = Callable[[str], SerialLoraFileError]

ARCHITECTURE_ATTRIBUTE = "serial_lora_architecture"
"""Integrations set `model.serial_lora_architecture = "<name>"`; files record it and errors quote it."""


def model_architecture(model: nn.Module) -> str:
    """The architecture name integrations attached to `model`, else its class name."""
    model = unwrap_model(model)
    return getattr(model, ARCHITECTURE_ATTRIBUTE, None) or type(model).__name__


def _adapted(model: nn.Module, adapter_name: str) -> list[tuple[str, SerialLoraAttention]]:
    return [(name, module) for name, module in serial_lora_modules(model) if adapter_name in module]


def serial_lora_state_dict(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's weights under their file keys (`<attention>.serial_lora.<stream>.down.weight`, ...)."""
    model = unwrap_model(model)
    out = {}
    for attention, module in _adapted(model, adapter_name):
        for stream, adapter in module[adapter_name].items():
            out[adapter_key(attention, stream, "down")] = adapter.down.weight
            out[adapter_key(attention, stream, "up")] = adapter.up.weight
    if not out:
        raise SerialLoraFileError(f"{type(model).__name__} has no Serial LoRA adapter named {adapter_name!r} to save")
    return out


def count_attention_modules(model: nn.Module, streams: Mapping[str, Sequence[str]]) -> tuple[int, list[int]]:
    """(How many modules of `model` have one of `streams`, their input widths).

    A module has a stream when every projection path of the stream is an `nn.Linear` below it; a
    counted module's own children are not counted again. This depends only on the model and the
    file's streams, never on which hosts happen to be registered, so a file's
    `model_attention_modules` means the same at save and at load.
    """
    counted: list[str] = []
    widths: set[int] = set()
    for name, module in unwrap_model(model).named_modules():
        if isinstance(module, SerialLoraAttention) or any(not c or name.startswith(c + ".") for c in counted):
            continue
        found = False
        for projections in streams.values():
            layers = [get_submodule(module, p) for p in projections]
            if all(isinstance(layer, nn.Linear) for layer in layers):
                found = True
                widths.add(layers[0].in_features)
        if found:
            counted.append(name)
    return len(counted), sorted(widths)


def _saved_module_tensors(model: nn.Module, modules_to_save: Sequence[str]) -> dict[str, torch.Tensor]:
    """File key -> tensor for every parameter and buffer of the modules saved whole."""
    tensors = {}
    for path in modules_to_save:
        module = get_submodule(model, path) if isinstance(path, str) and path else None
        if module is None:
            raise SerialLoraFileError(f"modules_to_save names {path!r}, which {type(model).__name__} does not have; "
                                      "pass module paths as model.named_modules() lists them (e.g. 'head')")
        if any(isinstance(m, SerialLoraAttention) for m in module.modules()):
            raise SerialLoraFileError(f"modules_to_save {path!r} contains Serial LoRA adapters, which the file stores "
                                      "already; list only the modules trained in full (e.g. a new head)")
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                raise SerialLoraFileError(f"modules_to_save {path!r}: {name!r} is {tensor.dtype}; only floating-point "
                                          "tensors can be saved")
            tensors[modules_to_save_key(path, name)] = tensor
    return tensors


def save_serial_lora(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = DEFAULT_ADAPTER,
    *,
    architecture: str | None = None,
    base_model: str | None = None,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
    modules_to_save: Sequence[str] = (),
) -> Path:
    """Write adapter `adapter_name` of `model` to a .safetensors file, atomically.

    Args:
        architecture: name of the base architecture stored in the file (default:
            `model_architecture(model)`); loading into another architecture names both in its error.
        base_model: optional hub id or path of the base weights, for users of the file.
        dtype: store the weights in this dtype (default: as they are).
        metadata: extra string metadata to store.
        modules_to_save: paths of modules trained in full (e.g. ("head",) for a new classifier), as
            PEFT's `modules_to_save`: all their parameters and buffers are stored (format version 2)
            and `load_serial_lora` restores them.
    """
    architecture = architecture or model_architecture(model)
    model = unwrap_model(model)
    check_adapter_name(adapter_name)
    if isinstance(modules_to_save, str):
        modules_to_save = (modules_to_save,)
    tensors = {**serial_lora_state_dict(model, adapter_name), **_saved_module_tensors(model, modules_to_save)}
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    config = adapter_config(model, adapter_name)
    streams: dict[str, list[str]] = {}
    hosts = set()
    adapted = _adapted(model, adapter_name)
    for attention, module in adapted:
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
        architecture=architecture,
        base_model=base_model,
        dtype=dtype_name(next(iter(tensors.values())).dtype),
        # (at least the adapted ones, whatever a host's projections are)
        model_attention_modules=max(count_attention_modules(model, streams)[0], len(adapted)),
        modules_to_save=tuple(modules_to_save),
        extra=metadata,
    )
    validate_metadata(os.fspath(path), meta)  # never write a file this library would refuse to read
    return write_file(path, tensors, meta)


def resolve_projections(
    adapter: AdapterFile, attention: str, stream: str, host_streams: Mapping[str, StreamSpec] | None = None
) -> tuple[str, ...]:
    """The projections that `stream` of `attention` adapts: the one rule core load, export, the
    ComfyUI plan and the CLI all call.

    The file's `streams` metadata never names an output projection (`format.OUTPUT_PROJECTIONS`,
    checked when the file is read) and must agree with the host that reads the stream:
    - with the model (`host_streams`, from the host matched on its attention module): the host's
      projections; a file that says otherwise is refused;
    - without a model (export from base weights, ComfyUI's own key layout): the file's projections,
      refused if a host the file names in `hosts` is registered here and says otherwise (the same
      answer the core would give on the model). When no host it names is registered here, the
      projections must still be a layout that some registered host gives a stream (e.g. `qkv`, or
      `q_proj/k_proj/v_proj`), so an edited file cannot point the export at any other layer; the
      caller then checks each projection exists, with the adapter's width, in the weights it patches.
    """
    declared = tuple(adapter.info.streams[stream])
    if host_streams is None:
        hosts = registered_hosts()
        known = [h for h in hosts if h.name in adapter.hosts and stream in h.streams]
        if known and not any(sorted(h.streams[stream].projections) == sorted(declared) for h in known):
            raise _contradiction(adapter, stream, declared, f"its host {known[0].name!r}", known[0].streams[stream])
        layouts = {tuple(sorted(spec.projections)) for h in hosts for spec in h.streams.values()}
        if not known and tuple(sorted(declared)) not in layouts:
            raise SerialLoraFileError(
                f"{adapter.path}: metadata field 'streams' says stream {stream!r} feeds {list(declared)}, a layout no "
                f"registered host has (hosts named by the file: {list(adapter.hosts)}; known layouts: "
                f"{sorted(map(list, layouts))}); import the integration that made the file (timm_plugin, "
                "diffusers_loader, transformers_plugin) or register its host with register_host() first")
        return declared
    spec = host_streams.get(stream)
    if spec is None:
        raise SerialLoraFileError(f"{adapter.path}: key {adapter_key(attention, stream, 'down')!r}: attention "
                                  f"{attention!r} has no stream {stream!r} (it has {sorted(host_streams)})")
    if sorted(spec.projections) != sorted(declared):
        raise _contradiction(adapter, stream, declared, f"on this model {attention!r}", spec)
    return tuple(spec.projections)


def _contradiction(adapter: AdapterFile, stream: str, declared: tuple[str, ...], where: str, spec: StreamSpec) -> SerialLoraFileError:
    return SerialLoraFileError(
        f"{adapter.path}: metadata field 'streams' says stream {stream!r} feeds {list(declared)}, but {where} "
        f"feeds it to {list(spec.projections)}; the file is for another attention layout")


def _describe(architecture: str | None, adapter: AdapterFile) -> str:
    theirs = adapter.architecture or "an unnamed architecture"
    ours = architecture or "this model"
    if theirs == ours:
        return f"the file and the model are both {ours!r}, but of different sizes"
    return f"the file was trained on {theirs!r}, the model is {ours!r}"


def _widths(widths: Sequence[int]) -> str:
    return "/".join(map(str, widths))


@dataclass(frozen=True)
class _Step:
    """One stream of the file, checked against the model and ready to copy."""

    attention: str
    module: nn.Module
    host: AttentionHost
    streams: Mapping[str, StreamSpec]
    stream: str
    pair: StreamWeights


def _check_depth(model: nn.Module, adapter: AdapterFile, fail: Fail) -> None:
    expected = adapter.model_attention_modules
    if expected is None:
        return
    actual, widths = count_attention_modules(model, adapter.info.streams)
    # With none at all the layouts differ: the per-key checks then say exactly where.
    if actual and actual != expected:
        theirs = sorted({pair.down.shape[1] for pair in adapter.weights.values()})
        raise fail(f"the file was saved from a model with {expected} attention modules of width {_widths(theirs)}, "
                   f"this model has {actual} of width {_widths(widths)} (metadata field 'model_attention_modules')")


def _saved_targets(model: nn.Module, adapter: AdapterFile, fail: Fail) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(model tensor, file tensor) for every tensor of the file's `modules_to_save`, all checked."""
    targets = []
    for path, tensor in adapter.modules_to_save.items():
        try:
            target = model.get_parameter(path)
        except AttributeError:
            try:
                target = model.get_buffer(path)
            except AttributeError:
                target = None
        if target is None:
            raise fail(f"key 'modules_to_save.{path}': the model has no parameter or buffer {path!r}")
        if target.shape != tensor.shape or not target.is_floating_point():
            raise fail(f"key 'modules_to_save.{path}' has shape {tuple(tensor.shape)}, the model's {path!r} has shape "
                       f"{tuple(target.shape)} ({target.dtype}); build the model with the same head")
        targets.append((target, tensor))
    return targets


def _plan(model: nn.Module, adapter: AdapterFile, adapter_name: str, architecture: str | None) -> list[_Step]:
    """Check the file against the model without changing it; return what to attach and copy."""
    def fail(message: str) -> SerialLoraFileError:
        return SerialLoraFileError(f"{adapter.path}: {message} ({_describe(architecture, adapter)}); "
                                   "the model was not changed. Use the adapter made for this model.")

    if is_merged(model):
        raise SerialLoraFileError(f"{adapter.path}: cannot load while adapters are merged; call unmerge_serial_lora() "
                                  "first (the model was not changed)")
    _check_depth(model, adapter, fail)
    existing = dict(_adapted(model, adapter_name))
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
        wrapper = getattr(module, ATTRIBUTE, None)
        if isinstance(wrapper, SerialLoraAttention):
            host, streams = wrapper.host, wrapper.stream_specs
        else:
            match = match_host(module)
            if match is None:
                raise fail(f"key {key!r}: module {attention!r} ({type(module).__name__}) is not an attention module "
                           "that a registered host recognises")
            host, streams = match
        try:
            projections = resolve_projections(adapter, attention, stream, streams)
        except SerialLoraFileError as err:
            raise fail(str(err).removeprefix(f"{adapter.path}: ")) from None
        in_features = get_submodule(module, projections[0]).in_features
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
            try:  # the adapter keeps its scale and takes the file's scaling: their product must fit float32
                check_scale(current.scale * adapter.scaling, "scale x scaling")
            except ValueError:
                raise fail(f"the model's adapter {adapter_name!r} has scale {current.scale:g}, which times the file's "
                           f"scaling {adapter.scaling:g} (metadata field 'alpha') is beyond float32; lower it with "
                           "set_serial_lora_scale() first") from None
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
    version, every metadata field) is checked before the model is touched: a bad file raises
    `SerialLoraFileError` naming the key and shapes, and leaves the model exactly as it was.
    Modules the file saved whole (`modules_to_save`) are copied into the model too.

    Args:
        architecture: the model's architecture name, quoted in errors next to the file's
            (default: `model_architecture(model)`).
        trainable: leave the loaded adapter (and saved modules) trainable (default: the adapter is
            frozen, for inference; saved modules keep their `requires_grad`).
        dtype: adapter dtype for a newly created adapter (default: the projection's dtype).
    """
    check_adapter_name(adapter_name)
    architecture = architecture or model_architecture(model)
    model = unwrap_model(model)
    adapter = read_file(path)
    plan = _plan(model, adapter, adapter_name, architecture)
    saved = _saved_targets(model, adapter, lambda m: SerialLoraFileError(
        f"{adapter.path}: {m} ({_describe(architecture, adapter)}); the model was not changed"))
    if architecture and adapter.architecture and architecture != adapter.architecture:
        warnings.warn(f"{adapter.path}: trained on {adapter.architecture!r}, loaded into {architecture!r} "
                      "(shapes match, so it loads)", stacklevel=2)
    config = SerialLoraConfig(
        rank=adapter.rank, alpha=adapter.alpha, use_rslora=adapter.use_rslora, dtype=dtype,
        dropout=adapter.dropout if trainable else 0.0,
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
            # An adapter that already existed takes the file's scaling too (alpha / rsLoRA may differ).
            target.scaling = adapter.scaling
            target.config = replace(target.config, alpha=adapter.alpha, use_rslora=adapter.use_rslora)
            target.requires_grad_(trainable)
    with torch.no_grad():
        for target, tensor in saved:
            target.copy_(tensor)
            if trainable and isinstance(target, nn.Parameter):
                target.requires_grad_(True)
    return adapter
