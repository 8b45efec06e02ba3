"""Serial LoRA on a diffusers transformer (SD3's `SD3Transformer2DModel`); the pipeline methods call these.

SD3 needs no host of its own: the core's `joint_qkv` host already describes diffusers' `Attention`
(`to_q/to_k/to_v` read the image tokens, `add_q/k/v_proj` the text tokens; `context_pre_only`
blocks and SD3.5's `attn2` simply have the streams they have). diffusers' joint attention
processors (`JointAttnProcessor2_0` and its PAG variants) call those six layers as modules, each
stream's three on one tensor, which is what the core's projection hooks need; the fused
processors (after `fuse_qkv_projections()`) call `to_qkv`/`to_added_qkv` instead and are refused.
"""

from __future__ import annotations

import math
import os

from torch import nn

from serial_lora_core import (
    DEFAULT_ADAPTER,
    AdapterFile,
    SerialLoraAttention,
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
    set_serial_lora_scales,
    unmerge_serial_lora,
)
from serial_lora_core.config import FLOAT32_MAX

from .fetch import resolve_adapter_file

_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def architecture_name(transformer: nn.Module) -> str:
    """e.g. "SD3Transformer2DModel(num_layers=24, width=1536, dual_attention_layers=())"."""
    config = getattr(transformer, "config", None)
    if config is None:
        return type(transformer).__name__
    width = config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0)
    dual = tuple(config.get("dual_attention_layers", ()) or ())
    return f"{type(transformer).__name__}(num_layers={config.get('num_layers')}, width={width}, dual_attention_layers={dual})"


def check_transformer(transformer: nn.Module, action: str = "load a Serial LoRA") -> None:
    """Refuse states in which the q/k/v hooks would be bypassed or the projections are not plain Linears."""
    for name, module in transformer.named_modules():
        processor = getattr(module, "processor", None)
        if processor is not None and type(processor).__name__.startswith("Fused") and hasattr(module, "to_q"):
            raise SerialLoraError(
                f"cannot {action}: {name!r} runs the fused processor {type(processor).__name__} (to_qkv), which "
                "bypasses to_q/to_k/to_v and so the Serial LoRA; call unfuse_qkv_projections() first"
            )
        for projection in _PROJECTIONS:
            layer = getattr(module, projection, None)
            if isinstance(layer, nn.Linear) and layer.weight.is_meta:
                raise SerialLoraError(
                    f"cannot {action}: {name}.{projection} has its weights on the meta device (sequential CPU offload "
                    "or a device_map that offloads them), which Serial LoRA does not support; use "
                    "enable_model_cpu_offload() instead"
                )
            if layer is not None and hasattr(layer, "base_layer"):
                raise SerialLoraError(
                    f"cannot {action}: {name}.{projection} is wrapped by a standard (PEFT) LoRA "
                    f"({type(layer).__module__}.{type(layer).__name__}); unload it first (pipe.unload_lora_weights()) "
                    "or bake it into the weights (pipe.fuse_lora(); pipe.unload_lora_weights()). A standard LoRA "
                    "loaded after the Serial LoRA runs alongside it, unfused."
                )


def _refuse_offloaded_adapters(transformer: nn.Module, _args: tuple) -> None:
    """Forward pre-hook: enable_sequential_cpu_offload() after loading leaves the adapters' weights on the
    meta device, and the adapter reads them directly (not through the modules accelerate hooks), which
    would silently compute with garbage. All adapters are offloaded together, so the first one tells."""
    for module in transformer.modules():
        if isinstance(module, SerialLoraAttention):
            if module.merged or not module.enabled:
                return  # the adapters' weights are not read
            for adapters in module.values():
                for adapter in adapters.values():
                    if adapter.down.weight.is_meta:
                        raise SerialLoraError(
                            "the Serial LoRA weights were offloaded to the meta device by sequential CPU offload "
                            "(enable_sequential_cpu_offload), which Serial LoRA does not support; use "
                            "enable_model_cpu_offload(), or fuse the Serial LoRA before offloading"
                        )
                    return


def _named(transformer: nn.Module) -> nn.Module:
    transformer.serial_lora_architecture = architecture_name(transformer)
    if _refuse_offloaded_adapters not in transformer._forward_pre_hooks.values():
        transformer.register_forward_pre_hook(_refuse_offloaded_adapters)
    return transformer


def _forget(transformer: nn.Module) -> None:
    """Remove what `_named` added once no adapter is left (unload restores the original module)."""
    if has_serial_lora(transformer):
        return
    for key, hook in list(transformer._forward_pre_hooks.items()):
        if hook is _refuse_offloaded_adapters:
            del transformer._forward_pre_hooks[key]
    transformer.__dict__.pop("serial_lora_architecture", None)


def add_serial_lora(transformer: nn.Module, config: SerialLoraConfig | None = None,
                    adapter_name: str = DEFAULT_ADAPTER) -> None:
    """A new trainable adapter on every joint attention (to train it).

    The default config adapts the image stream only (rank 8); pass e.g.
    `SerialLoraConfig(rank=16, streams=("image", "text"))` to adapt the text tokens' add_q/k/v_proj too.
    """
    check_transformer(transformer, "add a Serial LoRA")
    try:
        inject_serial_lora(_named(transformer), config or SerialLoraConfig(streams=("image",)), adapter_name)
    except Exception:
        _forget(transformer)
        raise


