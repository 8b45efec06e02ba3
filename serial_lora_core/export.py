"""Exact export of a Serial LoRA to a standard (PEFT/diffusers-format) LoRA.

W + s·(W B) A is a plain rank-r LoRA per projection: down = A, up = s·W B. The exported file
is 4x larger (q, k, v each get their own up; fused qkv gets one 3d x r up) and is exact only
for the base weights W it was computed against.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from torch import nn

from .errors import SerialLoraError, SerialLoraFileError
from .format import AdapterFile
from .inject import DEFAULT_ADAPTER, is_merged, serial_lora_modules

WeightLookup = Callable[[str], torch.Tensor]


def equivalent_lora(
    adapter: AdapterFile,
    base_weight: WeightLookup | Mapping[str, torch.Tensor],
    scale: float = 1.0,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """projection path -> (down = A, up = scale·s·W B), computed in float32.

    `base_weight(name)` (or a mapping) gives the base weight `<attention>.<projection>.weight`.
    """
    lookup = base_weight.__getitem__ if isinstance(base_weight, Mapping) else base_weight
    streams = adapter.streams
    pairs = {}
    for (attention, stream), pair in adapter.weights.items():
        for projection in streams[stream]:
            path = f"{attention}.{projection}" if attention else projection
            try:
                weight = lookup(f"{path}.weight")
            except KeyError:
                raise SerialLoraError(f"the base weights have no {path + '.weight'!r}, needed to export "
                                      f"{attention!r} stream {stream!r}; pass the base model the adapter was trained on") from None
            if weight.dim() != 2 or weight.shape[1] != pair.down.shape[1]:
                raise SerialLoraError(f"base weight {path + '.weight'!r} has shape {tuple(weight.shape)}, but the adapter "
                                      f"expects in_features {pair.down.shape[1]}; pass the matching base model")
            up = (scale * adapter.scale) * (weight.float() @ pair.up.float())
            pairs[path] = (pair.down.float(), up)
    return pairs


def model_equivalent_lora(
    model: nn.Module, adapter_name: str = DEFAULT_ADAPTER, scale: float = 1.0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Like `equivalent_lora`, from an adapted model: projection path -> (A, scale·s·w·W B).

    Uses the adapter's current strength `w`; the model must not be merged (W must be the base weight).
    """
    if is_merged(model):
        raise SerialLoraError("the model is merged; call unmerge_serial_lora() first so W is the base weight")
    pairs = {}
    for attention, module in serial_lora_modules(model):
        if adapter_name not in module:
            continue
        for stream, adapter in module[adapter_name].items():
            for projection in module.stream_specs[stream].projections:
                weight = module.projection(projection).weight.detach().float()
                up = (scale * adapter.scale * adapter.weight) * (weight @ adapter.up.weight.detach().float().to(weight.device))
                pairs[f"{attention}.{projection}" if attention else projection] = (adapter.down.weight.detach().float(), up)
    if not pairs:
        raise SerialLoraError(f"{type(model).__name__} has no Serial LoRA adapter named {adapter_name!r} to export")
    return pairs


def save_standard_lora(
    pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    path: str | os.PathLike,
    prefix: str = "",
    dtype: torch.dtype = torch.float32,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write PEFT-format keys `<prefix><projection>.lora_A.weight` / `.lora_B.weight` atomically.

    The scale is already inside `lora_B`, so rank = alpha (a LoRA scale of exactly 1). Besides
    `lora_rank`/`lora_alpha`, the metadata holds diffusers' `lora_adapter_metadata` (the LoraConfig
    fields r, lora_alpha and target_modules under `<prefix>`), which diffusers' loaders use instead
    of guessing the config from the tensors.
    """
    if not pairs:
        raise SerialLoraError("nothing to export")
    rank = next(iter(pairs.values()))[0].shape[0]
    tensors = {}
    for projection, (down, up) in pairs.items():
        # Cloned: q, k and v of one stream share the same A, and safetensors refuses shared memory.
        tensors[f"{prefix}{projection}.lora_A.weight"] = down.to(dtype).contiguous().cpu().clone()
        tensors[f"{prefix}{projection}.lora_B.weight"] = up.to(dtype).contiguous().cpu().clone()
    peft_config = {"r": rank, "lora_alpha": rank, "target_modules": sorted(pairs)}
    meta = {"format": "pt", "lora_rank": str(rank), "lora_alpha": str(rank), "exported_from": "serial_lora",
            "lora_adapter_metadata": json.dumps({f"{prefix}{k}": v for k, v in peft_config.items()}, sort_keys=True)}
    meta.update(metadata or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _safetensors_files(folder: Path) -> list[Path]:
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    return sorted(folder.glob("*.safetensors"))


def open_base_weights(source: str | os.PathLike, subfolder: str | None = None) -> WeightLookup:
    """A lookup of base weights by name, from a .safetensors file, a model folder (sharded or not),
    a pipeline folder (with `subfolder`, e.g. "transformer"), or a hub repo id (downloaded and cached
    by huggingface_hub; only safetensors files are fetched)."""
    path = Path(source)
    if not path.exists():
        if str(source).startswith((".", "/")) or str(source).count("/") != 1:
            raise SerialLoraFileError(f"base model {str(source)!r} is neither a file, a folder nor a hub repo id")
        from huggingface_hub import snapshot_download

        pattern = f"{subfolder}/*" if subfolder else "*"
        path = Path(snapshot_download(str(source), allow_patterns=[f"{pattern}.safetensors", f"{pattern}.json"]))
    if path.is_dir():
        folder = path / subfolder if subfolder and (path / subfolder).is_dir() else path
        files = _safetensors_files(folder)
    else:
        files = [path]
    if not files:
        raise SerialLoraFileError(f"no .safetensors weights in {str(path)!r}; pass the base model's weights file or folder")
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), file))

    def lookup(name: str) -> torch.Tensor:
        if name not in where:
            raise KeyError(name)
        with safe_open(where[name], framework="pt") as handle:
            return handle.get_tensor(name)

    return lookup
