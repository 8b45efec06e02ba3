"""Where the adapter's time goes: torch.profiler tables of the ViT training step and the SD3
denoising step, base/floor vs Serial LoRA (top CUDA/CPU ops by self time).

    python benchmarks/profile_adapter.py --out benchmarks/results [--smoke]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import device, free
from torch.profiler import ProfilerActivity, profile

import sd3
import vit


def table(fn, steps: int = 3) -> str:
    for _ in range(2):
        fn()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize() if torch.cuda.is_available() else None
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    lines = []
    batch, img, rank = (4, 32, 4) if args.smoke else (256, 224, 32)
    for mode in ("floor", "serial"):
        model = vit.build(mode, rank, img, args.smoke)
        lines += [f"## ViT train step, {mode}", table(vit.train_step(model, mode, batch, img))]
        del model
        free()
    b, lat, text, r = (2, 16, 8, 4) if args.smoke else (2, 128, 154, 64)
    for mode in ("base", "serial"):
        model = sd3.build(mode, r, args.smoke).eval()
        x = sd3.inputs(model, b, lat, text)

        @torch.no_grad()
        def forward(model=model, x=x):
            with torch.autocast(device().type, dtype=torch.bfloat16):
                model(**x)

        lines += [f"## SD3 denoising step, {mode}", table(forward)]
        del model
        free()
    path = Path(args.out) / "profile.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
