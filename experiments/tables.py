"""What the paper-table scripts (table2_sd3, table3_clip, table4_sam) share: the four methods as trainer
options, one call of a `serial-lora train-*` command, and the smoke mode's tiny models and data."""

from __future__ import annotations

import importlib
import itertools
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# The paper's four methods as trainer options (LoRA+ ratio 20, as in the paper).
METHOD_ARGS: dict[str, list[str]] = {
    "LoRA": ["--method", "lora"],
    "Serial LoRA": ["--method", "serial"],
    "LoRA+": ["--method", "lora", "--lora-plus-ratio", "20"],
    "Serial LoRA+": ["--method", "serial", "--lora-plus-ratio", "20"],
}
# Smoke runs: a couple of float32 steps, no progress bar; the methods' own options are kept.
SMOKE_ARGS = ["--max-train-steps", "2", "--train-batch-size", "4", "--rank", "4", "--mixed-precision", "no",
              "--disable-progress-bar"]


def train(command: str, argv: list[str], output_dir: Path) -> dict[str, Any]:
    """Run `serial-lora <command> ... --output-dir output_dir` in this process (exactly the CLI a user runs);
    return its final evaluation metrics (metrics.jsonl), its adapter parameter count and its wall time."""
    from experiments.common import read_jsonl
    from serial_lora_core.cli import main

    start = time.perf_counter()
    code = main([command, *argv, "--output-dir", str(output_dir)])
    if code:
        raise RuntimeError(f"serial-lora {command} {' '.join(argv)} exited with status {code}; see its message above")
    lines = read_jsonl(output_dir / "metrics.jsonl")
    evaluations = [r for r in lines if "loss" not in r]
    return {"metrics": evaluations[-1] if evaluations else {}, "train_loss": next((r["loss"] for r in reversed(lines) if "loss" in r), None),
            "adapter_parameters": adapter_parameters(output_dir), "seconds": time.perf_counter() - start}


def adapter_parameters(output_dir: Path) -> int:
    """Adapter parameters in what the trainer saved: the Serial LoRA file's pairs, or PEFT's lora_A/lora_B."""
    from safetensors import safe_open

    files = sorted(output_dir.glob("*.safetensors")) + sorted(output_dir.glob("*/adapter_model.safetensors"))
    count = 0
    for path in files:
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                if ".serial_lora." in key or "lora_A" in key or "lora_B" in key:
                    count += int(np.prod(handle.get_slice(key).get_shape()))
    return count


def tests_module(name: str):
    """A tiny-model builder of the test suite (tests/hf_tiny.py, tests/sd3_tiny.py), reused by smoke mode."""
    folder = str(REPO / "tests")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def write_class_folders(root: Path, classes: int, per_class: int, size: int, seed: int) -> Path:
    """An image folder (one sub-folder per shape name) drawn from experiments.procedural.shapes_dataset."""
    from experiments.procedural import SHAPES, shapes_dataset

    images, labels = shapes_dataset(per_class, size, seed=seed)
    for index, (image, label) in enumerate(zip(images, labels)):
        if label < classes:
            folder = root / SHAPES[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index}.png")
    return root


def write_mask_folders(root: Path, count: int, size: int, seed: int) -> Path:
    """images/ + masks/ (0/255 PNG) of random procedural shapes on a noisy background, for train-sam."""
    from experiments.procedural import SHAPES, _shape_masks

    rng = np.random.Generator(np.random.PCG64([seed, 3]))
    masks = _shape_masks(rng.integers(0, len(SHAPES), count), size, rng)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i, mask in enumerate(masks):
        image = rng.normal(60, 20, (size, size, 3))
        image[mask] = rng.uniform(120, 255, 3)
        Image.fromarray(np.clip(image, 0, 255).astype("uint8")).save(root / "images" / f"{i}.png")
        Image.fromarray(mask.astype("uint8") * 255).save(root / "masks" / f"{i}.png")
    return root


