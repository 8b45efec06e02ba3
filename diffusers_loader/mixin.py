"""`SerialLoraLoaderMixin` (pipelines) and `SerialLoraTransformerMixin` (models): the user-facing methods.

They mirror diffusers' LoRA methods (`load_lora_weights`, `set_adapters`, `fuse_lora`, ...) with
`serial_lora` in their names, and delegate to `diffusers_loader.transformer`. `install()` (run by
`import diffusers_loader`) adds them to diffusers' SD3 classes; a pipeline class of your own that
has a `transformer` can inherit `SerialLoraLoaderMixin` instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from serial_lora_core import (
    DEFAULT_ADAPTER,
    AdapterFile,
    adapter_names,
    disable_serial_lora,
    enable_serial_lora,
    save_serial_lora,
    set_serial_lora_scale,
)

from . import transformer as ops
from .fetch import DEFAULT_WEIGHT_NAME


def _name_or_path(obj) -> str | None:
    config = getattr(obj, "config", None)
    name = config.get("_name_or_path") if hasattr(config, "get") else None
    return name or None


class SerialLoraTransformerMixin:
    """Methods for a diffusers model (e.g. `SD3Transformer2DModel`) used without a pipeline."""

    def load_serial_lora_adapter(self, path_or_repo_id: str | os.PathLike, weight_name: str | None = None,
                                 adapter_name: str | None = None, hotswap: bool = False, **hub_kwargs) -> AdapterFile:
        """Load a Serial LoRA file (local file/folder or hub repo id) into this model; see
        `SerialLoraLoaderMixin.load_serial_lora_weights`."""
        return ops.load_into_transformer(self, path_or_repo_id, weight_name, adapter_name, hotswap, **hub_kwargs)

    def save_serial_lora_adapter(self, save_directory: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER,
                                 weight_name: str = DEFAULT_WEIGHT_NAME, dtype: torch.dtype | None = None,
                                 base_model: str | None = None) -> Path:
        """Write the adapter to `save_directory/weight_name` (atomically), recording this architecture and
        `base_model` (default: the model's `_name_or_path`, if it was loaded with from_pretrained)."""
        self.serial_lora_architecture = ops.architecture_name(self)
        return save_serial_lora(self, Path(save_directory) / weight_name, adapter_name, dtype=dtype,
                                base_model=base_model or _name_or_path(self))


class SerialLoraLoaderMixin:
    """Serial LoRA methods for pipelines with a `transformer` (SD3 pipelines get them from `install()`).

    Loading a file: `load_serial_lora_weights(path_or_repo_id, weight_name=None, adapter_name=None)`;
    the user's scale (0 = base model, 1 = trained): `set_serial_lora_scale` / `set_serial_lora_adapters`; `fuse_serial_lora` / `unfuse_serial_lora`
    (bit-exact); `unload_serial_lora_weights`; `save_serial_lora_weights`. Exact export to a standard
    LoRA for stock diffusers: `diffusers_loader.export_to_lora(pipe, path)`.
    """

    def _serial_lora_transformer(self):
        return getattr(self, getattr(self, "transformer_name", "transformer"))

    def load_serial_lora_weights(self, path_or_repo_id: str | os.PathLike, weight_name: str | None = None,
                                 adapter_name: str | None = None, hotswap: bool = False, **hub_kwargs) -> AdapterFile:
        """Load a Serial LoRA into the transformer.

        Args:
            path_or_repo_id: a local .safetensors file, a local folder, or a hub repo id (downloaded and
                cached by huggingface_hub).
            weight_name: the file inside the folder or repo (default `serial_lora_weights.safetensors`).
            adapter_name: name for `set_serial_lora_adapters` (default "default", then "default_1", ...; a
                generated name is never one in use).
            hotswap: replace the weights of the already loaded `adapter_name` in place.
            hub_kwargs: subfolder, revision, cache_dir, token, local_files_only, force_download, ...

        A bad file raises `SerialLoraFileError` (naming the key and shapes) and leaves the pipeline unchanged.
        Returns the validated file (rank, alpha, streams, metadata).
        """
        return ops.load_into_transformer(self._serial_lora_transformer(), path_or_repo_id, weight_name,
                                         adapter_name, hotswap, **hub_kwargs)

    def save_serial_lora_weights(self, save_directory: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER,
                                 weight_name: str = DEFAULT_WEIGHT_NAME, dtype: torch.dtype | None = None,
                                 base_model: str | None = None) -> Path:
        """Write the transformer's adapter to `save_directory/weight_name` (default base_model: the
        pipeline's `_name_or_path`)."""
        return SerialLoraTransformerMixin.save_serial_lora_adapter(
            self._serial_lora_transformer(), save_directory, adapter_name, weight_name, dtype,
            base_model or _name_or_path(self))

    def set_serial_lora_scale(self, scale: float, adapter_name: str | None = None) -> None:
        """Scale of one adapter (or all) without fusing: 0 is the base model, 1 the trained adapter."""
        set_serial_lora_scale(self._serial_lora_transformer(), scale, adapter_name)

    def set_serial_lora_adapters(self, adapter_names: str | list[str],
                                 adapter_weights: float | list[float] | None = None) -> None:
        """Use these adapters at these scales (`adapter_weights`; the others are switched off), like diffusers'
        `set_adapters`."""
        ops.set_adapters(self._serial_lora_transformer(), adapter_names, adapter_weights)

    def get_serial_lora_adapters(self) -> list[str]:
        """Names of the loaded Serial LoRA adapters, in loading order."""
        return adapter_names(self._serial_lora_transformer())

    def enable_serial_lora(self) -> None:
        """Apply the loaded adapters again after `disable_serial_lora`."""
        enable_serial_lora(self._serial_lora_transformer())

    def disable_serial_lora(self) -> None:
        """Run the base model while keeping the adapters loaded."""
        disable_serial_lora(self._serial_lora_transformer())

    def fuse_serial_lora(self, scale: float = 1.0) -> None:
        """Fold the adapters, at their current scales m, into the transformer's weights
        (W + scale·sum m·s·(W B) A with s = alpha/r, computed in float32)."""
        ops.fuse(self._serial_lora_transformer(), scale)

    def unfuse_serial_lora(self) -> None:
        """Restore the weights from before `fuse_serial_lora`, bit for bit (also in fp16/bf16)."""
        ops.unfuse(self._serial_lora_transformer())

    def unload_serial_lora_weights(self, adapter_name: str | None = None) -> None:
        """Remove one adapter, or all (the transformer's original modules, weights and state-dict keys come back)."""
        ops.unload(self._serial_lora_transformer(), adapter_name)
