"""Model-level operations: inject, find, scale, enable, merge, unmerge and remove Serial LoRA."""

from __future__ import annotations

import math
from typing import Iterator

from torch import nn

from .attention import ATTRIBUTE, SerialLoraAttention
from .config import SerialLoraConfig
from .errors import SerialLoraError
from .hosts import match_host, registered_hosts

DEFAULT_ADAPTER = "default"


def _check_adapter_name(adapter_name: str) -> None:
    if not isinstance(adapter_name, str) or not adapter_name.isidentifier():
        raise SerialLoraError(f"adapter_name must be a Python identifier such as 'default', got {adapter_name!r}")


def find_attention_modules(model: nn.Module, config: SerialLoraConfig) -> dict[str, tuple[nn.Module, object, dict]]:
    """Attention modules of `model` selected by `config`: name -> (module, host, streams to adapt).

    A matched module's children are not searched (an attention inside an attention is not adapted twice).
    """
    found: dict[str, tuple[nn.Module, object, dict]] = {}

    def visit(module: nn.Module, name: str) -> None:
        if isinstance(module, SerialLoraAttention):
            return
        match = match_host(module)
        if match is not None and config.targets(name):
            host, streams = match
            if config.streams is not None:
                streams = {s: spec for s, spec in streams.items() if s in config.streams}
            if streams:
                found[name] = (module, host, streams)
                return
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return found


def attach(module: nn.Module, host, streams: dict) -> SerialLoraAttention:
    """The `SerialLoraAttention` of `module`, created (with no adapter yet) if needed."""
    existing = getattr(module, ATTRIBUTE, None)
    if isinstance(existing, SerialLoraAttention):
        return existing
    if existing is not None:
        raise SerialLoraError(f"{type(module).__name__} already has an attribute {ATTRIBUTE!r} that is not Serial LoRA")
    wrapper = SerialLoraAttention(module, host, streams)
    wrapper.train(module.training)
    module.add_module(ATTRIBUTE, wrapper)
    return wrapper


def inject_serial_lora(
    model: nn.Module,
    config: SerialLoraConfig | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
    *,
    freeze: bool = True,
) -> dict[str, SerialLoraAttention]:
    """Add a Serial LoRA adapter to every attention module of `model` that `config` selects.

    Modules are adapted in place (no module is replaced). With `freeze`, every parameter of the
    model except the new adapter's is frozen. Returns attention name -> its `SerialLoraAttention`.
    """
    config = config or SerialLoraConfig()
    if not isinstance(config, SerialLoraConfig):
        raise TypeError(f"config must be a SerialLoraConfig, got {type(config).__name__}")
    _check_adapter_name(adapter_name)
    found = find_attention_modules(model, config)
    if not found:
        raise SerialLoraError(
            f"no attention module of {type(model).__name__} matched "
            f"(target_modules={config.target_modules}, streams={config.streams}); known hosts: "
            f"{[h.name for h in registered_hosts()]}. Check the patterns, or describe the attention "
            "with register_host(AttentionHost(...))."
        )
    for name, (module, _, _) in found.items():
        existing = getattr(module, ATTRIBUTE, None)
        if isinstance(existing, SerialLoraAttention) and adapter_name in existing:
            raise SerialLoraError(f"adapter {adapter_name!r} already exists on {name!r}; use another adapter_name")
    wrapped = {}
    for name, (module, host, streams) in found.items():
        wrapper = attach(module, host, streams)
        wrapper.add_adapter(adapter_name, config, streams)
        wrapped[name] = wrapper
    if freeze:
        model.requires_grad_(False)
        for wrapper in wrapped.values():
            wrapper[adapter_name].requires_grad_(True)
    return wrapped


def serial_lora_modules(model: nn.Module) -> Iterator[tuple[str, SerialLoraAttention]]:
    """(attention name, SerialLoraAttention) for every adapted attention module of `model`."""
    suffix = "." + ATTRIBUTE
    for name, module in model.named_modules():
        if isinstance(module, SerialLoraAttention):
            yield (name[: -len(suffix)] if name.endswith(suffix) else ""), module


