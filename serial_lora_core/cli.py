"""The `serial-lora` command: inspect adapter files and export them to standard LoRA."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import SerialLoraError
from .export import equivalent_lora, open_base_weights, save_standard_lora
from .format import read_file


def _info(args: argparse.Namespace) -> int:
    adapter = read_file(args.file)
    meta = adapter.metadata
    summary = {
        "file": args.file,
        "format": meta["format"],
        "format_version": int(meta["format_version"]),
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "use_rslora": adapter.use_rslora,
        "scale": adapter.scale,
        "streams": adapter.streams,
        "hosts": json.loads(meta.get("hosts", "[]")),
        "adapted_attention_modules": len(adapter.attentions),
        "parameters": adapter.num_parameters,
        "architecture": adapter.architecture,
        "base_model": meta.get("base_model", ""),
        "dtype": meta.get("dtype", ""),
        "created_by": meta.get("created_by", ""),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        width = max(len(k) for k in summary)
        for key, value in summary.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _export_lora(args: argparse.Namespace) -> int:
    adapter = read_file(args.input)
    base = open_base_weights(args.base, subfolder=args.subfolder)
    pairs = equivalent_lora(adapter, base, scale=args.scale)
    save_standard_lora(pairs, args.output, prefix=args.prefix)
    print(f"wrote {args.output}: {len(pairs)} projections, rank {adapter.rank} "
          f"({sum(a.numel() + b.numel() for a, b in pairs.values()):,} parameters, "
          f"{adapter.num_parameters:,} in the Serial LoRA)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="serial-lora", description=__doc__)
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
    export.add_argument("--prefix", default="transformer.",
                        help="key prefix of the output, 'transformer.' for diffusers pipelines (default); '' for a bare model")
    export.add_argument("--scale", type=float, default=1.0, help="strength baked into the export (default 1)")
    export.set_defaults(run=_export_lora)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SerialLoraError as err:
        print(f"serial-lora: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
