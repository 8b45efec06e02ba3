"""Where the adapter's time goes: torch.profiler tables (top ops by self device time) of the ViT training
step and inference, and the SD3 denoising step, each without and with Serial LoRA.

    python benchmarks/profile_adapter.py --out OUT [--smoke]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import cuda, free, sync
from torch.profiler import ProfilerActivity, profile

import sd3
import vit


def table(fn, steps: int = 3) -> str:
    for _ in range(2):
        fn()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda() else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        sync()
    key = "self_cuda_time_total" if cuda() else "self_cpu_time_total"
    return f"({steps} steps)\n" + prof.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=70)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    lines = []
    batch, img, rank = (4, 32, 4) if args.smoke else (256, 224, 32)
    for mode in ("floor", "serial"):
        lines += [f"## ViT train step, {mode}", table(vit.trainer(mode, rank, batch, img, args.smoke)())]
        free()
    for mode in ("base", "serial_unfused"):
        lines += [f"## ViT inference, {mode}", table(vit.inferer(mode, rank, batch, img, args.smoke)())]
        free()
    b, lat, text, r = (2, 16, 8, 4) if args.smoke else (2, 128, 154, 64)
    for mode in ("base", "serial_unfused"):
        lines += [f"## SD3 denoising step, {mode}", table(sd3.inferer(mode, r, b, lat, text, args.smoke)())]
        free()
    path = Path(args.out) / "profile.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
