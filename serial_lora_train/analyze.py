"""`serial-lora analyze`: the paper's Fig. 3 for any adapter - singular-value spectra of the effective q, k, v
weights per block, base vs adapted (and a PEFT LoRA of the same base side by side).

    serial-lora analyze out/serial_lora.safetensors --model vit_base_patch16_clip_224 --pretrained \\
        --compare out_lora/peft_lora --output-dir analysis

From Python, for any model that carries Serial LoRA adapters (timm tag, diffusers loader, load_serial_lora):

    from serial_lora_train.analyze import analyze
    result = analyze(model, "analysis", compare="out_lora/peft_lora")   # -> CSV, PNG, rows

The adapted weight of a projection W is W + s·(W B) A (`formula.weight_delta`); a fused qkv weight is cut
into its q, k and v rows. CSV: one row per block x stream x projection x singular value, with the base,
Serial LoRA (and LoRA) singular values as columns. PNG: one panel per projection (q, k, v), each block's
spectrum drawn per variant (matplotlib, Agg backend).
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from serial_lora_core import DEFAULT_ADAPTER, SerialLoraError, remove_serial_lora, serial_lora_modules
from serial_lora_core.format import atomic_write
from serial_lora_core.formula import weight_delta

CSV_FILE = "spectra.csv"
PNG_FILE = "spectra.png"
QKV = ("q", "k", "v")


@dataclass(frozen=True)
class Projection:
    """One effective projection of one block: base weight and the adapted weights (float32)."""

    block: str
    stream: str
    name: str  # q, k or v
    path: str  # module path of the Linear (its rows `rows` for a fused qkv)
    rows: slice
    base: torch.Tensor
    serial: torch.Tensor


@dataclass
class AnalysisResult:
    csv_path: Path
    png_path: Path
    rows: int
    variants: tuple[str, ...]


def _split(weight: torch.Tensor, projections: tuple[str, ...]) -> list[tuple[str, str, slice]]:
    """(q/k/v name, projection path, row slice) of a stream: a fused qkv is cut into three equal row blocks."""
    if len(projections) == 1:
        rows = weight.shape[0] // 3
        return [(n, projections[0], slice(i * rows, (i + 1) * rows)) for i, n in enumerate(QKV)]
    names = QKV if len(projections) == 3 else tuple(f"p{i}" for i in range(len(projections)))
    return [(n, p, slice(None)) for n, p in zip(names, projections)]


def effective_projections(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> list[Projection]:
    """Base and Serial-LoRA-adapted q, k, v weights of every adapted block of `model`."""
    if any(m.merged for _, m in serial_lora_modules(model)):
        raise SerialLoraError("the adapters are merged: the projections no longer hold the base weights; "
                              "call unmerge_serial_lora() first")
    found = []
    for block, wrapper in serial_lora_modules(model):
        if adapter_name not in wrapper:
            continue
        for stream, adapter in wrapper[adapter_name].items():
            paths = tuple(wrapper.stream_specs[stream].projections)
            weights = {p: wrapper.projection(p).weight for p in paths}
            adapted = {p: w.detach().float() + weight_delta(w, adapter.down.weight, adapter.up.weight, adapter.factor)
                       for p, w in weights.items()}
            for name, path, rows in _split(weights[paths[0]], paths):
                found.append(Projection(block, stream, name, path, rows, weights[path].detach().float()[rows],
                                        adapted[path][rows]))
    if not found:
        raise SerialLoraError(f"{type(model).__name__} has no Serial LoRA adapter {adapter_name!r} to analyze; load one "
                              "first (timm tag, load_serial_lora, pipe.load_serial_lora_weights)")
    return found


def _peft_weights(model: nn.Module, compare: str | Path | nn.Module) -> dict[str, torch.Tensor]:
    """Merged weights of a PEFT LoRA on the same base, by module path of the base model."""
    if isinstance(compare, nn.Module):
        merged = compare.merge_and_unload() if hasattr(compare, "merge_and_unload") else compare
    else:
        from peft import PeftModel

        path = Path(compare)
        if not (path / "adapter_config.json").is_file():
            raise ValueError(f"--compare {str(path)!r} is not a PEFT adapter folder (no adapter_config.json in it)")
        base = copy.deepcopy(model)
        remove_serial_lora(base)
        merged = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    return {name: module.weight.detach().float() for name, module in merged.named_modules() if isinstance(module, nn.Linear)}


def spectra(model: nn.Module, compare: str | Path | nn.Module | None = None,
            adapter_name: str = DEFAULT_ADAPTER) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """The CSV rows: block, stream, projection, index, base, serial_lora[, lora] singular values."""
    projections = effective_projections(model, adapter_name)
    lora = _peft_weights(model, compare) if compare is not None else None
    variants = ("base", "serial_lora") + (("lora",) if lora is not None else ())
    rows = []
    for p in projections:
        values = {"base": torch.linalg.svdvals(p.base), "serial_lora": torch.linalg.svdvals(p.serial)}
        if lora is not None:
            full = f"{p.block}.{p.path}" if p.block else p.path
            if full not in lora:
                raise ValueError(f"the compared LoRA model has no projection {full!r}; compare adapters of the same base")
            values["lora"] = torch.linalg.svdvals(lora[full][p.rows])
        for i in range(len(values["base"])):
            rows.append({"block": p.block, "stream": p.stream, "projection": p.name, "index": i,
                         **{v: float(values[v][i]) for v in variants}})
    return rows, variants


def _plot(rows: list[dict[str, Any]], variants: tuple[str, ...], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = list(dict.fromkeys(r["projection"] for r in rows))
    blocks = list(dict.fromkeys((r["block"], r["stream"]) for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    styles = {"base": ("0.5", "-"), "serial_lora": ("tab:red", "-"), "lora": ("tab:blue", "--")}
    for ax, name in zip(axes[0], names):
        for variant in variants:
            color, style = styles[variant]
            for j, key in enumerate(blocks):
                values = [r[variant] for r in rows if r["projection"] == name and (r["block"], r["stream"]) == key]
                ax.semilogy(values, color=color, linestyle=style, alpha=0.35 + 0.65 * (j + 1) / len(blocks),
                            linewidth=1, label=variant if j == len(blocks) - 1 else None)
        ax.set_title(f"{name}: {len(blocks)} block(s)")
        ax.set_xlabel("singular value index")
        ax.set_ylabel("singular value")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def analyze(model: nn.Module, output_dir: str | Path, *, compare: str | Path | nn.Module | None = None,
            adapter_name: str = DEFAULT_ADAPTER, title: str = "Singular values of the effective q, k, v weights") -> AnalysisResult:
    """Write spectra.csv and spectra.png for `model`'s Serial LoRA adapter (and a PEFT LoRA `compare`)."""
    with torch.no_grad():
        rows, variants = spectra(model, compare, adapter_name)
    out = Path(output_dir)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["block", "stream", "projection", "index", *variants])
    writer.writeheader()
    writer.writerows(rows)
    data = text.getvalue().encode()
    atomic_write(out / CSV_FILE, lambda tmp: Path(tmp).write_bytes(data))
    png = _plot(rows, variants, title)
    atomic_write(out / PNG_FILE, lambda tmp: Path(tmp).write_bytes(png))
    return AnalysisResult(out / CSV_FILE, out / PNG_FILE, len(rows), variants)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="Serial LoRA .safetensors file")
    parser.add_argument("--base", "--model", dest="model", required=True,
                        help="timm architecture of the base (the file's .serial_lora tag), e.g. vit_base_patch16_clip_224")
    parser.add_argument("--pretrained", action="store_true", help="timm's pretrained base weights")
    parser.add_argument("--pretrained-file", dest="pretrained_file", help="local base weights (timm pretrained_cfg_overlay)")
    parser.add_argument("--model-kwargs", dest="model_kwargs", default="{}", help="JSON of extra timm.create_model arguments")
    parser.add_argument("--compare", help="PEFT LoRA folder (adapter_config.json) trained on the same base")
    parser.add_argument("--output-dir", dest="output_dir", required=True)


def main(args: argparse.Namespace) -> int:
    import json

    import timm_plugin  # noqa: F401  (the .serial_lora tag)

    from .classifier import create_timm_model

    try:
        model = create_timm_model(f"{args.model}.serial_lora", pretrained=args.pretrained,
                                  pretrained_file=args.pretrained_file or None, model_kwargs=json.loads(args.model_kwargs),
                                  serial_lora_weights=args.adapter)
        result = analyze(model, args.output_dir, compare=args.compare,
                         title=f"{Path(args.adapter).name} on {args.model}")
    except (ValueError, TypeError, RuntimeError, SerialLoraError) as err:
        print(f"serial-lora: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {result.csv_path} ({result.rows} rows: {', '.join(result.variants)}) and {result.png_path}")
    return 0


if __name__ == "__main__":
    from .entry import task_parser

    sys.exit(main(task_parser("serial-lora analyze", __doc__, add_arguments).parse_args()))