def fresh_adapter_name(known: list[str]) -> str:
    """"default", else "default_N" for the first N >= len(known) not in use: never a loaded adapter's name
    (after unloading "default_1" of three, len(known) is 2 and "default_2" is still there)."""
    if DEFAULT_ADAPTER not in known:
        return DEFAULT_ADAPTER
    n = len(known)
    while f"{DEFAULT_ADAPTER}_{n}" in known:
        n += 1
    return f"{DEFAULT_ADAPTER}_{n}"


def load_into_transformer(transformer: nn.Module, path_or_repo_id: str | os.PathLike, weight_name: str | None = None,
                          adapter_name: str | None = None, hotswap: bool = False, **hub_kwargs) -> AdapterFile:
    """Load an adapter file (local file/folder or hub repo id) as `adapter_name` (default: a fresh name).

    An `adapter_name` already in use is refused unless `hotswap=True`, which replaces its weights in place
    (same attention modules, streams and rank) and keeps its scale.
    """
    known = adapter_names(transformer)
    if adapter_name is None:
        adapter_name = fresh_adapter_name(known)
    elif adapter_name in known and not hotswap:
        raise SerialLoraError(f"adapter_name {adapter_name!r} is already loaded ({known}); pick another name, "
                              "unload it first, or pass hotswap=True to replace its weights")
    elif hotswap and adapter_name not in known:
        raise SerialLoraError(f"hotswap=True needs an adapter to replace, but {adapter_name!r} is not loaded ({known})")
    check_transformer(transformer)
    path = resolve_adapter_file(path_or_repo_id, weight_name, **hub_kwargs)
    try:
        return load_serial_lora(_named(transformer), path, adapter_name)
    except Exception:
        _forget(transformer)  # a refused file leaves the transformer exactly as it was
        raise


def _scales(names: list[str], weights: float | list[float] | None) -> list[float]:
    """One finite scale per adapter name from diffusers-style `adapter_weights`, checked before anything is applied."""
    if weights is None:
        weights = [1.0] * len(names)
    elif isinstance(weights, (int, float)) and not isinstance(weights, bool):
        weights = [weights] * len(names)
    elif isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise TypeError(f"adapter_weights must be a number or a list of numbers, got {type(weights).__name__}")
    if len(weights) != len(names):
        raise SerialLoraError(f"got {len(names)} adapter names and {len(weights)} adapter_weights; pass one scale per "
                              "adapter")
    for name, weight in zip(names, weights):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"the scale of adapter {name!r} must be a number, got {type(weight).__name__} ({weight!r})")
        if not math.isfinite(weight) or abs(weight) > FLOAT32_MAX:  # the adapters compute in float32 or narrower
            raise ValueError(f"the scale of adapter {name!r} is {weight!r}; pass a finite number (e.g. 0.0 to 1.0)")
    return [float(w) for w in weights]


def set_adapters(transformer: nn.Module, adapter_names_: str | list[str], weights: float | list[float] | None = None) -> None:
    """Activate these adapters with these scales (diffusers' `set_adapters` and its `adapter_weights`); the others
    get scale 0.

    Everything (names, weights, the fused state) is checked first: a refused call changes nothing.
    """
    if isinstance(adapter_names_, str):
        names = [adapter_names_]
    elif isinstance(adapter_names_, (list, tuple)) and all(isinstance(n, str) for n in adapter_names_):
        names = list(adapter_names_)
    else:
        raise TypeError(f"adapter_names must be a name or a list of names, got {adapter_names_!r}")
    scales = dict(zip(names, _scales(names, weights)))
    known = adapter_names(transformer)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SerialLoraError(f"unknown Serial LoRA adapter(s) {unknown}; loaded: {known}")
    if len(scales) != len(names):
        raise SerialLoraError(f"adapter_names {names} name an adapter twice; pass each adapter once")
    if is_merged(transformer):
        raise SerialLoraError("the Serial LoRA is fused; call unfuse_serial_lora() before changing the adapters' scales")
    set_serial_lora_scales(transformer, {name: scales.get(name, 0.0) for name in known})


def fuse(transformer: nn.Module, scale: float = 1.0) -> None:
    """Fold the adapters (at their current scales m) into the weights: W + scale·sum m·s·(W B) A, s = alpha/r."""
    check_transformer(transformer, "fuse the Serial LoRA")
    merge_serial_lora(transformer, scale)


def unfuse(transformer: nn.Module) -> None:
    """Restore the weights saved by `fuse`, bit for bit."""
    unmerge_serial_lora(transformer)


def unload(transformer: nn.Module, adapter_name: str | None = None) -> None:
    """Remove one adapter, or all of them (restoring the original modules and weights)."""
    if adapter_name is None:
        remove_serial_lora(transformer)
    else:
        delete_serial_lora_adapter(transformer, adapter_name)
    _forget(transformer)


def has_serial_lora(transformer: nn.Module) -> bool:
    """Whether any Serial LoRA adapter is loaded."""
    return next(serial_lora_modules(transformer), None) is not None


__all__ = ["add_serial_lora", "architecture_name", "check_transformer", "fresh_adapter_name", "fuse", "has_serial_lora", "is_merged",
           "load_into_transformer", "set_adapters", "unfuse", "unload"]
