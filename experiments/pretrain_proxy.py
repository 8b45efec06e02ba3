"""Pre-train the offline proxy's backbone: a small timm ViT trained from scratch on procedural fractals.

No pretrained weights are reachable offline, so the proxy experiment (experiments/proxy.py) first makes
its own "foundation model": `vit_tiny_patch16_224` shrunk to 32 px, patch 4, depth 6, width 192 (3 heads),
trained to classify `--classes` IFS fractal classes (experiments/procedural.py, FractalDB-style). The
backbone is saved as safetensors (timm's state-dict names) and loads through
`timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=PATH, num_classes=K), **BACKBONE)`.

    python -m experiments.pretrain_proxy --out experiments/results/proxy_backbone   # GPU: about a minute
    python -m experiments.pretrain_proxy --smoke --out /tmp/bb                       # CPU, seconds, tiny
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from experiments.common import environment, write_bytes
from experiments.procedural import fractal_dataset

ARCH = "vit_tiny_patch16_224"
BACKBONE: dict[str, Any] = dict(img_size=32, patch_size=4, depth=6, embed_dim=192, num_heads=3)
SMOKE_BACKBONE: dict[str, Any] = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
MEAN, STD = 0.5, 0.25  # fixed normalisation of uint8 images, shared with the proxy


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> normalised float32."""
    return (images.float() / 255.0 - MEAN) / STD


def augment(x: torch.Tensor, generator: torch.Generator, flip: bool = True, shift: int = 4) -> torch.Tensor:
    """Per-image random horizontal flips (optional) and translations by up to `shift` px, on x's device."""
    n, _, h, w = x.shape
    if flip:
        mirrored = torch.rand(n, generator=generator, device=x.device) < 0.5
        x = torch.where(mirrored[:, None, None, None], x.flip(-1), x)
    if shift:
        offsets = torch.randint(-shift, shift + 1, (n, 2), generator=generator, device=x.device).to(x.dtype)
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        theta[:, 0, 2], theta[:, 1, 2] = offsets[:, 0] * 2 / w, offsets[:, 1] * 2 / h
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="nearest", padding_mode="reflection", align_corners=False)
    return x


def build_backbone(num_classes: int, smoke: bool = False, file: str | None = None) -> torch.nn.Module:
    """The proxy ViT (timm), fresh or with the backbone weights of a pre-training `file` and a new head.

    The weights are loaded here rather than through timm's `pretrained_cfg_overlay`: for this architecture
    some timm versions (1.0.29) route an overlay file to the JAX .npz loader.
    """
    import timm
    from safetensors.torch import load_file

    from serial_lora_core import ARCHITECTURE_ATTRIBUTE

    model = timm.create_model(ARCH, pretrained=False, num_classes=num_classes, **(SMOKE_BACKBONE if smoke else BACKBONE))
    setattr(model, ARCHITECTURE_ATTRIBUTE, ARCH)  # adapter files record it, and loading checks it
    if file is None:
        return model
    state = {k: v for k, v in load_file(str(file)).items() if not k.startswith("head.")}  # a new task, a new head
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{file} does not fit the proxy backbone {ARCH}: {err}") from err
    if unexpected or [k for k in missing if not k.startswith("head.")]:
        raise ValueError(f"{file} does not match the proxy backbone {ARCH} {BACKBONE if not smoke else SMOKE_BACKBONE}: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}; re-run experiments.pretrain_proxy")
    return model


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1024) -> float:
    """Top-1 of `model` on uint8 `images` (on any device: batches move to the model's), bf16 on GPU."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(images), batch):
        x = to_input(images[i:i + batch].to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            correct += int((model(x).argmax(-1) == labels[i:i + batch].to(device)).sum())
    return correct / len(images)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder: backbone.safetensors + pretrain.json")
    parser.add_argument("--classes", type=int, default=300, help="fractal classes")
    parser.add_argument("--per-class", type=int, default=100, help="training images per class")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--train-batch-size", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-workers", type=int, default=0, help="processes rendering the fractals")
    parser.add_argument("--smoke", action="store_true", help="tiny ViT, 10 classes, 1 epoch (CPU, seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.classes, args.per_class, args.epochs, args.train_batch_size = 10, 8, 1, 40
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    images, labels = fractal_dataset(args.classes, args.per_class + 10, seed=args.seed, workers=args.data_workers)
    # The last 10 images of every class are held out to report how well the backbone learnt its task.
    held = (torch.arange(len(labels)) % (args.per_class + 10)) >= args.per_class
    train_x, train_y = images[~held].to(device), labels[~held].to(device)
    data_seconds = time.perf_counter() - start

    model = build_backbone(args.classes, args.smoke).to(device)
    steps_per_epoch = math.ceil(len(train_y) / args.train_batch_size)
    total = steps_per_epoch * args.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.05)
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, cosine decay
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    generator = torch.Generator(device=device).manual_seed(args.seed)
    model.train()
    loss = torch.zeros(())
    for _ in range(args.epochs):
        order = torch.randperm(len(train_y), generator=generator, device=device)
        for i in range(steps_per_epoch):
            idx = order[i * args.train_batch_size:(i + 1) * args.train_batch_size]
            x = augment(to_input(train_x[idx]), generator)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    train_seconds = time.perf_counter() - start - data_seconds

    from safetensors.torch import save

    out = Path(args.out)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_bytes(out / "backbone.safetensors", save(state, metadata={"arch": ARCH, "classes": str(args.classes)}))
    record = {
        "arch": ARCH,
        "backbone": SMOKE_BACKBONE if args.smoke else BACKBONE,
        "smoke": args.smoke,
        "classes": args.classes,
        "train_images": int(len(train_y)),
        "epochs": args.epochs,
        "steps": total,
        "train_batch_size": args.train_batch_size,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "final_train_loss": float(loss.detach()),
        "held_out_top1": accuracy(model, images[held], labels[held]),
        "data_seconds": data_seconds,
        "train_seconds": train_seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
        "environment": environment(),
    }
    write_bytes(out / "pretrain.json", (json.dumps(record, indent=1) + "\n").encode())
    print(json.dumps({k: record[k] for k in ("classes", "steps", "final_train_loss", "held_out_top1", "train_seconds")}))
    return record


if __name__ == "__main__":
    main()
