"""SD3-medium-sized transformer (24 joint blocks, 1536 wide): training step, one denoising step, loading.

bf16 base weights with fp32 adapters under bf16 autocast (diffusers' LoRA training recipe). Serial
LoRA on the image stream (to_q/to_k/to_v input) vs PEFT LoRA on to_q, to_k, to_v, to_out.0 (the
image-stream projections a diffusers user targets) vs the floor (frozen, backward to the input only).

    python benchmarks/sd3.py --out benchmarks/results [--smoke] [--sections train,infer,load,rank,tokens]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
import tempfile

import torch
import torch.nn.functional as F
from common import device, environment, free, measure, write
from diffusers import SD3Transformer2DModel
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import save_file

import diffusers_loader
from serial_lora_core import SerialLoraConfig, merge_serial_lora, remove_serial_lora, serial_lora_parameters

MEDIUM = dict(num_layers=24, attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
              caption_projection_dim=1536, pooled_projection_dim=2048, in_channels=16, out_channels=16,
              patch_size=2, pos_embed_max_size=192, sample_size=128)
SMOKE = dict(num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
             caption_projection_dim=16, pooled_projection_dim=32, in_channels=4, out_channels=4,
             patch_size=2, pos_embed_max_size=32, sample_size=16)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build(mode: str, rank: int, smoke: bool) -> SD3Transformer2DModel:
    with torch.device(device()):
        torch.manual_seed(0)
        model = SD3Transformer2DModel(**(SMOKE if smoke else MEDIUM)).to(torch.bfloat16)
    model.requires_grad_(False)
    if mode == "serial":
        diffusers_loader.add_serial_lora(model, SerialLoraConfig(rank=rank, streams=("image",), dtype=torch.float32))
    elif mode == "peft":
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS), model)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()  # fp32 adapters, as diffusers/peft training scripts keep them
    return model


def inputs(model, batch: int, latent: int, text_tokens: int, grad: bool = False) -> dict:
    dev, cfg = device(), model.config
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, latent, latent, device=dev, dtype=torch.bfloat16,
                                  requires_grad=grad),
        encoder_hidden_states=torch.randn(batch, text_tokens, cfg.joint_attention_dim, device=dev, dtype=torch.bfloat16),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, device=dev, dtype=torch.bfloat16),
        timestep=torch.full((batch,), 500.0, device=dev),
    )


def train_step(model, mode: str, batch: int, latent: int, text_tokens: int):
    x = inputs(model, batch, latent, text_tokens, grad=(mode == "floor"))
    target = torch.randn_like(x["hidden_states"], dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        with torch.autocast(device().type, dtype=torch.bfloat16):
            out = model(**x).sample
        F.mse_loss(out.float(), target).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            x["hidden_states"].grad = None

    return step


def adapters(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "serial_lora" in n or "lora_" in n)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def loading(rank: int, smoke: bool, repeats: int) -> dict:
    """load + fuse of equal-rank files: ours vs diffusers' load_lora_adapter + fuse_lora."""
    model = build("base", rank, smoke)
    folder = Path(tempfile.mkdtemp())
    # A trained-looking Serial LoRA file (non-zero B) on the image stream.
    diffusers_loader.add_serial_lora(model, SerialLoraConfig(rank=rank, streams=("image",)))
    for p in serial_lora_parameters(model):
        torch.nn.init.normal_(p, std=0.01)
    serial_path = model.save_serial_lora_adapter(folder)
    remove_serial_lora(model)
    # The equal-rank standard LoRA on to_q, to_k, to_v, to_out.0 in diffusers' key layout.
    lora = {}
    for name, module in model.named_modules():
        if any(name.endswith("attn." + t) for t in LORA_TARGETS) and isinstance(module, torch.nn.Linear):
            lora[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, module.in_features) * 0.01
            lora[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, rank) * 0.01
    lora_path = folder / "lora.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in lora.items()}, str(lora_path))

    def ours():
        sync()
        t0 = time.perf_counter()
        model.load_serial_lora_adapter(serial_path)
        merge_serial_lora(model)
        sync()
        elapsed = time.perf_counter() - t0
        remove_serial_lora(model)
        return elapsed

    def theirs(i):
        sync()
        t0 = time.perf_counter()
        model.load_lora_adapter(str(lora_path), adapter_name=f"a{i}", prefix="transformer")
        model.fuse_lora()
        sync()
        elapsed = time.perf_counter() - t0
        model.unfuse_lora()
        model.unload_lora()
        return elapsed

    import statistics

    ours(), theirs(-1)  # warm-up (file cache, kernels)
    serial_s = [ours() for _ in range(repeats)]
    lora_s = [theirs(i) for i in range(repeats)]
    result = {
        "serial_load_fuse_s": statistics.median(serial_s),
        "diffusers_lora_load_fuse_s": statistics.median(lora_s),
        "repeats": repeats,
        "serial_file_bytes": serial_path.stat().st_size,
        "lora_file_bytes": lora_path.stat().st_size,
    }
    result["speedup"] = result["diffusers_lora_load_fuse_s"] / result["serial_load_fuse_s"]
    result["file_ratio"] = result["lora_file_bytes"] / result["serial_file_bytes"]
    del model
    free()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--sections", default="train,infer,load,rank,tokens")
    args = parser.parse_args()
    sections = args.sections.split(",")
    iters, warmup = (2, 1) if args.smoke else (20, 3)
    batch, latent, text, rank = (2, 16, 8, 4) if args.smoke else (2, 128, 154, 64)
    results = {"env": environment(), "config": "smoke" if args.smoke else "sd3-medium-sized", "batch": batch,
               "latent": latent, "text_tokens": text, "rank": rank}

    def run(mode, r=rank, lat=latent):
        model = build(mode, r, args.smoke)
        m = measure(train_step(model, mode, batch, lat, text), iters, warmup)
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
        write(results, "sd3", args.out)

    if "infer" in sections:
        infer = {}
        for mode in ("base", "serial_unfused", "serial_fused", "peft_unmerged"):
            model = build({"serial_unfused": "serial", "serial_fused": "serial", "peft_unmerged": "peft"}.get(mode, "base"),
                          rank, args.smoke).eval()
            for p in serial_lora_parameters(model) if mode.startswith("serial") else ():
                torch.nn.init.normal_(p, std=0.01)
            if mode == "serial_fused":
                merge_serial_lora(model)
            x = inputs(model, batch, latent, text)

            @torch.no_grad()
            def forward(model=model, x=x):
                with torch.autocast(device().type, dtype=torch.bfloat16):
                    model(**x)

            infer[mode] = measure(forward, iters, warmup)
            del model
            free()
        base = infer["base"]["median_ms"]
        infer["ratios"] = {k: infer[k]["median_ms"] / base for k in ("serial_unfused", "serial_fused", "peft_unmerged")}
        results["infer"] = infer
        write(results, "sd3", args.out)

    if "load" in sections:
        results["load"] = loading(rank, args.smoke, 3 if args.smoke else 10)
        write(results, "sd3", args.out)

    if "rank" in sections:
        ranks = (2, 4) if args.smoke else (8, 16, 32, 64, 128)
        results["rank_sweep"] = {mode: {str(r): run(mode, r=r) for r in ranks} for mode in ("serial", "peft")}
        write(results, "sd3", args.out)

    if "tokens" in sections:
        lats = (8, 16) if args.smoke else (64, 128)  # 512 px and 1024 px
        results["token_sweep"] = {mode: {str(lat * 8): run(mode, lat=lat) for lat in lats}
                                  for mode in ("floor", "serial", "peft")}
        write(results, "sd3", args.out)


if __name__ == "__main__":
    main()
