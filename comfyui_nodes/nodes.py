"""The Serial LoRA nodes (category "model/loaders", next to ComfyUI's LoRA loaders).

- Load Serial LoRA (model only): MODEL + file + strength -> MODEL
- Load Serial LoRA: MODEL, CLIP + file + two strengths -> MODEL, CLIP
- Save Serial LoRA as LoRA: MODEL + file + strength -> a standard LoRA in `loras` that
  ComfyUI's stock LoraLoader applies with the same result.
The input MODEL/CLIP is never modified: each node clones it and adds ComfyUI weight patches.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
from typing_extensions import override

import comfy.lora
import folder_paths
from comfy_api.latest import ComfyExtension, io
from serial_lora_core import AdapterFile, SerialLoraError, read_file, save_standard_lora

from .keymap import CLIP_PREFIXES, MODEL_PREFIXES, PatchTarget, plan_patches
from .weight_adapter import SerialLoraWeightAdapter

CATEGORY = "model/loaders"  # ComfyUI 0.30.0's LoraLoader and LoraLoaderModelOnly (nodes.py) use this one
FOLDER = "serial_loras"
if FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)],
                                                   set(folder_paths.supported_pt_extensions))

_CACHE: "OrderedDict[str, tuple[tuple[int, int], AdapterFile]]" = OrderedDict()
_CACHE_SIZE = 4


def adapter_names() -> list[str]:
    """The files the loader offers: the `serial_loras` folder, then `loras`."""
    names = folder_paths.get_filename_list(FOLDER) + folder_paths.get_filename_list("loras")
    return list(dict.fromkeys(n for n in names if n.endswith(".safetensors")))


def adapter_path(name: str) -> str:
    """Full path of an offered file name (ComfyUI's own resolution, `serial_loras` first)."""
    return folder_paths.get_full_path(FOLDER, name) or folder_paths.get_full_path_or_raise("loras", name)


def load_adapter(name: str) -> AdapterFile:
    """Read and validate a Serial LoRA once; later calls reuse it until the file changes."""
    path = adapter_path(name)
    stat = os.stat(path)
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _CACHE.get(path)
    if cached is not None and cached[0] == stamp:
        _CACHE.move_to_end(path)
        return cached[1]
    adapter = read_file(path)
    _CACHE[path] = (stamp, adapter)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return adapter


def _shapes(state_dict) -> dict[str, torch.Size]:
    return {key: value.shape for key, value in state_dict.items()}


def plan_for(adapter: AdapterFile, model, clip=None) -> dict[str, list[PatchTarget]]:
    """Where the adapter lands in `model` (a ModelPatcher) and, if given, `clip` (ComfyUI's CLIP)."""
    targets = [("model", comfy.lora.model_lora_keys_unet(model.model, {}), MODEL_PREFIXES,
                _shapes(model.model.state_dict()))]
    if clip is not None:
        targets.append(("clip", comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}), CLIP_PREFIXES,
                        _shapes(clip.cond_stage_model.state_dict())))
    return plan_patches(adapter, targets)


def _patches(adapter: AdapterFile, targets: list[PatchTarget]) -> dict:
    patches = {}
    for target in targets:
        patch = SerialLoraWeightAdapter.from_pair(target.down, target.up, adapter.scale, source=adapter.path,
                                                  whole=target.offset is None)
        patches[target.key if target.offset is None else (target.key, target.offset)] = patch
    return patches


def apply_serial_lora(adapter: AdapterFile, model, strength_model: float, clip=None, strength_clip: float = 1.0):
    """Clones of `model` (and `clip`) with the adapter added as weight patches at the given strengths."""
    plan = plan_for(adapter, model, clip)
    new_model = model.clone()
    added = set(new_model.add_patches(_patches(adapter, plan["model"]), strength_model))
    new_clip = None
    if clip is not None:
        new_clip = clip.clone()
        added |= set(new_clip.add_patches(_patches(adapter, plan["clip"]), strength_clip))
    expected = len(plan["model"]) + len(plan.get("clip", []))
    if len(added) != expected:  # the plan only names weights that exist: this guards ComfyUI changes
        raise SerialLoraError(f"Serial LoRA {adapter.path!r}: ComfyUI accepted {len(added)} of {expected} patches")
    return new_model, new_clip


