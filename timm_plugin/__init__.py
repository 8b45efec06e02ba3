"""Serial LoRA for timm's vision transformers, through `timm.create_model` itself.

Importing this package registers the `.serial_lora` pretrained tag for every architecture of
timm's `vision_transformer` (incl. CLIP/SigLIP ViTs), `deit`, `vision_transformer_sam`, `eva` and
`beit` modules whose attention the core can adapt (`SERIAL_LORA_ARCHITECTURES`):

    import timm, timm_plugin
    from serial_lora_core import save_serial_lora, merge_and_unload_serial_lora

    model = timm.create_model("vit_base_patch16_clip_224.serial_lora", pretrained=True, num_classes=10,
                              serial_lora_rank=8)     # base weights as for the plain architecture
    ...                                              # train: only adapters and the new head are trainable
    save_serial_lora(model, "adapter.safetensors", modules_to_save=("head",))   # + the new head
    model = timm.create_model("vit_base_patch16_clip_224.serial_lora", pretrained=True, num_classes=10,
                              serial_lora_weights="adapter.safetensors")   # base + adapter + head
    merge_and_unload_serial_lora(model)               # a plain vit_base_patch16_clip_224 again

Keyword arguments: `serial_lora_rank` (8), `serial_lora_alpha` (= rank), `serial_lora_dropout` (0),
`serial_lora_rslora` (False), `serial_lora_weights` (file to load), `serial_lora_target_modules`
(regex on attention names), plus every timm argument (`pretrained_cfg_overlay=dict(file=...)` loads
local base weights). List the tagged models with `timm.list_pretrained("*.serial_lora")` (those with
base weights) or `timm.list_models("*.serial_lora", include_tags=True)` (all).
"""

from .factory import SerialLoraOptions, make_serial_lora
from .hosts import FUNCTIONAL_QKV, computes_qkv_functionally, register_timm_hosts, unsupported_attention
from .registry import (
    FAMILIES,
    TAG,
    UNSUPPORTED,
    base_entrypoint,
    register_serial_lora_models,
    requests_serial_lora,
    serial_lora_architectures,
)

register_timm_hosts()
SERIAL_LORA_ARCHITECTURES: tuple[str, ...] = register_serial_lora_models()

__all__ = [
    "FAMILIES",
    "FUNCTIONAL_QKV",
    "SERIAL_LORA_ARCHITECTURES",
    "SerialLoraOptions",
    "TAG",
    "UNSUPPORTED",
    "base_entrypoint",
    "computes_qkv_functionally",
    "make_serial_lora",
    "register_serial_lora_models",
    "register_timm_hosts",
    "requests_serial_lora",
    "serial_lora_architectures",
    "unsupported_attention",
]