def _modules_with(model: nn.Module, adapter_name: str | None) -> list[SerialLoraAttention]:
    modules = [m for _, m in serial_lora_modules(model) if adapter_name is None or adapter_name in m]
    if not modules:
        what = "Serial LoRA adapters" if adapter_name is None else f"a Serial LoRA adapter named {adapter_name!r}"
        raise SerialLoraError(f"{type(model).__name__} has no {what}; call inject_serial_lora() or load_serial_lora() first")
    return modules


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters present in `model`, in the order they were added."""
    names: dict[str, None] = {}
    for _, module in serial_lora_modules(model):
        names.update(dict.fromkeys(module.keys()))
    return list(names)


def adapter_config(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> SerialLoraConfig:
    """The `SerialLoraConfig` adapter `adapter_name` was created with."""
    module = _modules_with(model, adapter_name)[0]
    return next(iter(module[adapter_name].values())).config


def is_merged(model: nn.Module) -> bool:
    return any(m.merged for _, m in serial_lora_modules(model))


def _refuse_if_merged(model: nn.Module, action: str) -> None:
    if is_merged(model):
        raise SerialLoraError(f"cannot {action} while the adapters are merged; call unmerge_serial_lora() first")


def set_serial_lora_scale(model: nn.Module, scale: float, adapter_name: str | None = None) -> None:
    """Set the strength of an adapter (or of all): 0 gives the base model, 1 the trained adapter."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a number, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    _refuse_if_merged(model, "change the scale")
    for module in _modules_with(model, adapter_name):
        for name, adapters in module.items():
            if adapter_name is None or name == adapter_name:
                for adapter in adapters.values():
                    adapter.weight = float(scale)


def enable_serial_lora(model: nn.Module, enabled: bool = True) -> None:
    """Turn every adapter's effect on or off without changing its weights."""
    _refuse_if_merged(model, "enable or disable the adapters")
    for module in _modules_with(model, None):
        module.enabled = bool(enabled)


def disable_serial_lora(model: nn.Module) -> None:
    """Run the base model: the adapters stay loaded but have no effect."""
    enable_serial_lora(model, False)


def merge_serial_lora(model: nn.Module, scale: float = 1.0) -> None:
    """Fold every adapter into its projections: W <- W + scale·s·(W B) A (in float32).

    All-or-nothing: if one projection would become non-finite, nothing stays merged.
    """
    modules = _modules_with(model, None)
    _refuse_if_merged(model, "merge again")
    if not all(module.enabled for module in modules):
        raise SerialLoraError("the adapters are disabled; call enable_serial_lora() before merging them")
    done = []
    try:
        for module in modules:
            module.merge(scale)
            done.append(module)
    except SerialLoraError:
        for module in done:
            module.unmerge()
        raise


def unmerge_serial_lora(model: nn.Module) -> None:
    """Restore the weights saved by `merge_serial_lora`, bit for bit."""
    for _, module in serial_lora_modules(model):
        module.unmerge()


def delete_serial_lora_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one named adapter; attention modules left without adapters are restored."""
    _refuse_if_merged(model, "delete an adapter")
    for module in _modules_with(model, adapter_name):
        module.delete_adapter(adapter_name)
        if not len(module):
            _detach(module)


def _detach(module: SerialLoraAttention) -> None:
    module.remove_hooks()
    delattr(module.attention, ATTRIBUTE)


def remove_serial_lora(model: nn.Module) -> None:
    """Restore the original model: unmerge if merged, then drop every adapter and hook."""
    for _, module in list(serial_lora_modules(model)):
        module.unmerge()
        _detach(module)


def merge_and_unload_serial_lora(model: nn.Module, scale: float = 1.0) -> nn.Module:
    """Merge, then drop the adapters: `model` becomes a plain model of its base architecture.

    If the model is already merged, its merged weights are kept as they are (`scale` is not applied again).
    """
    if not is_merged(model):
        merge_serial_lora(model, scale)
    for _, module in list(serial_lora_modules(model)):
        module.forget_originals()
        _detach(module)
    return model
