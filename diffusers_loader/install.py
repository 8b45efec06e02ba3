"""`install()`: give diffusers' SD3 pipelines and transformer the Serial LoRA methods.

`import diffusers_loader` calls it; that import is the opt-in. It adds the methods of
`SerialLoraLoaderMixin` to `SD3LoraLoaderMixin` (so StableDiffusion3Pipeline, its img2img, inpaint
and ControlNet variants get them), those of `SerialLoraTransformerMixin` to `SD3Transformer2DModel`,
and makes diffusers' own `lora_state_dict` refuse a Serial LoRA file with a clear error (otherwise
`load_lora_weights` would warn that it found no LoRA keys and carry on).
"""

from __future__ import annotations

import functools

from serial_lora_core import SerialLoraFileError
from serial_lora_core.format import parse_key

from .mixin import SerialLoraLoaderMixin, SerialLoraTransformerMixin

_INSTALLED = "_serial_lora_installed"


def _methods(mixin: type) -> dict:
    return {name: value for name, value in vars(mixin).items() if callable(value) and not name.startswith("__")}


def _refuse_serial_lora(lora_state_dict):
    @functools.wraps(lora_state_dict.__func__)
    def guarded(cls, *args, **kwargs):
        result = lora_state_dict.__func__(cls, *args, **kwargs)
        state_dict = result[0] if isinstance(result, tuple) else result
        serial = [key for key in state_dict if parse_key(key.removeprefix("transformer.")) is not None]
        if serial:
            raise SerialLoraFileError(
                f"this is a Serial LoRA (e.g. key {serial[0]!r}), not a standard LoRA: load it with "
                "pipe.load_serial_lora_weights(...), or convert it with `serial-lora export-lora`. "
                "The pipeline was not changed."
            )
        return result

    return classmethod(guarded)


def install() -> None:
    """Add the Serial LoRA methods to diffusers' SD3 classes (idempotent)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders import SD3LoraLoaderMixin

    if getattr(SD3LoraLoaderMixin, _INSTALLED, False):
        return
    for name, method in _methods(SerialLoraLoaderMixin).items():
        setattr(SD3LoraLoaderMixin, name, method)
    for name, method in _methods(SerialLoraTransformerMixin).items():
        setattr(SD3Transformer2DModel, name, method)
    SD3LoraLoaderMixin.lora_state_dict = _refuse_serial_lora(SD3LoraLoaderMixin.lora_state_dict)
    setattr(SD3LoraLoaderMixin, _INSTALLED, True)