class SerialLoraLoaderModelOnly(io.ComfyNode):
    """Load Serial LoRA (model only)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SerialLoraLoaderModelOnly",
            display_name="Load Serial LoRA (model only)",
            category=CATEGORY,
            search_aliases=["serial lora", "load serial lora"],
            description="Applies a Serial LoRA (one shared low-rank pair per attention stream, before q/k/v) "
                        "to the diffusion model as weight patches.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the Serial LoRA will be applied to."),
                io.Combo.Input("lora_name", options=adapter_names(), tooltip="A Serial LoRA file (serial_loras or loras folder)."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly to modify the diffusion model. This value can be negative."),
            ],
            outputs=[io.Model.Output(tooltip="The modified diffusion model.")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength_model) -> io.NodeOutput:
        new_model, _ = apply_serial_lora(load_adapter(lora_name), model, strength_model)
        return io.NodeOutput(new_model)


class SerialLoraLoader(io.ComfyNode):
    """Load Serial LoRA: the diffusion model and the text encoder (CLIP)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SerialLoraLoader",
            display_name="Load Serial LoRA",
            category=CATEGORY,
            search_aliases=["serial lora"],
            description="Applies a Serial LoRA to the diffusion model and, for adapters that also carry "
                        "text-encoder attention, to CLIP.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Combo.Input("lora_name", options=adapter_names()),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01),
                io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01),
            ],
            outputs=[io.Model.Output(), io.Clip.Output()],
        )

    @classmethod
    def execute(cls, model, clip, lora_name, strength_model, strength_clip) -> io.NodeOutput:
        new_model, new_clip = apply_serial_lora(load_adapter(lora_name), model, strength_model, clip, strength_clip)
        return io.NodeOutput(new_model, new_clip)


def current_weight(key_patches: dict, key: str) -> torch.Tensor:
    """`key` as the model at hand computes with it, in float32, from `key_patches` (its ModelPatcher's
    `get_key_patches()`): the original weight (not whatever patched clone sharing the module was
    loaded last) with that model's own patches applied."""
    (weight, convert), patches = key_patches[key][0], key_patches[key][1:]
    weight = convert(weight.detach().to(torch.float32, copy=True), inplace=True)
    if patches:
        weight = comfy.lora.calculate_weight(patches, weight, key, intermediate_dtype=torch.float32,
                                             original_weights=key_patches)
    return weight


def _diffusers_names(pairs: dict) -> tuple[dict, str]:
    # diffusers' loaders want `transformer.` as the prefix (also in the PEFT metadata), names under it.
    prefix = "transformer."
    if pairs and all(name.startswith(prefix) for name in pairs):
        return {name[len(prefix):]: pair for name, pair in pairs.items()}, prefix
    return pairs, ""


def export_standard_lora(adapter: AdapterFile, model, strength: float, path: str) -> str:
    """Write the exact standard-LoRA equivalent of `adapter` at `strength` for the weights `model` has
    (its base weights with its own patches): per projection, down = A and up = strength·s·W_proj B,
    under the per-projection names of ComfyUI's key map (diffusers style for SD3,
    `transformer.transformer_blocks.N.attn.to_q.lora_A.weight`), which ComfyUI's LoRA loaders and
    diffusers' `load_lora_weights` both read (alpha absent = scale 1)."""
    pairs = {}
    weights: dict[str, torch.Tensor] = {}
    key_patches = model.get_key_patches()
    for target in plan_for(adapter, model)["model"]:
        if target.key not in weights:
            weights[target.key] = current_weight(key_patches, target.key)
        whole = weights[target.key]
        for name, offset in target.projections:
            weight = whole.narrow(*offset) if offset is not None else whole
            up = (strength * adapter.scale) * (weight @ target.up.float().to(weight.device))
            pairs[name] = (target.down.float(), up)
    pairs, prefix = _diffusers_names(pairs)
    save_standard_lora(pairs, path, prefix=prefix,
                       metadata={"exported_from_serial_lora": os.path.basename(adapter.path),
                                 "strength": repr(float(strength))})
    return path


class SaveSerialLoraAsLora(io.ComfyNode):
    """Save Serial LoRA as LoRA: the exact standard-LoRA equivalent, for the model at hand."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SaveSerialLoraAsLora",
            display_name="Save Serial LoRA as LoRA",
            category=CATEGORY,
            description="Exports a Serial LoRA as the exactly equivalent standard LoRA (about 4x larger, exact only for "
                        "the weights this model has) into the loras folder, for the stock LoRA loader, diffusers and other tools.",
            inputs=[
                io.Model.Input("model", tooltip="The model the export is computed against: its weights, including LoRAs already applied to it."),
                io.Combo.Input("lora_name", options=adapter_names()),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01),
                io.String.Input("filename", default="serial_lora_export", tooltip="File name in the loras folder."),
            ],
            outputs=[io.String.Output(display_name="lora_name")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, lora_name, strength_model, filename) -> io.NodeOutput:
        stem = os.path.basename(filename.strip())
        if not stem or stem != filename.strip() or stem in (".", ".."):
            raise SerialLoraError(f"filename {filename!r} must be a plain file name (no folders), e.g. 'my_export'")
        if not stem.endswith(".safetensors"):
            stem += ".safetensors"
        folder = folder_paths.get_folder_paths("loras")[0]
        export_standard_lora(load_adapter(lora_name), model, strength_model, os.path.join(folder, stem))
        return io.NodeOutput(stem)


class SerialLoraExtension(ComfyExtension):
    """The node pack."""

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [SerialLoraLoaderModelOnly, SerialLoraLoader, SaveSerialLoraAsLora]
