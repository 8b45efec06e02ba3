"""`serial-lora train-classifier` speed next to the bare Serial LoRA training step, in one run.

ViT-B/16 CLIP (`vit_base_patch16_clip_224`, random weights), batch 256, bf16 autocast, rank 32:
- bare_serial: benchmarks/vit.py's Serial training step (one fixed in-memory batch, AdamW), images/s from
  `common.measure`;
- trainer_memory_serial / trainer_memory_lora: the full trainer (`serial_lora_train.engine.train`: Accelerate,
  DataLoader with workers and pinned memory, per-sample seeding, copy to the GPU one step ahead, grad
  clipping, scheduler, metrics log every step) on in-memory synthetic uint8 images normalised on the GPU
  (as the classifier's timm transforms deliver them), dropout 0 like the bare step; images/s over the steps
  after the warm-up, from the trainer's own metrics log;
- trainer_jpeg_serial (timm's evaluation transform: decode, resize, crop) and trainer_jpeg_serial_augment
  (timm's training augmentation): the real `ClassifierTask` on a JPEG image folder written first.
Targets (issue 11): trainer_memory_serial >= 0.95 x bare_serial; trainer_jpeg_serial >= 0.85 x bare_serial.

    python benchmarks/train_classifier.py --out benchmarks/results [--smoke] [--workers 12]
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from common import benchmark_parser, device, environment, measure, record

import timm
import timm_plugin  # noqa: F401
from serial_lora_train.classifier import ClassifierOptions, ClassifierTask, Normalize
from serial_lora_train.engine import METRICS_FILE, Task, TaskSetup, TrainingArguments, train
from serial_lora_train.methods import apply_method

ARCH = "vit_base_patch16_clip_224"
SMOKE = dict(depth=2, embed_dim=64, num_heads=2)
SMOKE_HELP = "tiny model, few steps, CPU (seconds)"


class SyntheticImages(torch.utils.data.Dataset):
    """Random uint8 images held in memory (a fixed pool, indexed cyclically), as the classifier's transforms
    deliver them (the task normalises on the device)."""

    def __init__(self, length: int, img: int, pool: int = 64, classes: int = 10) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (pool, 3, img, img), generator=generator, dtype=torch.uint8)
        self.length, self.classes = length, classes

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.images[index % len(self.images)], index % self.classes


class SyntheticClassifier(Task):
    """The classifier's model and loss on in-memory data (no image folder)."""

    name = "classifier-synthetic"
    loss = ClassifierTask.loss

    def __init__(self, img: int, smoke: bool, length: int) -> None:
        self.img, self.smoke, self.length = img, smoke, length

    def build(self, args: TrainingArguments, accelerator) -> TaskSetup:
        torch.manual_seed(0)
        model = timm.create_model(ARCH, pretrained=False, img_size=self.img, num_classes=10, **(SMOKE if self.smoke else {}))
        config = model.pretrained_cfg
        self.normalize = Normalize(config["mean"], config["std"])
        model, self.info = apply_method(model, args.method, rank=args.rank, dropout=args.dropout,
                                        trainable_modules=("head",))
        return TaskSetup(model, SyntheticImages(self.length, self.img))

    def save(self, model, output_dir: Path) -> Path:
        path = output_dir / "adapter.json"  # timing run: record the counts only
        path.write_text(json.dumps({"adapter_parameters": self.info.adapter_parameters}))
        return path

    def card(self) -> dict:
        return {"adapter_parameters": self.info.adapter_parameters, "lora_parameters_note": self.info.note}


def images_per_second(out: Path, batch: int, warmup: int) -> dict:
    """Throughput between the warm-up's last logged step and the final one (trainer's own clock)."""
    logged = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    steps = [r for r in logged if "elapsed_s" in r]
    first = next(r for r in steps if r["step"] >= warmup)
    last = steps[-1]
    seconds = last["elapsed_s"] - first["elapsed_s"]
    measured = last["step"] - first["step"]
    return {"images_per_s": batch * measured / seconds, "measured_steps": measured, "seconds": seconds,
            "final_loss": last["loss"]}


