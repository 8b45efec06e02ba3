"""SD3-medium-sized transformer (24 joint blocks, 1536 wide, random weights): training step, one
denoising step, loading + fusing, scaling.

bf16 base weights with fp32 adapters under bf16 autocast (diffusers' LoRA training recipe). Variants:
- floor: frozen transformer, backward to its latent input only (no trainables, no optimizer);
- floor_blocks: stricter floor, backward to the first joint block's image tokens only (skips the
  patch-embedding convolution's input gradient);
- serial: Serial LoRA on the image stream (one pair before to_q/to_k/to_v of each block);
- peft: PEFT LoRA on to_q, to_k, to_v, to_out.0 (the image-stream projections; the text stream's
  add_q/k/v_proj and to_add_out are not targeted, like the serial variant), same rank, lora_alpha = rank.

    python benchmarks/sd3.py --out OUT [--smoke] [--sections train,infer,load,rank,tokens]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (compare, device, environment, free, ratios, record, section_args, sync, training_comparison,
                    training_ratios, without_triton_kernel)
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.utils import logging as diffusers_logging
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
diffusers_logging.set_verbosity_error()  # the per-call "no LoRA keys for the text encoders" notes


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
                p.data = p.data.float()  # fp32 adapters, as diffusers' training scripts keep them
    elif mode == "floor_blocks":
        # Gradient from the first joint block's image tokens on.
        model.pos_embed.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))
    return model


def inputs(model, batch: int, latent: int, text_tokens: int, grad: bool = False) -> dict:
    dev, cfg = device(), model.config
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, latent, latent, device=dev, dtype=torch.bfloat16,
                                  requires_grad=grad),
        encoder_hidden_states=torch.randn(batch, text_tokens, cfg.joint_attention_dim, device=dev,
                                          dtype=torch.bfloat16),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, device=dev, dtype=torch.bfloat16),
        timestep=torch.full((batch,), 500.0, device=dev),
    )


def trainer(mode: str, rank: int, batch: int, latent: int, text_tokens: int, smoke: bool, info: dict | None = None):
    def make():
        model = build(mode, rank, smoke)
        if info is not None:
            info[mode] = sum(p.numel() for p in model.parameters() if p.requires_grad)
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
            x["hidden_states"].grad = None

        return step

    return make


def inferer(mode: str, rank: int, batch: int, latent: int, text_tokens: int, smoke: bool):
    def make():
        kind = "serial" if mode.startswith("serial") else "peft" if mode == "peft_unmerged" else "base"
        model = build(kind, rank, smoke).eval()
        for p in serial_lora_parameters(model) if kind == "serial" else ():
            torch.nn.init.normal_(p, std=0.01)  # a trained-looking adapter (B != 0)
        if mode == "serial_fused":
            merge_serial_lora(model)
        if mode == "serial_unfused_pytorch":
            without_triton_kernel(model)
        x = inputs(model, batch, latent, text_tokens)

        @torch.no_grad()
        def forward():
            with torch.autocast(device().type, dtype=torch.bfloat16):
                model(**x)

        return forward

    return make


def tiny_components() -> dict | None:
    """Text encoders, tokenizers, VAE and scheduler of the tests' tiny offline SD3 pipeline."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    try:
        from sd3_tiny import tiny_sd3_pipeline

        components = dict(tiny_sd3_pipeline().components)
    except Exception as error:  # a transformers/tokenizers version that cannot build it: model level
        print(f"   tiny pipeline unavailable ({type(error).__name__}: {error}); loading at model level", flush=True)
        return None
    components.pop("transformer")
    return components


