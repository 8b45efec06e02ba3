"""The Serial LoRA nodes (category "model/loaders", next to ComfyUI's LoRA loaders).

- Load Serial LoRA: MODEL, CLIP + file + two strengths -> MODEL, CLIP
- Load Serial LoRA (model only): MODEL + file + strength -> MODEL (a subclass, as ComfyUI's
  LoraLoaderModelOnly is of LoraLoader)
- Save Serial LoRA as LoRA: MODEL + file + strength -> a new standard LoRA in `loras`
  (`<prefix>_00001_.safetensors`, counted like ComfyUI's own save nodes: never overwrites) that
  ComfyUI's stock LoraLoader applies with the same result.
The input MODEL/CLIP is never modified: each node clones it and adds ComfyUI weight patches.
"""

from __future__ import annotations

import json
import os
import struct
from collections import OrderedDict

import torch
from typing_extensions import override

import comfy.lora
import folder_paths
from comfy_api.latest import ComfyExtension, io
from serial_lora_core import AdapterFile, SerialLoraError, check_scale, read_file, save_standard_lora
from serial_lora_core.export import DIFFUSERS_PREFIX
from serial_lora_core.formula import equivalent_up

from .keymap import CLIP_PREFIXES, MODEL_PREFIXES, PatchTarget, plan_patches
from .weight_adapter import SerialLoraWeightAdapter

CATEGORY = "model/loaders"  # ComfyUI 0.30.0's LoraLoader and LoraLoaderModelOnly (nodes.py) use this one
FOLDER = "serial_loras"
if FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)],
                                                   set(folder_paths.supported_pt_extensions))

_HEADER_LIMIT = 100_000_000  # safetensors' own limit on a header's size
# path -> (the file's stored sha256, the validated adapter)
_CACHE: "OrderedDict[str, tuple[str, AdapterFile]]" = OrderedDict()
_CACHE_SIZE = 4


def adapter_names() -> list[str]:
    """The files the loader offers: the `serial_loras` folder, then `loras`."""
    names = folder_paths.get_filename_list(FOLDER) + folder_paths.get_filename_list("loras")
    return list(dict.fromkeys(n for n in names if n.endswith(".safetensors")))


def adapter_path(name: str) -> str:
    """Full path of an offered file name (ComfyUI's own resolution, `serial_loras` first)."""
    return folder_paths.get_full_path(FOLDER, name) or folder_paths.get_full_path_or_raise("loras", name)


def stored_sha256(path: str) -> str | None:
    """The sha256 a Serial LoRA file stores in its metadata, read from the safetensors header with plain
    reads (no memory map, so ComfyUI's --disable-mmap holds; the core reads the file into memory too).
    None when the file has none or is not safetensors: `read_file` then says what is wrong."""
    try:
        with open(path, "rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            if size > _HEADER_LIMIT:
                return None
            metadata = json.loads(handle.read(size)).get("__metadata__") or {}
    except (OSError, struct.error, ValueError, AttributeError):  # unreadable: read_file names the problem
        return None
    digest = metadata.get("sha256")
    return digest if isinstance(digest, str) else None


def load_adapter(name: str) -> AdapterFile:
    """Read and validate a Serial LoRA once; later calls reuse it while the file's content is the same.

    The cache keys on the sha256 the file stores (which `read_file` checks against the content), not on
    its modification time and size, which a different file copied with `cp -p` can share.
    """
    path = adapter_path(name)
    digest = stored_sha256(path)
    cached = _CACHE.get(path)
    if cached is not None and digest is not None and cached[0] == digest:
        _CACHE.move_to_end(path)
        return cached[1]
    adapter = read_file(path)
    _CACHE[path] = (adapter.metadata["sha256"], adapter)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return adapter


def finite_strength(name: str, value: float, adapter: AdapterFile | None = None) -> float:
    """`value` of the input `name` as a float, refusing NaN and inf (which pass ComfyUI's min/max check)
    by the core's one check of a scale (`check_scale`), in ComfyUI's words; with `adapter`, also a
    strength whose product with the adapter's scaling (alpha/r) overflows float32 (inf weights)."""
    try:
        strength = check_scale(value, name)
    except (TypeError, ValueError):
        raise SerialLoraError(f"{name} is {value!r}; set it to a finite number (1.0 = as trained, 0 = off)") from None
    if adapter is not None:
        try:
            check_scale(strength * adapter.scaling, f"{name}={strength!r} times the scaling {adapter.scaling:g} of {adapter.path!r}")
        except ValueError as err:
            raise SerialLoraError(f"{err}; lower {name}") from None
    return strength


def _shapes(state_dict) -> dict[str, torch.Size]:
    return {key: value.shape for key, value in state_dict.items()}


def plan_for(adapter: AdapterFile, model, clip=None) -> dict[str, list[PatchTarget]]:
    """Where the adapter lands in `model` (a ModelPatcher) and, if given, `clip` (ComfyUI's CLIP).

    Every node goes through here, so this is where a file that also carries whole trained modules
    (format version 2 `modules_to_save`, e.g. a classifier head) is refused: ComfyUI applies weight
    patches only, and the modules would be silently dropped."""
    if adapter.modules_to_save:
        raise SerialLoraError(
            f"Serial LoRA {adapter.path!r} also stores whole trained modules (modules_to_save "
            f"{list(adapter.info.modules_to_save)}), which ComfyUI cannot apply: it applies weight patches only. "
            "Use this file with serial_lora_core.load_serial_lora, or save the adapter without modules_to_save")
    targets = [("model", comfy.lora.model_lora_keys_unet(model.model, {}), MODEL_PREFIXES,
                _shapes(model.model.state_dict()))]
    if clip is not None:
        targets.append(("clip", comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}), CLIP_PREFIXES,
                        _shapes(clip.cond_stage_model.state_dict())))
    return plan_patches(adapter, targets)


