"""Writes a tiny SD3 checkpoint that ComfyUI's "Load Checkpoint" (CheckpointLoaderSimple) loads.

Run in a subprocess (ComfyUI puts generic module names on sys.path):
    python comfyui_tiny_checkpoint.py COMFYUI_DIR DIFFUSERS_TRANSFORMER.safetensors OUT.safetensors

- model: the diffusers-format tiny SD3 transformer, converted to ComfyUI's MMDiT names by ComfyUI
  itself (`comfy.sd.load_diffusion_model_state_dict`), under `model.diffusion_model.`;
- VAE: a TAESD (ComfyUI's tiny autoencoder, 16 latent channels) with seeded random weights, under
  `first_stage_model.`;
- text encoder: none of CLIP-L/CLIP-G/T5 (their fixed sizes are hundreds of MB); one placeholder key
  under `text_encoders.` makes ComfyUI build its SD3 text encoder with no encoders, whose output is
  zeros of SD3's shapes (77 x 4096 tokens, 2048 pooled). The transformer is built for those widths.
"""

import sys

comfy_dir, transformer_path, out_path = sys.argv[1:4]
sys.path.insert(0, comfy_dir)

from comfy.cli_args import args  # noqa: E402

args.cpu = True

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import comfy.sd  # noqa: E402
import comfy.taesd.taesd  # noqa: E402

patcher = comfy.sd.load_diffusion_model_state_dict(load_file(transformer_path))
tensors = {f"model.{k}": v.detach().float().contiguous() for k, v in patcher.model.state_dict().items()
           if k.startswith("diffusion_model.")}
taesd = comfy.taesd.taesd.TAESD(latent_channels=16)
generator = torch.Generator().manual_seed(0)
for name, value in taesd.state_dict().items():
    # ComfyUI's layers skip weight initialisation: give every tensor seeded values.
    filled = torch.ones_like(value) if name == "vae_scale" else torch.randn(value.shape, generator=generator) * 0.05
    tensors[f"first_stage_model.{name}"] = filled.contiguous()
tensors["text_encoders.placeholder"] = torch.zeros(1)
save_file(tensors, out_path)
print(f"wrote {out_path}: {len(tensors)} tensors")
