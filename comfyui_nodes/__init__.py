"""Serial LoRA nodes for ComfyUI: load a Serial LoRA file onto a MODEL (and CLIP) as ComfyUI weight patches.

ComfyUI finds the nodes through `comfy_entrypoint` (its current node API). Importing this package does
not import ComfyUI (so `python -m comfyui_nodes.link` works outside it); the nodes are imported when
ComfyUI calls `comfy_entrypoint()`.
"""

from __future__ import annotations

from .link import link_into_comfyui


async def comfy_entrypoint():
    """ComfyUI's entry point for a node pack: the `ComfyExtension` with the Serial LoRA nodes."""
    from .nodes import SerialLoraExtension

    return SerialLoraExtension()


__all__ = ["comfy_entrypoint", "link_into_comfyui"]
