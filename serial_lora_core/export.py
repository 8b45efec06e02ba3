"""Exact export of a Serial LoRA to a standard (PEFT/diffusers-format) LoRA.

W + s·(W B) A is a plain rank-r LoRA per projection: down = A, up = s·W B (`formula.equivalent_up`).
The exported file is 4x larger (q, k, v each get their own up; fused qkv gets one 3d x r up) and is
exact only for the base weights W it was computed against.
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

from .config import check_scale
from .errors import SerialLoraError, SerialLoraFileError
from .files import resolve_projections
from .format import MODULES_TO_SAVE, AdapterFile, atomic_write
from .formula import equivalent_up
from .hosts import JOINT_QKV
from .inject import DEFAULT_ADAPTER, is_merged, serial_lora_modules, unwrap_model

WeightLookup = Callable[[str], torch.Tensor]

DIFFUSERS_PREFIX = "transformer."
"""Key prefix of a diffusers pipeline's transformer LoRA (what `pipe.load_lora_weights` expects)."""


def default_prefix(adapter: AdapterFile) -> str:
    """The key prefix an export of `adapter` gets: `transformer.` when the file was trained on a
    diffusers transformer (its `hosts` metadata names diffusers' attention layout, `joint_qkv`), else
    none (timm, transformers and other bare models load LoRA keys relative to the model)."""
    return DIFFUSERS_PREFIX if JOINT_QKV.name in adapter.hosts else ""


def _export_factor(scale: float, scaling: float) -> float:
    """scale x scaling, both checked: the factor baked into every exported `up`."""
    scale = check_scale(scale, "scale")
    return check_scale(scale * scaling, f"scale x scaling ({scale!r} x {scaling!r})")


def equivalent_lora(
    adapter: AdapterFile,
    base_weight: WeightLookup | Mapping[str, torch.Tensor],
    scale: float = 1.0,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """projection path -> (down = A, up = scale·s·W B), computed in float32.

    `base_weight(name)` (or a mapping) gives the base weight `<attention>.<projection>.weight`.
    The projections are the file's (`files.resolve_projections` without a model); each must exist
    in the base weights with the adapter's input width.
    """
    if adapter.modules_to_save:
        raise SerialLoraError(f"{adapter.path} also stores whole modules ({MODULES_TO_SAVE} "
                              f"{list(adapter.info.modules_to_save)}), which a standard LoRA cannot hold; load it with "
                              "load_serial_lora() instead, or merge_and_unload_serial_lora() and save the model")
    factor = _export_factor(scale, adapter.scaling)
    lookup = base_weight.__getitem__ if isinstance(base_weight, Mapping) else base_weight
    pairs = {}
    for (attention, stream), pair in adapter.weights.items():
        for projection in resolve_projections(adapter, attention, stream):
            path = f"{attention}.{projection}" if attention else projection
            try:
                weight = lookup(f"{path}.weight")
            except KeyError:
                raise SerialLoraError(f"the base weights have no {path + '.weight'!r}, needed to export "
                                      f"{attention!r} stream {stream!r}; pass the base model the adapter was trained on") from None
            if weight.dim() != 2 or weight.shape[1] != pair.down.shape[1]:
                raise SerialLoraError(f"base weight {path + '.weight'!r} has shape {tuple(weight.shape)}, but the adapter "
                                      f"expects in_features {pair.down.shape[1]}; pass the matching base model")
            pairs[path] = (pair.down.float(), equivalent_up(weight, pair.up, factor))
    return pairs


def model_equivalent_lora(
    model: nn.Module, adapter_name: str = DEFAULT_ADAPTER, scale: float = 1.0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Like `equivalent_lora`, from an adapted model: projection path -> (A, scale·s·m·W B).

    Uses the adapter's current scale `m`; the model must not be merged (W must be the base weight).
    """
    model = unwrap_model(model)
    scale = check_scale(scale, "scale")
    if is_merged(model):
        raise SerialLoraError("the model is merged; call unmerge_serial_lora() first so W is the base weight")
    pairs = {}
    for attention, module in serial_lora_modules(model):
        if adapter_name not in module:
            continue
        for stream, adapter in module[adapter_name].items():
            factor = check_scale(scale * adapter.factor, "scale x scaling")
            for projection in module.stream_specs[stream].projections:
                up = equivalent_up(module.projection(projection).weight, adapter.up.weight, factor)
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
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _safetensors_files(folder: Path) -> list[Path]:
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    return sorted(folder.glob("*.safetensors"))


def is_hub_repo_id(source: str | os.PathLike) -> bool:
    """Whether `source` (which is not an existing path) reads as a Hugging Face hub id `owner/name`.

    The one rule for every loader that accepts "a path or a hub id"."""
    text = os.fspath(source)
    return not text.startswith((".", "/", "~")) and text.count("/") == 1 and not text.endswith(
        (".safetensors", ".bin", ".pt", ".ckpt"))


def _download(source: str, subfolder: str | None) -> Path:
    """A hub repo's safetensors weights (and configs) in the local cache; one clear line when that fails."""
    from huggingface_hub import snapshot_download

    pattern = f"{subfolder}/*" if subfolder else "*"
    try:
        return Path(snapshot_download(source, allow_patterns=[f"{pattern}.safetensors", f"{pattern}.json"]))
    except Exception as err:  # offline, unknown repo, gated, network: huggingface_hub has many error types
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise SerialLoraFileError(
            f"could not get base model {source!r} from the Hugging Face hub ({type(err).__name__}: {reason[:200]}); "
            "pass a local .safetensors file or model folder instead, or, offline, set HF_HUB_OFFLINE=1 with the "
            "model already in the hub cache") from None


def open_base_weights(source: str | os.PathLike, subfolder: str | None = None) -> WeightLookup:
    """A lookup of base weights by name, from a .safetensors file, a model folder (sharded or not),
    a pipeline folder (with `subfolder`, e.g. "transformer"), or a hub repo id (downloaded and cached
    by huggingface_hub; only safetensors files are fetched)."""
    path = Path(source)
    if not path.exists():
        if not is_hub_repo_id(source):
            raise SerialLoraFileError(f"base model {str(source)!r} is neither a file, a folder nor a hub repo id")
        path = _download(str(source), subfolder)
    if path.is_dir():
        folder = path / subfolder if subfolder and (path / subfolder).is_dir() else path
        files = _safetensors_files(folder)
    else:
        files = [path]
    if not files:
        raise SerialLoraFileError(f"no .safetensors weights in {str(path)!r}; pass the base model's weights file or folder")
    where: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                where.update(dict.fromkeys(handle.keys(), file))
        except Exception as err:  # safetensors' own error types
            raise SerialLoraFileError(f"base weights {str(file)!r} are not a readable safetensors file "
                                      f"({type(err).__name__}: {err})") from None

    def lookup(name: str) -> torch.Tensor:
        if name not in where:
            raise KeyError(name)
        with safe_open(where[name], framework="pt") as handle:
            return handle.get_tensor(name)

    return lookup
