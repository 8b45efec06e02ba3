"""The paper's Table III: CLIP few-shot classification (1/4/16 shots), LoRA vs Serial LoRA (and the LoRA+ pair),
end to end through `serial-lora train-clip`.

With real data (the paper: CLIP ViT-B/16 on Caltech101, Food101, EuroSAT, Oxford Pets):

    python -m experiments.table3_clip --model openai/clip-vit-base-patch16 \\
        --data-root /data/fewshot --datasets caltech101 food101 eurosat oxford_pets --out results/table3

`--model` is a hub id already in the local Hugging Face cache or a local `save_pretrained` folder (CLIPModel +
tokenizer + image processor); `<data-root>/<dataset>/train/<class>/*.jpg` is the pool the shots are drawn from
and `<data-root>/<dataset>/test/<class>/*.jpg` the held-out test split (class folder names become the prompts).
Paper settings are train-clip's defaults: rank 32, lr 2e-4, dropout 0.25, bf16 on GPU, LoRA+ ratio 20; the
paper trains 50 epochs (`--epochs`). Each cell is the top-1 (%) on the test split, mean ± std over `--seeds`.

`--smoke` runs everything on a tiny random-weight CLIP and a tiny procedural dataset in seconds (CI); its
numbers mean nothing and its table says so.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from experiments.common import smoke_banner, write_results
from experiments.tables import (SMOKE_ARGS, base_record, layout, resolve, run_grid, table_parser, tests_module,
                               write_class_folders)


def smoke_setup(root: Path) -> tuple[str, Path, list[str]]:
    """A tiny random CLIP folder and one tiny 3-class dataset (train pool + test split)."""
    model = tests_module("hf_tiny").save_tiny_clip_folder(root / "tiny_clip")
    size = tests_module("hf_tiny").CLIP_IMAGE
    write_class_folders(root / "data" / "shapes" / "train", classes=3, per_class=4, size=size, seed=0)
    write_class_folders(root / "data" / "shapes" / "test", classes=3, per_class=2, size=size, seed=1)
    return str(model), root / "data", ["shapes"]


def run(args: argparse.Namespace, model: str, data_root: Path, datasets: list[str]) -> list[dict[str, Any]]:
    def argv(dataset: str, shots: int, seed: int) -> list[str]:
        options = ["--model", model, "--train-dir", str(data_root / dataset / "train"),
                   "--val-dir", str(data_root / dataset / "test"), "--shots", str(shots), "--seed", str(seed)]
        return options + (SMOKE_ARGS if args.smoke else ["--num-train-epochs", str(args.epochs), *args.extra])

    return run_grid("train-clip", Path(args.out), datasets, args.shots, args.methods, args.seeds, argv)


def markdown(record: dict[str, Any]) -> str:
    datasets, runs = record["datasets"], record["runs"]
    zero = [next((f"{r['metrics']['zero_shot_top1'] * 100:.1f}" for r in runs
                  if r["dataset"] == d and "zero_shot_top1" in r["metrics"]), "-") for d in datasets]
    return (smoke_banner(record["smoke"]) + "# Table III (CLIP few-shot top-1 %, mean ± std over "
            f"{record['seeds']} seed(s))\n\nModel `{record['model']}`; {record['environment']['device']}; "
            f"real data: {'no (smoke)' if record['smoke'] else 'yes'}.\n\n"
            + layout(runs, datasets, record["shots"], record["methods"], "top1", lambda s: f"{s} shot")
            + "\nZero-shot top-1 before training: " + ", ".join(f"{d} {z}" for d, z in zip(datasets, zero)) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = table_parser(__doc__, "CLIP", "folder with <dataset>/train and <dataset>/test class folders",
                          "--shots", int, [1, 4, 16], epochs=50)
    args, args.extra = parser.parse_known_args(argv)  # anything else goes to train-clip (e.g. --rank 16)
    if args.smoke:
        args.shots, args.seeds = [1], 1
    with tempfile.TemporaryDirectory() as tmp:
        model, data_root, datasets = resolve(parser, args, smoke_setup, Path(tmp))
        record = {**base_record("III", args, "CLIP", model, datasets), "shots": args.shots,
                  "runs": run(args, model, data_root, datasets)}
    write_results(args.out, "table3_clip", record, markdown(record))
    return record


if __name__ == "__main__":
    main()
