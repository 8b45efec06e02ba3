"""The `serial-lora` command: inspect adapter files and export them to standard LoRA."""

from __future__ import annotations

import argparse
import json
import os
import sys
import unicodedata

from .config import check_scale
from .errors import SerialLoraError
from .export import default_prefix, equivalent_lora, open_base_weights, save_standard_lora
from .files import resolve_projections
from .format import FORMAT_FIELD, read_file
from .version import __version__


def printable(text: object) -> str:
    """`text` with every control/format character escaped (\\x1b, \\x07, \\u202e, ...): untrusted
    metadata never reaches the terminal as an escape sequence."""
    return "".join(
        ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn")
        else ch
        for ch in str(text)
    )


def _info(args: argparse.Namespace) -> int:
    adapter = read_file(args.file)
    summary = {
        "file": args.file,
        "format": adapter.metadata[FORMAT_FIELD],
        "format_version": adapter.format_version,
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "use_rslora": adapter.use_rslora,
        "scaling": adapter.scaling,
        "dropout": adapter.dropout,
        # What each stream adapts, by the rule every loader uses (no model here: the file's own claim,
        # already checked never to name an output projection).
        "streams": {stream: list(resolve_projections(adapter, attention, stream))
                    for attention, stream in sorted(adapter.weights)},
        "hosts": list(adapter.hosts),
        "adapted_attention_modules": len(adapter.attentions),
        "model_attention_modules": adapter.model_attention_modules,
        "parameters": adapter.num_parameters,
        "modules_to_save": list(adapter.info.modules_to_save),
        "architecture": adapter.architecture,
        "base_model": adapter.base_model,
        "dtype": adapter.info.dtype or "",
        "created_by": adapter.info.created_by,
        "export_prefix": default_prefix(adapter),
    }
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=True))  # escapes every control character
    else:
        width = max(len(k) for k in summary)
        for key, value in summary.items():
            print(f"{key:<{width}}  {printable(value)}")
    return 0


def _export_lora(args: argparse.Namespace) -> int:
    try:
        scale = check_scale(args.scale, "--scale")
    except ValueError as err:
        raise SerialLoraError(str(err)) from None
    for argument, source in (("input", args.input), ("--base", args.base)):
        # The export would replace the adapter (or the base weights) it is computed from.
        if os.path.exists(args.output) and os.path.exists(source) and os.path.samefile(args.output, source):
            raise SerialLoraError(f"output {args.output!r} is the {argument} file; write the standard LoRA "
                                  "to another path")
    adapter = read_file(args.input)
    prefix = default_prefix(adapter) if args.prefix is None else args.prefix
    pairs = equivalent_lora(adapter, open_base_weights(args.base, subfolder=args.subfolder), scale=scale)
    save_standard_lora(pairs, args.output, prefix=prefix)
    print(f"wrote {printable(args.output)}: {len(pairs)} projections, rank {adapter.rank}, key prefix {prefix!r} "
          f"({sum(a.numel() + b.numel() for a, b in pairs.values()):,} parameters, "
          f"{adapter.num_parameters:,} in the Serial LoRA)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="serial-lora", description=__doc__)
    parser.add_argument("--version", action="version", version=f"serial-lora {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="show what a Serial LoRA file contains")
    info.add_argument("file")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=_info)

    export = commands.add_parser(
        "export-lora",
        help="write the exact standard-LoRA equivalent (PEFT/diffusers keys) for given base weights",
    )
    export.add_argument("input", help="Serial LoRA .safetensors file")
    export.add_argument("output", help="standard LoRA .safetensors file to write")
    export.add_argument("--base", required=True,
                        help="base weights: a .safetensors file, a model or pipeline folder, or a hub repo id")
    export.add_argument("--subfolder", default="transformer",
                        help="subfolder of a pipeline folder/repo holding the model (default: transformer)")
    export.add_argument("--prefix", default=None,
                        help="key prefix of the output (default: from the file: 'transformer.' for diffusers "
                             "transformers, '' for timm and other bare models)")
    export.add_argument("--scale", type=float, default=1.0,
                        help="the adapter's scale baked into the export, as in set_serial_lora_scale: "
                             "1 = as trained (default), 0 = the base model")
    export.set_defaults(run=_export_lora)
    _add_trainer_commands(commands)
    return parser


def _add_trainer_commands(commands: argparse._SubParsersAction) -> None:
    """`train-*` and `analyze` come from the optional `serial_lora_train` package, when it is installed."""
    try:
        from serial_lora_train.cli import add_commands  # lazy: the core itself imports only torch/safetensors
    except ModuleNotFoundError as err:
        if err.name in ("serial_lora_train", "serial_lora_train.cli"):
            return
        raise
    add_commands(commands)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SerialLoraError as err:
        print(f"serial-lora: error: {printable(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