def run_grid(command: str, out: Path, datasets: list[str], settings: list[Any], methods: list[str], seeds: int,
             argv: Any, score: Any = None) -> list[dict[str, Any]]:
    """Every (dataset, setting, method, seed) through `serial-lora <command>`; `argv(dataset, setting, seed)`
    gives the run's options besides the method's (the method's come last, so they win). `score(dataset, method,
    output_dir)`, if given, replaces the trainer's own final metrics (e.g. metrics of generated images)."""
    runs = []
    for dataset, setting, method, seed in itertools.product(datasets, settings, methods, range(seeds)):
        folder = out / "runs" / dataset / str(setting) / method.replace(" ", "_") / f"seed{seed}"
        result = train(command, [*argv(dataset, setting, seed), *METHOD_ARGS[method], "--overwrite-output-dir"], folder)
        if score is not None:
            result["metrics"] = score(dataset, method, folder)
        runs.append({"dataset": dataset, "setting": setting, "method": method, "seed": seed, **result})
    return runs


def layout(runs: list[dict[str, Any]], datasets: list[str], settings: list[Any], methods: list[str], metric: str,
           setting_label: Any, scale: float = 100.0, digits: int = 1) -> str:
    """The paper's layout: a row per (setting, method), a column per dataset, cells `metric` mean ± std."""
    from experiments.common import fmt, markdown_table

    rows = []
    for setting, method in itertools.product(settings, methods):
        cells = []
        for dataset in datasets:
            values = [r["metrics"][metric] for r in runs if (r["dataset"], r["setting"], r["method"]) == (dataset, setting, method)
                      and metric in r["metrics"]]
            cells.append(fmt(values, scale, digits) if values else "-")
        params = next((r["adapter_parameters"] for r in runs if r["method"] == method), 0)
        rows.append([setting_label(setting), method, f"{params:,}", *cells])
    return markdown_table(["", "method", "adapter params", *datasets], rows)


def table_parser(doc: str, system: str, data_help: str, setting: str, setting_type: type, setting_default: list,
                 epochs: int) -> Any:
    """The options every table script shares; `setting` is its data-setting flag (--shots, --fractions)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"{system}: hub id already in the Hugging Face cache, or a local folder")
    parser.add_argument("--data-root", help=data_help)
    parser.add_argument("--datasets", nargs="+", help="dataset folder names under --data-root")
    parser.add_argument(setting, nargs="+", type=setting_type, default=setting_default)
    parser.add_argument("--methods", nargs="+", default=list(METHOD_ARGS), choices=list(METHOD_ARGS))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=epochs, help=f"training epochs (the paper: {epochs})")
    parser.add_argument("--out", required=True, help="folder for the table (.md), its record (.json) and the runs")
    parser.add_argument("--smoke", action="store_true", help=f"tiny random {system} + procedural data (CPU, seconds)")
    return parser


def resolve(parser: Any, args: Any, smoke_setup: Any, tmp: Path, required: tuple[str, ...] = ()) -> tuple:
    """(model, data root, datasets, *extra) from the arguments, or the smoke set-up's tiny ones in `tmp`."""
    if args.smoke:
        return smoke_setup(tmp)
    names = ("model", "data_root", "datasets", *required)
    if not all(getattr(args, name) for name in names):
        parser.error(", ".join("--" + n.replace("_", "-") for n in names) + " are required (or --smoke)")
    return (args.model, Path(args.data_root), args.datasets, *(getattr(args, n) for n in required))


def base_record(table: str, args: Any, system: str, model: str, datasets: list[str]) -> dict[str, Any]:
    """The fields every table record starts with."""
    from experiments.common import environment

    return {"table": table, "smoke": args.smoke, "model": f"tiny random {system} (smoke)" if args.smoke else model,
            "datasets": datasets, "methods": args.methods, "seeds": args.seeds,
            "epochs": None if args.smoke else args.epochs, "extra_trainer_args": args.extra,
            "environment": environment()}
