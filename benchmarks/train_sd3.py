"""`serial-lora train-sd3`'s training step next to the bare Serial LoRA step of benchmarks/sd3.py, in one run.

SD3-medium-sized transformer (24 joint blocks, 1536 wide, random weights from its config), 1024 px
(128x128 latents), batch 2, rank 64 on the image stream, bf16 base weights with fp32 adapters, 154 text
tokens; precomputed latent distributions and text embeddings (what the trainer caches), so no pipeline
is needed. Issue 11's target: trainer steps/s >= 0.95 x the bare step's.

- bare: benchmarks/sd3.py's `serial` training step (fixed inputs, MSE to a fixed target, AdamW),
  timed with CUDA events, once before and once after the trainer (drift check);
- trainer: the engine's loop on `SD3Task` (DataLoader + per-sample latent sampling, flow-matching noise
  and timesteps, weighting, preconditioning, gradient clipping, per-step loss logging): per-step
  times are the differences of metrics.jsonl's `elapsed_s` (logged, so synchronised, at every step).

    python benchmarks/train_sd3.py --out OUT [--smoke] [--methods serial,lora] [--iters 20]
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import torch
from common import benchmark_parser, compare, cuda, device, environment, free, record
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from sd3 import MEDIUM, SMOKE
from sd3 import trainer as bare_trainer

from serial_lora_train import sd3 as sd3_task
from serial_lora_train.engine import TaskSetup, TrainingArguments, train


class SyntheticSD3Task(sd3_task.SD3Task):
    """`SD3Task` on a transformer built from its config and random precomputed latents/embeddings."""

    def __init__(self, config: dict, samples: int, latent: int, text_tokens: int) -> None:
        super().__init__(sd3_task.SD3Options("random weights (config)", "synthetic", streams=("image",)))
        self.config, self.samples, self.latent, self.text_tokens = config, samples, latent, text_tokens

    def build(self, args, accelerator) -> TaskSetup:
        with torch.device(accelerator.device):
            torch.manual_seed(0)
            transformer = SD3Transformer2DModel(**self.config).to(sd3_task.weight_dtype(args.mixed_precision))
        model = self.adapt(transformer, args)
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's training schedule
        g = torch.Generator().manual_seed(0)
        n, c, cfg = self.samples, self.config["in_channels"], self.config
        mean = torch.randn(n, c, self.latent, self.latent, generator=g)
        params = torch.cat([mean, torch.full_like(mean, -10.0)], 1)  # a latent distribution (mean, log-variance)
        self.dataset = sd3_task.PrecomputedSD3Dataset(
            params, torch.randn(n, self.text_tokens, cfg["joint_attention_dim"], generator=g),
            torch.randn(n, cfg["pooled_projection_dim"], generator=g), 0.0609, 1.5305)
        self.data_facts = {"images": n, "captions": n, "skipped": []}
        return TaskSetup(model=model, train_dataset=self.dataset)


def trainer_steps(method: str, config: dict, rank: int, batch: int, latent: int, text: int, iters: int,
                  warmup: int) -> dict:
    """Per-step milliseconds of the engine's loop (after `warmup` steps), from metrics.jsonl."""
    with tempfile.TemporaryDirectory() as out:
        task = SyntheticSD3Task(config, samples=4 * batch, latent=latent, text_tokens=text)
        args = TrainingArguments(output_dir=out, method=method, rank=rank, dropout=0.0, learning_rate=1e-4,
                                 train_batch_size=batch, max_train_steps=warmup + iters, mixed_precision="bf16",
                                 logging_steps=1, disable_progress_bar=True)
        if cuda():
            torch.cuda.reset_peak_memory_stats()
        train(task, args)
        log = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in log if "loss" in r]
    times = [1e3 * (b - a) for a, b in zip(elapsed[warmup - 1:], elapsed[warmup:])]
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "iters": len(times),
            "adapter_parameters": task.info.adapter_parameters,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda() else float("nan")}


def comparison(methods: list[str], config: dict, rank: int, batch: int, latent: int, text: int, smoke: bool,
               iters: int, warmup: int) -> dict:
    bare = {"serial": "serial", "lora": "peft"}
    out: dict = {}
    for method in methods:
        mode = bare[method]
        before = compare({mode: bare_trainer(mode, rank, batch, latent, text, smoke)}, iters, warmup)[mode]
        trainer = trainer_steps(method, config, rank, batch, latent, text, iters, warmup)
        free()  # the trainer's model, before the second bare model is built
        after = compare({mode: bare_trainer(mode, rank, batch, latent, text, smoke)}, iters, warmup)[mode]
        bare_ms = (before["median_ms"] + after["median_ms"]) / 2
        out[method] = {
            "bare_before": before, "bare_after": after, "trainer": trainer,
            "bare_steps_per_s": 1e3 / bare_ms, "trainer_steps_per_s": 1e3 / trainer["median_ms"],
            "trainer_over_bare_steps_per_s": bare_ms / trainer["median_ms"],
        }
        print(f"   {method}: bare {bare_ms:.1f} ms, trainer {trainer['median_ms']:.1f} ms/step -> "
              f"{out[method]['trainer_over_bare_steps_per_s']:.3f} x the bare steps/s (target >= 0.95)", flush=True)
    return out


def main() -> None:
    parser = benchmark_parser("train_sd3", "tiny config on CPU, seconds (tests run it)", description=__doc__)
    parser.add_argument("--methods", default="serial", help="comma list of serial, lora")
    args = parser.parse_args()
    iters, warmup = (3, 2) if args.smoke else (args.iters, 3)
    batch, latent, text, rank = (2, 16, 8, 4) if args.smoke else (2, 128, 154, 64)
    config = SMOKE if args.smoke else MEDIUM
    methods = [m.strip() for m in args.methods.split(",")]
    results = {"env": environment(), "config": "smoke" if args.smoke else "sd3-medium-sized", "transformer": config,
               "device": str(device()), "batch": batch, "latent": latent, "pixels": latent * 8, "text_tokens": text,
               "rank": rank, "streams": ["image"], "mixed_precision": "bf16", "iters": iters, "warmup": warmup}
    record(results, "train", "train-sd3 trainer vs bare step",
           lambda: comparison(methods, config, rank, batch, latent, text, args.smoke, iters, warmup),
           args.name, args.out)


if __name__ == "__main__":
    main()
