"""The paper's Table IV: SAM box-prompted segmentation with 20/50/100% of the training data, LoRA vs Serial LoRA
(and the LoRA+ pair), end to end through `serial-lora train-sam` (image encoder adapted; prompt encoder and mask
decoder frozen).

With real data (the paper: SAM ViT-B, rank 64, lr 1e-4, 5 epochs; FloodNet, Stanford-40 actions, FoodSeg103):

    python -m experiments.table4_sam --model facebook/sam-vit-base --data-root /data/seg \\
        --datasets flood human icecream pie strawberry --out results/table4 --rank 64 --learning-rate 1e-4

`--model` is a hub id already in the local Hugging Face cache or a local `SamModel.save_pretrained` folder;
`<data-root>/<dataset>/train/{images,masks}` holds the training pairs (masks: binary PNGs named like the image)
and `<data-root>/<dataset>/val/{images,masks}` the held-out pairs. Options after the known ones go to train-sam
unchanged (the paper's `--rank 64 --learning-rate 1e-4`). Each cell is the Dice coefficient (higher is better)
of the thresholded masks on the held-out pairs, mean ± std over `--seeds`; the paper's table reports a Dice
score where lower is better (presumably the Dice loss, 1 - Dice), so compare directions with care.

`--smoke` runs everything on a tiny random-weight SAM and procedural masks in seconds (CI); its numbers mean
nothing and its table says so.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from experiments.common import smoke_banner, write_results
from experiments.tables import (SMOKE_ARGS, base_record, layout, resolve, run_grid, table_parser, tests_module,
                               write_mask_folders)


def smoke_setup(root: Path) -> tuple[str, Path, list[str]]:
    """A tiny random SamModel folder and one tiny procedural segmentation dataset."""
    hf_tiny = tests_module("hf_tiny")
    hf_tiny.tiny_sam().save_pretrained(root / "tiny_sam")
    write_mask_folders(root / "data" / "shapes" / "train", count=5, size=48, seed=0)
    write_mask_folders(root / "data" / "shapes" / "val", count=2, size=48, seed=1)
    return str(root / "tiny_sam"), root / "data", ["shapes"]


def run(args: argparse.Namespace, model: str, data_root: Path, datasets: list[str]) -> list[dict[str, Any]]:
    def argv(dataset: str, fraction: float, seed: int) -> list[str]:
        options = ["--model", model, "--data-dir", str(data_root / dataset / "train"),
                   "--val-dir", str(data_root / dataset / "val"), "--data-fraction", str(fraction), "--seed", str(seed)]
        return options + (SMOKE_ARGS if args.smoke else ["--num-train-epochs", str(args.epochs), *args.extra])

    return run_grid("train-sam", Path(args.out), datasets, args.fractions, args.methods, args.seeds, argv)


def markdown(record: dict[str, Any]) -> str:
    return (smoke_banner(record["smoke"]) + "# Table IV (SAM: Dice coefficient on held-out masks, higher is better; "
            f"mean ± std over {record['seeds']} seed(s))\n\nModel `{record['model']}`; {record['environment']['device']}; "
            f"real data: {'no (smoke)' if record['smoke'] else 'yes'}.\n\n"
            + layout(record["runs"], record["datasets"], record["fractions"], record["methods"], "dice",
                     lambda f: f"{f * 100:g}% data", scale=1.0, digits=4))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = table_parser(__doc__, "SAM", "folder with <dataset>/train and <dataset>/val (images/ + masks/)",
                          "--fractions", float, [0.2, 0.5, 1.0], epochs=5)
    args, args.extra = parser.parse_known_args(argv)  # anything else goes to train-sam (e.g. --rank 64)
    if args.smoke:
        args.fractions, args.seeds = [0.5], 1
    with tempfile.TemporaryDirectory() as tmp:
        model, data_root, datasets = resolve(parser, args, smoke_setup, Path(tmp))
        record = {**base_record("IV", args, "SAM", model, datasets), "fractions": args.fractions,
                  "runs": run(args, model, data_root, datasets)}
    write_results(args.out, "table4_sam", record, markdown(record))
    return record


if __name__ == "__main__":
    main()
