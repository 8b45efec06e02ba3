"""timm ViT (vit_base_patch16_clip_224, random weights): training step, inference, torch.compile, scaling.

Variants (all fp32 weights, bf16 autocast, AdamW on the trainable parameters):
- floor: frozen model, backward to its input image only (the input requires grad; no trainables, no optimizer);
- floor_blocks: stricter floor, backward to the first block's input only (skips the patch-embedding
  convolution's input gradient, which no in-block adapter needs);
- serial: Serial LoRA through the core (`inject_serial_lora`, stream "input" of every block's fused `qkv`);
- peft: PEFT LoRA (`inject_adapter_in_model`) on every block's `attn.qkv` and `attn.proj`, same rank,
  lora_alpha = rank, no dropout.

    python benchmarks/vit.py --out OUT [--smoke] [--sections train,infer,compile,rank,tokens]
"""

from __future__ import annotations


import timm
import torch
import torch.nn.functional as F
from common import (compare, device, environment, free, ratios, record, section_args, training_comparison,
                    training_ratios, without_triton_kernel)
from peft import LoraConfig, inject_adapter_in_model

from serial_lora_core import SerialLoraConfig, inject_serial_lora, merge_serial_lora, serial_lora_parameters

ARCH = "vit_base_patch16_clip_224"
SMOKE = dict(depth=2, embed_dim=64, num_heads=2)
PEFT_TARGETS = r".*attn\.(qkv|proj)$"


def build(mode: str, rank: int, img: int, smoke: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, img_size=img, **(SMOKE if smoke else {}))
    model.requires_grad_(False)
    if mode == "serial":
        inject_serial_lora(model, SerialLoraConfig(rank=rank))
    elif mode == "peft":
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=PEFT_TARGETS), model)
    elif mode == "floor_blocks":
        # Gradient from the first block's input on: the patch embedding's output becomes the leaf.
        model.patch_embed.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))
    return model.to(device())


def adapter_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


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
        x.grad = None

    return step


def trainer(mode: str, rank: int, batch: int, img: int, smoke: bool, compile_: bool = False, info: dict | None = None):
    def make():
        model = build(mode, rank, img, smoke)
        if info is not None:
            info[mode] = adapter_parameters(model)
        return train_step(model, mode, batch, img, compile_)

    return make


def inferer(mode: str, rank: int, batch: int, img: int, smoke: bool):
    def make():
        model = build("serial" if mode.startswith("serial") else "peft" if mode == "peft_unmerged" else "base",
                      rank, img, smoke).eval()
        for p in serial_lora_parameters(model) if mode.startswith("serial") else ():
            torch.nn.init.normal_(p, std=0.02)  # a trained-looking adapter (B != 0)
        if mode == "serial_fused":
            merge_serial_lora(model)
        if mode == "serial_unfused_pytorch":
            without_triton_kernel(model)
        x = torch.randn(batch, 3, img, img, device=device())

        @torch.no_grad()
        def forward():
            with torch.autocast(device().type, dtype=torch.bfloat16):
                model(x)

        return forward

    return make


def main() -> None:
    args, sections, iters, warmup = section_args("vit", "tiny sizes, few iterations (CPU check)", __doc__, sections="train,infer,compile,rank,tokens")
    smoke = args.smoke
    batch, img, rank = (4, 32, 4) if smoke else (256, 224, 32)
    results = {"env": environment(), "arch": ARCH, "batch": batch, "img": img, "rank": rank,
               "peft_target_modules": PEFT_TARGETS, "iters": iters, "warmup": warmup}

    def save(key: str, title: str, compute) -> dict:
        return record(results, key, f"vit {title}", compute, args.name, args.out)

    if "train" in sections:
        save("train", "train", lambda: training_comparison(
            lambda m, info: trainer(m, rank, batch, img, smoke, info=info), iters, warmup))

    if "infer" in sections:
        def infer() -> dict:
            modes = ("base", "serial_unfused", "serial_unfused_pytorch", "serial_fused", "peft_unmerged")
            out = compare({m: inferer(m, rank, batch, img, smoke) for m in modes},
                          max(iters, 50) if not smoke else iters, warmup)
            out["ratios"] = ratios(out, "base", list(modes[1:]))
            return out

        save("infer", "infer", infer)

    if "compile" in sections:
        def compiled() -> dict:
            torch._dynamo.reset()
            comp = compare({f"{m}_compiled": trainer(m, rank, batch, img, smoke, compile_=True)
                            for m in ("floor", "serial", "peft")}, iters, warmup + 1)
            comp["ratios"] = ratios(comp, "floor_compiled", ["serial_compiled", "peft_compiled"])
            if "train" in results:
                comp["compiled_over_eager"] = {m: comp[f"{m}_compiled"]["median_ms"] / results["train"][m]["median_ms"]
                                               for m in ("floor", "serial", "peft")}
            return comp

        save("compile", "compile", compiled)

    if "rank" in sections:
        def rank_sweep() -> dict:
            sweep = {}
            for r in (2, 4) if smoke else (8, 16, 32, 64, 128):
                sweep[str(r)] = compare({m: trainer(m, r, batch, img, smoke) for m in ("serial", "peft")}, iters, warmup)
                free()
            return sweep

        save("rank_sweep", "rank sweep", rank_sweep)

    if "tokens" in sections:
        def token_sweep() -> dict:
            b = batch if smoke else 64
            sweep = {"batch": b, "rank": rank}
            for s in (32, 48) if smoke else (224, 336, 448):
                point = compare({m: trainer(m, rank, b, s, smoke) for m in ("floor", "serial", "peft")}, iters, warmup)
                point["tokens"] = (s // 16) ** 2 + 1
                point["ratios"] = training_ratios(point)
                sweep[str(s)] = point
                free()
            return sweep

        save("token_sweep", "token sweep", token_sweep)

if __name__ == "__main__":
    main()
