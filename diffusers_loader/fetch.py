"""Find the adapter file for `load_serial_lora_weights`: a local file, a local folder, or a hub repo."""

from __future__ import annotations

import os
from pathlib import Path

from serial_lora_core import SerialLoraFileError
from serial_lora_core.export import is_hub_repo_id

DEFAULT_WEIGHT_NAME = "serial_lora_weights.safetensors"
HUB_KWARGS = ("revision", "cache_dir", "force_download", "token", "local_files_only", "user_agent", "repo_type")
"""Keyword arguments passed on to `huggingface_hub.hf_hub_download` (as diffusers' loaders accept them)."""


def resolve_adapter_file(
    path_or_repo_id: str | os.PathLike,
    weight_name: str | None = None,
    subfolder: str | None = None,
    **hub_kwargs,
) -> str:
    """The local path of an adapter file.

    A folder uses `weight_name` (default `serial_lora_weights.safetensors`, else its only .safetensors
    file). Anything that is not a local path is a hub repo id, downloaded and cached by
    huggingface_hub (`hub_kwargs`: revision, cache_dir, token, local_files_only, ...; HF_HUB_OFFLINE
    and HF_HUB_CACHE apply as everywhere in huggingface_hub).
    """
    unknown = sorted(set(hub_kwargs) - set(HUB_KWARGS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown} for loading a Serial LoRA; accepted: "
                        f"weight_name, subfolder, adapter_name, hotswap, {', '.join(HUB_KWARGS)}")
    if not isinstance(path_or_repo_id, (str, os.PathLike)):
        raise TypeError(f"path_or_repo_id must be a path or a hub repo id, got {type(path_or_repo_id).__name__}")
    path = Path(path_or_repo_id)
    if subfolder:
        path = path / subfolder
    if path.is_file():
        return str(path)
    if path.is_dir():
        if weight_name:
            candidate = path / weight_name
            if not candidate.is_file():
                raise SerialLoraFileError(f"{str(path)!r} has no {weight_name!r}")
            return str(candidate)
        if (path / DEFAULT_WEIGHT_NAME).is_file():
            return str(path / DEFAULT_WEIGHT_NAME)
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise SerialLoraFileError(f"{str(path)!r} holds {len(files)} .safetensors files and no "
                                      f"{DEFAULT_WEIGHT_NAME!r}; pass weight_name= to pick one")
        return str(files[0])
    repo_id = str(path_or_repo_id)
    if not is_hub_repo_id(repo_id):
        raise SerialLoraFileError(f"{repo_id!r} is neither an existing local file or folder nor a hub repo id "
                                  "('user/name')")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, weight_name or DEFAULT_WEIGHT_NAME, subfolder=subfolder, **hub_kwargs)
