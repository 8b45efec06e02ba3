"""timm ViT (vit_base_patch16_clip_224): training step, inference, compile and scaling.

Serial LoRA vs PEFT LoRA (fused `qkv` + `proj`, what a PEFT user targets on timm) vs the floor any
in-block adapter pays (frozen model, backward to its input only), bf16 autocast, AdamW on trainables.

    python benchmarks/vit.py --out benchmarks/results [--smoke] [--sections train,infer,compile,rank,tokens]
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F
from common import device, environment, free, measure, write
from peft import LoraConfig, inject_adapter_in_model

import timm_plugin  # noqa: F401
from serial_lora_core import merge_serial_lora

ARCH = "vit_base_patch16_clip_224"
SMOKE = dict(depth=2, embed_dim=64, num_heads=2)


def build(mode: str, rank: int, img: int, smoke: bool):
    dev = device()
    sizes = dict(img_size=img, **(SMOKE if smoke else {}))
    if mode == "serial":
        model = timm.create_model(f"{ARCH}.serial_lora", pretrained=False, serial_lora_rank=rank, **sizes)
    else:
        model = timm.create_model(ARCH, pretrained=False, **sizes)
        model.requires_grad_(False)
        if mode == "peft":
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=r".*attn\.(qkv|proj)$"), model)
    return model.to(dev)


def train_step(model, mode: str, batch: int, img: int, compile_: bool = False):
    dev = device()
    x = torch.randn(batch, 3, img, img, device=dev, requires_grad=(mode == "floor"))
    y = torch.randint(0, 10, (batch,), device=dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    run = torch.compile(model) if compile_ else model

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(run(x).float(), y)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            x.grad = None

    return step


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapters(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "serial_lora" in n or "lora_" in n)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, few iterations (CPU check)")
    parser.add_argument("--sections", default="train,infer,compile,rank,tokens")
    args = parser.parse_args()
    sections = args.sections.split(",")
    iters, warmup = (2, 1) if args.smoke else (20, 3)
    batch, img, rank = (4, 32, 4) if args.smoke else (256, 224, 32)
    results = {"env": environment(), "arch": ARCH, "batch": batch, "img": img, "rank": rank}

    def run(mode, r=rank, b=batch, size=img, compile_=False):
        model = build(mode, r, size, args.smoke)
        m = measure(train_step(model, mode, b, size, compile_), iters, warmup)
        m["adapter_params"] = adapters(model)
        del model
        free()
        return m

    if "train" in sections:
        train = {mode: run(mode) for mode in ("floor", "serial", "peft")}
        floor = train["floor"]["median_ms"]
        train["ratios"] = {
            "serial_over_floor": train["serial"]["median_ms"] / floor,
            "peft_over_floor": train["peft"]["median_ms"] / floor,
            "serial_overhead_over_peft_overhead": (train["serial"]["median_ms"] - floor)
            / max(train["peft"]["median_ms"] - floor, 1e-9),
            "serial_peak_over_peft_peak": train["serial"]["peak_gib"] / train["peft"]["peak_gib"],
        }
        results["train"] = train
        write(results, "vit", args.out)

    if "infer" in sections:
        dev = device()
        x = torch.randn(batch, 3, img, img, device=dev)
        infer = {}
        for mode in ("base", "serial_unfused", "serial_fused", "peft_unmerged"):
            model = build({"base": "floor", "peft_unmerged": "peft"}.get(mode, "serial"), rank, img, args.smoke).eval()
            if mode == "serial_fused":
                merge_serial_lora(model)

            @torch.no_grad()
            def forward(model=model):
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    model(x)

            infer[mode] = measure(forward, iters, warmup)
            del model
            free()
        base = infer["base"]["median_ms"]
        infer["ratios"] = {k: infer[k]["median_ms"] / base for k in ("serial_unfused", "serial_fused", "peft_unmerged")}
        results["infer"] = infer
        write(results, "vit", args.out)

    if "compile" in sections:
        comp = {f"{mode}_compiled": run(mode, compile_=True) for mode in ("floor", "serial", "peft")}
        floor = comp["floor_compiled"]["median_ms"]
        comp["ratios"] = {"serial_over_floor": comp["serial_compiled"]["median_ms"] / floor,
                          "peft_over_floor": comp["peft_compiled"]["median_ms"] / floor}
        results["compile"] = comp
        write(results, "vit", args.out)

    if "rank" in sections:
        ranks = (2, 4) if args.smoke else (8, 16, 32, 64, 128)
        results["rank_sweep"] = {mode: {str(r): run(mode, r=r) for r in ranks} for mode in ("serial", "peft")}
        write(results, "vit", args.out)

    if "tokens" in sections:
        sizes = (32, 48) if args.smoke else (224, 336, 448)
        b = batch if args.smoke else 64
        results["token_sweep"] = {"batch": b, **{mode: {str(s): run(mode, b=b, size=s) for s in sizes}
                                                 for mode in ("floor", "serial", "peft")}}
        write(results, "vit", args.out)


if __name__ == "__main__":
    main()
