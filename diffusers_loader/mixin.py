"""`SerialLoraLoaderMixin` (pipelines) and `SerialLoraTransformerMixin` (models): the user-facing methods.

They mirror diffusers' LoRA methods (`load_lora_weights`, `set_adapters`, `fuse_lora`, ...) with
`serial_lora` in their names, and delegate to `diffusers_loader.transformer`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from serial_lora_core import DEFAULT_ADAPTER, AdapterFile, adapter_names, save_serial_lora, set_serial_lora_scale

from . import transformer as ops
from .fetch import DEFAULT_WEIGHT_NAME


class SerialLoraTransformerMixin:
    """Methods for a diffusers model (e.g. `SD3Transformer2DModel`) used without a pipeline."""

    def load_serial_lora_adapter(self, path_or_repo_id: str | os.PathLike, weight_name: str | None = None,
                                 adapter_name: str | None = None, **hub_kwargs) -> AdapterFile:
        """Load a Serial LoRA file (local file/folder or hub repo id) into this model."""
        return ops.load_into_transformer(self, path_or_repo_id, weight_name, adapter_name, **hub_kwargs)

    def save_serial_lora_adapter(self, save_directory: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER,
                                 weight_name: str = DEFAULT_WEIGHT_NAME, dtype: torch.dtype | None = None) -> Path:
        """Write the adapter to `save_directory/weight_name` (atomically)."""
        self.serial_lora_architecture = ops.architecture_name(self)
        return save_serial_lora(self, Path(save_directory) / weight_name, adapter_name, dtype=dtype)


class SerialLoraLoaderMixin:
    """Serial LoRA methods for pipelines with a `transformer` (SD3 pipelines get them from `install()`)."""

    def _serial_lora_transformer(self):
        return getattr(self, getattr(self, "transformer_name", "transformer"))

    def load_serial_lora_weights(self, path_or_repo_id: str | os.PathLike, weight_name: str | None = None,
                                 adapter_name: str | None = None, **hub_kwargs) -> AdapterFile:
        """Load a Serial LoRA into the transformer: a local .safetensors file, a local folder, or a hub
        repo id (`weight_name` picks the file; hub kwargs such as revision/cache_dir/token pass through).

        Several adapters can be loaded under different `adapter_name`s; a bad file raises
        `SerialLoraFileError` and leaves the pipeline unchanged.
        """
        return ops.load_into_transformer(self._serial_lora_transformer(), path_or_repo_id, weight_name,
                                         adapter_name, **hub_kwargs)

    def save_serial_lora_weights(self, save_directory: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER,
                                 weight_name: str = DEFAULT_WEIGHT_NAME, dtype: torch.dtype | None = None) -> Path:
        """Write the transformer's adapter to `save_directory/weight_name`."""
        return SerialLoraTransformerMixin.save_serial_lora_adapter(self._serial_lora_transformer(), save_directory,
                                                                   adapter_name, weight_name, dtype)

    def set_serial_lora_scale(self, scale: float, adapter_name: str | None = None) -> None:
        """Strength of one adapter (or all) without fusing: 0 is the base model."""
        set_serial_lora_scale(self._serial_lora_transformer(), scale, adapter_name)

    def set_serial_lora_adapters(self, adapter_names_: str | list[str], adapter_weights: float | list[float] | None = None) -> None:
        """Use these adapters with these weights (the others are switched off), like `set_adapters`."""
        ops.set_adapters(self._serial_lora_transformer(), adapter_names_, adapter_weights)

    def get_serial_lora_adapters(self) -> list[str]:
        return adapter_names(self._serial_lora_transformer())

    def fuse_serial_lora(self, scale: float = 1.0) -> None:
        """Fold the active adapters into the transformer's weights (W + scale·s·(W B) A, in float32)."""
        ops.fuse(self._serial_lora_transformer(), scale)

    def unfuse_serial_lora(self) -> None:
        """Restore the weights from before `fuse_serial_lora`, bit for bit."""
        ops.unfuse(self._serial_lora_transformer())

    def unload_serial_lora_weights(self, adapter_name: str | None = None) -> None:
        """Remove one adapter, or all (the transformer's original modules and weights come back)."""
        ops.unload(self._serial_lora_transformer(), adapter_name)
