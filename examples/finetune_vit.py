"""Fine-tune a timm ViT with Serial LoRA next to PEFT's LoRA, judged on held-out data; save, reload, merge.

The default run is self-contained (no hub, no dataset download) and needs under a minute of CPU time.
A small CLIP-style ViT is first trained on one synthetic task (stripes, checkers and discs in four
colours), standing in for a pretrained backbone. It is then frozen and adapted to a shifted task (new
colours, new label rule) by three methods, each with the same steps, batches and learning rate:

- head only: a new linear head on the frozen features (the floor any adapter must beat);
- Serial LoRA (this package): one shared pair per block, before q, k and v, through
  `timm.create_model("<arch>.serial_lora", ...)`;
- PEFT LoRA on the attention's `qkv` and `proj` Linears only (timm fuses q, k, v into one `qkv`).

Accuracy is measured on held-out images never seen in training, after 1/4, 1/2 and all of the steps,
for five seeds (mean +- std). The summary says which method is ahead and by how much, whichever it is.
The adapter of the first seed is saved, reloaded through `create_model(..., serial_lora_weights=...)`
(outputs must be identical) and merged into the weights (outputs must agree).

Real use: `--model vit_base_patch16_clip_224 --pretrained --data /path/to/imagefolder --image-size 224`
(then a random `--holdout-fraction` of the folder is held out).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
from pathlib import Path
from typing import Callable, NamedTuple

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import timm_plugin  # noqa: F401  (registers the ".serial_lora" tag)
from serial_lora_core import (
    atomic_write,
    count_trainable_parameters,
    loraplus_param_groups,
    merge_and_unload_serial_lora,
    read_file,
    save_serial_lora,
)

TINY = dict(img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=4)
"""The stand-in backbone: 16 patches of 8x8 pixels, 4 blocks, 64 wide (about 0.2 M parameters)."""
PEFT_TARGETS = r"blocks\.\d+\.attn\.(qkv|proj)"
"""PEFT matches a string target against full module names: the attention's projections only (a plain
["qkv", "proj"] would also match `patch_embed.proj`, a Conv2d that Serial LoRA leaves alone)."""
Data = tuple[torch.Tensor, torch.Tensor]


def synthetic_task(n: int, shift: bool, seed: int) -> Data:
    """`n` noisy images of a pattern in a colour; the label depends on both.

    `shift=False` is the "pretraining" task (8 classes: pattern x warm/cold colour); `shift=True` uses
    other colours and another rule (4 classes: (pattern + colour) mod 4), so the frozen backbone must
    be adapted to solve it. Each seed draws new images (patterns, colours and noise).
    """
    g = torch.Generator().manual_seed(seed)
    size = TINY["img_size"]
    coords = torch.arange(size)
    patterns = [
        (coords[:, None] // 4 % 2).expand(size, size),  # horizontal stripes
        (coords[None, :] // 4 % 2).expand(size, size),  # vertical stripes
        ((coords[:, None] // 4 + coords[None, :] // 4) % 2),  # checkers
        ((coords[:, None] - size / 2) ** 2 + (coords[None, :] - size / 2) ** 2 < (size / 3) ** 2).long(),  # disc
    ]
    palette = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]] if not shift else
                           [[0, 1, 1], [1, 0, 1], [1, .5, 0], [.5, .5, 1]], dtype=torch.float32)
    pattern = torch.randint(0, 4, (n,), generator=g)
    colour = torch.randint(0, 4, (n,), generator=g)
    images = torch.stack([patterns[p].float() for p in pattern])[:, None] * palette[colour][:, :, None, None]
    images = images + 0.3 * torch.randn(images.shape, generator=g)
    labels = pattern * 2 + colour % 2 if not shift else (pattern + colour) % 4
    return images, labels


def image_folder(path: str, image_size: int, holdout_fraction: float, seed: int) -> tuple[Data, Data, int]:
    """A small ImageFolder loaded into memory, split at random into (train, held-out); and its class count."""
    from torchvision import datasets, transforms

    if not 0 < holdout_fraction < 1:
        raise ValueError(f"--holdout-fraction must be between 0 and 1, got {holdout_fraction}")
    tf = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor()])
    data = datasets.ImageFolder(path, transform=tf)
    xs, ys = zip(*(data[i] for i in range(len(data))))
    x, y = torch.stack(xs), torch.tensor(ys)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_held = max(1, round(len(x) * holdout_fraction))
    if n_held >= len(x):
        raise ValueError(f"{path} has {len(x)} images: too few to hold {holdout_fraction:.0%} out for evaluation")
    held, train = order[:n_held], order[n_held:]
    return (x[train], y[train]), (x[held], y[held]), len(data.classes)


def train(model: nn.Module, data: Data, steps: int, optimizer: torch.optim.Optimizer, batch: int,
          generator: torch.Generator) -> None:
    """`steps` optimizer steps on random batches drawn with `generator` (same seed = same batches for every method)."""
    x, y = data
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=generator)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, data: Data) -> float:
    model.eval()
    x, y = data
    return float((model(x).argmax(-1) == y).float().mean())


def adapter_parameters(model: nn.Module, marker: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if marker in n)


class Run(NamedTuple):
    """One method, one seed: `model` is evaluated; `trainee` is trained on `data` by `optimizer`."""

    model: nn.Module
    trainee: nn.Module
    data: Data
    optimizer: torch.optim.Optimizer


def head_only(backbone: nn.Module, num_classes: int, train_set: Data, lr: float) -> Run:
    """A new linear head on the frozen backbone's features (computed once: the backbone never changes)."""
    model = copy.deepcopy(backbone)
    model.reset_classifier(num_classes)
    model.requires_grad_(False).eval()
    head = model.get_classifier().requires_grad_(True)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(train_set[0]), pre_logits=True)
    return Run(model, head, (features, train_set[1]), torch.optim.AdamW(head.parameters(), lr=lr))


