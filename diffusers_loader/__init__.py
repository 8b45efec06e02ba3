"""Serial LoRA for diffusers' Stable Diffusion 3 pipelines.

    import diffusers_loader            # the import is the opt-in: it calls install()
    pipe = StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3-medium-diffusers")
    pipe.load_serial_lora_weights("user/repo", weight_name="serial_lora_weights.safetensors", adapter_name="style")
    pipe.set_serial_lora_scale(0.8)                  # scale without fusing (0 = base model, 1 = trained)
    pipe.set_serial_lora_adapters(["style", "subject"], [1.0, 0.5])
    pipe.fuse_serial_lora(); pipe.unfuse_serial_lora()   # unfuse restores the weights bit for bit
    pipe.unload_serial_lora_weights()
    export_to_lora(pipe, "lora.safetensors")         # exact standard LoRA for stock load_lora_weights (the
                                                     # only adapter, or the active ones combined)

The import is the opt-in: it adds the `SerialLoraLoaderMixin` methods to diffusers' `SD3LoraLoaderMixin`
(so every SD3 pipeline: text-to-image, img2img, inpaint, ControlNet, PAG), the
`SerialLoraTransformerMixin` methods to `SD3Transformer2DModel`, and makes the stock
`load_lora_weights`/`lora_state_dict` refuse a Serial LoRA file with a clear error. Nothing else of
diffusers changes. Your own pipeline class can inherit `SerialLoraLoaderMixin` instead.

Without a pipeline: `transformer.load_serial_lora_adapter(path)`, `transformer.save_serial_lora_adapter(dir)`,
and the functions of `diffusers_loader.transformer` (e.g. `add_serial_lora(transformer, config)` to train,
then `serial_lora_core.loraplus_param_groups`). Limits: the fused q/k/v processors of
`fuse_qkv_projections()` and weights on the meta device (sequential CPU offload) are refused; a standard
LoRA loaded after a Serial LoRA runs alongside it, but the Serial LoRA cannot be fused until it is unloaded.
"""

from .export import export_to_lora
from .fetch import DEFAULT_WEIGHT_NAME, HUB_KWARGS, resolve_adapter_file
from .install import install
from .mixin import SerialLoraLoaderMixin, SerialLoraTransformerMixin
from .transformer import add_serial_lora, architecture_name

install()

__all__ = [
    "DEFAULT_WEIGHT_NAME",
    "HUB_KWARGS",
    "SerialLoraLoaderMixin",
    "SerialLoraTransformerMixin",
    "add_serial_lora",
    "architecture_name",
    "export_to_lora",
    "install",
    "resolve_adapter_file",
]
