"""Where each (attention, stream) of a Serial LoRA file lands in a ComfyUI model.

The names come from ComfyUI's own LoRA key maps (`comfy.lora.model_lora_keys_unet` /
`model_lora_keys_clip`, which use `comfy.utils.mmdit_to_diffusers` for SD3): a file's
`transformer_blocks.N.attn` + `to_q/to_k/to_v` resolves to slices of
`diffusion_model.joint_blocks.N.x_block.attn.qkv.weight`, `add_q/k/v_proj` to
`context_block.attn.qkv`, `attn2` (SD3.5) to `x_block.attn2.qkv`. When a stream's projections
tile one fused weight, the stream becomes one patch on the whole weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from serial_lora_core import AdapterFile, SerialLoraError
from serial_lora_core.files import resolve_projections

# How diffusion-model and text-encoder LoRA names are prefixed in ComfyUI's key maps.
MODEL_PREFIXES = ("transformer.", "diffusion_model.", "")
CLIP_PREFIXES = ("", "text_encoder.", "text_encoders.")


@dataclass(frozen=True)
class PatchTarget:
    """One patch: the model weight `key`, an optional row slice `offset` (dim, start, size),
    the stream's pair, `name` (the LoRA name ComfyUI's key map resolves to this target) and
    `projections`: per projection the LoRA name ComfyUI's key map has for it and its row slice of
    `key` (one entry unless the patch covers a whole fused weight)."""

    name: str
    key: str
    offset: tuple[int, int, int] | None
    attention: str
    stream: str
    down: torch.Tensor
    up: torch.Tensor
    projections: tuple[tuple[str, tuple[int, int, int] | None], ...] = ()


def _lookup(key_map: Mapping[str, object], prefixes: tuple[str, ...], path: str):
    for prefix in prefixes:
        target = key_map.get(prefix + path)
        if target is not None:
            return prefix + path, target
    return None, None


def _stream_targets(adapter: AdapterFile, attention: str, stream: str, key_map, prefixes, shapes) -> list[PatchTarget] | None:
    pair = adapter.weights[(attention, stream)]
    found = []
    # The core's one rule for what a stream adapts (no model host here: ComfyUI has its own layout).
    for projection in resolve_projections(adapter, attention, stream):
        path = f"{attention}.{projection}" if attention else projection
        name, target = _lookup(key_map, prefixes, path)
        if target is None:
            return None if not found else _partial(adapter, attention, stream, path)
        key, offset = (target, None) if isinstance(target, str) else (target[0], tuple(target[1]))
        if key not in shapes:
            return None
        found.append((name, key, offset))
    for name, key, offset in found:
        shape = shapes[key]
        if len(shape) != 2 or shape[1] != pair.down.shape[1]:
            raise SerialLoraError(
                f"Serial LoRA {adapter.path!r} ({adapter.architecture or 'unknown architecture'}) does not fit this model: "
                f"{attention!r} stream {stream!r} has in_features {pair.down.shape[1]} but {key!r} has shape {tuple(shape)}; "
                "load an adapter trained on this model")
    keys = {key for _, key, _ in found}
    if len(keys) == 1:
        key = next(iter(keys))
        spans = sorted((o[1], o[2]) if o else (0, shapes[key][0]) for _, _, o in found)
        covered, tiled = 0, True
        for start, size in spans:
            tiled = tiled and start == covered
            covered = start + size
        if tiled and covered == shapes[key][0]:
            name = key[: -len(".weight")] if key.endswith(".weight") else key
            projections = tuple((n, o) for n, _, o in found)
            return [PatchTarget(name, key, None, attention, stream, pair.down, pair.up, projections)]
    return [PatchTarget(name, key, offset, attention, stream, pair.down, pair.up, ((name, offset),))
            for name, key, offset in found]


def _partial(adapter: AdapterFile, attention: str, stream: str, path: str):
    raise SerialLoraError(f"Serial LoRA {adapter.path!r}: {attention!r} stream {stream!r} matches some projections of "
                          f"this model but not {path!r}; the adapter is for another architecture")


def plan_patches(
    adapter: AdapterFile,
    targets: list[tuple[str, Mapping[str, object], tuple[str, ...], Mapping[str, torch.Size]]],
) -> dict[str, list[PatchTarget]]:
    """Resolve every (attention, stream) of `adapter` against `targets`, a list of
    (part name, key map, prefixes, weight shapes) tried in order (e.g. the model, then the CLIP).

    Returns part name -> patches. Anything that resolves nowhere raises SerialLoraError listing it.
    """
    plan: dict[str, list[PatchTarget]] = {part: [] for part, *_ in targets}
    unmatched = []
    for attention, stream in sorted(adapter.weights):
        for part, key_map, prefixes, shapes in targets:
            resolved = _stream_targets(adapter, attention, stream, key_map, prefixes, shapes)
            if resolved:
                plan[part].extend(resolved)
                break
        else:
            unmatched.append(f"{attention}.serial_lora.{stream}")
    if unmatched:
        parts = " or ".join(part for part, *_ in targets)
        raise SerialLoraError(
            f"Serial LoRA {adapter.path!r} (architecture {adapter.architecture or 'unknown'!r}) has {len(unmatched)} "
            f"adapter(s) that match nothing in the {parts}: {', '.join(unmatched)}. The file is for another model "
            "(or needs the CLIP input: use 'Load Serial LoRA'); nothing was applied.")
    return plan
