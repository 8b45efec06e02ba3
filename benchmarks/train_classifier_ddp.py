"""`train-classifier` data-parallel scaling: the same trainer on 1 and on N GPUs (DDP through Accelerate).

Run it once per process count with `accelerate launch`; each run appends its global images/s (per-process
batch x processes / second, from the trainer's own metrics log) to `<out>/<name>.json`:

    accelerate launch --num_processes 1 benchmarks/train_classifier_ddp.py --out OUT
    accelerate launch --num_processes 2 --multi_gpu benchmarks/train_classifier_ddp.py --out OUT

Same model, batch per GPU (256), bf16 and rank 32 as `train_classifier.py`'s in-memory section; the final losses
of both runs are recorded next to each other. Target (issue 11): 2 GPUs >= 1.8 x one GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import PartialState
from common import benchmark_parser, environment
from train_classifier import SMOKE_HELP, SyntheticClassifier, run_trainer


def main() -> None:
    parser = benchmark_parser("train_classifier_ddp", SMOKE_HELP, iters=30, description=__doc__)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=6)
    args = parser.parse_args()
    batch, img, rank = (4, 32, 4) if args.smoke else (256, 224, 32)
    iters, warmup, workers = (3, 1, 0) if args.smoke else (args.iters, args.warmup, args.workers)
    state = PartialState(cpu=not torch.cuda.is_available())  # as the engine's Accelerator: gloo without a GPU
    processes = state.num_processes
    scratch = Path(args.out) / f"{args.name}_scratch"  # one folder for all processes: the main one writes it
    length = batch * processes * (warmup + iters + 1)
    run = run_trainer(SyntheticClassifier(img, args.smoke, length), scratch / "serial", "serial", batch, rank,
                      warmup, iters, workers)
    if not state.is_main_process:
        return
    path = Path(args.out) / f"{args.name}.json"
    results = json.loads(path.read_text()) if path.exists() else {"env": environment(), "runs": {}}
    results["runs"][str(processes)] = {**run, "global_images_per_s": run["images_per_s"] * processes,
                                       "batch_per_process": batch}
    runs = results["runs"]
    if "1" in runs and len(runs) > 1:
        top = max(runs, key=int)
        results["speedup"] = {f"{top}_over_1": runs[top]["global_images_per_s"] / runs["1"]["global_images_per_s"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(json.dumps({"processes": processes, **results["runs"][str(processes)], **results.get("speedup", {})}))


if __name__ == "__main__":
    main()