def run_trainer(task: Task, out: Path, method: str, batch: int, rank: int, warmup: int, iters: int,
                workers: int) -> dict:
    args = TrainingArguments(output_dir=str(out), method=method, rank=rank, dropout=0.0, learning_rate=1e-4,
                             train_batch_size=batch, max_train_steps=warmup + iters, logging_steps=1,
                             mixed_precision="bf16", dataloader_num_workers=workers, overwrite_output_dir=True,
                             disable_progress_bar=True)
    result = train(task, args)
    return {**images_per_second(out, batch, warmup), "trainable_parameters": result.trainable_parameters}


def write_jpegs(root: Path, count: int, size: int, classes: int = 8) -> Path:
    """A JPEG image folder of smooth random images (decoding cost like real photos of that size)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"{i}.jpg", quality=90)
    return root


def main() -> None:
    parser = benchmark_parser("train_classifier", SMOKE_HELP, iters=30, description=__doc__)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--jpeg-images", type=int, default=2048)
    parser.add_argument("--sections", default="memory,jpeg")
    args = parser.parse_args()
    smoke = args.smoke
    batch, img, rank = (4, 32, 4) if smoke else (256, 224, 32)
    iters, warmup, workers = (3, 1, 0) if smoke else (args.iters, args.warmup, args.workers)
    results = {"env": environment(), "arch": ARCH, "batch": batch, "img": img, "rank": rank, "iters": iters,
               "warmup": warmup, "workers": workers, "mixed_precision": "bf16"}
    sections = args.sections.split(",")
    scratch = Path(tempfile.mkdtemp(prefix="train_classifier_bench_"))

    def bare() -> dict:
        from vit import trainer as bare_trainer  # benchmarks/vit.py's Serial step, the reference

        step = bare_trainer("serial", rank, batch, img, smoke)()
        timing = measure(step, iters, warmup)
        return {**timing, "images_per_s": batch / timing["median_ms"] * 1e3}

    def memory() -> dict:
        out = {"bare_serial": bare()}
        length = batch * (warmup + iters + 1)
        for method in ("serial", "lora"):
            out[f"trainer_memory_{method}"] = run_trainer(SyntheticClassifier(img, smoke, length), scratch / method,
                                                          method, batch, rank, warmup, iters, workers)
        out["ratios"] = {f"trainer_memory_{m}_over_bare_serial": out[f"trainer_memory_{m}"]["images_per_s"]
                         / out["bare_serial"]["images_per_s"] for m in ("serial", "lora")}
        return out

    def jpeg() -> dict:
        folder = write_jpegs(scratch / "jpeg", batch * 2 if smoke else args.jpeg_images, 48 if smoke else 256)
        out = {"bare_serial": bare()}
        for name, augment in (("trainer_jpeg_serial", False), ("trainer_jpeg_serial_augment", True)):
            task = ClassifierTask(ClassifierOptions(model=ARCH, train_dir=str(folder), augment=augment,
                                                    model_kwargs={"img_size": img, **(SMOKE if smoke else {})}))
            out[name] = run_trainer(task, scratch / name, "serial", batch, rank, warmup, iters, workers)
        out["ratios"] = {f"{name}_over_bare_serial": out[name]["images_per_s"] / out["bare_serial"]["images_per_s"]
                         for name in ("trainer_jpeg_serial", "trainer_jpeg_serial_augment")}
        return out

    if "memory" in sections:
        record(results, "memory", "train-classifier, in-memory data", memory, args.name, args.out)
    if "jpeg" in sections:
        record(results, "jpeg", "train-classifier, JPEG folder", jpeg, args.name, args.out)
    print(json.dumps({k: results[k]["ratios"] for k in ("memory", "jpeg") if k in results}, indent=2))
    print(f"device: {device()}")


if __name__ == "__main__":
    main()
