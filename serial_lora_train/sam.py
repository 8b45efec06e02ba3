"""`serial-lora train-sam`: fine-tune SAM's image encoder for box-prompted segmentation (the paper's SAM setup).

    serial-lora train-sam --model facebook/sam-vit-base --data-dir data/train --val-dir data/val \\
        --data-fraction 0.2 --seed 0 --output-dir out

Data: `<dir>/images/<name>.<ext>` with a binary mask `<dir>/masks/<name>.png` of the same size (0 = background,
255 or 1 = object). Every pair is checked before training: a missing, unreadable, wrongly sized, non-binary or
empty mask stops the run with a message naming the file, or with `--skip-bad-images` is skipped and counted.
Images and masks go through the model's `SamImageProcessor` as SAM sees them at inference: longest side resized to
the model's input size (`vision_config.image_size`, 1024 for SAM; masks with nearest neighbour), normalised, padded
to a square; the box prompt is the mask's bounding box in that frame, jittered by up to `--box-jitter` x the box's
side while training. The loss is Dice + binary cross-entropy of the low-resolution mask logits upsampled to the
input size, over the image's pixels only (never the padding); the summary reports the Dice of the thresholded
masks (at the input resolution, padding excluded) on the validation split (`--val-dir`, or `--val-fraction` of
`--data-dir` held out with the seed). `--data-fraction` trains on that share of the training pairs, drawn with
the seed (the paper's 20/50/100% columns).

Serial LoRA adapts every attention of the image encoder (a pair per block before the fused qkv); the prompt encoder
and the mask decoder stay frozen. `--method lora` trains PEFT's LoRA on qkv and proj of the same blocks instead.
The adapter reloads with `serial_lora_core.load_serial_lora(SamModel.from_pretrained(...), file)`.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import IMAGE_EXTENSIONS, mix_seed
from .engine import Task, TaskSetup, TrainingArguments
from .entry import add_data_arguments, task_entry, task_parser
from .methods import PEFT_DIR, MethodInfo, apply_method, peft_usage, save_peft

ADAPTER_FILE = "serial_lora.safetensors"
IMAGES, MASKS = "images", "masks"
MASK_SUFFIX = ".png"
TOWER = "image_encoder"


# ----------------------------------------------------------------------------------------------- data


@dataclass
class MaskFolderScan:
    """Checked (image, mask) pairs of a folder, and the pairs skipped as bad with the reason."""

    root: Path
    pairs: list[tuple[str, str]]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _load(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.copy()


def mask_problem(image_path: Path, mask_path: Path) -> str | None:
    """Why the pair cannot train (None when it can): missing/unreadable file, size mismatch, not binary, empty."""
    import numpy as np

    if not mask_path.is_file():
        return f"no mask {mask_path} for image {image_path}"
    try:
        image, mask = _load(image_path), _load(mask_path)
    except Exception as err:  # noqa: BLE001  (PIL raises many types for bad files)
        return f"{image_path} / {mask_path}: unreadable ({type(err).__name__}: {err})"
    if mask.size != image.size:
        return f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} but image {image_path} is {image.size[0]}x{image.size[1]}"
    values = np.unique(np.asarray(mask.convert("L")))
    if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
        shown = values[:8].tolist()
        return (f"mask {mask_path} is not binary (values {shown}{'...' if len(values) > 8 else ''}); use 0 for "
                "background and 255 (or 1) for the object")
    if values.max() == 0:
        return f"mask {mask_path} is empty (no object pixel), so no box prompt can be derived from it"
    return None


def scan_mask_folder(root: str | Path, argument: str = "--data-dir", *, skip_bad_images: bool = False) -> MaskFolderScan:
    """Check `root/images` and `root/masks` pair by pair, before any training (see the module docstring)."""
    root = Path(root)
    images_dir = root / IMAGES
    if not images_dir.is_dir() or not (root / MASKS).is_dir():
        raise ValueError(f"{argument}={str(root)!r} needs the sub-folders {IMAGES}/ and {MASKS}/ (a mask "
                         f"{MASKS}/<name>{MASK_SUFFIX} for each image {IMAGES}/<name>.<ext>)")
    images = sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise ValueError(f"{argument}={str(root)!r}: {images_dir} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    pairs, skipped = [], []
    for image in images:
        mask = root / MASKS / (image.stem + MASK_SUFFIX)
        why = mask_problem(image, mask)
        if why is None:
            pairs.append((str(image), str(mask)))
        else:
            skipped.append((str(image), why))
    if skipped and not skip_bad_images:
        listed = "; ".join(why for _, why in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        raise ValueError(f"{argument}={str(root)!r}: {len(skipped)} bad image/mask pair(s): {listed}{more}. Fix or "
                         "remove them, or pass --skip-bad-images to skip them")
    if not pairs:
        raise ValueError(f"{argument}={str(root)!r}: every image/mask pair is bad ({skipped[0][1]})")
    return MaskFolderScan(root, pairs, skipped)


def seeded_subset(count: int, fraction: float, seed: int, salt: int) -> list[int]:
    """round(fraction x count) (at least 1) indices of range(count), drawn with `seed`, sorted."""
    generator = torch.Generator().manual_seed(mix_seed(seed, salt))
    keep = max(1, round(fraction * count))
    return sorted(torch.randperm(count, generator=generator)[:keep].tolist())


def box_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(x1, y1, x2, y2) pixel box around the object pixels of an (H, W) mask (SAM's box-prompt format)."""
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()


