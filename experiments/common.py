"""Helpers shared by the experiment scripts: atomic result files, environment facts, mean +- std."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from serial_lora_core.format import atomic_write


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically, through the project's one helper (`serial_lora_core.format.atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_results(out_dir: str | os.PathLike, name: str, record: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """`name`.json (the raw record) and `name`.md (the table) in `out_dir`, each written atomically."""
    out = Path(out_dir)
    json_path = write_bytes(out / f"{name}.json", (json.dumps(record, indent=1, sort_keys=False) + "\n").encode())
    md_path = write_bytes(out / f"{name}.md", markdown.encode())
    return json_path, md_path


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def environment() -> dict[str, Any]:
    """Device and software versions, for the record of every run."""
    import importlib.metadata as md

    versions = {}
    for package in ("torch", "timm", "peft", "accelerate", "diffusers", "transformers", "torchmetrics",
                    "scikit-learn", "numpy", "safetensors"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": device, "python": platform.python_version(), "versions": versions}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """'mean ± std' of `values` x `scale` (percent by default)."""
    mean, std = mean_std(values)
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def smoke_banner(smoke: bool) -> str:
    """The line every smoke-mode table starts with, so nobody mistakes it for a result."""
    return ("> **SMOKE MODE**: tiny random-weight models and synthetic data; these numbers test the pipeline "
            "and mean nothing about the method.\n\n" if smoke else "")
