"""Tiny Hugging Face CLIP / SAM and open_clip models built in code (random weights, milliseconds), and the
Serial LoRA hand formula the tests compare against.

The CLIP towers get different widths (text 32, vision 48) so a mix-up between them shows as a shape error.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    SamConfig,
    SamMaskDecoderConfig,
    SamModel,
    SamPromptEncoderConfig,
    SamVisionConfig,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from timm_models import randomize_adapters  # noqa: F401  (one helper for every test module)

TEXT_WIDTH, VISION_WIDTH, LAYERS = 32, 48, 2
CLIP_IMAGE = 32
SAM_IMAGE = 64


def clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer built in memory (no merges: one token per byte, word ends marked "</w>")."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=40)


def clip_config() -> CLIPConfig:
    eos = 513
    text = dict(vocab_size=514, hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=LAYERS,
                num_attention_heads=2, max_position_embeddings=40, bos_token_id=512, eos_token_id=eos, pad_token_id=eos)
    vision = dict(hidden_size=VISION_WIDTH, intermediate_size=37, num_hidden_layers=LAYERS, num_attention_heads=2,
                  image_size=CLIP_IMAGE, patch_size=8)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def tiny_clip(cls: type = CLIPModel, seed: int = 0) -> nn.Module:
    """`cls` (CLIPModel or a standalone tower class) of the tiny config, seeded, in eval mode."""
    config = clip_config()
    if "Vision" in cls.__name__:
        config = config.vision_config
    elif "Text" in cls.__name__:
        config = config.text_config
    torch.manual_seed(seed)
    return cls(config).eval()


def save_tiny_clip_folder(folder: Path, seed: int = 0) -> Path:
    """A local `from_pretrained` folder: tiny CLIPModel + tokenizer + image processor."""
    tiny_clip(seed=seed).save_pretrained(folder)
    clip_tokenizer().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": CLIP_IMAGE}, crop_size={"height": CLIP_IMAGE, "width": CLIP_IMAGE}
                       ).save_pretrained(folder)
    return folder


def sam_config() -> SamConfig:
    vision = SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=LAYERS, num_attention_heads=2,
                             image_size=SAM_IMAGE, patch_size=8, window_size=4, global_attn_indexes=(1,), mlp_dim=37,
                             num_pos_feats=8)
    prompt = SamPromptEncoderConfig(hidden_size=16, image_size=SAM_IMAGE, patch_size=8, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32,
                                   iou_head_hidden_dim=16)
    return SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                     mask_decoder_config=decoder.to_dict())


def tiny_sam(seed: int = 0) -> SamModel:
    """A tiny SamModel with variance-preserving init (std 1/sqrt(fan_in)): with transformers' (std 0.02) a random tiny SAM's masks
    are ~1e-6 and its gradients vanish, so a few training steps could not show anything."""
    torch.manual_seed(seed)
    model = SamModel(sam_config())
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            fan_in = module.weight[0].numel() if not isinstance(module, nn.ConvTranspose2d) else module.weight[:, 0].numel()
            nn.init.normal_(module.weight, std=fan_in ** -0.5)
    return model.eval()


def tiny_open_clip(seed: int = 0) -> nn.Module:
    """open_clip's own `CLIP` class with tiny towers (vision 32 wide, text 24 wide)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=LAYERS, width=32, head_width=16, image_size=CLIP_IMAGE, patch_size=8)
    text = CLIPTextCfg(context_length=8, vocab_size=50, width=24, heads=2, layers=LAYERS)
    return CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()


def hand_adapted(x: torch.Tensor, adapter: nn.Module, scaling: float) -> torch.Tensor:
    """(I + s·B A) x written out: x + s·(x Aᵀ) Bᵀ, from the adapter's two weight matrices."""
    return x + scaling * (x @ adapter.down.weight.T) @ adapter.up.weight.T