def _patches(adapter: AdapterFile, targets: list[PatchTarget]) -> dict:
    patches = {}
    for target in targets:
        patch = SerialLoraWeightAdapter.from_pair(target.down, target.up, adapter.scaling, source=adapter.path,
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


def _lora_name_input(tooltip: str = "A Serial LoRA file (serial_loras or loras folder).") -> io.Combo.Input:
    return io.Combo.Input("lora_name", options=adapter_names(), tooltip=tooltip)


def _strength_input(name: str, tooltip: str) -> io.Float.Input:
    return io.Float.Input(name, default=1.0, min=-100.0, max=100.0, step=0.01, tooltip=tooltip)


def _schema(node_id: str, display_name: str, **fields) -> io.Schema:
    """A node schema of this pack: its category is ComfyUI's LoRA loaders' one."""
    return io.Schema(node_id=node_id, display_name=display_name, category=CATEGORY, **fields)


MODEL_INPUT_TOOLTIP = "The diffusion model the Serial LoRA will be applied to."
STRENGTH_MODEL_TOOLTIP = ("The Serial LoRA's scale on the diffusion model: 1 = as trained, 0 = off. "
                          "This value can be negative.")


class SerialLoraLoader(io.ComfyNode):
    """Load Serial LoRA: the diffusion model and the text encoder (CLIP)."""

    @classmethod
    def define_schema(cls):
        return _schema(
            "SerialLoraLoader", "Load Serial LoRA",
            search_aliases=["serial lora", "load serial lora", "lora"],
            description="Applies a Serial LoRA (one shared low-rank pair per attention stream, before q/k/v) to the "
                        "diffusion model and, for adapters that also carry text-encoder attention, to CLIP.",
            inputs=[
                io.Model.Input("model", tooltip=MODEL_INPUT_TOOLTIP),
                io.Clip.Input("clip", tooltip="The CLIP model the Serial LoRA's text-encoder part will be applied to."),
                _lora_name_input(),
                _strength_input("strength_model", STRENGTH_MODEL_TOOLTIP),
                _strength_input("strength_clip", "The Serial LoRA's scale on the CLIP model: 1 = as trained, 0 = off. "
                                                 "This value can be negative."),
            ],
            outputs=[io.Model.Output(tooltip="The modified diffusion model."),
                     io.Clip.Output(tooltip="The modified CLIP model.")],
        )

    @classmethod
    def execute(cls, model, clip, lora_name, strength_model, strength_clip) -> io.NodeOutput:
        strength_model = finite_strength("strength_model", strength_model)
        strength_clip = finite_strength("strength_clip", strength_clip)
        adapter = load_adapter(lora_name)
        new_model, new_clip = apply_serial_lora(adapter, model, finite_strength("strength_model", strength_model, adapter),
                                                clip, finite_strength("strength_clip", strength_clip, adapter))
        return io.NodeOutput(new_model, new_clip)


class SerialLoraLoaderModelOnly(SerialLoraLoader):
    """Load Serial LoRA (model only)."""

    @classmethod
    def define_schema(cls):
        schema = super().define_schema()
        schema.node_id, schema.display_name = "SerialLoraLoaderModelOnly", "Load Serial LoRA (model only)"
        schema.description = ("Applies a Serial LoRA (one shared low-rank pair per attention stream, before q/k/v) "
                              "to the diffusion model as weight patches.")
        schema.inputs = [i for i in schema.inputs if i.id not in ("clip", "strength_clip")]
        schema.outputs = schema.outputs[:1]
        return schema

    @classmethod
    def execute(cls, model, lora_name, strength_model) -> io.NodeOutput:
        strength_model = finite_strength("strength_model", strength_model)
        adapter = load_adapter(lora_name)
        new_model, _ = apply_serial_lora(adapter, model, finite_strength("strength_model", strength_model, adapter))
        return io.NodeOutput(new_model)


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
    if pairs and all(name.startswith(DIFFUSERS_PREFIX) for name in pairs):
        return {name[len(DIFFUSERS_PREFIX):]: pair for name, pair in pairs.items()}, DIFFUSERS_PREFIX
    return pairs, ""


def export_standard_lora(adapter: AdapterFile, model, strength: float, path: str) -> str:
    """Write the exact standard-LoRA equivalent of `adapter` at `strength` for the weights `model` has
    (its base weights with its own patches): per projection, down = A and up = strength·s·W_proj B,
    under the per-projection names of ComfyUI's key map (diffusers style for SD3,
    `transformer.transformer_blocks.N.attn.to_q.lora_A.weight`), which ComfyUI's LoRA loaders and
    diffusers' `load_lora_weights` both read (alpha absent = LoRA scale 1)."""
    pairs = {}
    weights: dict[str, torch.Tensor] = {}
    key_patches = model.get_key_patches()
    for target in plan_for(adapter, model)["model"]:
        if target.key not in weights:
            weights[target.key] = current_weight(key_patches, target.key)
        whole = weights[target.key]
        for name, offset in target.projections:
            weight = whole.narrow(*offset) if offset is not None else whole
            pairs[name] = (target.down.float(), equivalent_up(weight, target.up, strength * adapter.scaling))
    pairs, prefix = _diffusers_names(pairs)
    save_standard_lora(pairs, path, prefix=prefix,
                       metadata={"exported_from_serial_lora": os.path.basename(adapter.path),
                                 "scale": repr(float(strength))})  # strength_model is the scale
    return path


def next_free_path(folder: str, filename_prefix: str) -> str:
    """`<folder>/<prefix>_NNNNN_.safetensors` with the counter ComfyUI's own save nodes use
    (`folder_paths.get_save_image_path`): one past the highest already there, never an existing file."""
    full_folder, filename, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, folder)
    path = os.path.join(full_folder, f"{filename}_{counter:05}_.safetensors")
    while os.path.lexists(path):  # e.g. a file named out of the counter's order
        counter += 1
        path = os.path.join(full_folder, f"{filename}_{counter:05}_.safetensors")
    return path


