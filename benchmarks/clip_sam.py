"""The paper's CLIP and SAM systems (transformers, random weights): a training step of Serial LoRA next to the frozen
floor and PEFT LoRA, in one run, with peak memory.

- clip: `CLIPModel` ViT-B/16 (vision 768 x 12, text 512 x 12), BOTH towers adapted, batch 256 image/caption pairs
  (77 tokens), CLIP's contrastive loss on `logits_per_image`, rank 32;
- sam: `SamModel` ViT-B (1024 px, windowed + global attention), image encoder adapted, prompt encoder and mask
  decoder frozen, batch 4 with one box prompt each, Dice + BCE (`serial_lora_train.sam`), rank 32.

Variants (fp32 weights, bf16 autocast, AdamW on the trainable parameters), as benchmarks/vit.py:
- floor: frozen model, backward to its inputs (image pixels; the text tower's token embeddings);
- floor_blocks: backward to the first block's input only (patch-embedding outputs as leaves);
- serial: Serial LoRA through `transformers_plugin.inject` (one pair per attention per tower);
- peft: PEFT LoRA (`inject_adapter_in_model`) on q, k, v, o of the same attention (SAM: fused qkv and proj).

    python benchmarks/clip_sam.py --out OUT [--smoke] [--sections clip,sam]
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from common import device, environment, record, section_args, training_comparison
from peft import LoraConfig, inject_adapter_in_model
from transformers import CLIPConfig, CLIPModel, SamConfig, SamModel

import transformers_plugin as tp
from serial_lora_core import SerialLoraConfig
from serial_lora_train.sam import dice_bce_loss, mask_logits

CLIP_PEFT_TARGETS = r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)$"
SAM_PEFT_TARGETS = r".*vision_encoder\.layers\.\d+\.attn\.(qkv|proj)$"
CLIP_SMOKE = dict(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2),
                  vision_config=dict(hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=32, patch_size=8), projection_dim=16)
SAM_SMOKE = dict(vision_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=64, patch_size=8, window_size=4, global_attn_indexes=(1,), mlp_dim=37,
                                    num_pos_feats=8),
                 prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
                 mask_decoder_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32,
                                          iou_head_hidden_dim=16))


def adapt(model: torch.nn.Module, mode: str, rank: int, peft_targets: str, leaves: list[torch.nn.Module]) -> None:
    """Freeze `model` and add `mode`'s adapters; for floor_blocks, make the outputs of `leaves` gradient leaves."""
    model.requires_grad_(False)
    if mode == "serial":
        tp.inject(model, SerialLoraConfig(rank=rank))
    elif mode == "peft":
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=peft_targets), model)
    elif mode == "floor_blocks":
        for leaf in leaves:
            leaf.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))


def optimizer_step(model: torch.nn.Module, loss_of: "callable", inputs: list[torch.Tensor]):
    """The step: bf16-autocast forward, backward, AdamW on the trainable parameters (none for the floors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        with torch.autocast(device().type, dtype=torch.bfloat16):
            loss = loss_of()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        for x in inputs:
            x.grad = None

    return step


def clip_trainer(mode: str, rank: int, batch: int, smoke: bool, info: dict):
    def make():
        torch.manual_seed(0)
        config = CLIPConfig(**CLIP_SMOKE) if smoke else CLIPConfig(vision_config=dict(patch_size=16, image_size=224))
        model = CLIPModel(config)
        text_embeddings = model.text_model.embeddings
        adapt(model, mode, rank, CLIP_PEFT_TARGETS, [model.vision_model.embeddings, text_embeddings])
        if mode == "floor":  # token ids carry no gradient: the text tower's floor starts at its embeddings
            text_embeddings.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))
        info[mode] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        model.to(device())
        size, length = config.vision_config.image_size, min(77, config.text_config.max_position_embeddings)
        pixels = torch.randn(batch, 3, size, size, device=device(), requires_grad=(mode == "floor"))
        ids = torch.randint(0, config.text_config.vocab_size, (batch, length), device=device())
        labels = torch.arange(batch, device=device())

        def loss():
            logits = model(pixel_values=pixels, input_ids=ids).logits_per_image.float()
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

        return optimizer_step(model, loss, [pixels])

    return make


def sam_trainer(mode: str, rank: int, batch: int, smoke: bool, info: dict):
    def make():
        torch.manual_seed(0)
        model = SamModel(SamConfig(**SAM_SMOKE) if smoke else SamConfig())  # SamConfig(): SAM ViT-B, 1024 px
        adapt(model, mode, rank, SAM_PEFT_TARGETS, [model.vision_encoder.patch_embed])
        info[mode] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        model.to(device())
        size = model.config.vision_config.image_size
        pixels = torch.randn(batch, 3, size, size, device=device(), requires_grad=(mode == "floor"))
        boxes = torch.tensor([[[0.1, 0.2, 0.6, 0.7]]], device=device()).repeat(batch, 1, 1) * size
        target = torch.zeros(batch, size, size, device=device())
        target[:, size // 5: size * 7 // 10, size // 10: size * 6 // 10] = 1
        return optimizer_step(model, lambda: dice_bce_loss(mask_logits(model, pixels, boxes), target), [pixels])

    return make


def main() -> None:
    args, sections, iters, warmup = section_args("clip_sam", "tiny models, few iterations (CPU check)", __doc__, sections="clip,sam")
    smoke = args.smoke
    rank = 4 if smoke else 32
    clip_batch, sam_batch = (4, 2) if smoke else (256, 4)
    results = {"env": environment(), "rank": rank, "clip_batch": clip_batch, "sam_batch": sam_batch,
               "clip_peft_target_modules": CLIP_PEFT_TARGETS, "sam_peft_target_modules": SAM_PEFT_TARGETS,
               "iters": iters, "warmup": warmup}
    if "clip" in sections:
        record(results, "clip", "clip ViT-B/16 both towers: train", lambda: training_comparison(
            lambda m, info: clip_trainer(m, rank, clip_batch, smoke, info), iters, warmup), args.name, args.out)
    if "sam" in sections:
        record(results, "sam", "sam ViT-B image encoder: train", lambda: training_comparison(
            lambda m, info: sam_trainer(m, rank, sam_batch, smoke, info), iters, warmup), args.name, args.out)


if __name__ == "__main__":
    main()
