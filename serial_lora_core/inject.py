"""Model-level operations: inject, find, scale, enable, merge, unmerge and remove Serial LoRA."""

from __future__ import annotations

import itertools
from typing import Iterator, Mapping

from torch import nn

from .attention import ATTRIBUTE, SerialLoraAttention, check_adapter_name, check_untied
from .config import SerialLoraConfig, check_scale
from .errors import SerialLoraError
from .hosts import get_submodule, match_host, registered_hosts

DEFAULT_ADAPTER = "default"


# Wrappers that hold the model as a child: (class name, attribute). torch.compile's OptimizedModule,
# DataParallel and DistributedDataParallel (also what accelerate's `prepare` returns), FSDP (1),
# DeepSpeed's engine (accelerate with DeepSpeed). FSDP2's `fully_shard` works in place: nothing to unwrap.
_WRAPPERS = {
    "OptimizedModule": "_orig_mod",
    "DataParallel": "module",
    "DistributedDataParallel": "module",
    "FullyShardedDataParallel": "_fsdp_wrapped_module",
    "DeepSpeedEngine": "module",
}
# What wrappers put INSIDE a model's module paths: a compiled block (`_orig_mod`), FSDP's nested units
# (an auto-wrap policy wraps every block: `_fsdp_wrapped_module`), activation checkpointing's wrapper.
_INNER_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def plain_module_path(name: str) -> str:
    """`name` as the plain model names it: without the segments wrappers insert inside the model, so
    files written from a model with compiled or FSDP-wrapped blocks load into the plain model."""
    return ".".join(segment for segment in name.split(".") if segment not in _INNER_WRAPPER_SEGMENTS)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside the wrappers compilation and distributed training put around it.

    Unwraps `torch.compile`, `nn.DataParallel`, `DistributedDataParallel`, FSDP and DeepSpeed's engine
    (nested in any order), so that files record the plain model's keys and architecture and load into
    it. A model that is not wrapped is returned as it is.
    """
    for _ in range(16):  # a bound, in case a wrapper ever contains itself
        attribute = next((a for cls in type(model).__mro__ for n, a in _WRAPPERS.items() if cls.__name__ == n), None)
        inner = getattr(model, attribute, None) if attribute else None
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def _wraps_a_linear(layer: nn.Module | None) -> bool:
    return layer is not None and isinstance(layer._modules.get("base_layer"), nn.Linear)


def find_wrapped_projections(model: nn.Module) -> list[str]:
    """q/k/v projections of attention modules that another adapter library has wrapped.

    PEFT's LoRA layers (and others following its convention) replace an `nn.Linear` by a module keeping
    the original as `base_layer`. Such an attention is no longer recognised by its host, so injecting
    would silently skip it. Returns the wrapped projections' names.
    """
    if not any(_wraps_a_linear(m) for m in model.modules()):
        return []
    found = []
    for name, module in model.named_modules():
        for host in registered_hosts():
            if not host.accepts(module):
                continue
            for spec in host.streams.values():
                layers = {path: get_submodule(module, path) for path in spec.projections}
                wrapped = [path for path, layer in layers.items() if _wraps_a_linear(layer)]
                if wrapped and all(isinstance(layers[p], nn.Linear) for p in layers if p not in wrapped):
                    found.extend(f"{name}.{path}" if name else path for path in wrapped)
    return list(dict.fromkeys(found))


def _check_projections_not_shared(found: dict[str, tuple[nn.Module, object, dict]]) -> None:
    """Refuse one projection layer shared by two attention modules or two streams: its pre-hook can
    apply only one stream's adapters."""
    owners: dict[int, tuple[str, str, str]] = {}  # id(layer) -> (attention, stream, its name)
    for name, (module, _, streams) in found.items():
        for stream, spec in streams.items():
            for path in spec.projections:
                layer = get_submodule(module, path)
                where = f"{name}.{path}" if name else path
                other = owners.setdefault(id(layer), (name, stream, where))
                if other[:2] != (name, stream):
                    raise SerialLoraError(
                        f"{where!r} is the same layer as {other[2]!r}: one nn.Linear shared by two attention modules "
                        "or streams cannot carry a separate Serial LoRA for each; give each attention its own layer "
                        "(the model was not changed)"
                    )


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
    check_adapter_name(adapter_name)
    wrapped_projections = find_wrapped_projections(model)
    if wrapped_projections:
        raise SerialLoraError(
            f"cannot inject Serial LoRA: {len(wrapped_projections)} attention projection(s) are wrapped by another "
            f"adapter (PEFT LoRA), e.g. {wrapped_projections[:4]}; those attention modules would be silently skipped. "
            "Merge the PEFT LoRA into the weights first (peft_model.merge_and_unload()), or inject Serial LoRA "
            "before adding the PEFT LoRA. The model was not changed."
        )
    found = find_attention_modules(model, config)
    if not found:
        raise SerialLoraError(
            f"no attention module of {type(model).__name__} matched "
            f"(target_modules={config.target_modules}, streams={config.streams}); known hosts: "
            f"{[h.name for h in registered_hosts()]}. Check the patterns, or describe the attention "
            "with register_host(AttentionHost(...))."
        )
    _check_projections_not_shared(found)
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
            yield plain_module_path(name[: -len(suffix)] if name.endswith(suffix) else ""), module


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
    """Set the scale (the user's knob) of an adapter (or of all): 0 gives the base model, 1 the trained adapter.

    Refused before anything changes if `scale` is not finite or, times an adapter's scaling (alpha/r),
    lies beyond float32 (the adapters compute in float32 at least).
    """
    set_serial_lora_scales(model, {adapter_name: scale})