def sam_processor(model_id: str, size: int) -> Any:
    """The model's `SamImageProcessor` (SAM's defaults for a folder without one), framed for inputs of `size` px:
    longest side resized to `size`, padded to size x size; masks the same way (not to SAM's 256 px logits)."""
    from transformers import SamImageProcessor

    frame = {"size": {"longest_edge": size}, "pad_size": {"height": size, "width": size},
             "mask_size": {"longest_edge": size}, "mask_pad_size": {"height": size, "width": size}}
    try:
        return SamImageProcessor.from_pretrained(model_id, **frame)
    except (OSError, ValueError):  # a folder with the model only
        return SamImageProcessor(**frame)


class MaskDataset(torch.utils.data.Dataset):
    """(pixel_values 3xSxS, box 1x4, mask SxS, valid SxS) per pair, through SAM's image processor; `valid` is 1 on
    the image, 0 on its padding. The box is jittered (from torch's seeded RNG) within the image if asked."""

    def __init__(self, pairs: list[tuple[str, str]], processor: Any, box_jitter: float = 0.0) -> None:
        self.pairs, self.processor, self.box_jitter = pairs, processor, box_jitter

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image = _load(Path(image_path)).convert("RGB")
        mask = _load(Path(mask_path)).convert("L")
        out = self.processor(images=image, segmentation_maps=mask, return_tensors="pt")
        target = (out["labels"][0] > 0).float()
        height, width = out["reshaped_input_sizes"][0].tolist()
        valid = torch.zeros_like(target)
        valid[:height, :width] = 1
        box = box_from_mask(target)
        if self.box_jitter:
            side = torch.stack([box[2] - box[0], box[3] - box[1]]).repeat(2)
            box = box + (torch.rand(4) * 2 - 1) * self.box_jitter * side
            box = torch.minimum(box.clamp(min=0), torch.tensor([width, height, width, height], dtype=box.dtype))
        return out["pixel_values"][0].float(), box[None], target, valid


# ----------------------------------------------------------------------------------------------- metrics