class SaveSerialLoraAsLora(io.ComfyNode):
    """Save Serial LoRA as LoRA: the exact standard-LoRA equivalent, for the model at hand."""

    @classmethod
    def define_schema(cls):
        return _schema(
            "SaveSerialLoraAsLora", "Save Serial LoRA as LoRA",
            description="Exports a Serial LoRA as the exactly equivalent standard LoRA (about 4x larger, exact only for "
                        "the weights this model has) into the loras folder as <filename_prefix>_00001_.safetensors "
                        "(a new number each time, never overwriting), for the stock LoRA loader, diffusers and other tools.",
            inputs=[
                io.Model.Input("model", tooltip="The model the export is computed against: its weights, including LoRAs already applied to it."),
                _lora_name_input(),
                _strength_input("strength_model", STRENGTH_MODEL_TOOLTIP),
                io.String.Input("filename_prefix", default="serial_lora_export",
                                tooltip="Start of the file name in the loras folder; a counter is appended."),
            ],
            outputs=[io.String.Output(display_name="lora_name")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, lora_name, strength_model, filename_prefix) -> io.NodeOutput:
        strength_model = finite_strength("strength_model", strength_model)
        stem = filename_prefix.strip().removesuffix(".safetensors")
        if not stem or os.path.basename(stem) != stem or stem in (".", "..") or "%" in stem:
            raise SerialLoraError(f"filename_prefix {filename_prefix!r} must be a plain file name (no folders), "
                                  "e.g. 'my_export'")
        folder = folder_paths.get_folder_paths("loras")[0]
        path = next_free_path(folder, stem)
        adapter = load_adapter(lora_name)
        export_standard_lora(adapter, model, finite_strength("strength_model", strength_model, adapter), path)
        return io.NodeOutput(os.path.basename(path))


class SerialLoraExtension(ComfyExtension):
    """The node pack."""

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # The subclass first: ComfyUI's GET_SCHEMA (called in this order at registration) stores what it
        # derives from a schema (output types, description) in class attributes the first time, and a
        # subclass asked after its parent would find the parent's already there.
        return [SerialLoraLoaderModelOnly, SerialLoraLoader, SaveSerialLoraAsLora]