def set_serial_lora_scales(model: nn.Module, scales: Mapping[str | None, float]) -> None:
    """Set several adapters' scales at once ({adapter_name: scale}; the name None means every adapter).

    All-or-nothing, as diffusers' `set_adapters` needs: every scale, and every scale times its adapter's
    scaling, is checked before any adapter changes.
    """
    checked = {name: check_scale(scale, "scale") for name, scale in scales.items()}
    _refuse_if_merged(model, "change the scale")
    plan = []
    for adapter_name, scale in checked.items():
        for module in _modules_with(model, adapter_name):
            for name, adapters in module.items():
                if adapter_name is None or name == adapter_name:
                    plan.extend((adapter, scale) for adapter in adapters.values())
    for adapter, scale in plan:
        check_scale(scale * adapter.scaling, f"scale={scale!r} times the adapter's scaling {adapter.scaling:g}")
    for adapter, scale in plan:
        adapter.scale = scale


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

    All-or-nothing: if one projection would become non-finite, or anything else fails (e.g. out of
    memory), every weight already written is restored and nothing stays merged. Weights shared by
    two adapted attention modules, or by a projection and any other tensor of the model (tied weights),
    are refused, since both would see the change.
    """
    scale = check_scale(scale, "scale")
    _modules_with(model, None)
    modules = {module: name for name, module in serial_lora_modules(model)}
    _refuse_if_merged(model, "merge again")
    if not all(module.enabled for module in modules):
        raise SerialLoraError("the adapters are disabled; call enable_serial_lora() before merging them")
    adapted = [(f"{name}.{path}" if name else path, (name, stream), weight)
               for module, name in modules.items() for stream, path, weight in module.adapted_projections()]
    weights = {f"{path}.weight" for path, _, _ in adapted}
    tensors = [(plain_module_path(name), tensor) for name, tensor in
               itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))]
    # A projection that is a view of a parameter registered under another name (nn.MultiheadAttention's
    # packed `in_proj_weight`) has that parameter as its weight, not as a second user of it.
    registered_names = {name for name, _ in tensors}
    views = {id(weight) for path, _, weight in adapted if f"{path}.weight" not in registered_names}
    check_untied(adapted, [(name, tensor) for name, tensor in tensors if name not in weights and id(tensor) not in views])
    done = []
    try:
        for module in modules:
            module.merge(scale)
            done.append(module)
    except BaseException:
        for module in reversed(done):
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
