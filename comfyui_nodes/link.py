"""Link a pip-installed serial-lora into ComfyUI: `python -m comfyui_nodes.link /path/to/ComfyUI`.

Writes `custom_nodes/serial_lora/__init__.py`, which imports the installed node pack. Run it with
the Python environment ComfyUI uses (the one serial-lora is installed in).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serial_lora_core.format import atomic_write

STUB = '''"""Serial LoRA nodes, linked by `python -m comfyui_nodes.link` (serial-lora is pip-installed)."""
from comfyui_nodes import comfy_entrypoint  # noqa: F401
'''


def link_into_comfyui(comfyui: str | Path, name: str = "serial_lora") -> Path:
    """Write `<comfyui>/custom_nodes/<name>/__init__.py` importing the pack; returns its path."""
    custom_nodes = Path(comfyui) / "custom_nodes"
    if not custom_nodes.is_dir():
        raise ValueError(f"{str(comfyui)!r} has no custom_nodes folder; pass the ComfyUI root folder (the one with main.py)")
    target = custom_nodes / name / "__init__.py"
    return atomic_write(target, lambda tmp: Path(tmp).write_text(STUB))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comfyui_nodes.link", description=__doc__.splitlines()[0])
    parser.add_argument("comfyui", help="the ComfyUI root folder")
    args = parser.parse_args(argv)
    try:
        path = link_into_comfyui(args.comfyui)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"linked serial-lora nodes: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
