"""The trainers' sub-commands of `serial-lora` (the core CLI calls `add_commands` when this package is installed).

Each task module exposes `add_arguments(parser)` and `main(args) -> int`; this module only wires them.
Each is also runnable as `python -m serial_lora_train.<module>` (for `accelerate launch -m ...`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train-classifier": ("classifier", "fine-tune a timm image classifier with Serial LoRA (or PEFT LoRA)"),
    "train-sd3": ("sd3", "DreamBooth / style fine-tuning of an SD3 / SD3.5 transformer"),
    "train-clip": ("clip", "fine-tune a CLIP model"),
    "train-sam": ("sam", "fine-tune SAM's image encoder for segmentation"),
    "analyze": ("analyze", "singular-value spectra of the effective q, k, v weights (base vs adapted)"),
}


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register every task whose module is present. A task whose optional dependency is missing still gets
    its command, which then says what to install (the core's own commands keep working either way)."""
    for command, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(f"{__package__}.{module_name}")
        except ModuleNotFoundError as err:
            if err.name == f"{__package__}.{module_name}":
                continue
            # No option prefix: whatever follows the command is accepted, so the message below is what the user sees.
            parser = commands.add_parser(command, help=f"{help_text} (needs: {err.name})", add_help=False,
                                         prefix_chars="\0")
            parser.add_argument("ignored", nargs="*")
            parser.set_defaults(run=_missing(command, err.name))
            continue
        parser = commands.add_parser(command, help=help_text, description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parser)
        parser.set_defaults(run=module.main)


def _missing(command: str, dependency: str | None):
    def run(_: argparse.Namespace) -> int:
        print(f"serial-lora: error: {command} needs the Python package {dependency!r}, which is not installed; "
              "install the extras: pip install 'serial-lora[train,timm,diffusers]'", file=sys.stderr)
        return 2

    return run
