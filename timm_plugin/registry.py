"""The glue with timm's model registry: the `.serial_lora` pretrained tag. The only module that touches it.

timm has no plugin mechanism, and `create_model("<arch>.<tag>")` raises "Invalid pretrained tag" for
a tag it does not know, even with `pretrained=False`. So for each supported architecture this module
edits the same registry tables that timm's own `@register_model` fills (timm/models/_registry.py):

- `_model_pretrained_cfgs["<arch>.serial_lora"]`: a copy of the architecture's default
  `PretrainedCfg` (same hub id / url / input size), so `pretrained=True` loads the base weights
  through timm's own loader, and `pretrained_cfg_overlay=dict(file=...)` works as for any model.
- `_model_with_tags[arch]` and the architecture's `DefaultCfg` (appended last, so the tag never
  becomes the default), and `_model_has_pretrained` when the base has weights: the tag then shows in
  `timm.list_pretrained("*.serial_lora")` and `timm.list_models("*.serial_lora", include_tags=True)`.
- `_model_entrypoints[arch]`: the entry point, wrapped. `create_model` passes the tag on as
  `pretrained_cfg="serial_lora"`; only then does the wrapper pop the `serial_lora_*` arguments,
  build the model with the original entry point and add Serial LoRA. Any other call goes to the
  original entry point unchanged.
- `_model_entrypoints[<deprecated name>]` of those architectures: timm's deprecation shims call the
  unwrapped function, so "<old name>.serial_lora" would silently build a model without adapters;
  the wrapped shim refuses the tag and names the current architecture instead.
- `timm.models._builder.get_pretrained_cfg`, where timm resolves a tag while building a model: wrapped
  so that "<arch>.serial_lora" of an architecture without the tag (e.g. "resnet18.serial_lora") says
  which families have it and why this one has not, instead of timm's bare "Invalid pretrained tag".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import torch
from timm.models import _builder as timm_builder
from timm.models import _registry as timm_registry
from timm.models._pretrained import PretrainedCfg

from .factory import PREFIX, SerialLoraOptions, make_serial_lora, warn_if_base_not_loaded

TAG = "serial_lora"

FAMILIES = ("vision_transformer", "deit", "vision_transformer_sam", "eva", "beit")
"""timm model modules whose architectures get the tag."""

UNSUPPORTED = frozenset({
    # ParallelScalingBlock / DiffParallelScalingBlock: q, k and v share one `in_proj` Linear with the
    # MLP's fc1, so no layer reads the attention input for q/k/v alone (checked against timm 1.0.31
    # by tests/test_timm_plugin.py, which builds every architecture of FAMILIES on the meta device).
    "vit_base_patch16_xp_224",
    "vit_large_patch14_xp_224",
    "vit_huge_patch14_xp_224",
    "vit_pwee_patch16_reg1_gap_256",
    "vit_dpwee_patch16_reg1_gap_256",
})

_BASE_ENTRYPOINT = "serial_lora_base_entrypoint"


def requests_serial_lora(pretrained_cfg: Any) -> bool:
    """Whether an entry point's `pretrained_cfg` argument is the `.serial_lora` tag (or its resolved cfg)."""
    if isinstance(pretrained_cfg, str):
        return pretrained_cfg == TAG
    if isinstance(pretrained_cfg, PretrainedCfg):
        return pretrained_cfg.tag == TAG
    if isinstance(pretrained_cfg, dict):
        return pretrained_cfg.get("tag") == TAG
    return False


