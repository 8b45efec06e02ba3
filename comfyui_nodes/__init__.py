"""Serial LoRA nodes for ComfyUI: load a Serial LoRA file onto a MODEL (and CLIP) as ComfyUI weight patches.

ComfyUI finds the nodes through `comfy_entrypoint` (its current node API). Importing this package
imports neither ComfyUI nor any submodule: the nodes are imported when ComfyUI calls
`comfy_entrypoint()`, and `link_into_comfyui` on first use (importing `.link` here would make
`python -m comfyui_nodes.link` find it already imported and warn).
"""

from __future__ import annotations


async def comfy_entrypoint():
    """ComfyUI's entry point for a node pack: the `ComfyExtension` with the Serial LoRA nodes."""
    from .nodes import SerialLoraExtension

    return SerialLoraExtension()


def __getattr__(name: str):
    if name == "link_into_comfyui":
        from .link import link_into_comfyui

        return link_into_comfyui
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["comfy_entrypoint", "link_into_comfyui"]