def dice_scores(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample Dice 2|P∩T| / (|P| + |T|) of binary (N, H, W) masks (torchmetrics' dice_score, object class)."""
    from torchmetrics.functional.segmentation import dice_score

    with warnings.catch_warnings():  # a notice about the default of `average`, which is given here
        warnings.filterwarnings("ignore", message="dice_score metric currently defaults")
        return dice_score(pred.long(), target.long(), num_classes=2, include_background=False, input_format="index",
                          average="micro")


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
                  smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss + binary cross-entropy of (N, H, W) mask logits (the usual SAM fine-tuning loss), over the
    pixels where `valid` is 1 (all without it: padding must not teach the model anything)."""
    valid = torch.ones_like(target) if valid is None else valid
    prob = (logits.sigmoid() * valid).flatten(1)
    flat = (target * valid).flatten(1)
    dice = (2 * (prob * flat).sum(1) + smooth) / (prob.sum(1) + flat.sum(1) + smooth)
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=valid, reduction="sum") / valid.sum()
    return (1 - dice).mean() + bce


def mask_logits(model: nn.Module, pixel_values: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(N, S, S) logits of SAM's single-mask output for one box per image, upsampled to the input size."""
    out = model(pixel_values=pixel_values, input_boxes=boxes, multimask_output=False)
    low = out.pred_masks[:, 0]  # (N, 1, h, w)
    return F.interpolate(low.float(), size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


# ----------------------------------------------------------------------------------------------- task


@dataclass
class SamOptions:
    """What the SAM task needs beyond `TrainingArguments`."""

    model: str
    data_dir: str
    val_dir: str | None = None
    val_fraction: float = 0.2
    data_fraction: float = 1.0
    box_jitter: float = 0.1
    skip_bad_images: bool = False
    eval_batch_size: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.data_fraction <= 1:
            raise ValueError(f"--data-fraction must be in (0, 1] (the paper uses 0.2, 0.5, 1.0), got {self.data_fraction}")
        if self.val_dir is None and not 0 < self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in (0, 1) without --val-dir, got {self.val_fraction}")
        if not 0 <= self.box_jitter < 1:
            raise ValueError(f"--box-jitter must be in [0, 1) (a share of the box side), got {self.box_jitter}")


class SamTask(Task):
    """Box-prompted binary segmentation with a transformers `SamModel`: Dice + BCE, Dice on the validation split."""

    name = "sam"

    def __init__(self, options: SamOptions) -> None:
        self.options = options
        self.scan = scan_mask_folder(options.data_dir, "--data-dir", skip_bad_images=options.skip_bad_images)
        self.val_scan = None
        if options.val_dir is not None:
            self.val_scan = scan_mask_folder(options.val_dir, "--val-dir", skip_bad_images=options.skip_bad_images)
        elif len(self.scan.pairs) < 2:
            raise ValueError(f"--data-dir={options.data_dir!r} has {len(self.scan.pairs)} usable pair(s); --val-fraction "
                             "needs at least 2 (or pass --val-dir)")
        self.info: MethodInfo | None = None
        self.train_pairs: list[tuple[str, str]] = []
        self.val_set: MaskDataset | None = None

    def _split(self, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        pairs = self.scan.pairs
        if self.val_scan is not None:
            train, val = pairs, self.val_scan.pairs
        else:
            held = set(seeded_subset(len(pairs), self.options.val_fraction, seed, salt=1))
            if len(held) == len(pairs):
                held.pop()
            train = [p for i, p in enumerate(pairs) if i not in held]
            val = [p for i, p in enumerate(pairs) if i in held]
        picked = seeded_subset(len(train), self.options.data_fraction, seed, salt=2)
        return [train[i] for i in picked], val

    def build(self, args: TrainingArguments, accelerator: Any) -> TaskSetup:
        import transformers_plugin as tp
        from transformers import SamModel

        try:
            model = SamModel.from_pretrained(self.options.model)
        except (OSError, ValueError) as err:
            raise ValueError(f"--model {self.options.model!r}: cannot load a SamModel from it "
                             f"({str(err).splitlines()[0]}); pass a hub id or a folder written by save_pretrained") from err
        targets = [f"^{re.escape(name)}$" for name in tp.attention_towers(model).get(TOWER, [])]
        if not targets:
            raise ValueError(f"--model {self.options.model!r}: no image-encoder attention found")
        model, self.info = apply_method(model, args.method, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                                        target_modules=targets)
        processor = sam_processor(self.options.model, model.config.vision_config.image_size)
        self.train_pairs, val_pairs = self._split(args.seed)
        self.val_set = MaskDataset(val_pairs, processor)
        return TaskSetup(model=model, train_dataset=MaskDataset(self.train_pairs, processor, self.options.box_jitter))

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        pixels, boxes, target, valid = batch
        return dice_bce_loss(mask_logits(model, pixels, boxes), target, valid)

    def evaluate(self, model: nn.Module, accelerator: Any) -> dict[str, float]:
        loader = torch.utils.data.DataLoader(self.val_set, batch_size=self.options.eval_batch_size, shuffle=False)
        scores, losses = [], []
        for batch in loader:
            pixels, boxes, target, valid = (t.to(accelerator.device) for t in batch)
            logits = mask_logits(model, pixels, boxes)
            losses.append(dice_bce_loss(logits, target, valid).item() * len(target))
            scores.append(dice_scores((logits > 0) & (valid > 0), target > 0.5))
        return {"dice": torch.cat(scores).mean().item(), "val_loss": sum(losses) / len(self.val_set)}

    def save(self, model: nn.Module, output_dir: Path) -> Path:
        if self.info.method == "lora":
            return save_peft(model, output_dir)
        import transformers_plugin as tp

        return tp.save_serial_lora(model, output_dir / ADAPTER_FILE, base_model=self.options.model)

    def card(self) -> dict[str, Any]:
        o = self.options
        skipped = len(self.scan.skipped) + (len(self.val_scan.skipped) if self.val_scan else 0)
        val = f"`{o.val_dir}`" if o.val_dir else f"{o.val_fraction:g} of `{o.data_dir}` held out"
        facts: dict[str, Any] = {
            **self.info.card_facts(f"SAM image encoder on {o.model}", o.model, lora_targets="qkv,proj"),
            "data": f"{len(self.train_pairs)} image/mask pairs ({o.data_fraction:g} of the training pairs) from "
                    f"`{o.data_dir}`, box prompts jittered by {o.box_jitter:g}; validation {len(self.val_set)} pairs, {val}",
            "summary_rows": {"adapted": "image encoder (prompt encoder, mask decoder frozen)",
                             "data fraction": f"{o.data_fraction:g}", "skipped bad pairs": skipped},
        }
        if self.info.method == "serial":
            facts["usage"] = ["```python", "from transformers import SamModel", "import serial_lora_core",
                              f"model = SamModel.from_pretrained({o.model!r})",
                              f"serial_lora_core.load_serial_lora(model, {ADAPTER_FILE!r})", "```"]
        else:
            facts["usage"] = peft_usage(["from transformers import SamModel"], f"SamModel.from_pretrained({o.model!r})",
                                        PEFT_DIR)
        return facts

    def fingerprint(self) -> dict[str, Any]:
        o = self.options
        return {"model": o.model, "data_dir": str(o.data_dir), "val_dir": o.val_dir, "val_fraction": o.val_fraction,
                "data_fraction": o.data_fraction, "box_jitter": o.box_jitter}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The SAM task's options plus the engine's."""
    g = parser.add_argument_group("sam")
    g.add_argument("--model", required=True, help="hub id or local folder of a transformers SamModel, e.g. facebook/sam-vit-base")
    g.add_argument("--data-dir", dest="data_dir", required=True, help="folder with images/ and masks/<image stem>.png")
    g.add_argument("--val-dir", dest="val_dir", help="validation folder of the same layout")
    g.add_argument("--val-fraction", dest="val_fraction", type=float, default=0.2,
                   help="without --val-dir: share of --data-dir held out for validation, drawn with --seed (0.2)")
    g.add_argument("--data-fraction", dest="data_fraction", type=float, default=1.0,
                   help="train on this share of the training pairs, drawn with --seed (paper: 0.2, 0.5, 1.0)")
    g.add_argument("--box-jitter", dest="box_jitter", type=float, default=0.1,
                   help="move each box side by up to this share of the box size while training (0: exact boxes)")
    add_data_arguments(parser, g, eval_batch_size=4, bad="bad image/mask pairs", train_batch_size=4)


main = task_entry(SamTask, SamOptions)


if __name__ == "__main__":
    sys.exit(main(task_parser("serial-lora train-sam", __doc__, add_arguments).parse_args()))