def loading(rank: int, smoke: bool, repeats: int) -> dict:
    """Load + fuse of equal-rank files into the same transformer, ours vs diffusers' stock LoRA path."""
    model = build("base", rank, smoke)
    folder = Path(tempfile.mkdtemp())
    # A trained-looking Serial LoRA file (B != 0) on the image stream, bf16 like the base weights.
    diffusers_loader.add_serial_lora(model, SerialLoraConfig(rank=rank, streams=("image",)))
    for p in serial_lora_parameters(model):
        torch.nn.init.normal_(p, std=0.01)
    serial_path = model.save_serial_lora_adapter(folder)
    remove_serial_lora(model)
    # The equal-rank standard LoRA on to_q, to_k, to_v, to_out.0 in diffusers/PEFT's key layout, bf16.
    lora = {}
    for name, module in model.named_modules():
        if any(name.endswith("attn." + t) for t in LORA_TARGETS) and isinstance(module, torch.nn.Linear):
            lora[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, module.in_features) * 0.01
            lora[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, rank) * 0.01
    lora_path = folder / "pytorch_lora_weights.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in lora.items()}, str(lora_path))

    components = tiny_components()
    if components is not None:
        pipe = StableDiffusion3Pipeline(transformer=model, **components)
        pipe.to(device())
        level = ("pipeline: pipe.load_serial_lora_weights + pipe.fuse_serial_lora vs "
                 "pipe.load_lora_weights + pipe.fuse_lora")

        def ours_load():
            pipe.load_serial_lora_weights(str(serial_path))
            pipe.fuse_serial_lora()

        def ours_undo():
            pipe.unfuse_serial_lora()
            pipe.unload_serial_lora_weights()

        def theirs_load(i):
            pipe.load_lora_weights(str(lora_path), adapter_name=f"a{i}")
            pipe.fuse_lora()

        def theirs_undo():
            pipe.unfuse_lora()
            pipe.unload_lora_weights()
    else:
        level = ("model: transformer.load_serial_lora_adapter + merge_serial_lora vs "
                 "transformer.load_lora_adapter + fuse_lora")

        def ours_load():
            model.load_serial_lora_adapter(serial_path)
            merge_serial_lora(model)

        def ours_undo():
            remove_serial_lora(model)

        def theirs_load(i):
            model.load_lora_adapter(str(lora_path), adapter_name=f"a{i}", prefix="transformer")
            model.fuse_lora()

        def theirs_undo():
            model.unfuse_lora()
            model.unload_lora()

    def timed(load, undo) -> float:
        sync()
        t0 = time.perf_counter()
        load()
        sync()
        elapsed = time.perf_counter() - t0
        undo()
        sync()
        return elapsed

    # Warm-up (file cache, kernels), checking that each path really changes the weights and undoes it.
    probe = model.transformer_blocks[0].attn.to_q.weight
    original = probe.detach().clone()
    checks = {}
    for name, load, undo in (("serial", ours_load, ours_undo), ("diffusers", lambda: theirs_load(-1), theirs_undo)):
        load()
        checks[f"{name}_fuse_changed_to_q"] = not torch.equal(probe, original)
        undo()
        checks[f"{name}_undo_restored_to_q"] = bool(torch.allclose(probe.float(), original.float(), atol=1e-2))
    serial_s, lora_s = [], []
    for i in range(repeats):  # interleaved, like the other comparisons
        serial_s.append(timed(ours_load, ours_undo))
        lora_s.append(timed(lambda: theirs_load(i), theirs_undo))
    result = {
        "level": level,
        "serial_load_fuse_ms": 1e3 * statistics.median(serial_s),
        "diffusers_lora_load_fuse_ms": 1e3 * statistics.median(lora_s),
        "serial_min_max_ms": [1e3 * min(serial_s), 1e3 * max(serial_s)],
        "diffusers_min_max_ms": [1e3 * min(lora_s), 1e3 * max(lora_s)],
        "repeats": repeats,
        "checks": checks,
        "serial_file_bytes": serial_path.stat().st_size,
        "lora_file_bytes": lora_path.stat().st_size,
        "files": "both bf16 safetensors, rank %d; LoRA on %s of every block" % (rank, ", ".join(LORA_TARGETS)),
    }
    result["speedup"] = result["diffusers_lora_load_fuse_ms"] / result["serial_load_fuse_ms"]
    result["file_ratio"] = result["lora_file_bytes"] / result["serial_file_bytes"]
    return result


def main() -> None:
    args, sections, iters, warmup = section_args("sd3", "tiny sizes, few iterations (CPU check)", __doc__, sections="train,infer,load,rank,tokens")
    smoke = args.smoke
    batch, latent, text, rank = (2, 16, 8, 4) if smoke else (2, 128, 154, 64)
    results = {"env": environment(), "config": "smoke" if smoke else "sd3-medium-sized", "transformer": MEDIUM,
               "batch": batch, "latent": latent, "pixels": latent * 8, "text_tokens": text, "rank": rank,
               "peft_target_modules": LORA_TARGETS, "iters": iters, "warmup": warmup}

    def save(key: str, title: str, compute) -> dict:
        return record(results, key, f"sd3 {title}", compute, args.name, args.out)

    if "train" in sections:
        save("train", "train", lambda: training_comparison(
            lambda m, info: trainer(m, rank, batch, latent, text, smoke, info), iters, warmup))

    if "infer" in sections:
        def infer() -> dict:
            modes = ("base", "serial_unfused", "serial_unfused_pytorch", "serial_fused", "peft_unmerged")
            out = compare({m: inferer(m, rank, batch, latent, text, smoke) for m in modes},
                          iters if smoke else max(iters, 40), warmup)
            out["ratios"] = ratios(out, "base", list(modes[1:]))
            return out

        save("infer", "infer", infer)

    if "load" in sections:
        print(f"   {save('load', 'load', lambda: loading(rank, smoke, 3 if smoke else 10))}", flush=True)

    if "rank" in sections:
        def rank_sweep() -> dict:
            sweep = {}
            for r in (2, 4) if smoke else (8, 16, 32, 64, 128):
                sweep[str(r)] = compare({m: trainer(m, r, batch, latent, text, smoke) for m in ("serial", "peft")},
                                        iters, warmup)
                free()
            return sweep

        save("rank_sweep", "rank sweep", rank_sweep)

    if "tokens" in sections:
        def token_sweep() -> dict:
            sweep = {"batch": batch, "rank": rank}
            for lat in (8, 16) if smoke else (64, 96, 128):  # 512, 768, 1024 px
                point = compare({m: trainer(m, rank, batch, lat, text, smoke) for m in ("floor", "serial", "peft")},
                                iters, warmup)
                point["image_tokens"] = (lat // 2) ** 2
                point["ratios"] = training_ratios(point)
                sweep[str(lat * 8)] = point
                free()
            return sweep

        save("token_sweep", "token sweep", token_sweep)

if __name__ == "__main__":
    main()
