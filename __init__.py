"""ComfyUI entry point when this repository is cloned into ComfyUI/custom_nodes/.

Importing this file has no side effects and imports neither ComfyUI nor the pack (tools such as
pytest import it outside ComfyUI); ComfyUI calls `comfy_entrypoint()`, which makes
`serial_lora_core` and `comfyui_nodes` importable (appending this folder to sys.path when
serial-lora is not pip-installed) and returns the node pack.
"""

import importlib.util
import os
import sys


async def comfy_entrypoint():
    """ComfyUI's entry point for a node pack: the `ComfyExtension` with the Serial LoRA nodes."""
    if importlib.util.find_spec("serial_lora_core") is None or importlib.util.find_spec("comfyui_nodes") is None:
        sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    from comfyui_nodes import comfy_entrypoint as pack_entrypoint

    return await pack_entrypoint()


__all__ = ["comfy_entrypoint"]