def _wrap(architecture: str, entrypoint: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(entrypoint)
    def serial_lora_entrypoint(pretrained: bool = False, **kwargs: Any):
        if not requests_serial_lora(kwargs.get("pretrained_cfg")):
            stray = sorted(k for k in kwargs if k.startswith(PREFIX))
            if stray:
                # The model class would reject them anyway; say why.
                raise TypeError(f"{stray} need the Serial LoRA tag: create '{architecture}.{TAG}' instead of "
                                f"'{architecture}'")
            return entrypoint(pretrained=pretrained, **kwargs)
        options = SerialLoraOptions.pop_from(kwargs)
        warn_if_base_not_loaded(architecture, pretrained, options)
        model = entrypoint(pretrained=pretrained, **kwargs)
        return make_serial_lora(model, architecture, options)

    setattr(serial_lora_entrypoint, _BASE_ENTRYPOINT, entrypoint)
    return serial_lora_entrypoint


def _refuse_tag_on_deprecated(deprecated: str, current: str, shim: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(shim)
    def deprecated_entrypoint(pretrained: bool = False, **kwargs: Any):
        if requests_serial_lora(kwargs.get("pretrained_cfg")):
            raise ValueError(f"'{deprecated}' is a deprecated timm name of '{current}'; create "
                             f"'{timm_registry.get_arch_name(current)}.{TAG}' instead")
        return shim(pretrained=pretrained, **kwargs)

    setattr(deprecated_entrypoint, _BASE_ENTRYPOINT, shim)
    return deprecated_entrypoint


def base_entrypoint(architecture: str) -> Callable[..., Any]:
    """timm's original entry point of `architecture` (unwrapped)."""
    entrypoint = timm_registry.model_entrypoint(architecture)
    return getattr(entrypoint, _BASE_ENTRYPOINT, entrypoint)


def _register(architecture: str) -> None:
    entrypoints = timm_registry._model_entrypoints
    if not hasattr(entrypoints[architecture], _BASE_ENTRYPOINT):  # idempotent on re-import / reload
        entrypoints[architecture] = _wrap(architecture, entrypoints[architecture])

    name = f"{architecture}.{TAG}"
    if name in timm_registry._model_pretrained_cfgs:
        return
    # The tagless entry is the architecture's default cfg (its first tag), already completed by
    # timm (architecture, full hf_hub_id).
    default = timm_registry._model_pretrained_cfgs.get(architecture) or PretrainedCfg(architecture=architecture)
    cfg = dataclasses.replace(default, tag=TAG)
    timm_registry._model_pretrained_cfgs[name] = cfg
    timm_registry._model_with_tags[architecture].append(name)
    if cfg.has_weights:
        timm_registry._model_has_pretrained.add(name)
    arch_cfgs = timm_registry._model_default_cfgs.get(architecture)
    if arch_cfgs is not None and TAG not in arch_cfgs.cfgs:
        arch_cfgs.tags.append(TAG)
        arch_cfgs.cfgs[TAG] = cfg


def _attention_classes(architecture: str) -> list[str]:
    """Class names of the attention-like modules of `architecture` (built on the meta device: no memory, no weights)."""
    with torch.device("meta"):
        model = base_entrypoint(architecture)(pretrained=False)
    return sorted({type(m).__name__ for m in model.modules() if "attention" in type(m).__name__.lower()
                   or type(m).__name__.lower().endswith("attn")})


def missing_tag_message(architecture: str) -> str:
    """Why `<architecture>.serial_lora` does not exist, and where the tag does."""
    module = timm_registry._model_to_module.get(architecture, "?")
    if architecture in UNSUPPORTED:
        why = ("its blocks compute q, k and v in one Linear together with the MLP (a parallel block), so no layer "
               "reads the attention input alone")
    else:
        try:
            attention: list[str] | None = _attention_classes(architecture)
        except Exception:  # noqa: BLE001  (it only words the message; the answer stays "no tag")
            attention = None  # an entry point that cannot build on the meta device
        if attention == []:
            why = "it has no attention layers for Serial LoRA to adapt"
        else:
            found = f" ({', '.join(attention)})" if attention else ""
            why = f"its attention{found} is not among those Serial LoRA is registered for"
    tagged = serial_lora_architectures()
    return (f"{architecture!r} (timm module {module!r}) has no '.{TAG}' tag: {why}. The tag exists for the "
            f"vision transformers of timm's {', '.join(FAMILIES)} modules ({len(tagged)} architectures, e.g. "
            f"'vit_base_patch16_clip_224.{TAG}'); list them with timm.list_models('*.{TAG}', include_tags=True).")


def _explain_missing_tag(get_pretrained_cfg: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(get_pretrained_cfg)
    def serial_lora_get_pretrained_cfg(model_name: str, *args: Any, **kwargs: Any):
        architecture, tag = timm_registry.split_model_name_tag(model_name)
        if tag == TAG and model_name not in timm_registry._model_pretrained_cfgs:
            raise ValueError(missing_tag_message(architecture))
        return get_pretrained_cfg(model_name, *args, **kwargs)

    setattr(serial_lora_get_pretrained_cfg, _BASE_ENTRYPOINT, get_pretrained_cfg)
    return serial_lora_get_pretrained_cfg


def register_serial_lora_models(families: Iterable[str] = FAMILIES) -> tuple[str, ...]:
    """Register `<arch>.serial_lora` for every supported architecture of `families`; return the architectures."""
    architectures = []
    for family in families:
        for architecture in timm_registry.list_models(module=family):
            if architecture not in UNSUPPORTED:
                _register(architecture)
                architectures.append(architecture)
    entrypoints = timm_registry._model_entrypoints
    for deprecated, current in timm_registry._deprecated_models.items():
        if current and timm_registry.get_arch_name(current) in architectures:
            if not hasattr(entrypoints[deprecated], _BASE_ENTRYPOINT):
                entrypoints[deprecated] = _refuse_tag_on_deprecated(deprecated, current, entrypoints[deprecated])
    if not hasattr(timm_builder.get_pretrained_cfg, _BASE_ENTRYPOINT):
        timm_builder.get_pretrained_cfg = _explain_missing_tag(timm_builder.get_pretrained_cfg)
    return tuple(architectures)


def serial_lora_architectures() -> list[str]:
    """Every architecture with the `.serial_lora` tag, sorted as timm sorts names."""
    return [timm_registry.get_arch_name(n) for n in timm_registry.list_models(f"*.{TAG}", include_tags=True)]