def peft_lora(backbone: nn.Module, num_classes: int, rank: int) -> nn.Module:
    """PEFT's LoRA on every block's attention `qkv` and `proj` (and nothing else), plus a new head."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    model = copy.deepcopy(backbone)
    model.reset_classifier(num_classes)
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=PEFT_TARGETS), model)
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))
    expected = sorted(f"blocks.{i}.attn.{p}" for i in range(len(model.blocks)) for p in ("qkv", "proj"))
    if wrapped != expected:
        raise SystemExit(f"PEFT adapted {wrapped}, expected exactly {expected}: the comparison would be unfair")
    model.get_classifier().requires_grad_(True)
    return model


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def compare(serial: dict, peft: dict) -> str:
    """Serial LoRA vs PEFT LoRA, two mean_std dicts of held-out accuracy, in words: who leads, by how much."""
    gap, noise = serial["mean"] - peft["mean"], max(serial["std"], peft["std"])
    numbers = f"Serial LoRA {serial['mean']:.3f} +- {serial['std']:.3f}, PEFT LoRA {peft['mean']:.3f} +- {peft['std']:.3f}"
    if abs(gap) <= noise:
        return f"{numbers}: within one standard deviation ({noise:.3f}) of each other"
    leader = "Serial LoRA" if gap > 0 else "PEFT LoRA"
    return f"{numbers}: {leader} ahead by {abs(gap):.3f}, more than one standard deviation ({noise:.3f})"


def verdict(results: dict, seeds: list[int]) -> str:
    """Plain sentences comparing the methods' held-out accuracy along training, whichever wins."""
    serial, peft = results["serial_lora"]["heldout_accuracy_at_step"], results["peft_lora"]["heldout_accuracy_at_step"]
    lines = [f"Held-out accuracy, mean +- std over seeds {seeds}, after {step} steps: {compare(serial[step], peft[step])}."
             for step in serial]
    lines.append(f"A new head alone on the frozen backbone reaches {results['head_only']['heldout_accuracy']['mean']:.3f}. "
                 f"Serial LoRA has {results['parameter_ratio_serial_over_peft']:.2f}x PEFT LoRA's adapter parameters.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_clip_224", help="timm architecture")
    parser.add_argument("--pretrained", action="store_true", help="load the architecture's pretrained base weights")
    parser.add_argument("--data", help="ImageFolder for the adaptation task (default: the embedded synthetic task)")
    parser.add_argument("--holdout-fraction", type=float, default=0.2, help="share of --data held out for evaluation")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--model-kwargs", type=json.loads, default={},
                        help='JSON of extra timm.create_model arguments, e.g. \'{"depth": 2}\' (not for the default run)')
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-train-steps", type=int, default=120, help="adaptation steps per method and seed")
    parser.add_argument("--pretrain-steps", type=int, default=150, help="steps of the stand-in backbone's pretraining")
    parser.add_argument("--train-batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--lora-plus-ratio", type=float, default=1.0,
                        help="LoRA+: learning rate of B = ratio x that of A (the paper uses 20 with 2e-4)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="adaptation seeds (head and adapter init, batch order); backbone and data use --seed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stand-in backbone and the data")
    parser.add_argument("--output-dir", default="outputs/finetune_vit", help="folder for the adapter and the report")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tiny = not args.pretrained and args.data is None
    # The synthetic images are TINY's size; a real architecture on them gets that input size (timm resamples
    # its position embeddings when it loads pretrained weights).
    image_size = args.image_size or (None if args.data else TINY["img_size"])
    sizes = TINY if tiny else {**({"img_size": image_size} if image_size else {}), **args.model_kwargs}
    steps, lr, batch = args.max_train_steps, args.learning_rate, args.train_batch_size
    if tiny and "OMP_NUM_THREADS" not in os.environ:
        # 64-wide matrices are too small to share between threads: on 2 busy cores a second thread made
        # this run 10x slower (waiting threads), never faster. Big models keep torch's default.
        torch.set_num_threads(1)

    if args.data:
        train_set, heldout, num_classes = image_folder(args.data, args.image_size or 224, args.holdout_fraction, args.seed)
    else:
        train_set, heldout = synthetic_task(1024, True, args.seed + 1), synthetic_task(1024, True, args.seed + 2)
        num_classes = 4
    torch.manual_seed(args.seed)
    if tiny:
        # Stand-in for pretrained weights: train the whole small ViT on the unshifted task.
        backbone = timm.create_model(args.model, pretrained=False, num_classes=8, **sizes)
        pretrain = synthetic_task(2048, False, args.seed)
        train(backbone, pretrain, args.pretrain_steps, torch.optim.AdamW(backbone.parameters(), lr=2e-3), batch,
              torch.Generator().manual_seed(args.seed))
        print(f"stand-in backbone: accuracy {accuracy(backbone, synthetic_task(1024, False, args.seed + 3)):.3f} "
              f"on held-out images of its own (unshifted) task")
    else:
        backbone = timm.create_model(args.model, pretrained=args.pretrained, **sizes)
    overlay = None
    if not args.pretrained:
        # Every model below must start from these same base weights: timm loads them from the file.
        base_path = atomic_write(out / "backbone.safetensors", lambda tmp: save_file(backbone.state_dict(), tmp))
        overlay = {"file": str(base_path), "num_classes": backbone.num_classes}

    def serial_lora_run() -> Run:
        # Serial LoRA through timm's own create_model: base weights in, adapters injected, all else frozen.
        model = timm.create_model(f"{args.model}.serial_lora", pretrained=True,
                                  pretrained_cfg_overlay=overlay, num_classes=num_classes,
                                  serial_lora_rank=args.rank, **sizes)
        return Run(model, model, train_set, torch.optim.AdamW(loraplus_param_groups(model, lr=lr, ratio=args.lora_plus_ratio)))

    def peft_lora_run() -> Run:
        model = peft_lora(backbone, num_classes, args.rank)
        return Run(model, model, train_set, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr))

    # name -> (builds one run, the parameter-name marker of its adapter)
    methods: dict[str, tuple[Callable[[], Run], str | None]] = {
        "head_only": (lambda: head_only(backbone, num_classes, train_set, lr), None),
        "serial_lora": (serial_lora_run, ".serial_lora."),
        "peft_lora": (peft_lora_run, "lora_"),
    }
    # Held-out accuracy along the way, not only at the end: which method learns faster, which ends higher.
    checkpoints = sorted({max(1, steps // 4), max(1, steps // 2), steps})
    results: dict = {}
    trained: dict[str, list[nn.Module]] = {}
    for name, (build, marker) in methods.items():
        curves: list[list[float]] = []
        trained[name] = []
        for seed in args.seeds:
            torch.manual_seed(seed)  # the new head's (and the adapter's) initialisation
            run, generator, done = build(), torch.Generator().manual_seed(seed), 0
            curves.append([])
            for checkpoint in checkpoints:
                train(run.trainee, run.data, checkpoint - done, run.optimizer, batch, generator)
                done = checkpoint
                curves[-1].append(accuracy(run.model, heldout))
            trained[name].append(run.model)
            print(f"{name:12s} seed {seed}: held-out accuracy " + ", ".join(
                f"{acc:.3f} at step {step}" for step, acc in zip(checkpoints, curves[-1])), flush=True)
        model = trained[name][0]
        finals = [curve[-1] for curve in curves]
        results[name] = {
            "adapter_parameters": adapter_parameters(model, marker) if marker else 0,
            "trainable_parameters": count_trainable_parameters(model),
            "heldout_accuracy": mean_std(finals),
            "heldout_accuracy_per_seed": dict(zip(map(str, args.seeds), finals)),
            "heldout_accuracy_at_step": {str(step): mean_std([c[i] for c in curves]) for i, step in enumerate(checkpoints)},
            "train_accuracy": mean_std([accuracy(m, train_set) for m in trained[name]]),
        }
    results["parameter_ratio_serial_over_peft"] = (results["serial_lora"]["adapter_parameters"]
                                                   / results["peft_lora"]["adapter_parameters"])
    results["parameter_ratio_note"] = (
        "Serial LoRA: one pair per block, 2*d*r. PEFT LoRA on timm's fused qkv Linear shares one A (r x d) "
        "across q, k and v with one B (3d x r), 4*d*r, plus 2*d*r on proj: 6*d*r, so 3x Serial's. A LoRA with "
        "its own pair on each of q, k, v and o (8*d*r) would be 4x Serial's, the paper's 1/4.")

    first = trained["serial_lora"][0]
    adapter_path = out / "serial_lora.safetensors"
    # The new head is trained in full: it goes into the adapter file too (as PEFT's modules_to_save).
    heads = first.pretrained_cfg.get("classifier") or "head"
    save_serial_lora(first, adapter_path, modules_to_save=(heads,) if isinstance(heads, str) else tuple(heads))
    # Reload through create_model: base weights, then the adapter and the trained head from the file.
    reloaded = timm.create_model(f"{args.model}.serial_lora", pretrained=True,
                                 pretrained_cfg_overlay=overlay, num_classes=num_classes,
                                 serial_lora_weights=str(adapter_path), **sizes)
    first.eval(), reloaded.eval()
    probe = heldout[0][:64]
    with torch.no_grad():
        expected = first(probe)
        reload_equal = torch.equal(reloaded(probe), expected)
        merged = merge_and_unload_serial_lora(reloaded)
        merge_error = float((merged(probe) - expected).abs().max())

    report = {
        "model": args.model,
        "backbone": "pretrained" if args.pretrained else ("stand-in trained on the unshifted synthetic task" if tiny else "random"),
        "data": args.data or "synthetic: 1024 training and 1024 held-out images of the shifted task",
        "rank": args.rank,
        "max_train_steps": steps,
        "train_batch_size": batch,
        "learning_rate": lr,
        "seeds": args.seeds,
        "peft_target_modules": PEFT_TARGETS,
        **results,
        "summary": verdict(results, args.seeds),
        "adapter_file": str(adapter_path),
        "adapter_file_bytes": adapter_path.stat().st_size,
        "file_info": {k: read_file(adapter_path).metadata[k] for k in ("rank", "alpha", "streams", "architecture")},
        "reloaded_outputs_identical": reload_equal,
        "merged_max_abs_difference": merge_error,
    }
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    print()
    print(f"{'method':12s} {'adapter params':>14s} {'held-out accuracy':>20s}")
    for name in methods:
        acc = results[name]["heldout_accuracy"]
        print(f"{name:12s} {results[name]['adapter_parameters']:14d} {acc['mean']:12.3f} +- {acc['std']:.3f}")
    print(report["summary"])
    print(results["parameter_ratio_note"])
    print(f"adapter {adapter_path} ({report['adapter_file_bytes']} bytes): reloaded outputs identical: {reload_equal}, "
          f"merged max difference {merge_error:.1e}; full report: {out / 'report.json'}")
    if not reload_equal or merge_error > 1e-4:
        raise SystemExit("reloaded or merged outputs differ from the trained model")
    return report


if __name__ == "__main__":
    main()
